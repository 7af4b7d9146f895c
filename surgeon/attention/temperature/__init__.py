"""``temperature``: SSA position-dependent temperature (methods.md §7), training-free form.

Definition (logit space): row i of the scaled logits is multiplied by ``1 + σ·ln(i)``, i the
1-based query position, so later queries get sharper softmaxes:

    z'[b, h, r, :] = z[b, h, r, :] · (1 + σ · ln i(b, r))

σ is given directly or as SSA's ``β`` (σ = exp(−exp(β))). [PROPOSED] The training-free use
(σ chosen per layer by grid search, σ ∈ {0, 0.01, 0.02, 0.05}) is methods.md's proposal, not the
paper's method (which learns β while fine-tuning).

Position convention (a choice of ours): i counts the real tokens up to and including the query
(``cumsum(key_padding)``), so a left-padded sequence gets the same temperatures as the unpadded
one; i is clamped to ≥ 1 (padded query rows get factor 1). Without ``key_padding`` i is the
tensor position + 1. Non-causal sites use the same positions. A float ``attn_mask`` is part of
z and is scaled with it.

Fused path: pre-scale the query rows (and a float mask) by the factor and call SDPA.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from surgeon.errors import BadInput
from surgeon.attention.base import AttnContext, VariantParams, additive_mask
from surgeon.attention.modulation import Hooks, ModulatedVariant, check_strength, dense_sdpa, expect_params

NAME = "temperature"
DEFAULT_SIGMA = 0.02  # [PROPOSED] the middle of methods.md's calibration grid; the planner picks per layer


@dataclass(frozen=True)
class TemperatureParams(VariantParams):
    """``sigma`` in [0, 1] (None: ``beta`` if given, else 0.02) or ``beta`` in [−30, 30] with
    σ = exp(−exp(β)); give at most one of them."""

    sigma: Optional[float] = None
    beta: Optional[float] = None

    def __post_init__(self) -> None:
        if self.sigma is not None and self.beta is not None:
            raise BadInput(f"{NAME}: both sigma={self.sigma} and beta={self.beta} given",
                           "give sigma or beta (sigma = exp(-exp(beta))), not both")
        if self.sigma is not None:
            check_strength(NAME, "sigma", self.sigma, 0.0, 1.0)
        if self.beta is not None:
            check_strength(NAME, "beta", self.beta, -30.0, 30.0)

    @property
    def effective_sigma(self) -> float:
        if self.sigma is not None:
            return float(self.sigma)
        if self.beta is not None:
            return math.exp(-math.exp(float(self.beta)))
        return DEFAULT_SIGMA


def position_factor(sigma: float, nq: int, nk: int, key_padding: Optional[torch.Tensor],
                    device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Per-row logit multiplier ``1 + σ ln i``: [B|1, 1, Nq, 1] (see the module docstring)."""
    if key_padding is None:
        i = torch.arange(nk - nq + 1, nk + 1, device=device, dtype=dtype)[None]
    else:
        if key_padding.shape[-1] != nk:
            raise BadInput(f"{NAME}: key_padding covers {key_padding.shape[-1]} keys but the scores have {nk}",
                           "pass key_padding of shape [B, Nk]")
        i = key_padding.to(torch.long).cumsum(-1)[:, nk - nq:].clamp(min=1).to(dtype)
    return (1.0 + sigma * torch.log(i))[:, None, :, None]


class Temperature(ModulatedVariant):
    name = NAME
    lowering_module = "surgeon.attention.temperature.lowering"
    Params = TemperatureParams
    description = "SSA position temperature: logits of query i scaled by 1 + sigma*ln(i) (fused: scaled Q + SDPA)"

    def check_site(self, q, k, ctx: AttnContext, p: VariantParams) -> None:
        kp = ctx.key_padding
        if kp is not None and kp.shape[-1] != k.shape[2]:
            raise BadInput(f"{NAME}: key_padding covers {kp.shape[-1]} keys but K has {k.shape[2]}",
                           "pass key_padding of shape [B, Nk]")

    def make_hooks(self, q, k, v, ctx: AttnContext, p: VariantParams) -> Hooks:
        sigma = expect_params(NAME, p, TemperatureParams).effective_sigma
        kp = ctx.key_padding

        def logit_fn(z: torch.Tensor) -> torch.Tensor:
            f = position_factor(sigma, z.shape[-2], z.shape[-1], kp, z.device, z.dtype)
            return z * f

        return {"logit_fn": logit_fn}

    def fused(self, q, k, v, ctx: AttnContext, p: VariantParams) -> torch.Tensor:
        sigma = expect_params(NAME, p, TemperatureParams).effective_sigma
        if sigma == 0.0:
            return dense_sdpa(q, k, v, ctx)
        f = position_factor(sigma, q.shape[2], k.shape[2], ctx.key_padding, q.device, q.dtype)
        add = additive_mask(ctx)
        if add is not None:
            ctx = dataclasses.replace(ctx, attn_mask=add * f)
        return dense_sdpa(q * f, k, v, ctx)

    def degenerate_params(self, n: int) -> VariantParams:
        return TemperatureParams(sigma=0.0)

    def example_params(self, n: int, hq: int) -> VariantParams:
        return TemperatureParams(sigma=0.05)

    def small_example_params(self, hq: int) -> VariantParams:
        """Non-trivial parameters at 24–32 tokens (small blocks / visible edits; the ONNX
        modulated × sparse matrix)."""
        return self.params_from({"sigma": 0.4})
