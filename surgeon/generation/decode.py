"""Decode modes: what a site runs for one new query (``q_len == 1``) against its KV cache.

A mode gets q [B, Hq, 1, D], the cache k/v [B, Hkv, Nk, D] (transformers' cache, unrepeated; the
query sits at the last position) and the key padding [B, Nk] bool (None: none) and returns
[B, Hq, 1, Dv].

* ``dense`` (default): exact attention over the whole cache — the same SDPA call transformers
  makes, so an identity policy generates exactly what the original model generates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F

from surgeon.errors import BadInput


def dense_over_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: Optional[torch.Tensor],
                     scale: float) -> torch.Tensor:
    """Exact attention of the last-position queries over every real cached key."""
    gqa = q.shape[1] != k.shape[1]
    if kp is None or bool(kp.all()):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    mask = kp.to(torch.bool)[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    row_ok = mask.any(dim=-1, keepdim=True)
    return torch.where(row_ok, out, torch.zeros((), dtype=out.dtype, device=out.device))


class DecodeMode:
    """Base class: ``name`` and ``run(plan, q, k, v, kp)``."""

    name: ClassVar[str] = ""

    def run(self, plan: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            kp: Optional[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"mode": self.name}


@dataclass
class DenseDecode(DecodeMode):
    name: ClassVar[str] = "dense"

    def run(self, plan, q, k, v, kp):
        return dense_over_cache(q, k, v, kp, float(plan.site.scale))


DECODE_MODES: dict[str, type] = {"dense": DenseDecode}


def decode_mode_for(choice: Any, site: Any) -> DecodeMode:
    """The decode mode a site's choice names (``choice.decode``; default dense)."""
    spec = getattr(choice, "decode", None)
    if spec is None:
        return DenseDecode()
    mode = spec.mode if hasattr(spec, "mode") else spec.get("mode", "dense")
    params = dict(spec.params if hasattr(spec, "params") else spec.get("params", {}) or {})
    if mode not in DECODE_MODES:
        raise BadInput(f"site {site.name}: unknown decode mode '{mode}'",
                       f"valid decode modes: {', '.join(sorted(DECODE_MODES))}")
    cls = DECODE_MODES[mode]
    return cls.from_params(params, site) if hasattr(cls, "from_params") else cls()
