"""surgeon: a model-surgery compiler for attention.

The public API (``surgeon.load``, ``surgeon.capture``, ``surgeon.inspect``, ``surgeon.variants``,
``surgeon.profile``, ``surgeon.plan``, ``surgeon.rewrite``, ``surgeon.load_rewritten``,
``surgeon.evaluate``, ``surgeon.tune``, ``surgeon.export``, ``surgeon.build``, ``surgeon.bench``,
``surgeon.apply``, ``surgeon.generate``) is imported lazily so ``import surgeon`` does no work.
:data:`_API` is the one list of these names (name → the module that defines it; ``build`` sits
above the API, in the build-stages module); ``dir(surgeon)`` shows exactly them.

Two submodules share a name with an API function (``surgeon/capture.py``,
``surgeon/evaluate.py``); importing a submodule normally binds it on its package, which would
replace ``surgeon.capture`` the function by the module as soon as ``surgeon.api`` loads. The
package's module class keeps API names bound to the API (a submodule stays reachable through
``from surgeon.capture import ...`` and ``sys.modules``), so ``surgeon.capture`` and
``surgeon.evaluate`` stay the functions after any import.
"""
import importlib as _importlib
import sys as _sys
import types as _types
import typing as _typing

__version__ = "0.1.0"

_API: dict[str, str] = {
    "load": "surgeon.api",
    "capture": "surgeon.api",
    "inspect": "surgeon.api",
    "variants": "surgeon.api",
    "profile": "surgeon.api",
    "plan": "surgeon.planning",
    "rewrite": "surgeon.api",
    "load_rewritten": "surgeon.api",
    "evaluate": "surgeon.api",
    "tune": "surgeon.api",
    "export": "surgeon.api",
    "build": "surgeon.build_stages",
    "bench": "surgeon.api",
    "apply": "surgeon.api",
    "generate": "surgeon.api",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> _typing.Any:
    mod = _API.get(name)
    if mod is not None:
        return getattr(_importlib.import_module(mod), name)
    raise AttributeError(f"module 'surgeon' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(_API) + ["__version__"]


class _Package(_types.ModuleType):
    def __setattr__(self, name: str, value: _typing.Any) -> None:
        if name in _API and isinstance(value, _types.ModuleType):
            return  # the import system binding surgeon/capture.py over surgeon.capture
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
