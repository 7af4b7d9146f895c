"""``local_boost``: LocoRE local-coherence reinforcement (methods.md §10) — [PROPOSED] form.

The official code does not contain LocoRE; this is methods.md's proposed formula. Definition
(probability space), for each boosted head h and query at position t:

    a'[t, j] = a[t, j] · (1 + γ_j),   γ_j = γ · λ^(t−1−j)   for j in W_t, else γ_j = 0
    a'[t, :] /= Σ_j a'[t, j]

with the window ``W_t = {j : t − w ≤ j ≤ t − 1, j ≥ first_key}``. The diagonal (j = t, the query's
own key) is NOT in the window: the spec boosts the most recent *previous* tokens. ``first_key``
excludes a prefix (system prompt / image tokens) so only generated/output tokens are boosted;
positions are key positions as passed (left padding keys are masked anyway). Rows with no
allowed key stay 0.

Equivalent logit form (exact): add ``ln(1 + γ_j)`` to those logits before the softmax. That is
:meth:`LocalBoost.fused_hooks` and the fused path: SDPA with a float bias, built chunk by chunk
over queries (keys past the chunk are skipped for causal sites), for the boosted heads only;
the other heads run plain SDPA.

Defaults [PROPOSED]: γ = 0.5, w = 5, λ = 1 (no decay); tune γ ∈ {0.2, 0.5, 1.0}.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from surgeon.attention.base import AttnContext, VariantParams
from surgeon.attention.modulation import (
    Hooks,
    ModulatedVariant,
    BiasChunk,
    biased_sdpa_rows,
    check_index_tuple,
    check_int,
    check_strength,
    expect_params,
    normalise_fields,
    patch_heads,
    site_heads,
    site_index,
)

NAME = "local_boost"


@dataclass(frozen=True)
class LocalBoostParams(VariantParams):
    """``gamma`` in [0, 10]; ``window`` ≥ 1 previous keys; ``decay`` λ in [0, 1];
    ``heads`` (empty: all); ``first_key``: keys before it are never boosted."""

    gamma: float = 0.5
    window: int = 5
    decay: float = 1.0
    heads: tuple[int, ...] = ()
    first_key: int = 0

    def __post_init__(self) -> None:
        normalise_fields(self, ("heads",))
        check_strength(NAME, "gamma", self.gamma, 0.0, 10.0)
        check_int(NAME, "window", self.window, 1)
        check_strength(NAME, "decay", self.decay, 0.0, 1.0)
        check_index_tuple(NAME, "heads", self.heads)
        check_int(NAME, "first_key", self.first_key, 0)


def window_gain(p: LocalBoostParams, qpos: torch.Tensor, kpos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """γ_j / γ for queries at qpos [R] and keys at kpos [K]: [R, K], 0 outside the window."""
    d = qpos[:, None] - kpos[None, :]
    inside = (d >= 1) & (d <= p.window) & (kpos[None, :] >= p.first_key)
    lam = torch.tensor(float(p.decay), dtype=dtype, device=qpos.device)
    g = torch.pow(lam, (d - 1).clamp(min=0).to(dtype))
    return torch.where(inside, g, torch.zeros((), dtype=dtype, device=qpos.device))


def add_band(p: LocalBoostParams, qpos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Add the logit bias ln(1 + γ λ^(t−1−j)) on the window to ``mask`` [..., R, K] in place, for
    queries at qpos [R] and keys 0..K−1; touches only the R·w band entries. Returns ``mask``."""
    r, nkeys = mask.shape[-2], mask.shape[-1]
    d = torch.arange(1, p.window + 1, device=qpos.device)
    cols = qpos[:, None] - d[None, :]
    rows = torch.arange(r, device=qpos.device)[:, None].expand(r, p.window)
    lam = torch.tensor(float(p.decay), dtype=mask.dtype, device=qpos.device)
    vals = torch.log1p(float(p.gamma) * torch.pow(lam, (d - 1).to(mask.dtype))).expand(r, p.window)
    ok = (cols >= p.first_key) & (cols >= 0) & (cols < nkeys)
    mask[..., rows[ok], cols[ok]] += vals[ok]
    return mask


def head_gammas(p: LocalBoostParams, hq: int) -> list[float]:
    """γ for every query head (0 for heads not boosted): length ``hq``."""
    heads = set(p.heads) if p.heads else set(range(hq))
    return [float(p.gamma) if h in heads else 0.0 for h in range(hq)]


class LocalBoost(ModulatedVariant):
    name = NAME
    lowering_module = "surgeon.attention.local_boost.lowering"
    Params = LocalBoostParams
    description = ("LocoRE [PROPOSED]: boost the w most recent keys by (1+gamma) and renormalise "
                   "(fused: SDPA + ln(1+gamma) bias)")

    def check_site(self, q, k, ctx: AttnContext, p: VariantParams) -> None:
        p = expect_params(NAME, p, LocalBoostParams)
        site_heads(NAME, "heads", p.heads, q.shape[1], ctx)
        site_index(NAME, "first_key", p.first_key, k.shape[2])

    def _gains(self, p: LocalBoostParams, hq: int, nq: int, nk: int, device, dtype) -> torch.Tensor:
        """γ_{h,j} for every head and pair: [1, Hq, Nq, Nk]."""
        qpos = torch.arange(nk - nq, nk, device=device)
        g = window_gain(p, qpos, torch.arange(nk, device=device), dtype)
        gh = torch.tensor(head_gammas(p, hq), device=device, dtype=dtype)
        return gh[None, :, None, None] * g[None, None]

    def make_hooks(self, q, k, v, ctx: AttnContext, p: VariantParams) -> Hooks:
        p = expect_params(NAME, p, LocalBoostParams)
        hq = q.shape[1]

        def prob_fn(a: torch.Tensor) -> torch.Tensor:
            g = self._gains(p, hq, a.shape[-2], a.shape[-1], a.device, a.dtype)
            b = a * (1.0 + g)
            s = b.sum(dim=-1, keepdim=True)
            return b / torch.where(s > 0, s, torch.ones_like(s))

        return {"prob_fn": prob_fn}

    def fused_hooks(self, q, k, v, ctx: AttnContext, p: VariantParams) -> Hooks:
        """The logit form: ``z + ln(1 + γ_j)`` on the window (equal to :meth:`hooks`)."""
        self.check_site(q, k, ctx, p)
        p = expect_params(NAME, p, LocalBoostParams)
        hq = q.shape[1]

        def logit_fn(z: torch.Tensor) -> torch.Tensor:
            return z + torch.log1p(self._gains(p, hq, z.shape[-2], z.shape[-1], z.device, z.dtype))

        return {"logit_fn": logit_fn}

    def fused(self, q, k, v, ctx: AttnContext, p: VariantParams) -> torch.Tensor:
        p = expect_params(NAME, p, LocalBoostParams)
        heads = [h for h, g in enumerate(head_gammas(p, q.shape[1])) if g > 0.0]

        def bias_fn(chunk: BiasChunk, mask: torch.Tensor) -> torch.Tensor:
            return add_band(p, chunk.qpos, mask)

        return patch_heads(q, k, v, ctx, heads, 0, lambda idx: biased_sdpa_rows(q, k, v, ctx, idx, bias_fn))

    def degenerate_params(self, n: int) -> VariantParams:
        return LocalBoostParams(gamma=0.0)

    def example_params(self, n: int, hq: int) -> VariantParams:
        return LocalBoostParams(gamma=1.0, window=5, decay=0.8, heads=(1, 2, hq - 1))

    def small_example_params(self, hq: int) -> VariantParams:
        """Non-trivial parameters at 24–32 tokens (small blocks / visible edits; the ONNX
        modulated × sparse matrix)."""
        return self.params_from({"gamma": 3.0, "window": 3, "decay": 0.5, "heads": [1, 2, 5], "first_key": 2})
