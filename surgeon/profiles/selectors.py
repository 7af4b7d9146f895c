"""Selectors for the modulated variants: which tokens, dimensions and heads to modulate.

Pure functions over tensors the profiler records (no model loading here):

* VAR (methods.md §8): :func:`find_sink_dims` (massive-activation dimensions of the residual
  stream), :func:`sink_phi` / :func:`find_sink_tokens` (RMS-normalised sink score φ > τ),
  :func:`sink_positions` (positions that are sinks across a calibration batch) and
  :func:`var_head_rows` / :func:`var_head_fraction` (VAR's image-centric (head, query) rule).
* PAINT (methods.md §11): :func:`paint_span_mass` (per-head attention mass on the boosted
  spans) and :func:`paint_head_alpha` (the [PROPOSED] head-specific strengths).
* HeadHunter (methods.md §9): :func:`headhunter_greedy` with a user objective, loaded from a
  ``"module:function"`` string by :func:`load_objective`.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Sequence

import torch

from surgeon.errors import BadInput


def _need(t: Any, ndim: int, name: str, shape: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != ndim:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise BadInput(f"{name} must be a {ndim}-d tensor {shape}, got {got}", f"pass {name} shaped {shape}")


# --------------------------------------------------------------------------- VAR: sinks

def find_sink_dims(hidden: torch.Tensor, ratio: float = 100.0, token: int = 0) -> tuple[int, ...]:
    """Massive-activation ("sink") dimensions of residual-stream states.

    hidden [B, N, C] (one layer's input hidden states over a calibration batch). A dimension d is
    a sink dimension when the mean over the batch of ``|hidden[:, token, d]|`` exceeds ``ratio`` ×
    the median of ``|hidden|`` over all entries (methods.md §8: the first token's activation ≫ the
    others, e.g. > 100× the median). ``token`` is the BOS/first real token (0 without left
    padding). Returns the dimensions, largest first.
    """
    _need(hidden, 3, "hidden", "[B, N, C]")
    if not (isinstance(ratio, (int, float)) and ratio > 0 and math.isfinite(ratio)):
        raise BadInput(f"ratio={ratio} must be a positive number", "use e.g. ratio=100")
    if not 0 <= token < hidden.shape[1]:
        raise BadInput(f"token={token} is outside the {hidden.shape[1]}-token sequence",
                       f"use a token index in [0, {hidden.shape[1] - 1}]")
    a = hidden.detach().abs().to(torch.float64)
    med = a.median()
    floor = torch.finfo(torch.float64).tiny
    score = a[:, token, :].mean(dim=0) / torch.clamp(med, min=floor)
    dims = torch.nonzero(score > ratio).flatten()
    order = torch.argsort(score[dims], descending=True, stable=True)
    return tuple(int(d) for d in dims[order].tolist())


def sink_phi(hidden: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """VAR's sink score φ [B, N]: ``max_{d∈dims} |h_t[d] / sqrt(mean_c h_t[c]^2 + 1e-6)|``.

    hidden [B, N, C]; ``dims`` the sink dimensions (from :func:`find_sink_dims`).
    """
    _need(hidden, 3, "hidden", "[B, N, C]")
    c = hidden.shape[-1]
    dims = list(dims)
    if not dims:
        raise BadInput("no sink dimensions given", "find them first with find_sink_dims")
    bad = [d for d in dims if not isinstance(d, int) or not 0 <= d < c]
    if bad:
        raise BadInput(f"sink dimension(s) {bad} outside the hidden size {c}", f"use dimensions in [0, {c - 1}]")
    h = hidden.detach().to(torch.float64)
    rms = torch.sqrt(h.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
    return (h[..., dims] / rms).abs().amax(dim=-1)


def find_sink_tokens(hidden: torch.Tensor, dims: Sequence[int], tau: float = 20.0) -> torch.Tensor:
    """Sink tokens, bool [B, N]: φ(t) > τ (τ = 20 in VAR). hidden [B, N, C]."""
    if not (isinstance(tau, (int, float)) and math.isfinite(tau)):
        raise BadInput(f"tau={tau} is not a finite number", "use e.g. tau=20")
    return sink_phi(hidden, dims) > tau


def sink_positions(is_sink: torch.Tensor, min_frac: float = 0.5) -> tuple[int, ...]:
    """Positions flagged as sinks in at least ``min_frac`` of the batch: is_sink bool [B, N].

    The variant's ``sinks`` parameter is static, so it takes positions that are sinks in most
    calibration inputs (e.g. the BOS token).
    """
    _need(is_sink, 2, "is_sink", "[B, N]")
    if not 0.0 < min_frac <= 1.0:
        raise BadInput(f"min_frac={min_frac} is out of range", "use a value in (0, 1]")
    frac = is_sink.to(torch.float64).mean(dim=0)
    return tuple(int(i) for i in torch.nonzero(frac >= min_frac).flatten().tolist())


def _key_mask(nk: int, idx: Sequence[int], device: torch.device) -> torch.Tensor:
    m = torch.zeros(nk, dtype=torch.bool, device=device)
    for i in idx:
        if not 0 <= i < nk:
            raise BadInput(f"token {i} is outside the {nk}-token sequence", f"use indices in [0, {nk - 1}]")
        m[i] = True
    return m


def _span_mask(nk: int, spans: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    m = torch.zeros(nk, dtype=torch.bool, device=device)
    for s in spans:
        if len(s) != 2 or not 0 <= s[0] < s[1] <= nk:
            raise BadInput(f"span {list(s)} is not inside the {nk}-token sequence", f"use 0 <= start < end <= {nk}")
        m[s[0]:s[1]] = True
    return m


def var_head_rows(probs: torch.Tensor, sinks: Sequence[int], target: tuple[int, int],
                  rho: float = 0.5, summ: float = 0.2) -> torch.Tensor:
    """VAR's image-centric rule per (head, query): bool [B, H, Nq].

    probs [B, H, Nq, Nk] post-softmax attention; a row is selected when the target mass
    ``m = Σ_{j∈target} a_j ≥ summ`` and ``r = Σ_{j∈sinks∩target} a_j / m ≤ rho``.
    """
    _need(probs, 4, "probs", "[B, H, Nq, Nk]")
    nk = probs.shape[-1]
    sink = _key_mask(nk, sinks, probs.device)
    tgt = _span_mask(nk, [tuple(target)], probs.device)
    a = probs.detach().to(torch.float64)
    m = (a * tgt).sum(-1)
    m_vis = (a * (sink & tgt)).sum(-1)
    return (m >= summ) & (m > 0) & (m_vis <= rho * m)


def var_head_fraction(probs: torch.Tensor, sinks: Sequence[int], target: tuple[int, int],
                      rho: float = 0.5, summ: float = 0.2, row_start: int = 0) -> torch.Tensor:
    """Fraction of query rows ≥ ``row_start`` each head selects under :func:`var_head_rows`: [H]."""
    rows = var_head_rows(probs, sinks, target, rho, summ)[:, :, row_start:]
    if rows.shape[-1] == 0:
        raise BadInput(f"row_start={row_start} leaves no query rows of {probs.shape[2]}", "use a smaller row_start")
    return rows.to(torch.float64).mean(dim=(0, 2))


# --------------------------------------------------------------------------- PAINT

def paint_span_mass(probs: torch.Tensor, spans: Sequence[Sequence[int]], last_row_only: bool = True) -> torch.Tensor:
    """Per-head attention mass on the key ``spans``: [H] (mean over batch and rows).

    probs [B, H, Nq, Nk]; with ``last_row_only`` only the last query row counts (PAINT's
    decode-time rows). Stack one layer per row to get the [L, H] input of :func:`paint_head_alpha`.
    """
    _need(probs, 4, "probs", "[B, H, Nq, Nk]")
    m = _span_mask(probs.shape[-1], spans, probs.device)
    a = probs.detach().to(torch.float64)
    if last_row_only:
        a = a[:, :, -1:]
    return (a * m).sum(-1).mean(dim=(0, 2))


def paint_head_alpha(mass_on_span: torch.Tensor, alpha: float) -> torch.Tensor:
    """[PROPOSED] head-specific PAINT strengths α_{l,h} = α · v_{l,h} / mean_h v_{l,h}, clipped to [0, 2α].

    mass_on_span [L, H] (visual sensitivity v: mean attention mass on the boosted tokens, e.g.
    from :func:`paint_span_mass`) → [L, H] float64. A layer whose heads all have zero mass gets α
    for every head (no evidence to differentiate them).
    """
    _need(mass_on_span, 2, "mass_on_span", "[L, H]")
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 5):
        raise BadInput(f"alpha={alpha} is out of range", "use a value in [0, 5]")
    v = mass_on_span.detach().to(torch.float64)
    if bool((v < 0).any()) or not bool(torch.isfinite(v).all()):
        raise BadInput("mass_on_span has negative or non-finite entries", "pass attention masses (>= 0)")
    mean = v.mean(dim=1, keepdim=True)
    ratio = torch.where(mean > 0, v / torch.where(mean > 0, mean, torch.ones_like(mean)), torch.ones_like(v))
    return torch.clamp(alpha * ratio, 0.0, 2.0 * alpha)


# --------------------------------------------------------------------------- HeadHunter

@dataclass(frozen=True)
class HeadHunterResult:
    """``selected``: heads in the order picked; ``rounds``: per round, every candidate's score
    (``{"head": h, "score": s}``, best first)."""

    selected: tuple[Hashable, ...]
    rounds: list[list[dict[str, Any]]] = field(default_factory=list)


def _hashable(h: Any) -> Hashable:
    return tuple(_hashable(x) for x in h) if isinstance(h, (list, tuple)) else h


def headhunter_greedy(heads: Sequence[Hashable], score_fn: Callable[[tuple[Hashable, ...]], float],
                      rounds: int = 1, k: int = 1) -> HeadHunterResult:
    """HeadHunter's greedy search (methods.md §9, Algorithm 1).

    ``heads``: the candidate pool, e.g. ``(layer, head)`` pairs. Each round scores every remaining
    head h by ``score_fn(selected + (h,))`` (higher is better; the objective — e.g. mean PickScore
    over a prompt-seed set with those heads perturbed — is the caller's), adds the top ``k`` to
    the selection and removes them from the pool. Stops early when the pool is empty. Ties keep
    the pool order.
    """
    pool = [_hashable(h) for h in heads]
    if not pool:
        raise BadInput("headhunter_greedy got no candidate heads", "pass the (layer, head) pairs to search")
    if len(set(pool)) != len(pool):
        raise BadInput("headhunter_greedy got repeated candidate heads", "list each head once")
    for name, val in (("rounds", rounds), ("k", k)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise BadInput(f"headhunter_greedy: {name}={val!r} must be an integer >= 1", f"use {name} >= 1")
    if not callable(score_fn):
        raise BadInput("headhunter_greedy: score_fn is not callable", "pass a function(selected_heads) -> float")
    selected: list[Hashable] = []
    history: list[list[dict[str, Any]]] = []
    for _ in range(rounds):
        if not pool:
            break
        scored = []
        for h in pool:
            s = score_fn(tuple(selected) + (h,))
            try:
                s = float(s)
            except (TypeError, ValueError):
                raise BadInput(f"objective returned {s!r} for head {h}", "return a finite float score") from None
            if not math.isfinite(s):
                raise BadInput(f"objective returned {s} for head {h}", "return a finite float score")
            scored.append((h, s))
        order = sorted(range(len(scored)), key=lambda i: -scored[i][1])
        picks = [scored[i][0] for i in order[:k]]
        history.append([{"head": scored[i][0], "score": scored[i][1]} for i in order])
        selected.extend(picks)
        taken = set(picks)
        pool = [h for h in pool if h not in taken]
    return HeadHunterResult(selected=tuple(selected), rounds=history)


def load_objective(spec: str) -> Callable[..., Any]:
    """Import a user objective given as ``"module:function"`` (``function`` may be dotted)."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise BadInput(f"objective '{spec}' is not of the form module:function",
                       "e.g. --objective mypkg.scores:pickscore")
    mod_name, attr = spec.split(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise BadInput(f"cannot import objective module '{mod_name}' ({e})",
                       "check the module name and that it is on PYTHONPATH") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BadInput(f"objective module '{mod_name}' has no attribute '{attr}'",
                           f"define {attr} in {mod_name} or fix the name")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BadInput(f"objective '{spec}' is a {type(obj).__name__}, not a callable",
                       "point to a function(selected_heads) -> float")
    return obj


def select_top(values: torch.Tensor, k: int, min_value: Optional[float] = None) -> tuple[int, ...]:
    """Indices of the ``k`` largest entries of a 1-d score (e.g. :func:`var_head_fraction`),
    optionally only those ≥ ``min_value``; sorted ascending."""
    _need(values, 1, "values", "[H]")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise BadInput(f"k={k!r} must be an integer >= 0", "use k >= 0")
    order = torch.argsort(values, descending=True, stable=True)[:k].tolist()
    if min_value is not None:
        order = [i for i in order if float(values[i]) >= min_value]
    return tuple(sorted(int(i) for i in order))
