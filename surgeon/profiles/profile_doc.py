"""The profile artifact (``profile.json``): every calibration statistic the planners need.

One document per (model, calibration data, settings). Per site (one entry per attention site,
in graph order) the statistics are stored under named fields, one value per query head unless
the name says otherwise; model-wide matrices (inter-layer overlap, hash ratios, sinks) sit at
the top level. Same inputs and seed give a byte-identical file (canonical JSON, deterministic
computation).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from surgeon.artifacts import Artifact
from surgeon.errors import ArtifactMismatch


class SiteProfile(BaseModel):
    """Statistics of one attention site. Lists are per query head ([H]) unless noted.

    - ``mass_fraction_90`` / ``_95``: fraction of a query block's allowed key blocks needed to
      cover 90% / 95% of its attention mass (oracle top blocks), IQR-clipped mean over steps
      (steps = (sample, query block) pairs where block_topk makes a real choice).
    - ``mass_fraction_90_kv``: the same on the KV group's summed mass, per KV head ([G]) — HyLRA's
      per-step hash ratio; ``hash_ratio`` is its mean over KV heads.
    - ``coverage``: [H][len(settings.keep_grid)] mean attention mass covered by a block_topk-like
      oracle selection of ⌈κ·n_allowed⌉ key blocks for each κ of the keep grid: the forced blocks
      (sinks, local, causal boundary) first, then the heaviest remaining blocks by true mass.
    - ``entropy``: mean row entropy (nats); ``entropy_max``: mean over rows of log(#keys seen),
      the upper bound; ``entropy_normalized``: mean of entropy/log(#keys) over rows with ≥ 2 keys.
    - ``local_mass``: mean mass on the ``settings.local_window`` keys nearest the query.
    - ``primary_sink_mass``: mean mass on key 0 from later queries; ``sink_score``: σ_l(0)
      (the same averaged over heads); ``secondary_sinks``: mean number of secondary sinks per
      sample in this layer.
    - ``hess``: HeSS per head, Σ_e S_h^e / Σ_h' S_h'^e over the error terms ``hess_terms`` (raw
      S_h^e = E[(Σ dL_e/dO_h ⊙ δ_h)^2]) — or the label-free proxy where no gradient was taken;
      ``hess_proxy``: E‖δ_h‖² / E‖O_h‖² (δ = block-sparse − dense output at the reference keep).
    - ``sensitivity``: the calibration-loss increase when this layer alone runs block_topk at the
      reference keep (CE for causal LMs, else the relative L2 error of the output);
      ``sensitivity_rel_l2``: relative L2 error of the model output in the same run.
    """

    model_config = ConfigDict(extra="forbid")
    name: str
    layer: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    steps: int
    mass_fraction_90: list[float]
    mass_fraction_95: list[float]
    mass_fraction_90_kv: list[float]
    hash_ratio: float
    coverage: list[list[float]]
    entropy: list[float]
    entropy_max: float
    entropy_normalized: list[float]
    local_mass: list[float]
    primary_sink_mass: list[float]
    sink_score: float
    secondary_sinks: float
    hess: list[float]
    hess_terms: dict[str, list[float]] = Field(default_factory=dict)
    hess_proxy: list[float]
    sensitivity: Optional[float] = None
    sensitivity_rel_l2: Optional[float] = None


class Profile(Artifact):
    """``profile.json``. See :class:`SiteProfile` for the per-site fields.

    Top level: ``data_fingerprint`` (hash of the calibration rows), ``model`` (name, kind,
    sites), ``data`` (source, split, rows), ``settings`` (every knob that shaped the numbers,
    including the gradient window and the layer-sensitivity subset actually used),
    ``overlap`` [L][L] (directed top-k block overlap O[i][j] = mean |M_i ∩ M_j| / |M_j| for
    i < j, merged over KV heads by min; diagonal 1, lower triangle 0; rollback zeroing is the
    planner's job), ``overlap_per_kv_head`` [G][L][L], ``hash_ratios`` [L],
    ``layer_sensitivity`` [L] (None where not measured), ``sinks`` (primary-sink scores per
    layer and the secondary sinks found, each with start layer and lifetime).
    """

    KIND = "profile"
    VERSION = 1
    kind: str = "profile"
    schema_version: int = 1
    data_fingerprint: str
    model: dict[str, Any]
    data: dict[str, Any]
    settings: dict[str, Any]
    sites: list[SiteProfile]
    overlap: list[list[float]]
    overlap_per_kv_head: list[list[list[float]]]
    hash_ratios: list[float]
    layer_sensitivity: list[Optional[float]]
    sinks: dict[str, Any]

    @model_validator(mode="after")
    def _shapes(self) -> "Profile":
        """Array lengths agree with the sites and heads (a hand-edited or truncated profile is an
        error naming the field, not a crash in the planner)."""
        L = len(self.sites)
        if L == 0:
            raise ValueError("the profile has no sites")
        kg = self.settings.get("keep_grid")
        for i, st in enumerate(self.sites):
            for name in ("mass_fraction_90", "mass_fraction_95", "entropy", "entropy_normalized", "local_mass",
                         "primary_sink_mass", "hess", "hess_proxy", "coverage"):
                v = getattr(st, name)
                if len(v) != st.heads:
                    raise ValueError(f"sites[{i}].{name} has {len(v)} values for {st.heads} heads")
            if len(st.mass_fraction_90_kv) != st.kv_heads:
                raise ValueError(f"sites[{i}].mass_fraction_90_kv has {len(st.mass_fraction_90_kv)} values for "
                                 f"{st.kv_heads} KV heads")
            if isinstance(kg, list):
                for row in st.coverage:
                    if len(row) != len(kg):
                        raise ValueError(f"sites[{i}].coverage rows have {len(row)} values for a keep grid of {len(kg)}")
        for name in ("hash_ratios", "layer_sensitivity"):
            if len(getattr(self, name)) != L:
                raise ValueError(f"{name} has {len(getattr(self, name))} values for {L} sites")
        if len(self.overlap) != L or any(len(r) != L for r in self.overlap):
            raise ValueError(f"overlap is not {L} x {L}")
        for g, m in enumerate(self.overlap_per_kv_head):
            if len(m) != L or any(len(r) != L for r in m):
                raise ValueError(f"overlap_per_kv_head[{g}] is not {L} x {L}")
        return self

    # -- helpers ------------------------------------------------------------------
    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    def matrix(self, field: str) -> np.ndarray:
        """Per-head field as a [L, Hmax] float64 array (NaN where a site has fewer heads)."""
        hmax = max(s.heads for s in self.sites)
        out = np.full((len(self.sites), hmax), np.nan)
        for i, s in enumerate(self.sites):
            v = getattr(s, field)
            out[i, : len(v)] = v
        return out

    def check_sites(self, names: list[str]) -> None:
        """Raise ArtifactMismatch unless the profile covers exactly ``names`` (graph order)."""
        if self.site_names != list(names):
            missing = sorted(set(names) - set(self.site_names))[:3]
            extra = sorted(set(self.site_names) - set(names))[:3]
            raise ArtifactMismatch(
                f"the profile's sites differ from the model's (missing {missing}, unexpected {extra})",
                "profile this model again")


__all__ = ["Profile", "SiteProfile"]
