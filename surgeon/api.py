"""The typed Python API that the CLI mirrors. Each function is one CLI command's work.

    import surgeon
    lm = surgeon.load("smollm2-135m")
    cap = surgeon.capture(lm)
    sites = surgeon.inspect(cap)            # list[Site]
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from surgeon.capture import Captured, Site
from surgeon.capture import capture as _capture
from surgeon.models import DEFAULT_MODEL, LoadedModel
from surgeon.models import load as _load


def load(model: str = DEFAULT_MODEL) -> LoadedModel:
    """Load MODEL: an alias (smollm2-135m, minilm-l6, vit-tiny), a Hugging Face folder, a .gguf file,
    timm:NAME or package.module:factory."""
    return _load(model)


def capture(model: LoadedModel | str = DEFAULT_MODEL) -> Captured:
    """torch.export the model (dynamic batch/sequence) and find its attention sites."""
    lm = _load(model) if isinstance(model, str) else model
    return _capture(lm)


def inspect(model: LoadedModel | Captured | str = DEFAULT_MODEL) -> list[Site]:
    """The attention sites of MODEL."""
    cap = model if isinstance(model, Captured) else capture(model)
    return list(cap.sites)


def variants() -> list[dict[str, Any]]:
    """Registered variants with parameters, defaults, fast paths and exports."""
    from surgeon.variants.registry import all_variants

    return [v.info() for v in all_variants()]
