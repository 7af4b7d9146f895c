"""The variant registry: one line per variant (registry key → ``module:Class``)."""
from __future__ import annotations

import functools
import importlib

from surgeon.errors import BadInput
from surgeon.attention.base import Variant

VARIANTS: dict[str, str] = {
    "dense": "surgeon.attention.dense:Dense",
    "temperature": "surgeon.attention.temperature:Temperature",
    "head_boost": "surgeon.attention.head_boost:HeadBoost",
    "sink_redistribute": "surgeon.attention.sink_redistribute:SinkRedistribute",
    "identity_blend": "surgeon.attention.identity_blend:IdentityBlend",
    "local_boost": "surgeon.attention.local_boost:LocalBoost",
    "block_topk": "surgeon.attention.block_topk:BlockTopK",
    "reuse": "surgeon.attention.reuse:Reuse",
    "window_sink": "surgeon.attention.window_sink:WindowSink",
    "delta": "surgeon.attention.delta:Delta",
    "delta_sparse": "surgeon.attention.delta:DeltaSparse",
    "token_topk": "surgeon.attention.token_topk:TokenTopK",
    "dhsa": "surgeon.attention.dhsa:DHSA",
    "pyramid": "surgeon.attention.pyramid:Pyramid",
    "knn": "surgeon.attention.knn:KNN",
    "routing": "surgeon.attention.routing:Routing",
    "block_topp": "surgeon.attention.block_topp:BlockTopP",
    "head_hybrid": "surgeon.attention.head_hybrid:HeadHybrid",
    "token_topp": "surgeon.attention.token_topp:TokenTopP",
    "vertical_slash": "surgeon.attention.vertical_slash:VerticalSlash",
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
