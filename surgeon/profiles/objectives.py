"""Example objectives for ``surgeon tune --objective module:function`` (all to MINIMISE).

The objective contract (see :mod:`surgeon.profiles.tune`)::

    def objective(output: torch.Tensor, input_ids: torch.Tensor[, dense: torch.Tensor]) -> float

* ``output``: the (modulated) model's output for ONE calibration row: causal LMs give logits
  [1, N, V] (float32), encoders the last hidden states [1, N, C], vision models [1, T, C];
* ``input_ids``: that row's token ids [1, N] (long; for vision models the pixel values
  [1, 3, H, W]);
* ``dense`` (optional — passed only when the function has a parameter named ``dense``): the
  unmodified model's output for the same row, same shape as ``output``;
* returns a finite real number; lower is better. ``surgeon tune`` averages it over the
  calibration rows and minimises the mean. It is called under ``torch.no_grad()``.

A function that returns something else (a string, a tensor with several elements, NaN) or
raises is a :class:`~surgeon.errors.BadInput` (exit 2), and nothing is written.
"""
from __future__ import annotations

import torch

from surgeon.errors import BadInput
from surgeon.evaluate import next_token_ce

# PAG guidance weight of :func:`guided_ce` (HeadHunter's main table uses w = 3.0, methods.md §9)
GUIDANCE_W = 3.0


def _check_logits(logits: torch.Tensor, input_ids: torch.Tensor, name: str) -> None:
    if (not isinstance(logits, torch.Tensor) or not isinstance(input_ids, torch.Tensor) or logits.dim() != 3
            or input_ids.dim() != 2 or tuple(logits.shape[:2]) != tuple(input_ids.shape)
            or input_ids.dtype not in (torch.int64, torch.int32)):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise BadInput(f"objective {name} needs causal-LM logits [B, N, V] and token ids [B, N], got output {got}",
                       "use it with a causal language model, or give --objective module:function for this model")
    if input_ids.numel() and int(input_ids.max()) >= logits.shape[-1]:
        raise BadInput(f"objective {name}: token id {int(input_ids.max())} is beyond the output's "
                       f"{logits.shape[-1]} columns (the output is not a vocabulary distribution)",
                       "use it with a causal language model, or give --objective module:function for this model")


def calibration_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Next-token cross-entropy of the calibration text (the default objective; perplexity = exp).

    logits [B, N, V], input_ids [B, N]. For identity_blend's HeadHunter search this picks the
    heads whose SoftPAG perturbation costs the least cross-entropy."""
    _check_logits(logits, input_ids, "calibration_ce")
    return next_token_ce(logits, input_ids)


def guided_ce(logits: torch.Tensor, input_ids: torch.Tensor, dense: torch.Tensor) -> float:
    """[PROPOSED] cross-entropy of PAG-guided logits ``(1 + w)·dense − w·perturbed`` (w = GUIDANCE_W).

    methods.md §9 guides a sampler with ε̂ = (1 + w)·ε − w·ε_perturbed; for a language model the
    same extrapolation of logits away from the perturbed (identity-blended) model scores how
    useful the perturbed heads are as a guidance branch: HeadHunter's objective for LMs.
    logits, dense [B, N, V]; input_ids [B, N]."""
    _check_logits(logits, input_ids, "guided_ce")
    if not isinstance(dense, torch.Tensor) or dense.shape != logits.shape:
        raise BadInput("objective guided_ce needs the dense logits of the same shape", "call it through surgeon tune")
    guided = (1.0 + GUIDANCE_W) * dense.float() - GUIDANCE_W * logits.float()
    return next_token_ce(guided, input_ids)
