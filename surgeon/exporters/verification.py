"""Verification of an export: comparing outputs, the error table and the error it raises.

Used by both exporters: :mod:`surgeon.exporters.pipeline` (onnxruntime against PyTorch) and
:mod:`surgeon.exporters.tensorrt` (the TensorRT engine against onnxruntime).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from surgeon.errors import CheckFailed


class VerificationFailed(CheckFailed):
    """onnxruntime (or the TensorRT engine) disagrees with PyTorch. ``table`` is the error table
    (one line per input case and output), ``rows`` the same as dicts. Exit 1."""

    def __init__(self, problem: str, fix: str, table: str, rows: list[dict[str, Any]]) -> None:
        super().__init__(problem, fix)
        self.table = table
        self.rows = rows


def compare_output(want: np.ndarray, got: np.ndarray, valid: Optional[np.ndarray], rtol: float,
                   atol: float) -> dict[str, Any]:
    """Max abs error, max error relative to max |want|, tolerance and verdict for one output.

    ``valid`` bool [B, N] restricts the comparison to real tokens when the output starts with
    those axes. Bool/int outputs must be equal.
    """
    row: dict[str, Any] = {"shape": list(want.shape)}
    if want.shape != got.shape:
        row.update(max_abs_err=math.inf, max_rel_err=math.inf, tol=0.0, ok=False, got_shape=list(got.shape))
        return row
    if valid is not None and want.ndim >= 2 and want.shape[:2] == valid.shape:
        want, got = want[valid], got[valid]
    if want.dtype.kind in "biu" or got.dtype.kind in "biu":
        bad = int(np.count_nonzero(want.astype(np.int64) != got.astype(np.int64)))
        row.update(max_abs_err=float(bad > 0), max_rel_err=float(bad > 0), tol=0.0, ok=bad == 0, mismatched=bad)
        return row
    w, g = want.astype(np.float64), got.astype(np.float64)
    finite = np.isfinite(w) & np.isfinite(g)
    same_special = (~np.isfinite(w)) & (~np.isfinite(g)) & ((w == g) | (np.isnan(w) & np.isnan(g)))
    diff = np.where(finite, np.abs(w - g), np.where(same_special, 0.0, np.inf))
    scale = float(np.abs(w[np.isfinite(w)]).max()) if np.isfinite(w).any() else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    tol = atol + rtol * scale
    row.update(max_abs_err=max_abs, max_rel_err=max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf),
               tol=tol, ok=bool(max_abs <= tol))
    return row


def error_table(rows: list[dict[str, Any]]) -> str:
    """The verification rows as an aligned text table (one line per input case and output)."""
    head = f"{'batch':>5} {'length':>6}  {'output':<20} {'max_abs_err':>11} {'max_rel_err':>11} {'tol':>9}  ok"
    lines = [head]
    for r in rows:
        lines.append(f"{r['batch']:>5} {r['length']:>6}  {r['output'][:20]:<20} {r['max_abs_err']:>11.3e} "
                     f"{r['max_rel_err']:>11.3e} {r['tol']:>9.2e}  {'yes' if r['ok'] else 'NO'}")
    return "\n".join(lines)
