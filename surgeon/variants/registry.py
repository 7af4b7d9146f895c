"""The variant registry: one line per variant (registry key → ``module:Class``)."""
from __future__ import annotations

import functools
import importlib

from surgeon.errors import BadInput
from surgeon.variants.base import Variant

VARIANTS: dict[str, str] = {
    "dense": "surgeon.variants.dense:Dense",
    "temperature": "surgeon.variants.temperature:Temperature",
    "head_boost": "surgeon.variants.head_boost:HeadBoost",
    "sink_redistribute": "surgeon.variants.sink_redistribute:SinkRedistribute",
    "identity_blend": "surgeon.variants.identity_blend:IdentityBlend",
    "local_boost": "surgeon.variants.local_boost:LocalBoost",
    "block_topk": "surgeon.variants.block_topk:BlockTopK",
    "reuse": "surgeon.variants.reuse:Reuse",
    "window_sink": "surgeon.variants.window_sink:WindowSink",
    "delta": "surgeon.variants.delta:Delta",
    "delta_sparse": "surgeon.variants.delta:DeltaSparse",
    "token_topk": "surgeon.variants.token_topk:TokenTopK",
    "dhsa": "surgeon.variants.dhsa:DHSA",
    "pyramid": "surgeon.variants.pyramid:Pyramid",
    "knn": "surgeon.variants.knn:KNN",
    "routing": "surgeon.variants.routing:Routing",
}


@functools.lru_cache(maxsize=None)
def get_variant(name: str) -> Variant:
    """The singleton :class:`Variant` registered under ``name``."""
    if name not in VARIANTS:
        raise BadInput(f"unknown variant '{name}'", f"valid variants: {', '.join(sorted(VARIANTS))}")
    mod, cls = VARIANTS[name].split(":")
    return getattr(importlib.import_module(mod), cls)()


def all_variants() -> list[Variant]:
    return [get_variant(n) for n in sorted(VARIANTS)]
