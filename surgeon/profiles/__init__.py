"""Calibration profiling and planning.

Public API (imported lazily, so ``import surgeon.profiles`` does no work):

* :func:`profile` ``(lm, cap, *, texts | data_path, samples, seq_len, block_size, seed, progress)
  → Profile`` — :mod:`surgeon.profiles.collect`
* ``plan(profile, budget, *, options) → Policy`` — import it as
  ``from surgeon.profiles.plan import plan`` (the name ``surgeon.profiles.plan`` is the module)
* :func:`write_report` ``(profile, policy, path)`` — :mod:`surgeon.profiles.report`
* :func:`load_calibration` ``(path | None, lm, samples, seq_len, split)`` — :mod:`surgeon.profiles.data`
* :class:`Profile` — :mod:`surgeon.profiles.profile_doc`
* evidence: :func:`compare_head_budgets`, :func:`compare_layer_policies` — :mod:`surgeon.profiles.evidence`
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "profile": "surgeon.profiles.collect",
    "ProfileSettings": "surgeon.profiles.profile_settings",
    "compare_head_budgets": "surgeon.profiles.evidence",
    "compare_layer_policies": "surgeon.profiles.evidence",
    "evaluate_policies": "surgeon.profiles.evidence",
    "plan_details": "surgeon.profiles.plan",
    "PlanOptions": "surgeon.profiles.plan",
    "DEFAULT_BUDGET_CAUSAL": "surgeon.profiles.plan",
    "write_report": "surgeon.profiles.report",
    "render_report": "surgeon.profiles.report",
    "load_calibration": "surgeon.profiles.data",
    "CalibrationData": "surgeon.profiles.data",
    "Profile": "surgeon.profiles.profile_doc",
    "SiteProfile": "surgeon.profiles.profile_doc",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'surgeon.profiles' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)
