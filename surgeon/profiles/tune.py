"""Model-level calibration of the modulated variants (methods.md §7–§11): ``surgeon tune``.

:func:`tune` measures or searches one modulated variant's parameters, heads and layers on the
``calib`` split of the calibration data and returns a :class:`TuneResult` whose ``recipe`` is a
``surgeon rewrite --recipe`` recipe (site name → ``{variant, params…}``); :func:`write_outputs`
writes it as YAML (with the calibration numbers as header comments) plus a sidecar JSON with the
whole search. Every candidate is scored by running the captured program with the candidate's
variant at the chosen sites (the profiler's instrumented graph, :mod:`surgeon.profiles.collect`;
no re-export) and averaging the objective over the calibration rows.

The objective (``--objective module:function``; default
``surgeon.profiles.objectives:calibration_ce``, next-token cross-entropy)::

    fn(output, input_ids[, dense]) -> float        # lower is better

``output`` is the modulated model's output for one calibration row (causal LM: logits
[1, N, V]; encoder: hidden states [1, N, C]), ``input_ids`` the row's ids [1, N], ``dense`` (only
when the function has a parameter of that name) the unmodified output of the same row. See
:mod:`surgeon.profiles.objectives`. The mean over rows is minimised. "before" is the dense
model's objective, "after" the tuned recipe's, both on the same calibration rows.

Per variant:

* ``temperature`` (§7, [PROPOSED] training-free form): σ by a 1-D search — the grid (default
  {0, 0.005, 0.01, 0.02, 0.05, 0.1}; σ = 0 is dense) then golden-section refinement inside the
  best grid point's bracket. ``scope="global"``: one σ for all chosen sites. ``scope="layer"``:
  starting from the global σ, coordinate descent over sites (each a 1-D search with the others
  fixed, the site's current σ in its candidate set, a change kept only when it lowers the
  objective), at most ``sweeps`` sweeps. So the tuned objective is never above σ = 0's.
* ``local_boost`` (§10, [PROPOSED]): γ by the same 1-D search (γ = 0 is dense) for each window
  w in ``windows`` (default {2, 5, 10}); the best (γ, w). ``scope="layer"``: per-site γ by
  coordinate descent at that w. Default sites: the middle third of the layers (methods.md).
* ``head_boost`` (§11): per-head attention mass on the ``spans`` measured over the calibration
  rows (causal sites: the queries from the spans' last token on; :func:`~surgeon.profiles.modulation.paint_span_mass`)
  gives the [PROPOSED] head-specific α_{l,h} = α·v_{l,h}/mean_h v_{l,h} clipped to [0, 2α]
  (:func:`~surgeon.profiles.modulation.paint_head_alpha`); α = ``strength`` (0.7) or, with a
  ``grid``, searched on the objective. Default sites: layers ≥ 2 (PAINT's l ∈ [2, L)).
  Default spans: the model's span metadata (vision: the patch tokens), else the first
  ``min(16, N/2)`` tokens (a system-prompt stand-in) [PROPOSED].
* ``sink_redistribute`` (§8): the residual stream (each layer's input hidden states, from the
  Hugging Face model's ``output_hidden_states``; otherwise the query projection's input as a
  proxy) gives the sink dimensions — dimensions :func:`~surgeon.profiles.modulation.find_sink_dims`
  finds (first token ≫ ``sink_ratio`` × median) in at least half of the chosen layers — and, per
  layer, the sink positions (φ > τ in at least ``sink_min_frac`` = 0.75 of the rows [PROPOSED]:
  the variant's sinks are static positions, so content-dependent secondary sinks that appear
  in only some rows are left out; :func:`~surgeon.profiles.modulation.sink_positions`).
  A head qualifies when VAR's row rule
  selects at least ``head_frac`` (0.5, [PROPOSED]) of its query rows after the target span
  (:func:`~surgeon.profiles.modulation.var_head_rows`). ``strength`` is p (0.6). The target is the
  one ``spans`` entry (default as for head_boost). Default sites: layers 2 … L−2 (VAR skips the
  first two and the last).
* ``identity_blend`` (§9): HeadHunter's greedy search
  (:func:`~surgeon.profiles.modulation.headhunter_greedy`) over (layer, head) candidates with
  SoftPAG strength u = ``strength`` (0.5): ``rounds`` rounds, ``k`` heads per round, a candidate
  set scored by the objective (minimised) with exactly those heads blended.

Bad input — unknown variant, out-of-range strengths or grids, spans outside the sequence,
layers or heads the model does not have, an objective that does not import, raises, or returns
something other than a finite number — is a :class:`~surgeon.errors.BadInput`; nothing is
written. Same inputs and seed give byte-identical outputs (no timings in them).
"""
from __future__ import annotations

import inspect
import logging
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from surgeon.capture import Captured, Site
from surgeon.errors import BadInput, SurgeonError
from surgeon.models import LoadedModel
from surgeon.profiles.data import CalibrationData, load_calibration
from surgeon.attention.base import repeat_kv

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
VARIANTS = ("temperature", "head_boost", "sink_redistribute", "identity_blend", "local_boost")
SCOPES = ("global", "layer")
DEFAULT_OBJECTIVE = "surgeon.profiles.objectives:calibration_ce"
SCHEMA_VERSION = 1
# [PROPOSED] methods.md §7's grid {0, 0.01, 0.02, 0.05} widened by one point each side
DEFAULT_GRID = {"temperature": (0.0, 0.005, 0.01, 0.02, 0.05, 0.1),
                "local_boost": (0.0, 0.2, 0.5, 1.0, 2.0),  # methods.md §10 tunes γ ∈ {0.2, 0.5, 1.0}
                "head_boost": None}  # no search unless a grid is given: α = strength
BOUNDS = {"temperature": (0.0, 1.0), "local_boost": (0.0, 10.0), "head_boost": (0.0, 5.0)}
GRID_PARAM = {"temperature": "sigma", "local_boost": "gamma", "head_boost": "alpha"}
DEFAULT_WINDOWS = (2, 5, 10)  # local_boost w; methods.md §10's default w = 5 in the middle
# strength parameter: (name, default, lo, hi, lo inclusive, hi inclusive)
STRENGTH = {"head_boost": ("alpha", 0.7, 0.0, 5.0, False, True),
            "identity_blend": ("u", 0.5, 0.0, 1.0, False, True),
            "sink_redistribute": ("p", 0.6, 0.0, 1.0, True, False)}
DEFAULT_PREFIX = 16  # [PROPOSED] default span for text models: the first min(16, N/2) tokens
DEFAULT_K = 4  # [PROPOSED] HeadHunter heads per round for LMs (the paper's k = 24 is for DiTs)
DEFAULT_REFINE = 4
DEFAULT_SWEEPS = 1
_GEOMETRIC = ("none", "causal", "padding", "causal+padding")


# --------------------------------------------------------------------------- option parsing

def _bad_list(what: str, text: Any, example: str) -> BadInput:
    return BadInput(f"{what} {text!r} is not understood", f"give it as e.g. {example}")


def parse_index_list(text: Union[str, Sequence[int], None], what: str) -> Optional[tuple[int, ...]]:
    """``"0-3,7"`` or ``[0, 1, 2, 3, 7]`` → sorted distinct non-negative ints (None stays None)."""
    if text is None:
        return None
    out: set[int] = set()
    if isinstance(text, str):
        parts = [p for p in text.replace(" ", "").split(",")]
        if not any(parts):
            raise _bad_list(what, text, "0-3,7")
        for p in parts:
            try:
                if "-" in p[1:]:
                    a, b = p.split("-", 1) if not p.startswith("-") else (p, "")
                    lo, hi = int(a), int(b)
                    if hi < lo:
                        raise ValueError
                    out.update(range(lo, hi + 1))
                else:
                    out.add(int(p))
            except ValueError:
                raise _bad_list(what, text, "0-3,7") from None
    else:
        for x in text:
            if isinstance(x, bool) or not isinstance(x, numbers.Integral):
                raise _bad_list(what, list(text), "[0, 1, 7]")
            out.add(int(x))
    if not out or min(out) < 0:
        raise BadInput(f"{what} {text!r} has negative or no entries", "give indices >= 0")
    return tuple(sorted(out))


def parse_spans(text: Union[str, Sequence[Sequence[int]], None]) -> Optional[tuple[tuple[int, int], ...]]:
    """``"0:16,40:48"`` or ``[[0, 16], [40, 48]]`` → ((start, end), …), end exclusive, sorted."""
    if text is None:
        return None
    spans: list[tuple[int, int]] = []
    if isinstance(text, str):
        for p in text.replace(" ", "").split(","):
            if not p:
                continue
            try:
                a, b = p.split(":")
                spans.append((int(a), int(b)))
            except ValueError:
                raise _bad_list("--spans", text, "0:16,40:48 (start:end, end exclusive)") from None
    else:
        for s in text:
            if (not isinstance(s, (list, tuple)) or len(s) != 2
                    or any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in s)):
                raise _bad_list("spans", list(text), "[[0, 16], [40, 48]]")
            spans.append((int(s[0]), int(s[1])))
    if not spans:
        raise _bad_list("--spans", text, "0:16,40:48 (start:end, end exclusive)")
    spans.sort()
    for s, e in spans:
        if not 0 <= s < e:
            raise BadInput(f"span {s}:{e} is empty or negative", "give start:end with 0 <= start < end")
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        if b0 < a1:
            raise BadInput(f"spans {a0}:{a1} and {b0}:{b1} overlap", "merge or split overlapping spans")
    return tuple(spans)


def parse_grid(text: Union[str, Sequence[float], None], what: str = "--grid") -> Optional[tuple[float, ...]]:
    """``"0,0.01,0.02"`` or a list → sorted distinct finite floats (None stays None)."""
    if text is None:
        return None
    if isinstance(text, str):
        try:
            vals = [float(p) for p in text.replace(" ", "").split(",") if p]
        except ValueError:
            raise _bad_list(what, text, "0,0.01,0.02,0.05") from None
    else:
        vals = []
        for x in text:
            if isinstance(x, bool) or not isinstance(x, numbers.Real):
                raise _bad_list(what, list(text), "[0, 0.01, 0.02]")
            vals.append(float(x))
    if not vals or not all(math.isfinite(v) for v in vals):
        raise BadInput(f"{what} {text!r} is empty or not finite", "give finite numbers, e.g. 0,0.01,0.02")
    return tuple(sorted(set(_r(v) for v in vals)))


def _r(x: float) -> float:
    """Six significant digits: the value written to the recipe is the value evaluated."""
    return float(f"{float(x):.6g}")


# --------------------------------------------------------------------------- options

@dataclass(frozen=True)
class TuneOptions:
    """Validated settings of one tuning run (see :func:`check_options`)."""

    variant: str
    scope: str = "global"
    objective: str = DEFAULT_OBJECTIVE
    spans: Optional[tuple[tuple[int, int], ...]] = None
    layers: Optional[tuple[int, ...]] = None
    heads: Optional[tuple[int, ...]] = None
    strength: Optional[float] = None
    grid: Optional[tuple[float, ...]] = None
    windows: tuple[int, ...] = DEFAULT_WINDOWS
    refine: int = DEFAULT_REFINE
    sweeps: int = DEFAULT_SWEEPS
    rounds: int = 1
    k: int = DEFAULT_K
    sink_ratio: float = 100.0
    tau: float = 20.0
    sink_min_frac: float = 0.75
    head_frac: float = 0.5

    def settings(self) -> dict[str, Any]:
        d: dict[str, Any] = {"variant": self.variant, "scope": self.scope, "objective": self.objective}
        if self.variant in ("temperature", "local_boost", "head_boost"):
            d["grid"] = list(self.grid) if self.grid is not None else None
            d["refine"] = self.refine
        if self.variant in ("temperature", "local_boost") and self.scope == "layer":
            d["sweeps"] = self.sweeps
        if self.variant == "local_boost":
            d["windows"] = list(self.windows)
        if self.variant in STRENGTH:
            d[STRENGTH[self.variant][0]] = self.strength
        if self.variant == "identity_blend":
            d["rounds"], d["k"] = self.rounds, self.k
        if self.variant == "sink_redistribute":
            d["sink_ratio"], d["tau"], d["head_frac"] = self.sink_ratio, self.tau, self.head_frac
            d["sink_min_frac"] = self.sink_min_frac
        d["layers"] = list(self.layers) if self.layers is not None else None
        d["heads"] = list(self.heads) if self.heads is not None else None
        return d


def _pos_int(name: str, v: Any, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < lo:
        raise BadInput(f"{name}={v!r} is invalid", f"use an integer >= {lo}")
    return int(v)


def check_options(variant: str, *, scope: str = "global", objective: Optional[str] = None, spans: Any = None,
                  layers: Any = None, heads: Any = None, strength: Optional[float] = None, grid: Any = None,
                  windows: Any = None, refine: Optional[int] = None, sweeps: Optional[int] = None,
                  rounds: Optional[int] = None, k: Optional[int] = None, seq_len: Optional[int] = None,
                  sink_ratio: float = 100.0, tau: float = 20.0, sink_min_frac: float = 0.75,
                  head_frac: float = 0.5) -> TuneOptions:
    """Validate everything that does not need the model (before any loading); imports the objective.

    Options that do not apply to ``variant`` are refused rather than silently ignored."""
    from surgeon.profiles.modulation import load_objective

    if variant not in VARIANTS:
        raise BadInput(f"unknown variant '{variant}' for tune", f"use one of {', '.join(VARIANTS)}")
    if scope not in SCOPES:
        raise BadInput(f"--scope {scope!r} is not global or layer", "use --scope global or --scope layer")
    if scope == "layer" and variant not in ("temperature", "local_boost"):
        raise BadInput(f"--scope layer applies to temperature and local_boost, not {variant} "
                       "(its heads/strengths are per layer already)", "drop --scope")

    def only(name: str, value: Any, allowed: Sequence[str]) -> None:
        if value is not None and variant not in allowed:
            raise BadInput(f"{name} does not apply to {variant}", f"{name} applies to {', '.join(allowed)}")

    only("--spans", spans, ("head_boost", "sink_redistribute"))
    only("--strength", strength, tuple(STRENGTH))
    only("--grid", grid, tuple(GRID_PARAM))
    only("--windows", windows, ("local_boost",))
    only("--rounds", rounds, ("identity_blend",))
    only("--k", k, ("identity_blend",))
    only("--sweeps", sweeps, ("temperature", "local_boost"))
    only("--heads", heads, ("head_boost", "sink_redistribute", "identity_blend", "local_boost"))

    st: Optional[float] = None
    if variant in STRENGTH:
        name, default, lo, hi, lo_in, hi_in = STRENGTH[variant]
        st = default if strength is None else strength
        if isinstance(st, bool) or not isinstance(st, numbers.Real) or not math.isfinite(float(st)):
            raise BadInput(f"--strength {st!r} is not a finite number", f"give {variant}'s {name} as a number")
        st = float(st)
        ok = (lo <= st if lo_in else lo < st) and (st <= hi if hi_in else st < hi)
        if not ok:
            rng = f"{'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
            why = " (the other end leaves attention unchanged: nothing to calibrate)"
            raise BadInput(f"--strength {st} ({variant}'s {name}) is out of range {rng}{why}",
                           f"use a value in {rng}")
    g = parse_grid(grid)
    if g is None and variant in DEFAULT_GRID and DEFAULT_GRID[variant] is not None:
        g = DEFAULT_GRID[variant]
    if g is not None:
        lo, hi = BOUNDS[variant]
        bad = [v for v in g if not lo <= v <= hi]
        if bad:
            raise BadInput(f"--grid values {bad} are outside {variant}'s {GRID_PARAM[variant]} range [{lo}, {hi}]",
                           f"give values in [{lo}, {hi}]")
        if not any(v > 0 for v in g):
            raise BadInput(f"--grid {list(g)} holds no {GRID_PARAM[variant]} > 0", "add positive values to search")
    w = DEFAULT_WINDOWS
    if windows is not None:
        w = parse_index_list(windows, "--windows") or DEFAULT_WINDOWS
        if min(w) < 1:
            raise BadInput(f"--windows {windows!r} holds a window < 1", "give windows >= 1, e.g. 2,5,10")
    sp = parse_spans(spans)
    if sp is not None and variant == "sink_redistribute" and len(sp) != 1:
        raise BadInput(f"sink_redistribute takes one target span, got {len(sp)}", "give one --spans start:end")
    if sp is not None and seq_len is not None:
        for s, e in sp:
            if e > seq_len:
                raise BadInput(f"span {s}:{e} lies outside the {seq_len}-token calibration sequence",
                               f"use spans with end <= {seq_len}, or a longer --seq-len")
    lay = parse_index_list(layers, "--layers")
    hd = parse_index_list(heads, "--heads")
    for nm, v, lo_ in (("sink_ratio", sink_ratio, 0.0), ("tau", tau, 0.0)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= lo_:
            eg = 100 if nm == "sink_ratio" else 20
            raise BadInput(f"{nm}={v!r} must be a positive number", f"use e.g. {nm}={eg}")
    for nm, v in (("head_frac", head_frac), ("sink_min_frac", sink_min_frac)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 < v <= 1.0:
            raise BadInput(f"{nm}={v!r} is out of range", "use a fraction in (0, 1]")
    spec = objective or DEFAULT_OBJECTIVE
    load_objective(spec)  # import errors → BadInput now, before any model work
    return TuneOptions(variant=variant, scope=scope, objective=spec, spans=sp, layers=lay, heads=hd, strength=st,
                       grid=g, windows=tuple(w),
                       refine=_pos_int("--refine", DEFAULT_REFINE if refine is None else refine, 0),
                       sweeps=_pos_int("--sweeps", DEFAULT_SWEEPS if sweeps is None else sweeps),
                       rounds=_pos_int("--rounds", 1 if rounds is None else rounds),
                       k=_pos_int("--k", DEFAULT_K if k is None else k), sink_ratio=float(sink_ratio),
                       tau=float(tau), sink_min_frac=float(sink_min_frac), head_frac=float(head_frac))


# --------------------------------------------------------------------------- objective

def _as_float(r: Any, spec: str) -> float:
    if isinstance(r, torch.Tensor) and r.numel() == 1 and not r.dtype == torch.bool and not r.is_complex():
        r = r.item()
    if isinstance(r, bool) or not isinstance(r, numbers.Real):
        shown = repr(r) if not isinstance(r, torch.Tensor) else f"a tensor of shape {tuple(r.shape)}"
        raise BadInput(f"objective {spec} returned {type(r).__name__} {shown[:60]}, not a number",
                       "return a finite float to minimise")
    x = float(r)
    if not math.isfinite(x):
        raise BadInput(f"objective {spec} returned {x}", "return a finite float to minimise")
    return x


def _wants_dense(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "dense" in params


class Evaluator:
    """Scores site → (variant, params) choices by the mean objective over the calibration rows.

    Builds the profiler's instrumented graph once (its SDPA nodes run the chosen variant at the
    chosen sites, dense elsewhere); results are memoised by the choice, and every evaluation is
    recorded in ``trace`` with its label."""

    def __init__(self, lm: LoadedModel, cap: Captured, data: CalibrationData, objective: str,
                 progress: Optional[Callable[[], None]] = None) -> None:
        from surgeon.profiles.collect import Collector, ProfileSettings, instrument
        from surgeon.profiles.modulation import load_objective

        self.lm, self.cap, self.data, self.spec = lm, cap, data, objective
        self.fn = load_objective(objective)
        self.wants_dense = _wants_dense(self.fn)
        self.col = Collector(cap, ProfileSettings(samples=1, seq_len=max(16, data.seq_len or 16)))
        self.gm = instrument(cap, self.col)
        self.memo: dict[tuple, float] = {}
        self.trace: list[dict[str, Any]] = []
        self._dense: dict[int, torch.Tensor] = {}
        self._tick = progress

    @staticmethod
    def key(modes: dict[int, tuple[Any, Any, Optional[int]]]) -> tuple:
        return tuple(sorted((i, v.name, repr(p)) for i, (v, p, _) in modes.items()))

    def _forward(self, modes: dict, s: int) -> torch.Tensor:
        from surgeon.profiles.collect import _Mode

        self.col.mode = _Mode(policy=modes)
        self.col.produced = {}
        try:
            return self.gm(*self.data.row(s))
        finally:
            self.col.mode = _Mode()
            self.col.produced = {}

    def _call(self, out: torch.Tensor, s: int) -> float:
        x = self.data.row(s)[0]
        try:
            if self.wants_dense:
                if s not in self._dense:
                    self._dense[s] = self._forward({}, s)
                r = self.fn(out, x, dense=self._dense[s])
            else:
                r = self.fn(out, x)
        except SurgeonError:
            raise
        except Exception as e:  # the user's code: one line, exit 2
            msg = str(e).splitlines()[0][:160] if str(e) else ""
            raise BadInput(f"objective {self.spec} raised {type(e).__name__}: {msg}",
                           "fix the objective; it is called as fn(output, input_ids[, dense]) -> float") from None
        return _as_float(r, self.spec)

    def __call__(self, modes: dict[int, tuple[Any, Any, Optional[int]]], label: Optional[dict[str, Any]] = None
                 ) -> float:
        k = self.key(modes)
        if k in self.memo:  # same choice reached again (e.g. σ = 0 is the dense model): recorded, not rerun
            self.trace.append({**(label or {}), "objective": self.memo[k], "cached": True})
            return self.memo[k]
        vals = []
        with torch.no_grad():
            for s in range(self.data.samples):
                out = self._forward(modes, s)
                vals.append(self._call(out, s))
        v = float(sum(vals) / len(vals))
        self.memo[k] = v
        self.trace.append({**(label or {}), "objective": v})
        if self._tick is not None:
            self._tick()
        return v


# --------------------------------------------------------------------------- 1-D search

_PHI = (math.sqrt(5.0) - 1.0) / 2.0


def search_1d(f: Callable[[float], float], grid: Sequence[float], lo: float, hi: float, refine: int
              ) -> tuple[float, float]:
    """Minimise ``f`` over [lo, hi]: every grid point, then ``refine`` golden-section steps inside
    the best grid point's bracket (its neighbours; past the last point up to 2× it). Returns the
    best point evaluated and its value (ties: the smallest x), so the result is never worse
    than any grid point."""
    xs = sorted(set(_r(x) for x in grid))
    seen: dict[float, float] = {}

    def ev(x: float) -> float:
        x = _r(min(hi, max(lo, x)))
        if x not in seen:
            seen[x] = f(x)
        return seen[x]

    for x in xs:
        ev(x)
    i = min(range(len(xs)), key=lambda j: (seen[xs[j]], xs[j]))
    a = xs[i - 1] if i > 0 else lo
    b = xs[i + 1] if i + 1 < len(xs) else min(hi, 2.0 * xs[i] if xs[i] > 0 else hi)
    if refine > 0 and b > a:
        c, d = b - _PHI * (b - a), a + _PHI * (b - a)
        fc, fd = ev(c), ev(d)
        for _ in range(refine - 1):
            if fc <= fd:
                b, d, fd = d, c, fc
                c = b - _PHI * (b - a)
                fc = ev(c)
            else:
                a, c, fc = c, d, fd
                d = a + _PHI * (b - a)
                fd = ev(d)
    best = min(seen, key=lambda x: (seen[x], x))
    return best, seen[best]


# --------------------------------------------------------------------------- attention probes

def prob_chunks(site: Site, q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool,
                scale: float, chunk_elems: int = 1 << 23) -> Iterator[tuple[int, torch.Tensor]]:
    """Dense attention probabilities of one site in query chunks: yields (first row, probs
    [B, Hq, c, Nk] float32). q [B, Hq, Nq, D]; k [B, Hq|Hkv, Nk, D]. Masked like the profiler:
    geometric causal mask for causal/padding/none sites (calibration rows are unpadded), the
    graph's own mask for explicit-mask sites. Fully masked rows are all zero."""
    b, hq, nq, _ = q.shape
    kr = repeat_kv(k, hq).float()
    nk = kr.shape[2]
    geometric = site.mask_kind in _GEOMETRIC
    causal = site.causal if geometric else bool(is_causal)
    rows = max(1, chunk_elems // max(1, b * hq * nk))
    kpos = torch.arange(nk, device=q.device)
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        z = torch.matmul(q[:, :, r0:r1].float(), kr.transpose(-1, -2)) * scale
        if not geometric and attn_mask is not None:
            m = attn_mask[..., r0:r1, :]
            z = z.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else z + m.float()
        if causal:
            qpos = torch.arange(nk - nq + r0, nk - nq + r1, device=q.device)
            z = z.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
        yield r0, torch.nan_to_num(torch.softmax(z, dim=-1), nan=0.0)


class Probe:
    """``instrument()``-compatible receiver: plain SDPA for the forward, and for the sites in
    ``want`` the probability chunks handed to ``want[idx](first_row, probs)``; records each
    site's query-projection input (``hidden``) when ``keep_hidden``. The forward stops after the
    last site of interest (no logits are built)."""

    def __init__(self, cap: Captured, want: dict[int, Callable[[int, torch.Tensor], None]],
                 keep_hidden: Sequence[int] = ()) -> None:
        self.sites = cap.sites
        self.want = want
        self.keep_hidden = set(keep_hidden)
        self.hidden: dict[int, torch.Tensor] = {}
        self.last = max(list(want) + list(self.keep_hidden)) if (want or self.keep_hidden) else None

    def call(self, idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False,
             scale: Optional[float] = None, enable_gqa: bool = False, hidden: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
        from surgeon.profiles.collect import _StopForward

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0,
                                             is_causal=bool(is_causal), scale=scale, enable_gqa=enable_gqa)
        sc = float(scale) if scale is not None else 1.0 / math.sqrt(query.shape[-1])
        with torch.no_grad():
            if idx in self.keep_hidden and hidden is not None:
                self.hidden[idx] = hidden.detach().float().clone()
            cb = self.want.get(idx)
            if cb is not None:
                for r0, p in prob_chunks(self.sites[idx], query.detach(), key.detach(), attn_mask, bool(is_causal), sc):
                    cb(r0, p)
        if self.last is not None and idx == self.last:
            raise _StopForward()
        return out


def run_probe(cap: Captured, data: CalibrationData, probe: Probe, on_row: Optional[Callable[[int], None]] = None
              ) -> None:
    """One probe pass over every calibration row."""
    from surgeon.profiles.collect import _run, instrument

    gm = instrument(cap, probe)  # type: ignore[arg-type]  # duck-typed: instrument only calls .call
    with torch.no_grad():
        for s in range(data.samples):
            _run(gm, data.row(s))
            if on_row is not None:
                on_row(s)


def _row_means(cap: Captured, data: CalibrationData, sites: Sequence[int],
               first_row: Callable[[int, int, int, int], int],
               per_row: Callable[[int, torch.Tensor], torch.Tensor],
               empty: Callable[[int], BadInput], on_row: Optional[Callable[[int], None]]) -> dict[int, torch.Tensor]:
    """Mean over calibration query rows of ``per_row(site, probs[:, :, start:])`` (a per-head sum
    over those rows), where ``start = first_row(site, r0, nq, nk)`` skips the rows that do not
    qualify → {site: [Hq]}. ``empty(site)`` is the error when no row of a site qualifies."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {i: 0 for i in sites}

    def make(i: int) -> Callable[[int, torch.Tensor], None]:
        def cb(r0: int, p: torch.Tensor) -> None:
            start = first_row(i, r0, p.shape[2], p.shape[3])
            if start >= p.shape[2]:
                return
            sub = p[:, :, start:]
            v = per_row(i, sub)
            sums[i] = sums[i] + v if i in sums else v
            counts[i] += sub.shape[0] * sub.shape[2]

        return cb

    run_probe(cap, data, Probe(cap, {i: make(i) for i in sites}), on_row)
    out = {}
    for i in sites:
        if counts[i] == 0:
            raise empty(i)
        out[i] = sums[i] / counts[i]
    return out


def measure_span_mass(cap: Captured, data: CalibrationData, sites: Sequence[int],
                      spans: Sequence[tuple[int, int]], on_row: Optional[Callable[[int], None]] = None
                      ) -> dict[int, torch.Tensor]:
    """Per site, per query head: mean attention mass on the key ``spans`` over the calibration
    rows, counting for causal sites only the query rows from the spans' last token on (the rows
    that see all of them; :func:`surgeon.profiles.modulation.paint_span_mass`) → {site: [Hq] float64}."""
    from surgeon.profiles.modulation import paint_span_mass

    end = max(e for _, e in spans)
    return _row_means(
        cap, data, sites,
        lambda i, r0, nq, nk: max(0, end - 1 - r0 - (nk - nq)) if cap.sites[i].causal else 0,  # rows >= end-1
        lambda i, sub: paint_span_mass(sub, spans, last_row_only=False) * (sub.shape[0] * sub.shape[2]),
        lambda i: BadInput(f"no query row of {cap.sites[i].name} sees the whole span set (ends at {end})",
                           "use spans that end inside the calibration sequence"),
        on_row)


def measure_var_heads(cap: Captured, data: CalibrationData, sinks: dict[int, tuple[int, ...]],
                      target: tuple[int, int], rho: float, summ: float,
                      on_row: Optional[Callable[[int], None]] = None) -> dict[int, torch.Tensor]:
    """Per site, per query head: the fraction of query rows after ``target`` that VAR's
    image-centric rule selects (:func:`surgeon.profiles.modulation.var_head_rows`) → {site: [Hq]}."""
    from surgeon.profiles.modulation import var_head_rows

    return _row_means(
        cap, data, list(sinks),
        lambda i, r0, nq, nk: max(0, target[1] - r0 - (nk - nq)),
        lambda i, sub: var_head_rows(sub, sinks[i], target, rho, summ).to(torch.float64).sum(dim=(0, 2)),
        lambda i: BadInput(f"no query row of {cap.sites[i].name} lies after the target span {list(target)}",
                           "use a target span that ends before the calibration sequence does"),
        on_row)


def residual_streams(lm: LoadedModel, cap: Captured, data: CalibrationData, sites: Sequence[int]
                     ) -> tuple[dict[int, torch.Tensor], str]:
    """Each site's layer-input residual stream over the calibration rows: {site: [S, N, C]}.

    From the Hugging Face model's ``output_hidden_states`` (hidden_states[l] is layer l's input)
    when the loaded model wraps one; otherwise the site's query-projection input (for pre-norm
    models the normalised residual, a per-dimension rescaling of it) as a proxy."""
    hf = getattr(lm.module, "hf", None)
    if hf is not None and lm.kind in ("causal-lm", "encoder", "vision"):
        rows: list[tuple] = []
        try:
            with torch.no_grad():
                for s in range(data.samples):
                    kw = dict(zip(lm.inputs, data.row(s)))
                    if lm.kind == "causal-lm":
                        kw["use_cache"] = False
                    hs = hf(**kw, output_hidden_states=True).hidden_states
                    rows.append(tuple(hs))
        except Exception as e:  # noqa: BLE001 — fall back to the proxy below
            log.info("output_hidden_states failed (%s); using query-projection inputs", e)
            rows = []
        if rows and all(0 <= cap.sites[i].layer < len(rows[0]) - 1 for i in sites):
            return ({i: torch.cat([r[cap.sites[i].layer].float() for r in rows], 0) for i in sites},
                    "hidden_states (layer inputs)")
    per: dict[int, list[torch.Tensor]] = {i: [] for i in sites}
    probe = Probe(cap, {}, keep_hidden=sites)

    def collect(_s: int) -> None:
        for i in sites:
            if i not in probe.hidden:
                raise BadInput(f"no hidden states found for {cap.sites[i].name}",
                               "sink_redistribute needs a model whose query projection input is visible")
            per[i].append(probe.hidden.pop(i))

    run_probe(cap, data, probe, collect)
    return {i: torch.cat(v, 0) for i, v in per.items()}, "query-projection input (proxy)"


# --------------------------------------------------------------------------- result

@dataclass
class TuneResult:
    """One tuning run. ``recipe``: site name → ``{variant, params…}`` (a ``surgeon rewrite``
    recipe); ``before``/``after``: the mean objective of dense / of the recipe on the calibration
    rows; ``details``: variant-specific measurements; ``trace``: every point asked for, in order
    (``cached``: the same choice was scored before); ``evaluations``: distinct choices run."""

    model: str
    model_fingerprint: str
    options: TuneOptions
    data: dict[str, Any]
    data_fingerprint: str
    before: float
    after: float
    recipe: dict[str, dict[str, Any]]
    details: dict[str, Any] = field(default_factory=dict)
    trace: list[dict[str, Any]] = field(default_factory=list)
    evaluations: int = 0

    @property
    def variant(self) -> str:
        return self.options.variant

    def document(self) -> dict[str, Any]:
        """The sidecar JSON document."""
        return {"kind": "tune", "schema_version": SCHEMA_VERSION, "model": self.model,
                "model_fingerprint": self.model_fingerprint, "variant": self.variant,
                "settings": self.options.settings(), "data": self.data, "data_fingerprint": self.data_fingerprint,
                "objective": {"spec": self.options.objective, "minimise": True, "before_dense": self.before,
                              "after": self.after, "change": self.after - self.before,
                              "evaluations": self.evaluations},
                "recipe": self.recipe, "details": self.details, "trace": self.trace}

    def recipe_yaml(self, sidecar: Optional[str] = None) -> str:
        import yaml

        o = self.options
        d = self.data
        lines = [f"# surgeon tune --variant {o.variant} --scope {o.scope}: {self.model} "
                 f"(model fingerprint {self.model_fingerprint})",
                 f"# calibration: {d.get('source')} {d.get('split')} split, {d.get('samples')} x {d.get('seq_len')} "
                 f"tokens (data fingerprint {self.data_fingerprint})",
                 f"# objective (minimised) {o.objective}: before (dense) {self.before:.6f} -> after "
                 f"{self.after:.6f} ({self.after - self.before:+.6f}) over {self.evaluations} evaluations"]
        if sidecar:
            lines.append(f"# search and measurements: {sidecar}")
        for name, spec in self.recipe.items():
            body = yaml.safe_dump(spec, default_flow_style=True, sort_keys=False, width=1 << 20).strip()
            lines.append(f"{_yaml_key(name)}: {body}")
        return "\n".join(lines) + "\n"


def _yaml_key(name: str) -> str:
    import json

    return json.dumps(name)


def sidecar_path(out: Path) -> Path:
    """``recipe.yaml`` → ``recipe.tune.json`` (next to it)."""
    out = Path(out)
    return out.with_name(out.stem + ".tune.json")


def write_outputs(result: TuneResult, out: Path, force: bool = False) -> tuple[Path, Path]:
    """Write the recipe YAML and its sidecar JSON atomically, both complete before either is
    switched in (see :mod:`surgeon.outputs`); returns both paths."""
    from surgeon.artifacts import canonical_json
    from surgeon.outputs import Output

    out = Path(out)
    side = sidecar_path(out)
    with Output(out, "tune-recipe", force=force) as o, Output(side, "tune", force=force) as s:
        s.write(canonical_json(result.document()).encode())
        o.write(result.recipe_yaml(side.name).encode())
        s.commit()
        o.commit()
    return out, side


# --------------------------------------------------------------------------- site selection

def _layers_of(cap: Captured) -> list[int]:
    return sorted({s.layer for s in cap.sites})


def choose_sites(cap: Captured, layers: Optional[tuple[int, ...]], default: Callable[[list[int]], list[int]]
                 ) -> list[int]:
    """Site indices for the requested layers (or the variant's default layers)."""
    have = _layers_of(cap)
    if layers is None:
        want = set(default(have))
    else:
        missing = [l for l in layers if l not in have]
        if missing:
            raise BadInput(f"layer(s) {missing} do not exist in this model (layers {have[0]}–{have[-1]})",
                           f"give --layers within {have[0]}-{have[-1]}")
        want = set(layers)
    idx = [i for i, s in enumerate(cap.sites) if s.layer in want]
    if not idx:
        raise BadInput("no attention site to tune in the chosen layers", "give --layers with attention sites")
    return idx


def check_heads(cap: Captured, sites: Sequence[int], heads: Optional[tuple[int, ...]]) -> None:
    if heads is None:
        return
    for i in sites:
        h = cap.sites[i].heads
        bad = [x for x in heads if x >= h]
        if bad:
            raise BadInput(f"head(s) {bad} do not exist: {cap.sites[i].name} has {h} query heads",
                           f"give --heads within 0-{h - 1}")


def default_span(cap: Captured, n_tokens: int) -> tuple[tuple[int, int], ...]:
    """The model's span metadata (vision: the patch tokens), else the first min(16, N/2) tokens."""
    for s in cap.sites:
        for sp in s.spans:
            if sp.get("name") in ("patches", "image", "system", "prompt"):
                return ((int(sp["start"]), int(sp["end"])),)
    return ((0, max(1, min(DEFAULT_PREFIX, n_tokens // 2))),)


def _n_tokens(lm: LoadedModel, data: CalibrationData) -> int:
    if lm.is_text:
        return int(data.inputs[0].shape[1])
    for k in ("image_size", "patch_size"):
        if k not in lm.config:
            return 0
    g = int(lm.config["image_size"]) // int(lm.config["patch_size"])
    return g * g + 1


# --------------------------------------------------------------------------- the variants

def _modes(cap: Captured, choice: dict[int, dict[str, Any]]) -> dict[int, tuple[Any, Any, None]]:
    from surgeon.attention.registry import get_variant

    out = {}
    for i, spec in choice.items():
        spec = dict(spec)
        var = get_variant(spec.pop("variant"))
        out[i] = (var, var.params_from(spec), None)
    return out


def _tune_search(ev: Evaluator, cap: Captured, o: TuneOptions, sites: list[int]) -> tuple[dict[int, dict], dict]:
    """temperature / local_boost: global 1-D search (per window), then per-site coordinate descent."""
    names = [s.name for s in cap.sites]
    lo, hi = BOUNDS[o.variant]
    grid = list(o.grid or ())
    pname = GRID_PARAM[o.variant]

    def spec(x: float, w: Optional[int]) -> dict[str, Any]:
        d: dict[str, Any] = {"variant": o.variant, pname: x}
        if o.variant == "local_boost":
            d["window"] = w
            if o.heads is not None:
                d["heads"] = list(o.heads)
        return d

    def choice(state: dict[int, float], w: Optional[int]) -> dict[int, dict]:
        return {i: spec(x, w) for i, x in state.items() if x > 0}

    windows: list[Optional[int]] = list(o.windows) if o.variant == "local_boost" else [None]
    best: Optional[tuple[float, float, Optional[int]]] = None
    per_window = []
    for w in windows:
        def f(x: float, w: Optional[int] = w) -> float:
            lab: dict[str, Any] = {"scope": "global", pname: x}
            if w is not None:
                lab["window"] = w
            return ev(_modes(cap, choice({i: x for i in sites}, w)), lab)

        x, fx = search_1d(f, grid, lo, hi, o.refine)
        per_window.append({"window": w, pname: x, "objective": fx})
        if best is None or fx < best[1]:
            best = (x, fx, w)
    assert best is not None
    x0, cur, w0 = best
    state = {i: x0 for i in sites}
    details: dict[str, Any] = {"global": {pname: x0, "objective": cur}}
    if o.variant == "local_boost":
        details["global"]["window"] = w0
        details["windows"] = per_window
    if o.scope == "layer":
        sweeps_done = 0
        for sweep in range(o.sweeps):
            changed = False
            for i in sites:
                def fl(x: float, i: int = i, sweep: int = sweep) -> float:
                    st = dict(state)
                    st[i] = x
                    lab = {"scope": "layer", "sweep": sweep, "site": names[i], pname: x}
                    return ev(_modes(cap, choice(st, w0)), lab)

                x, fx = search_1d(fl, sorted(set(grid) | {state[i]}), lo, hi, o.refine)
                if fx < cur:
                    state[i], cur, changed = x, fx, True
            sweeps_done += 1
            if not changed:
                break
        details["sweeps_done"] = sweeps_done
        details["per_site"] = {names[i]: state[i] for i in sites}
    return choice(state, w0), details


def _tune_head_boost(ev: Evaluator, cap: Captured, data: CalibrationData, o: TuneOptions, sites: list[int],
                     spans: tuple[tuple[int, int], ...], on_row: Callable[[int], None]) -> tuple[dict, dict]:
    from surgeon.profiles.modulation import paint_head_alpha

    names = [s.name for s in cap.sites]
    mass = measure_span_mass(cap, data, sites, spans, on_row)
    ratio = {}
    for i in sites:
        # α_h = α · clip(v_h / mean v, 0, 2): paint_head_alpha at α = 1 gives the ratio
        ratio[i] = paint_head_alpha(mass[i][None, :], 1.0)[0]

    def choice(alpha: float) -> dict[int, dict]:
        out = {}
        if alpha <= 0:
            return out
        for i in sites:
            ha = [round(float(alpha * r), 4) for r in ratio[i].tolist()]
            d: dict[str, Any] = {"variant": "head_boost", "alpha": alpha}
            if o.heads is not None:
                d["heads"] = list(o.heads)
                d["head_alpha"] = [ha[h] for h in o.heads]
            else:
                d["head_alpha"] = ha
            d["spans"] = [list(s) for s in spans]
            out[i] = d
        return out

    details: dict[str, Any] = {"spans": [list(s) for s in spans],
                               "span_mass": {names[i]: [float(x) for x in mass[i].tolist()] for i in sites}}
    if o.grid is not None:
        alpha, _ = search_1d(lambda a: ev(_modes(cap, choice(a)), {"alpha": a}), o.grid, *BOUNDS["head_boost"],
                             o.refine)
        details["alpha_searched"] = True
    else:
        alpha = float(o.strength or 0.0)
        details["alpha_searched"] = False
    details["alpha"] = alpha
    return choice(alpha), details


def _tune_sink(ev: Evaluator, lm: LoadedModel, cap: Captured, data: CalibrationData, o: TuneOptions,
               sites: list[int], target: tuple[int, int], on_row: Callable[[int], None]) -> tuple[dict, dict]:
    from surgeon.attention.sink_redistribute import SinkRedistributeParams
    from surgeon.profiles.modulation import find_sink_dims, find_sink_tokens, sink_positions

    names = [s.name for s in cap.sites]
    hidden, source = residual_streams(lm, cap, data, sites)
    counts: dict[int, int] = {}
    for i in sites:
        for d in find_sink_dims(hidden[i], o.sink_ratio):
            counts[d] = counts.get(d, 0) + 1
    need = (len(sites) + 1) // 2
    dims = sorted((d for d, c in counts.items() if c >= need), key=lambda d: (-counts[d], d))
    if not dims:
        raise BadInput(f"no sink dimensions: in fewer than half of the {len(sites)} chosen layers does a hidden "
                       f"dimension of the first token exceed {o.sink_ratio:g}x the median activation",
                       "lower sink_ratio, or choose other --layers (this model may have no massive activations)")
    sinks: dict[int, tuple[int, ...]] = {}
    for i in sites:
        pos = sink_positions(find_sink_tokens(hidden[i], dims, o.tau), o.sink_min_frac)
        if pos:
            sinks[i] = pos
    del hidden
    defaults = SinkRedistributeParams()
    details: dict[str, Any] = {"residual_source": source, "sink_dims": dims,
                               "sink_dim_layers": {str(d): counts[d] for d in dims},
                               "sinks": {names[i]: list(v) for i, v in sinks.items()},
                               "target": list(target), "rho": defaults.rho, "summ": defaults.summ}
    if not sinks:
        raise BadInput(f"no sink tokens (phi > tau={o.tau:g} in at least {o.sink_min_frac:g} of the rows) in the "
                       "chosen layers "
                       f"for sink dimensions {dims}", "lower tau, or choose other --layers")
    frac = measure_var_heads(cap, data, sinks, target, defaults.rho, defaults.summ, on_row)
    details["head_fraction"] = {names[i]: [float(x) for x in frac[i].tolist()] for i in sinks}
    choice = {}
    for i in sinks:
        heads = [h for h, f in enumerate(frac[i].tolist()) if f >= o.head_frac and (o.heads is None or h in o.heads)]
        if heads:
            choice[i] = {"variant": "sink_redistribute", "p": o.strength, "rho": defaults.rho, "summ": defaults.summ,
                         "sinks": list(sinks[i]), "target": list(target), "heads": heads, "after_target_only": True}
    if not choice:
        raise BadInput(f"no head qualifies: VAR's rule selects fewer than {o.head_frac:g} of the query rows after "
                       f"the target {list(target)} in every head of the chosen layers",
                       "lower head_frac, or give another target span (--spans)")
    return choice, details


def _tune_identity(ev: Evaluator, cap: Captured, o: TuneOptions, sites: list[int]) -> tuple[dict, dict]:
    from surgeon.profiles.modulation import headhunter_greedy

    names = [s.name for s in cap.sites]
    pool = [(i, h) for i in sites for h in (o.heads if o.heads is not None else range(cap.sites[i].heads))]

    def choice(sel: Sequence[tuple[int, int]]) -> dict[int, dict]:
        by: dict[int, list[int]] = {}
        for i, h in sel:
            by.setdefault(i, []).append(h)
        return {i: {"variant": "identity_blend", "u": o.strength, "heads": sorted(hs)} for i, hs in sorted(by.items())}

    def score(sel: tuple) -> float:
        lab = {"heads": [[names[i], h] for i, h in sel]}
        return -ev(_modes(cap, choice(sel)), lab)  # HeadHunter maximises; the objective is minimised

    res = headhunter_greedy(pool, score, rounds=o.rounds, k=o.k)
    selected = [tuple(h) for h in res.selected]
    details = {"u": o.strength, "candidates": len(pool),
               "selected": [{"site": names[i], "head": h} for i, h in selected],
               "rounds": [[{"site": names[r["head"][0]], "head": r["head"][1], "objective": -r["score"]} for r in rnd]
                          for rnd in res.rounds]}
    return choice(selected), details


# --------------------------------------------------------------------------- entry point

def tune(lm: LoadedModel, cap: Captured, options: TuneOptions, *, data: Optional[str] = None, samples: int = 4,
         seq_len: int = 512, seed: int = 0, calibration: Optional[CalibrationData] = None,
         progress: Optional[ProgressFn] = None) -> TuneResult:
    """Calibrate ``options.variant`` on ``lm`` (captured as ``cap``) with the ``calib`` split of
    ``data`` (None: the built-in corpus; ``samples`` rows of ``seq_len`` tokens, ``seed``) or the
    given ``calibration`` rows. ``progress(stage, done, total)`` is called as work proceeds."""
    from surgeon.passes.policy import policy_from_recipe
    from surgeon.profiles.collect import policy_modes

    o = options
    emit = progress or (lambda stage, done, total: None)
    if o.objective == DEFAULT_OBJECTIVE and lm.kind != "causal-lm":
        raise BadInput(f"the default objective (calibration cross-entropy) needs a causal language model, but "
                       f"{lm.name} is of kind '{lm.kind}'",
                       "give --objective module:function (see surgeon.profiles.objectives)")
    names = [s.name for s in cap.sites]
    have = _layers_of(cap)
    defaults: dict[str, Callable[[list[int]], list[int]]] = {
        "temperature": lambda L: L,
        "identity_blend": lambda L: L,
        "local_boost": lambda L: L[len(L) // 3: max(len(L) // 3 + 1, (2 * len(L)) // 3)],
        "head_boost": lambda L: L[2:] if len(L) > 2 else L,
        "sink_redistribute": lambda L: L[2:-1] if len(L) > 3 else L,
    }
    sites = choose_sites(cap, o.layers, defaults[o.variant])
    check_heads(cap, sites, o.heads)
    emit("calibration data", 0, 1)
    cal = calibration if calibration is not None else load_calibration(data, lm, samples, seq_len, "calib", seed=seed)
    emit("calibration data", 1, 1)
    n_tok = _n_tokens(lm, cal)
    spans = o.spans
    if o.variant in ("head_boost", "sink_redistribute"):
        if spans is None:
            spans = default_span(cap, n_tok)
        if n_tok:
            for s, e in spans:
                if e > n_tok:
                    raise BadInput(f"span {s}:{e} lies outside the {n_tok}-token calibration sequence",
                                   f"use spans with end <= {n_tok}")
        if o.variant == "sink_redistribute" and n_tok and spans[0][1] >= n_tok:
            raise BadInput(f"target span {spans[0][0]}:{spans[0][1]} leaves no query after it in the {n_tok}-token "
                           "sequence", f"end the target before {n_tok}")

    done = [0]
    total = [max(1, _planned(o, len(sites), cap, sites))]

    def tick() -> None:
        done[0] += 1
        total[0] = max(total[0], done[0])
        emit("objective evaluations", done[0], total[0])

    rows_done = [0]

    def on_row(_s: int) -> None:
        rows_done[0] += 1
        emit("attention statistics", rows_done[0], cal.samples)

    ev = Evaluator(lm, cap, cal, o.objective, progress=tick)
    before = ev({}, {"dense": True})  # also checks that the objective returns a number
    if o.variant in ("temperature", "local_boost"):
        choice, details = _tune_search(ev, cap, o, sites)
    elif o.variant == "head_boost":
        assert spans is not None
        choice, details = _tune_head_boost(ev, cap, cal, o, sites, spans, on_row)
    elif o.variant == "sink_redistribute":
        assert spans is not None
        choice, details = _tune_sink(ev, lm, cap, cal, o, sites, spans[0], on_row)
    else:
        choice, details = _tune_identity(ev, cap, o, sites)
    if choice:
        recipe = {names[i]: choice[i] for i in sorted(choice)}
    else:  # nothing beat dense: a recipe that keeps the tuned sites dense
        recipe = {names[i]: {"variant": "dense"} for i in sites}
        details["dense_kept"] = True
    # the recipe itself, read back as rewrite reads it, gives "after" (memo hit when unchanged)
    policy = policy_from_recipe({k: dict(v) for k, v in recipe.items()}, lm.fingerprint(), names)
    after = ev(policy_modes(cap, policy), {"recipe": True})
    details["sites_tuned"] = [names[i] for i in sites]
    emit("objective evaluations", done[0], done[0])
    return TuneResult(model=lm.name, model_fingerprint=lm.fingerprint(), options=o, data=cal.describe(),
                      data_fingerprint=cal.fingerprint, before=before, after=after, recipe=recipe, details=details,
                      trace=ev.trace, evaluations=len(ev.memo))


def _planned(o: TuneOptions, n_sites: int, cap: Captured, sites: Sequence[int]) -> int:
    """An upper bound on the objective evaluations (for progress bars)."""
    g = len(o.grid or ()) + 2 * o.refine + 2
    if o.variant == "temperature":
        return g + (o.sweeps * n_sites * g if o.scope == "layer" else 0)
    if o.variant == "local_boost":
        return len(o.windows) * g + (o.sweeps * n_sites * g if o.scope == "layer" else 0)
    if o.variant == "head_boost":
        return (g if o.grid is not None else 0) + 2
    if o.variant == "identity_blend":
        pool = sum(len(o.heads) if o.heads is not None else cap.sites[i].heads for i in sites)
        return sum(max(0, pool - r * o.k) for r in range(o.rounds)) + 2
    return 2
