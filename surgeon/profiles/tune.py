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
  rows (causal sites: the queries from the spans' last token on; :func:`~surgeon.profiles.selectors.paint_span_mass`)
  gives the [PROPOSED] head-specific α_{l,h} = α·v_{l,h}/mean_h v_{l,h} clipped to [0, 2α]
  (:func:`~surgeon.profiles.selectors.paint_head_alpha`); α = ``strength`` (0.7) or, with a
  ``grid``, searched on the objective. Default sites: layers ≥ 2 (PAINT's l ∈ [2, L)).
  Default spans: the model's span metadata (vision: the patch tokens), else the first
  ``min(16, N/2)`` tokens (a system-prompt stand-in) [PROPOSED].
* ``sink_redistribute`` (§8): the residual stream (each layer's input hidden states, from the
  Hugging Face model's ``output_hidden_states``; otherwise the query projection's input as a
  proxy) gives the sink dimensions — dimensions :func:`~surgeon.profiles.selectors.find_sink_dims`
  finds (first token ≫ ``sink_ratio`` × median) in at least half of the chosen layers — and, per
  layer, the sink positions (φ > τ in at least ``sink_min_frac`` = 0.75 of the rows [PROPOSED]:
  the variant's sinks are static positions, so content-dependent secondary sinks that appear
  in only some rows are left out; :func:`~surgeon.profiles.selectors.sink_positions`).
  A head qualifies when VAR's row rule
  selects at least ``head_frac`` (0.5, [PROPOSED]) of its query rows after the target span
  (:func:`~surgeon.profiles.selectors.var_head_rows`). ``strength`` is p (0.6). The target is the
  one ``spans`` entry (default as for head_boost). Default sites: layers 2 … L−2 (VAR skips the
  first two and the last).
* ``identity_blend`` (§9): HeadHunter's greedy search
  (:func:`~surgeon.profiles.selectors.headhunter_greedy`) over (layer, head) candidates with
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
from typing import Any, Callable, Optional, Sequence

import torch

from surgeon.capture import Captured
from surgeon.errors import BadInput, SurgeonError
from surgeon.models import LoadedModel
from surgeon.profiles.data import CalibrationData, load_calibration
from surgeon.profiles.tune_options import (
    BOUNDS,
    DEFAULT_OBJECTIVE,
    DEFAULT_PREFIX,
    GRID_PARAM,
    ProgressFn,
    six_digits,
    TuneOptions,
)
from surgeon.profiles.tune_probes import measure_span_mass, measure_var_heads, residual_streams
from surgeon.profiles.tune_result import TuneResult

# The API (surgeon.api.tune) reaches the option check and the writers through this module.
from surgeon.profiles.tune_options import check_options  # noqa: F401
from surgeon.profiles.tune_result import sidecar_path, write_outputs  # noqa: F401


log = logging.getLogger(__name__)


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
        from surgeon.profiles.collector import Collector, instrument
        from surgeon.profiles.profile_settings import ProfileSettings
        from surgeon.profiles.selectors import load_objective

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
        from surgeon.profiles.collector import _Mode

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


_PHI = (math.sqrt(5.0) - 1.0) / 2.0


def search_1d(f: Callable[[float], float], grid: Sequence[float], lo: float, hi: float, refine: int
              ) -> tuple[float, float]:
    """Minimise ``f`` over [lo, hi]: every grid point, then ``refine`` golden-section steps inside
    the best grid point's bracket (its neighbours; past the last point up to 2× it). Returns the
    best point evaluated and its value (ties: the smallest x), so the result is never worse
    than any grid point."""
    xs = sorted(set(six_digits(x) for x in grid))
    seen: dict[float, float] = {}

    def ev(x: float) -> float:
        x = six_digits(min(hi, max(lo, x)))
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
    from surgeon.profiles.selectors import paint_head_alpha

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
    from surgeon.profiles.selectors import find_sink_dims, find_sink_tokens, sink_positions

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
    from surgeon.profiles.selectors import headhunter_greedy

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


def tune(lm: LoadedModel, cap: Captured, options: TuneOptions, *, data: Optional[str] = None, samples: int = 4,
         seq_len: int = 512, seed: int = 0, calibration: Optional[CalibrationData] = None,
         progress: Optional[ProgressFn] = None) -> TuneResult:
    """Calibrate ``options.variant`` on ``lm`` (captured as ``cap``) with the ``calib`` split of
    ``data`` (None: the built-in corpus; ``samples`` rows of ``seq_len`` tokens, ``seed``) or the
    given ``calibration`` rows. ``progress(stage, done, total)`` is called as work proceeds."""
    from surgeon.passes.policy import policy_from_recipe
    from surgeon.profiles.evidence import policy_modes

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
