"""Settings of the calibration profiler (:class:`ProfileSettings`) and its fixed grids.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from surgeon.errors import BadInput
from surgeon.models import LoadedModel


ProgressFn = Callable[[str, int, int], None]


DEFAULT_KEEP_GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)


COVERAGES = (0.9, 0.95)


HESS_TERMS = ("ce", "pseudo_ce")


@dataclass(frozen=True)
class ProfileSettings:
    """Every knob that shapes the profile (all recorded in ``profile.settings``).

    ref_keep: the reference block_topk keep used for δ (HeSS), the overlap top-k and layer
    sensitivity; sink_blocks/local_blocks: block_topk's forced blocks; keep_grid: κ values of
    the coverage curves; local_window: tokens counted as "local"; sink_*: methods.md §13f
    thresholds [PROPOSED there]; grad_*: HeSS gradient passes (None → defaults below);
    sens_*: layer-sensitivity forwards; chunk_elems: elements per [Hq, c, Nk] chunk tensor.
    """

    samples: int = 8
    seq_len: int = 2048
    block_size: int = 64
    seed: int = 0
    ref_keep: float = 0.15
    sink_blocks: int = 1
    local_blocks: int = 1
    keep_grid: tuple[float, ...] = DEFAULT_KEEP_GRID
    local_window: int = 128
    sink_ratio: float = 5.0
    sink_min_score: float = 0.02
    sink_cos: float = 0.8
    sink_min_queries: int = 32
    gradients: bool = True
    grad_samples: Optional[int] = None
    grad_seq_len: Optional[int] = None
    sensitivity: bool = True
    sens_samples: Optional[int] = None
    sens_seq_len: Optional[int] = None
    chunk_elems: int = 1 << 23

    def __post_init__(self) -> None:
        def pos_int(name: str, v: Any, lo: int = 1) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise BadInput(f"{name}={v!r} is invalid", f"use an integer >= {lo}")

        pos_int("samples", self.samples)
        pos_int("seq_len", self.seq_len)
        pos_int("block_size", self.block_size)
        pos_int("seed", self.seed, 0)
        pos_int("sink_blocks", self.sink_blocks, 0)
        pos_int("local_blocks", self.local_blocks, 0)
        pos_int("local_window", self.local_window)
        pos_int("sink_min_queries", self.sink_min_queries)
        pos_int("chunk_elems", self.chunk_elems)
        for nm in ("grad_samples", "grad_seq_len", "sens_samples", "sens_seq_len"):
            v = getattr(self, nm)
            if v is not None:
                pos_int(nm, v, 0 if nm.endswith("samples") else 16)
        if not (0.0 < float(self.ref_keep) <= 1.0):
            raise BadInput(f"ref_keep={self.ref_keep} is out of range", "use a keep fraction in (0, 1]")
        if not self.keep_grid or any(not (0.0 < float(k) <= 1.0) for k in self.keep_grid) or \
                list(self.keep_grid) != sorted(self.keep_grid):
            raise BadInput(f"keep_grid={self.keep_grid} is invalid", "give increasing fractions in (0, 1]")

    # -- resolved values ------------------------------------------------------------
    def resolved(self, lm: LoadedModel, seq_len: int) -> dict[str, Any]:
        """The settings with defaults filled in for ``lm`` (what the profile records)."""
        lm_loss = lm.kind == "causal-lm"
        grad = bool(self.gradients and lm_loss and self.grad_samples != 0)
        sens = bool(self.sensitivity and self.sens_samples != 0)
        gs = min(seq_len, self.grad_seq_len or 1024) if lm.is_text else seq_len
        ss = min(seq_len, self.sens_seq_len or 1024) if lm.is_text else seq_len
        d = asdict(self)
        d["keep_grid"] = list(self.keep_grid)
        d.update({
            "seq_len": seq_len,
            "gradients": grad,
            "grad_samples": (min(self.samples, self.grad_samples) if self.grad_samples is not None
                             else self.samples) if grad else 0,
            "grad_seq_len": gs if grad else 0,
            "grad_checkpointing": False,
            "grad_window": ("full" if gs >= seq_len else f"first {gs} tokens of each sample") if grad else "none",
            "hess_method": "gradient" if grad else "label-free",
            "hess_terms": list(HESS_TERMS) if grad else [],
            "sensitivity": sens,
            "sens_samples": (min(self.samples, self.sens_samples) if self.sens_samples is not None
                             else min(self.samples, 2)) if sens else 0,
            "sens_seq_len": ss if sens else 0,
            "sensitivity_metric": "ce_increase" if lm_loss else "rel_l2",
            "coverages": list(COVERAGES),
            "sink_alignment": "q_proj_input",
        })
        return d
