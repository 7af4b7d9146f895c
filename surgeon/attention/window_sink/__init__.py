"""``window_sink``: sliding-window attention plus attention sinks (StreamingLLM-style).

Token-level pattern. Query row i sits at position p = Nk − Nq + i (queries are the last Nq of
the Nk positions). Key j is kept when ``j < sink_tokens`` or
    causal:      p − window < j ≤ p
    non-causal:  |p − j| < window
(padding keys are never attended). ``window ≥ N`` is dense attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from surgeon.kernels.blocksparse_cpu import band_attention
from surgeon.attention.base import (
    AttnContext,
    Variant,
    VariantParams,
    attention_from_keep,
    check_range,
    record_density,
    recorder_active,
)


@dataclass(frozen=True)
class WindowSinkParams(VariantParams):
    """sink_tokens: leading tokens every query keeps; window: tokens in the sliding window
    (the query's own token included)."""

    sink_tokens: int = 4
    window: int = 1024

    def __post_init__(self) -> None:
        check_range("sink_tokens", self.sink_tokens, 0, 1 << 30)
        check_range("window", self.window, 1, 1 << 30)


def window_keep(nq: int, nk: int, causal: bool, p: WindowSinkParams, device: torch.device) -> torch.Tensor:
    """Bool [1, 1, Nq, Nk] token keep mask of the pattern (before dense masking)."""
    pos = torch.arange(nk - nq, nk, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    band = (j > pos - p.window) & ((j <= pos) if causal else (j < pos + p.window))
    return (band | (j < p.sink_tokens))[None, None]


def window_density(nq: int, nk: int, causal: bool, p: WindowSinkParams, key_padding, device: torch.device) -> float:
    """Kept pairs / dense pairs, computed per row from prefix counts (O(B·N), no N×N mask)."""
    kv = (torch.ones(1, nk, dtype=torch.float64, device=device) if key_padding is None
          else key_padding.to(device=device, dtype=torch.float64))
    cum = torch.cat([kv.new_zeros(kv.shape[0], 1), kv.cumsum(dim=1)], dim=1)  # real keys before j

    def count(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:  # real keys in [lo, hi)
        lo = lo.clamp(0, nk)
        hi = torch.maximum(hi.clamp(0, nk), lo)
        return cum[:, hi] - cum[:, lo]

    pos = torch.arange(nk - nq, nk, device=device)
    zero = torch.zeros_like(pos)
    hi = pos + 1 if causal else pos + p.window
    lo = pos - p.window + 1
    band = count(lo, hi)
    sink = count(zero, torch.minimum(torch.full_like(pos, p.sink_tokens), lo.clamp_min(0)))
    # non-causal: sinks after the band's end are also kept
    extra = zero[None].to(torch.float64) if causal else count(hi, torch.full_like(pos, p.sink_tokens))
    dense = count(zero, pos + 1) if causal else count(zero, torch.full_like(pos, nk))
    kept = float((band + sink + extra).sum().item())
    return kept / max(float(dense.sum().item()), 1.0)


class WindowSink(Variant):
    name = "window_sink"
    lowering_module = "surgeon.attention.window_sink.lowering"
    Params = WindowSinkParams
    family = "sparse"
    description = "sliding-window attention plus attention-sink tokens"

    def reference(self, q, k, v, ctx: AttnContext, p: WindowSinkParams, block_mask=None):
        keep = window_keep(q.shape[2], k.shape[2], ctx.causal, p, q.device)
        out = attention_from_keep(q, k, v, ctx, keep)
        self._record(q, k, ctx, p)
        return out

    def _band(self, q, k, v, ctx: AttnContext, p: WindowSinkParams, block_mask=None):
        out = band_attention(q, k, v, sink_tokens=p.sink_tokens, window=p.window, causal=ctx.causal,
                             scale=ctx.scale, key_padding=ctx.key_padding)
        self._record(q, k, ctx, p)
        return out

    def _record(self, q, k, ctx: AttnContext, p: WindowSinkParams) -> None:
        if recorder_active():
            d = window_density(q.shape[2], k.shape[2], ctx.causal, p, ctx.key_padding, q.device)
            record_density(ctx.site, self.name, d, d)

    def fast_paths(self):
        return {"band": self._band}

    def fast_available(self, name: str, q, ctx: AttnContext, p: VariantParams) -> bool:
        return not ctx.modulated and ctx.attn_mask is None

    def keep_mask(self, q, k, v, ctx: AttnContext, p: WindowSinkParams, block_mask=None) -> torch.Tensor:
        b, hq, nq, _ = q.shape
        return window_keep(nq, k.shape[2], ctx.causal, p, q.device).expand(b, hq, nq, k.shape[2])

    def requested_density(self, p: WindowSinkParams) -> float:
        # the pattern fixes token counts, not a fraction; the fraction depends on the length
        return 1.0

    def achieved_density(self, q, k, v, ctx: AttnContext, p: WindowSinkParams, block_mask=None) -> float:
        if ctx.attn_mask is not None:
            return super().achieved_density(q, k, v, ctx, p, block_mask)
        return window_density(q.shape[2], k.shape[2], ctx.causal, p, ctx.key_padding, q.device)

    # -- test-matrix hooks ------------------------------------------------------------
    def degenerate_params(self, n: int) -> WindowSinkParams:
        return WindowSinkParams(sink_tokens=4, window=n)

    def example_params(self, n: int, hq: int) -> WindowSinkParams:
        return WindowSinkParams(sink_tokens=4, window=max(1, n // 4))

    def small_example_params(self, hq: int) -> VariantParams:
        """Non-trivial parameters at 24–32 tokens (small blocks / visible edits; the ONNX
        modulated × sparse matrix)."""
        return self.params_from({"sink_tokens": 2, "window": 6})
