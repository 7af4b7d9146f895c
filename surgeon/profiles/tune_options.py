"""``surgeon tune`` settings: defaults per variant, option parsing and :func:`check_options`.

Everything that can be checked without the model (see :mod:`surgeon.profiles.tune`).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from surgeon.errors import BadInput


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


GEOMETRIC_MASKS = ("none", "causal", "padding", "causal+padding")


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
    return tuple(sorted(set(six_digits(v) for v in vals)))


def six_digits(x: float) -> float:
    """Six significant digits: the value written to the recipe is the value evaluated."""
    return float(f"{float(x):.6g}")


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
    from surgeon.profiles.selectors import load_objective

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
