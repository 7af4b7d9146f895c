"""``surgeon.plan``: a per-site policy from a profile and a budget (the API door to
:func:`surgeon.profiles.plan.plan`).

Kept apart from :mod:`surgeon.api` only so the two can change independently; ``import surgeon``
exposes it as ``surgeon.plan`` like every other API function.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:  # pragma: no cover
    from surgeon.passes.policy import Policy
    from surgeon.profiles.plan import PlanOptions
    from surgeon.profiles.profile_doc import Profile


def plan(profile: Union["Profile", Path, str], budget: float, *,
         options: Union["PlanOptions", dict[str, Any], None] = None,
         model_fingerprint: Optional[str] = None) -> "Policy":
    """The policy for ``budget`` (kept fraction of dense attention compute) from ``profile``.

    ``profile``: a :class:`surgeon.profiles.Profile` or the path of a ``profile.json`` written by
    ``surgeon profile`` (checked against ``model_fingerprint`` when given). ``options``: a
    :class:`surgeon.profiles.PlanOptions` or its fields as a dict. Pure and deterministic; raises
    :class:`surgeon.errors.BadInput` when the budget is invalid or no plan fits it.
    """
    from surgeon.profiles.plan import plan as _plan
    from surgeon.profiles.profile_doc import Profile

    prof = profile if isinstance(profile, Profile) else Profile.load(profile, model_fingerprint=model_fingerprint)
    return _plan(prof, budget, options=options)
