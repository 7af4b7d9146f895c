"""surgeon: a model-surgery compiler for attention.

The public API (``surgeon.load``, ``surgeon.capture``, ``surgeon.inspect``, ``surgeon.variants``,
``surgeon.profile``, ``surgeon.plan``, ``surgeon.rewrite``, ``surgeon.evaluate``, ``surgeon.export``,
``surgeon.build``, ``surgeon.bench``, ``surgeon.apply``,
``surgeon.generate``) is imported lazily so ``import surgeon`` does no work.

No submodule shares a name with an API function (the implementation lives in
``surgeon.attention``, ``surgeon.exporters``, ``surgeon.build_stages``, ``surgeon.benchmark``), so
``surgeon.export`` stays the function after any import.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {"load", "capture", "inspect", "variants", "profile", "plan", "rewrite", "evaluate", "export", "build", "bench",
        "load_rewritten", "apply", "generate"}
# ``build`` sits above the API (it calls profile/rewrite/export); everything else is in surgeon.api
_HOME = {"build": "surgeon.build_stages"}


def __getattr__(name: str) -> Any:
    if name in _API:
        mod = importlib.import_module(_HOME.get(name, "surgeon.api"))
        if hasattr(mod, name):
            return getattr(mod, name)
    raise AttributeError(f"module 'surgeon' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_API))
