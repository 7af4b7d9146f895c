"""Quality-first planning: the fastest policy whose loss stays within a tolerance T.

``surgeon rewrite MODEL --profile P --tolerance T`` (the default mode) asks for the fastest
rewrite whose quality loss on held-out text stays within ``T``:

* causal LMs: the relative increase of next-token perplexity, ``ppl / ppl_dense − 1``;
* encoders (and other models): ``1 − cosine`` of the output embeddings against dense.

Algorithm (:func:`plan_within_tolerance`)
-----------------------------------------
1. **Validation data.** Rows of the *calibration* split at each serving length that share no
   token with the rows the profile was computed on (:func:`validation_data`); the held-out split
   stays untouched for the final gate. Serving lengths: the user's, by default the profile's
   length and the model's maximum (issue 14: quality depends on length — the same token_topk
   rewrite measured +1.5 % at 1024 tokens and +5.0 % at 8192).
2. **Families.** Each family maps one global knob (ordered from gentle to aggressive) to a
   policy:

   - ``surgeon`` — per head, the cheapest keep of the profile's keep grid whose profiled
     attention mass miss ``1 − coverage`` stays under a bound ε (the per-head output-error bound),
     dense when no keep below ``dense_above`` meets it; per site the heads' keeps are padded to
     the largest (the block-sparse kernels pad every head to the largest keep, so a mixed site
     costs its maximum: issue 14 measured 2–3× slower gathers for HeSS-mixed keeps of the same
     mean). The global knob is ε. [PROPOSED]
   - ``hylra`` — the profile planner of :mod:`surgeon.profiles.plan` (HyLRA layer roles, HeSS
     per-head keeps) at a compute budget; the knob is the budget.
   - ``block_topk``, ``token_topk``, ``window_sink`` — the single methods, uniform on every site;
     the knob is the keep fraction (window: the window as a fraction of the length);
   - ``block_topp``, ``token_topp`` (FlexPrefill-style and token-level mass budgets; knob p),
     ``vertical_slash`` (MInference; knob: the column + diagonal budget as a fraction of the
     length) and ``head_hybrid`` (DuoAttention: the share of KV groups, ranked model-wide by their
     profiled sink + local mass, that become sink + window heads; :func:`duo_policy`).

   Searched by default: ``DEFAULT_FAMILIES``; the others on request (``--families``).
3. **Closed loop.** Per family, bisection over the knob (the loss is assumed monotone in it)
   with one check per step on the validation rows at every serving length (shortest first; a
   failing length ends the check). A point passes when its validation loss is ≤ ``margin · T``
   at every length: the margin [PROPOSED, default 0.5] is headroom for the gap between
   validation and held-out text, which this model showed to be large at long lengths.
4. **Costs as the kernels run.** Each family's most aggressive passing point is rewritten and
   timed against dense, interleaved in one run (:func:`surgeon.benchmark.bench_program`, whole
   prefill and the sum of the site ops), at ``speed_length`` (default: the longest serving
   length). The fastest point with a whole-prefill speedup above 1 wins; when none is faster
   than dense, the policy is all dense and the result says so.
5. **Distributed.** Under ``torchrun`` (``WORLD_SIZE`` > 1) the families' closed-loop searches
   are divided across ranks (families ``rank, rank + N, …``); rank 0 gathers them in family
   order, times the candidates alone and writes, so the policy is the one a single process makes
   (validation losses are deterministic; the choice among candidates rests on rank 0's timings,
   as in one process). Frontier timings of checks made on concurrent ranks share the machine.
6. **Record.** The policy carries, per site, the chosen configuration, and in ``planner`` the
   tolerance, lengths, every check (family, knob, validation loss per length: the frontier)
   and the timings.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from surgeon.errors import BadInput

FAMILIES = ("surgeon", "hylra", "block_topk", "token_topk", "window_sink", "block_topp", "token_topp",
            "head_hybrid", "vertical_slash")
# searched unless --families says otherwise: the profile-driven plan, the adaptive methods and the
# cheapest single-method baselines (every family costs ~5 closed-loop checks at every length)
DEFAULT_FAMILIES = ("surgeon", "block_topp", "token_topk", "head_hybrid", "window_sink")
# knob grids, gentle → aggressive
EPS_GRID = (0.001, 0.002, 0.004, 0.007, 0.01, 0.015, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2)
BUDGET_GRID = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15)
KEEP_GRID = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1)
WINDOW_GRID = (0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05)
P_GRID = (0.998, 0.995, 0.99, 0.98, 0.97, 0.95, 0.93, 0.9, 0.85, 0.8)
STREAM_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)    # fraction of KV groups made streaming
VS_GRID = (0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05)          # vertical + slash budget / length


def check_tolerance(tolerance: Any) -> float:
    """``tolerance`` as a float in (0, 1), else BadInput (exit 2)."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(float(tolerance)) \
            or not 0.0 < float(tolerance) < 1.0:
        raise BadInput(f"--tolerance {tolerance} is outside (0, 1)",
                       "give the allowed relative quality loss, e.g. 0.01 for +1 % perplexity")
    return float(tolerance)


@dataclass(frozen=True)
class ToleranceSettings:
    """tolerance: allowed loss T; lengths: serving lengths (empty: the profile's and the model's
    maximum); val_tokens: validation tokens per length (rows = max(val_min_rows, val_tokens // length));
    margin: a point passes at validation loss ≤ margin·T; families: which families to search;
    speed_length: length of the timing run (None: the longest serving length); bench_repeats: timed
    rounds per candidate; dense_above: a ``surgeon``-family site whose padded keep exceeds this runs
    dense; frontier_timing: also time every checked point against dense at the profile's length
    (one interleaved round; the x axis of the frontier plot)."""

    tolerance: float = 0.01
    lengths: tuple[int, ...] = ()
    val_tokens: int = 8192
    val_min_rows: int = 1
    margin: float = 0.5
    families: tuple[str, ...] = DEFAULT_FAMILIES
    speed_length: Optional[int] = None
    bench_repeats: int = 2
    dense_above: float = 0.75
    frontier_timing: bool = True

    def __post_init__(self) -> None:
        check_tolerance(self.tolerance)
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise BadInput(f"unknown planner famil{'y' if len(bad) == 1 else 'ies'} {bad or '(none given)'}",
                           f"choose from {', '.join(FAMILIES)}")
        for n in self.lengths:
            if isinstance(n, bool) or not isinstance(n, int) or n < 16:
                raise BadInput(f"serving length {n!r} is invalid", "give lengths of at least 16 tokens")
        if not 0.0 < self.margin <= 1.0:
            raise BadInput(f"margin={self.margin} is outside (0, 1]", "use e.g. 0.5")
        if self.val_tokens < 16 or self.val_min_rows < 1 or self.bench_repeats < 1:
            raise BadInput("val_tokens, val_min_rows and bench_repeats must be positive",
                           "use the defaults (8192, 1, 2)")


@dataclass
class Check:
    family: str
    knob: float
    losses: dict[int, float]
    passed: bool
    sparse_sites: int
    seconds: float
    note: str = ""
    attn_speedup: Optional[float] = None  # measured at the frontier length (sum of site ops vs dense)
    speedup: Optional[float] = None       # whole prefill at the frontier length


@dataclass
class PlanOutcome:
    """What :func:`plan_within_tolerance` found. ``policy`` is the chosen policy (all dense when no
    faster policy stays within T); ``chosen`` the winning family (None: dense); ``candidates`` per
    family its best passing knob, validation losses and measured speed; ``checks`` every
    closed-loop check (the frontier)."""

    policy: Any
    chosen: Optional[str]
    tolerance: float
    lengths: list[int]
    speed_length: int
    candidates: list[dict[str, Any]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""
    crossover: dict[str, Any] = field(default_factory=dict)
    margin: float = 0.5
    frontier_length: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "tolerance": self.tolerance, "lengths": self.lengths,
                "margin": self.margin, "frontier_length": self.frontier_length,
                "speed_length": self.speed_length, "candidates": self.candidates,
                "checks": [{**asdict(c), "losses": {str(k): v for k, v in c.losses.items()}} for c in self.checks],
                "seconds": self.seconds, "note": self.note, "crossover": self.crossover}


# --------------------------------------------------------------------------- data

def serving_lengths(profile: Any, lm: Any, lengths: Sequence[int] = ()) -> list[int]:
    """The lengths T must hold at: ``lengths``, else the profile's and the model's maximum."""
    maxpos = int(lm.max_positions or 0)
    if lengths:
        out = sorted(set(int(n) for n in lengths))
        if maxpos and out[-1] > maxpos:
            raise BadInput(f"serving length {out[-1]} is beyond {lm.name}'s {maxpos} positions",
                           f"give lengths of at most {maxpos}")
        return out
    prof_len = int(profile.settings.get("seq_len") or profile.data.get("seq_len") or 0)
    out = {n for n in (prof_len, maxpos) if n}
    return sorted(out) or [prof_len or 512]


def validation_data(lm: Any, profile: Any, length: int, rows: int):
    """``rows`` rows of ``length`` tokens from the calibration split of the profile's data source,
    disjoint from every row the profile was computed on (so planning never scores the profile's
    own tokens, and never touches the held-out split). Fewer disjoint rows than asked: as many as
    there are (at least one, else BadInput)."""
    from surgeon.profiles.data import BUILTIN_SOURCE, CalibrationData, _fingerprint, calibration_tokens

    src = profile.data.get("source")
    path = None if src in (None, BUILTIN_SOURCE) else src
    if src == "texts":
        raise BadInput("the profile was made from in-memory texts, which the planner cannot read again",
                       "profile from a file (--data) or the built-in corpus")
    ids, source, ndocs = calibration_tokens(path, lm, "calib")
    s = int(profile.data.get("seq_len") or 0)
    used = [(int(i) * s, (int(i) + 1) * s) for i in profile.data.get("rows", [])]
    n_rows = len(ids) // length
    free = [j for j in range(n_rows)
            if all((j + 1) * length <= a or j * length >= b for a, b in used)]
    if not free:
        raise BadInput(f"the calibration split of {source} has no {length}-token row that the profile did not use",
                       "give more calibration text (--data), or plan at shorter --lengths")
    # spread the picks over the free rows, deterministically
    take = min(rows, len(free))
    pick = sorted({free[(i * len(free)) // take] for i in range(take)})
    t = torch.tensor([ids[j * length:(j + 1) * length] for j in pick], dtype=torch.long)
    return CalibrationData(inputs=(t, torch.ones_like(t)), source=source, split="validation",
                           fingerprint=_fingerprint("validation", t), seq_len=length, tokens_available=len(ids),
                           documents=ndocs, rows_available=n_rows, row_indices=pick)


# --------------------------------------------------------------------------- families

def _site_names(cap: Any) -> list[str]:
    return [s.name for s in cap.sites]


def surgeon_policy(profile: Any, cap: Any, eps: float, dense_above: float, fingerprint: str):
    """Per head the cheapest profiled keep with mass miss ≤ eps; per site the largest head keep
    (padding); dense above ``dense_above``."""
    from surgeon.passes.policy import Policy, SiteChoice

    grid = [float(k) for k in profile.settings["keep_grid"]]
    bs = int(profile.settings.get("block_size", 64))
    sb = int(profile.settings.get("sink_blocks", 1))
    lb = int(profile.settings.get("local_blocks", 1))
    by_name = {s.name: s for s in profile.sites}
    sites: dict[str, SiteChoice] = {}
    for name in _site_names(cap):
        sp = by_name[name]
        need = []
        for cov in sp.coverage:
            k = next((g for g, c in zip(grid, cov) if 1.0 - float(c) <= eps), 1.0)
            need.append(k)
        keep = max(need) if need else 1.0
        if keep > dense_above:
            sites[name] = SiteChoice(variant="dense", reason=f"tolerance:surgeon eps={eps:g}: keep {keep:g} needed")
        else:
            sites[name] = SiteChoice(variant="block_topk", params={"keep": keep, "block_size": bs, "sink_blocks": sb,
                                                                   "local_blocks": lb},
                                     reason=f"tolerance:surgeon eps={eps:g}")
    return Policy(model_fingerprint=fingerprint, source=f"tolerance:surgeon eps={eps:g}", sites=sites)


def family_policy(family: str, knob: float, profile: Any, cap: Any, lm: Any, length: int,
                  settings: ToleranceSettings):
    """The policy of ``family`` at ``knob`` (see the module docstring)."""
    from surgeon.passes.policy import uniform_policy

    fp = lm.fingerprint()
    names = _site_names(cap)
    bs = int(profile.settings.get("block_size", 64))
    if family == "surgeon":
        return surgeon_policy(profile, cap, knob, settings.dense_above, fp)
    if family == "hylra":
        from surgeon.profiles.plan import plan

        pol = plan(profile, knob)
        return pol.model_copy(update={"source": f"tolerance:hylra budget={knob:g}"})
    if family == "block_topk":
        pol = uniform_policy(fp, names, "block_topk", {"keep": knob, "block_size": bs})
    elif family == "token_topk":
        pol = uniform_policy(fp, names, "token_topk", {"keep": knob, "n_init": 64, "n_local": 128})
    elif family == "window_sink":
        pol = uniform_policy(fp, names, "window_sink", {"window": max(16, int(round(knob * length))),
                                                        "sink_tokens": 4})
    elif family == "block_topp":
        pol = uniform_policy(fp, names, "block_topp", {"p": knob, "block_size": bs})
    elif family == "token_topp":
        pol = uniform_policy(fp, names, "token_topp", {"p": knob, "n_init": 64, "n_local": 128})
    elif family == "vertical_slash":
        n = max(16, int(round(knob * length / 2)))
        pol = uniform_policy(fp, names, "vertical_slash", {"n_vertical": n, "n_slash": n})
    elif family == "head_hybrid":
        return duo_policy(profile, cap, knob, fp)
    else:  # pragma: no cover — ToleranceSettings validates families
        raise BadInput(f"unknown family {family}", f"choose from {', '.join(FAMILIES)}")
    return pol.model_copy(update={"source": f"tolerance:{family} {knob:g}"})


def duo_policy(profile: Any, cap: Any, fraction: float, fingerprint: str):
    """DuoAttention-style head split [PROPOSED scoring]: every (site, KV group) is ranked model-wide
    by its streaming score — the profiled attention mass its query heads put on the sink key plus
    the ``local_window`` nearest keys (a head that attends only there loses nothing under
    sink + window attention) — and the top ``fraction`` of groups become ``streaming`` (64 sink
    tokens + a 256-token window, DuoAttention's setting), the rest stay dense, per site in one
    ``head_hybrid`` op. Sites with no streaming group stay ``dense``."""
    from surgeon.passes.policy import Policy, SiteChoice

    by_name = {s.name: s for s in profile.sites}
    scores: list[tuple[float, str, int]] = []
    groups: dict[str, int] = {}
    for site in cap.sites:
        sp = by_name[site.name]
        g = int(site.kv_heads)
        per = max(1, int(site.heads) // g)
        groups[site.name] = g
        for j in range(g):
            hs = range(j * per, (j + 1) * per)
            score = sum(float(sp.local_mass[h]) + float(sp.primary_sink_mass[h]) for h in hs) / per
            scores.append((score, site.name, j))
    scores.sort(key=lambda t: (-t[0], t[1], t[2]))
    take = int(round(fraction * len(scores)))
    streaming: dict[str, set[int]] = {}
    for _, name, j in scores[:take]:
        streaming.setdefault(name, set()).add(j)
    sites: dict[str, SiteChoice] = {}
    for site in cap.sites:
        st = streaming.get(site.name, set())
        if not st:
            sites[site.name] = SiteChoice(variant="dense", reason=f"tolerance:head_hybrid {fraction:g}")
            continue
        kinds = ["streaming" if j in st else "dense" for j in range(groups[site.name])]
        sites[site.name] = SiteChoice(variant="head_hybrid", params={"kinds": kinds, "sink_tokens": 64, "window": 256},
                                      reason=f"tolerance:head_hybrid {fraction:g}")
    return Policy(model_fingerprint=fingerprint, source=f"tolerance:head_hybrid {fraction:g}", sites=sites)


def _grid(family: str) -> tuple[float, ...]:
    return {"surgeon": EPS_GRID, "hylra": BUDGET_GRID, "block_topk": KEEP_GRID, "token_topk": KEEP_GRID,
            "window_sink": WINDOW_GRID, "block_topp": P_GRID, "token_topp": P_GRID, "head_hybrid": STREAM_GRID,
            "vertical_slash": VS_GRID}[family]


# --------------------------------------------------------------------------- closed loop

class Validator:
    """Validation loss of policies at each serving length (dense references computed once)."""

    def __init__(self, lm: Any, cap: Any, profile: Any, lengths: Sequence[int], settings: ToleranceSettings,
                 progress: Callable[[str], None]) -> None:
        self.lm, self.cap, self.settings, self.say = lm, cap, settings, progress
        self.frontier_length = int(profile.settings.get("seq_len") or min(lengths))
        self.lengths = list(lengths)
        self.data = {n: validation_data(lm, profile, n, max(settings.val_min_rows, settings.val_tokens // n))
                     for n in self.lengths}
        self._dense: dict[int, Any] = {}
        self._dense_module = cap.program.module()

    def _score(self, module: torch.nn.Module, n: int) -> Any:
        from surgeon.evaluate import embeddings, lm_nll

        ids, mask = self.data[n].inputs
        if self.lm.kind == "causal-lm":
            return lm_nll(module, ids, mask)
        return embeddings(module, (ids, mask))

    def dense(self, n: int) -> Any:
        if n not in self._dense:
            self._dense[n] = self._score(self._dense_module, n)
        return self._dense[n]

    def loss(self, module: torch.nn.Module, n: int) -> float:
        import torch.nn.functional as F

        got, ref = self._score(module, n), self.dense(n)
        if self.lm.kind == "causal-lm":
            (nll, cnt), (dnll, _) = got, ref
            return math.exp(nll / cnt - dnll / cnt) - 1.0
        return float(1.0 - F.cosine_similarity(got, ref, dim=-1).mean())

    def check(self, family: str, knob: float, policy: Any) -> Check:
        from surgeon.passes.rewrite import rewrite

        t0 = time.perf_counter()
        sparse = sum(1 for c in policy.sites.values() if c.variant != "dense")
        losses: dict[int, float] = {}
        passed = True
        timing: dict[str, Any] = {}
        if sparse:
            program = rewrite(self.cap, policy).program
            module = program.module()
            for n in self.lengths:
                losses[n] = self.loss(module, n)
                if losses[n] > self.settings.margin * self.settings.tolerance:
                    passed = False
                    break
            if self.settings.frontier_timing:
                from surgeon.benchmark import bench_program

                b = bench_program(program, self.lm, seq_lens=[self.frontier_length], repeats=1,
                                  limits=(16, int(self.lm.max_positions or 1 << 30)))
                if b["results"]:
                    timing = {"attn_speedup": b["results"][0].get("attn_speedup"),
                              "speedup": b["results"][0].get("speedup")}
        else:
            losses = {n: 0.0 for n in self.lengths}
        c = Check(family, float(knob), losses, passed, sparse, time.perf_counter() - t0, **timing)
        shown = ", ".join(f"{n}: {100 * v:+.2f}%" for n, v in losses.items())
        self.say(f"plan: {family} {knob:g} → {shown} {'ok' if passed else 'over'}")
        return c


def search_family(family: str, validator: Validator, build: Callable[[float], Any]) -> tuple[Optional[int], list[Check]]:
    """Bisection over the family's grid: the index of the most aggressive passing knob (None: none
    passes) and the checks made."""
    grid = _grid(family)
    checks: list[Check] = []
    cache: dict[int, bool] = {}

    def ok(i: int) -> bool:
        if i not in cache:
            try:
                pol = build(grid[i])
            except BadInput as e:  # e.g. a budget below the plan's floor at this length: not reachable
                checks.append(Check(family, float(grid[i]), {}, False, 0, 0.0, note=e.one_line()))
                cache[i] = False
                return False
            c = validator.check(family, grid[i], pol)
            checks.append(c)
            cache[i] = c.passed
        return cache[i]

    lo, hi = -1, len(grid)  # invariant: lo passes (or −1), hi fails (or len)
    # probe the gentlest first: when it fails, the family cannot meet T
    if not ok(0):
        return None, checks
    lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, checks


def plan_within_tolerance(lm: Any, cap: Any, profile: Any, settings: ToleranceSettings,
                          progress: Optional[Callable[[str], None]] = None) -> PlanOutcome:
    """The fastest policy within ``settings.tolerance`` (see the module docstring)."""
    from surgeon.benchmark import bench_program
    from surgeon.passes.policy import identity_policy
    from surgeon.passes.rewrite import rewrite

    say = progress or (lambda msg: None)
    t_all = time.perf_counter()
    profile.check_sites(_site_names(cap))
    lengths = serving_lengths(profile, lm, settings.lengths)
    speed_len = int(settings.speed_length or lengths[-1])
    say(f"plan: validation rows at {', '.join(map(str, lengths))} tokens (calibration split, not profiled)")
    val = Validator(lm, cap, profile, lengths, settings, say)
    outcome = PlanOutcome(policy=None, chosen=None, tolerance=settings.tolerance, lengths=lengths,
                          speed_length=speed_len, margin=settings.margin, frontier_length=val.frontier_length)
    best_by_family: dict[str, tuple[float, Any, Check]] = {}
    from surgeon.profiles import distributed

    world = distributed.current()
    # under torchrun each rank searches its share of the families; rank 0 gathers them in family order
    mine = world.split(list(settings.families)) if world is not None else list(settings.families)
    found: list[tuple[str, Optional[int], list[Check]]] = []
    err: Optional[BaseException] = None
    try:
        for fam in mine:
            build = (lambda x, fam=fam: family_policy(fam, x, profile, cap, lm, lengths[-1], settings))
            idx, checks = search_family(fam, val, build)
            found.append((fam, idx, checks))
    except BaseException as e:  # noqa: BLE001 — distributed: every rank learns of it
        if world is None:
            raise
        err = e
    if world is not None:
        gathered = world.gather_units(found, err)
        if gathered is None:  # a rank other than 0: rank 0 times, chooses and writes
            return None  # type: ignore[return-value]
        order = {f: i for i, f in enumerate(settings.families)}
        found = sorted(gathered, key=lambda t: order[t[0]])
    for fam, idx, checks in found:
        build = (lambda x, fam=fam: family_policy(fam, x, profile, cap, lm, lengths[-1], settings))
        outcome.checks.extend(checks)
        if idx is None:
            outcome.candidates.append({"family": fam, "knob": None, "note": "no setting stays within the tolerance"})
            continue
        knob = _grid(fam)[idx]
        pol = build(knob)
        chk = next(c for c in checks if c.knob == knob)
        if chk.sparse_sites == 0:
            outcome.candidates.append({"family": fam, "knob": knob, "validation": chk.losses,
                                       "note": "all sites dense at the passing setting"})
            continue
        best_by_family[fam] = (knob, pol, chk)
    # costs as the kernels run: each family's best point against dense, interleaved
    timed: list[tuple[float, str, Any]] = []
    limits = (16, int(lm.max_positions or 1 << 30))
    for fam, (knob, pol, chk) in best_by_family.items():
        say(f"plan: timing {fam} {knob:g} against dense at {speed_len} tokens")
        prog = rewrite(cap, pol).program
        b = bench_program(prog, lm, seq_lens=[speed_len], repeats=settings.bench_repeats, limits=limits)
        r = b["results"][0] if b["results"] else {}
        cand = {"family": fam, "knob": knob, "validation": chk.losses,
                "sparse_sites": chk.sparse_sites, "speedup": r.get("speedup"), "attn_speedup": r.get("attn_speedup"),
                "density": r.get("density"), "dense_ms": r.get("dense_ms"), "rewritten_ms": r.get("rewritten_ms")}
        outcome.candidates.append(cand)
        if r.get("speedup") is not None:
            timed.append((float(r["speedup"]), fam, pol))
    timed.sort(key=lambda t: -t[0])
    if timed and timed[0][0] > 1.0:
        sp, fam, pol = timed[0]
        outcome.chosen = fam
        say(f"plan: measuring where {fam}'s sites start to pay")
        pol, crossover = with_crossovers(pol, cap, lm, speed_len, settings.bench_repeats, limits)
        outcome.crossover = crossover
        outcome.policy = pol
        outcome.note = f"{fam} is the fastest within the tolerance: {sp:.2f}× whole prefill at {speed_len} tokens"
    else:
        outcome.policy = identity_policy(lm.fingerprint(), _site_names(cap))
        outcome.note = ("only the all-dense plan stays within the tolerance" if not timed else
                        f"no plan within the tolerance is faster than dense at {speed_len} tokens "
                        f"(best {timed[0][0]:.2f}×): the result is all dense")
    outcome.seconds = time.perf_counter() - t_all
    outcome.policy = outcome.policy.model_copy(update={"planner": outcome.to_dict()})
    return outcome


LADDER = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def with_crossovers(policy: Any, cap: Any, lm: Any, top: int, repeats: int,
                    limits: tuple[int, int]) -> tuple[Any, dict[str, Any]]:
    """Per sparse site, the measured length from which its op is faster than dense SDPA on the
    same q/k/v (per-site op times inside real prefills at a ladder of lengths up to ``top``):
    the smallest measured length L such that the site is faster at L and at every longer measured
    length. The site gets ``dense_below = L`` (shorter inputs run dense, so they are never slower
    than the original); a site faster at no measured length, or not faster at ``top``, runs dense.
    Returns the new policy and the measurements."""
    from surgeon.benchmark import bench_program
    from surgeon.passes.policy import SiteChoice
    from surgeon.passes.rewrite import rewrite

    lengths = sorted({n for n in LADDER if n < top and n >= limits[0]} | {top})
    prog = rewrite(cap, policy).program
    b = bench_program(prog, lm, seq_lens=lengths, repeats=repeats, limits=limits)
    per: dict[str, dict[int, tuple[float, float]]] = {}
    for r in b["results"]:
        for st in r["sites"]:
            per.setdefault(st["site"], {})[int(r["seq_len"])] = (float(st["dense_ms"]), float(st["rewritten_ms"]))
    sites = dict(policy.sites)
    record: dict[str, Any] = {"lengths": [int(r["seq_len"]) for r in b["results"]], "sites": {}}
    anchors_dense: set[str] = set()
    for name, ch in policy.sites.items():
        if ch.variant == "dense" or name not in per:
            continue
        meas = per[name]
        ls = sorted(meas)
        start = None
        for i in range(len(ls) - 1, -1, -1):
            d, r = meas[ls[i]]
            if r < d:
                start = ls[i]
            else:
                break
        record["sites"][name] = {"dense_below": start,
                                 "ms": {str(n): {"dense": meas[n][0], "sparse": meas[n][1]} for n in ls}}
        if start is None:
            anchors_dense.add(name)
        else:
            sites[name] = ch.model_copy(update={"dense_below": int(start)})
    for name in anchors_dense:  # never pays at the measured lengths: dense (consumers keep their own choice)
        ch = sites[name]
        consumers = [n for n, c in sites.items() if c.block_mask_from == name]
        if consumers:  # an anchor feeding others keeps its op, dense at every length it serves
            sites[name] = ch.model_copy(update={"dense_below": int(top) + 1})
        else:
            sites[name] = SiteChoice(variant="dense", reason=f"{ch.reason}; not faster than dense up to {top} tokens")
    record["device"] = b.get("device")
    return policy.model_copy(update={"sites": sites}), record
