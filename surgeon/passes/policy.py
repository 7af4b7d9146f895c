"""The policy artifact: which variant (and parameters) each site runs."""
from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from surgeon.artifacts import Artifact
from surgeon.errors import BadInput


class Modulator(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: str
    params: dict[str, Any] = Field(default_factory=dict)


class DecodeSpec(BaseModel):
    """A site's decode mode (what each generation step runs against the KV cache): ``mode`` is a
    name in :data:`surgeon.generation.decode.DECODE_MODES` (``dense``, ``token_select``)."""

    model_config = ConfigDict(extra="forbid")
    mode: str = "dense"
    params: dict[str, Any] = Field(default_factory=dict)


class SiteChoice(BaseModel):
    """One site's choice. ``block_mask_from`` names the anchor site whose block mask a
    consumer variant (``reuse``, ``delta_sparse``) reads; ``modulators`` are modulated variants
    composed onto this site's variant; ``decode`` the decode mode of generation steps (None:
    dense over the cache; omitted from the JSON when None, so older policies keep their bytes)."""

    model_config = ConfigDict(extra="forbid")
    variant: str
    params: dict[str, Any] = Field(default_factory=dict)
    block_mask_from: Optional[str] = None
    modulators: list[Modulator] = Field(default_factory=list)
    reason: str = ""
    decode: Optional[DecodeSpec] = None

    @model_serializer(mode="wrap")
    def _omit_default_decode(self, handler: Any) -> dict[str, Any]:
        d = handler(self)
        if isinstance(d, dict) and d.get("decode") is None:
            d.pop("decode", None)
        return d


def decode_spec_from(raw: Any, where: str) -> Optional[DecodeSpec]:
    """A recipe's ``decode:`` entry (a mode name or ``{mode: NAME, params: {...}}`` / ``{mode: NAME,
    **params}``) → a validated :class:`DecodeSpec`."""
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"mode": raw}
    if not isinstance(raw, dict) or "mode" not in raw:
        raise BadInput(f"recipe entry '{where}' has a decode entry without a mode",
                       "write decode: {mode: token_select, params: {...}} (or decode: dense)")
    raw = dict(raw)
    mode = raw.pop("mode")
    params = dict(raw.pop("params", None) or {})
    params.update(raw)
    spec = DecodeSpec(mode=str(mode), params=params)
    from surgeon.generation.decode import mode_from_spec

    mode_from_spec(spec, where)  # validates the mode and its parameters
    return spec


class Policy(Artifact):
    KIND = "policy"
    VERSION = 1
    kind: str = "policy"
    schema_version: int = 1
    budget: Optional[float] = None
    source: str = ""
    sites: dict[str, SiteChoice]


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
    """Apply a recipe ``{glob: {variant: NAME, ...params, modulators: [...], block_mask_from: SITE,
    decode: {mode: NAME, params: {...}}}}`` (``decode``: the sites' decode mode for generation; an
    entry with ``decode`` alone sets the decode mode and keeps each matched site's variant).

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
        if isinstance(spec, dict) and set(spec) == {"decode"}:  # a decode mode only: keep each site's variant
            dec = decode_spec_from(spec["decode"], glob)
            matched = match_sites(glob, site_names)
            if not matched:
                shown = ", ".join(site_names[:3]) + (", …" if len(site_names) > 3 else "")
                raise BadInput(f"recipe glob '{glob}' matches no site", f"site names look like: {shown}")
            for n in matched:
                sites[n] = sites[n].model_copy(update={"decode": dec})
            continue
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
        dec = decode_spec_from(spec.pop("decode", None), glob)
        for n in matched:
            sites[n] = SiteChoice(variant=variant, params=spec, block_mask_from=bmf, modulators=mods,
                                  reason=f"recipe:{glob}", decode=dec)
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
