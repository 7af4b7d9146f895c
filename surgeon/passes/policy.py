"""The policy artifact: which variant (and parameters) each site runs."""
from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from surgeon.artifacts import Artifact
from surgeon.errors import BadInput


class Modulator(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: str
    params: dict[str, Any] = Field(default_factory=dict)


class SiteChoice(BaseModel):
    """One site's choice. ``block_mask_from`` names the anchor site whose block mask a
    consumer variant (``reuse``, ``delta_sparse``) reads; ``modulators`` are modulated variants
    composed onto this site's variant."""

    model_config = ConfigDict(extra="forbid")
    variant: str
    params: dict[str, Any] = Field(default_factory=dict)
    block_mask_from: Optional[str] = None
    modulators: list[Modulator] = Field(default_factory=list)
    reason: str = ""
    # shorter inputs (keys) run dense: measured crossover of this configuration (None: always sparse)
    dense_below: Optional[int] = None


class Policy(Artifact):
    KIND = "policy"
    VERSION = 1
    kind: str = "policy"
    schema_version: int = 1
    budget: Optional[float] = None
    source: str = ""
    sites: dict[str, SiteChoice]
    # the tolerance planner's record (tolerance, lengths, checks, candidates); None for other plans
    planner: Optional[dict[str, Any]] = None

    def to_json(self) -> str:
        """Canonical JSON; the optional fields added after schema 1 (``planner``, a site's
        ``dense_below``) are left out when unset, so older policies keep their exact bytes."""
        from surgeon.artifacts import canonical_json

        d = self.model_dump(mode="json")
        if d.get("planner") is None:
            d.pop("planner", None)
        for ch in d["sites"].values():
            if ch.get("dense_below") is None:
                ch.pop("dense_below", None)
        return canonical_json(d)


def identity_policy(fingerprint: str, site_names: list[str]) -> Policy:
    """Every site ``dense``."""
    return Policy(model_fingerprint=fingerprint, source="identity",
                  sites={n: SiteChoice(variant="dense", reason="identity") for n in site_names})


def uniform_policy(fingerprint: str, site_names: list[str], variant: str, params: Optional[dict] = None) -> Policy:
    return Policy(model_fingerprint=fingerprint, source=f"uniform:{variant}",
                  sites={n: SiteChoice(variant=variant, params=dict(params or {})) for n in site_names})


def match_sites(pattern: str, site_names: list[str]) -> list[str]:
    """Site names matching a glob (``*`` spans dots)."""
    return [n for n in site_names if fnmatch.fnmatchcase(n, pattern)]


def policy_from_recipe(recipe: dict[str, Any], fingerprint: str, site_names: list[str],
                       base: Optional[Policy] = None) -> Policy:
    """Apply a recipe ``{glob: {variant: NAME, ...params, modulators: [...], block_mask_from: SITE}}``.

    Later globs override earlier ones; sites matched by no glob keep ``base`` (or dense).
    A glob that matches no site is an error naming the sites.
    """
    from surgeon.attention.registry import VARIANTS

    if not isinstance(recipe, dict) or not recipe:
        raise BadInput("the recipe is empty or not a mapping", 'write it as {"<site glob>": {variant: NAME, ...}}')
    sites = dict(base.sites) if base else {n: SiteChoice(variant="dense", reason="default") for n in site_names}
    for glob, spec in recipe.items():
        if isinstance(spec, str):
            spec = {"variant": spec}
        if not isinstance(spec, dict) or "variant" not in spec:
            raise BadInput(f"recipe entry '{glob}' has no variant", f"valid variants: {', '.join(sorted(VARIANTS))}")
        spec = dict(spec)
        variant = spec.pop("variant")
        if variant not in VARIANTS:
            raise BadInput(f"recipe entry '{glob}' names unknown variant '{variant}'",
                           f"valid variants: {', '.join(sorted(VARIANTS))}")
        matched = match_sites(glob, site_names)
        if not matched:
            shown = ", ".join(site_names[:3]) + (", …" if len(site_names) > 3 else "")
            raise BadInput(f"recipe glob '{glob}' matches no site", f"site names look like: {shown}")
        mods = []
        for m in spec.pop("modulators", []) or []:
            if isinstance(m, str):
                m = {"variant": m}
            mv = m.get("variant")
            if mv not in VARIANTS:
                raise BadInput(f"recipe entry '{glob}' names unknown modulator '{mv}'",
                               f"valid variants: {', '.join(sorted(VARIANTS))}")
            mods.append(Modulator(variant=mv, params={k: v for k, v in m.items() if k != "variant"}))
        bmf = spec.pop("block_mask_from", None)
        for n in matched:
            sites[n] = SiteChoice(variant=variant, params=spec, block_mask_from=bmf, modulators=mods,
                                  reason=f"recipe:{glob}")
    return Policy(model_fingerprint=fingerprint, source="recipe", sites=sites)


def load_recipe(path: Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"no such recipe: {path}", "give a YAML or JSON recipe file")
    try:
        data = yaml.safe_load(path.read_text())
    except Exception as e:
        raise BadInput(f"{path} is not valid YAML/JSON ({type(e).__name__})", "fix the recipe syntax") from e
    if isinstance(data, dict) and "sites" in data and isinstance(data["sites"], dict):
        data = data["sites"]
    return data
