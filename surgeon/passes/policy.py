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
    name in :data:`surgeon.generation.decode.DECODE_MODES` (``dense``, ``token_select``, ``token_reuse``, ``page_select``, ``delta_plan``)."""

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
    # shorter inputs (keys) run dense: measured crossover of this configuration (None: always sparse)
    dense_below: Optional[int] = None
    decode: Optional[DecodeSpec] = None

    @model_serializer(mode="wrap")
    def _omit_default_decode(self, handler: Any) -> dict[str, Any]:
        d = handler(self)
        for k in ("decode", "dense_below"):  # added after schema 1: absent when unset (older bytes unchanged)
            if isinstance(d, dict) and d.get(k) is None:
                d.pop(k, None)
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
    # the tolerance planner's record (tolerance, lengths, checks, candidates); None for other plans
    planner: Optional[dict[str, Any]] = None

    def to_json(self) -> str:
        """Canonical JSON; the optional fields added after schema 1 (``planner``, a site's
        ``dense_below``) are left out when unset, so older policies keep their exact bytes."""
        from surgeon.artifacts import canonical_json

        d = self.model_dump(mode="json")
        if d.get("planner") is None:
            d.pop("planner", None)
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


def _type_ok(value: Any, t: str) -> bool:
    """Does ``value`` (as YAML/JSON gives it) fit the parameter type ``t`` (a dataclass field type
    string: int, float, bool, str, Optional[X], tuple[X, ...], tuple[X, Y])?"""
    t = t.replace(" ", "")
    if t.startswith("Optional[") and t.endswith("]"):
        return value is None or _type_ok(value, t[9:-1])
    if t.startswith("tuple[") and t.endswith("]"):
        if not isinstance(value, (list, tuple)):
            return False
        inner, parts, depth, cur = t[6:-1], [], 0, ""
        for ch in inner:
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
                continue
            depth += ch == "["
            depth -= ch == "]"
            cur += ch
        parts.append(cur)
        if len(parts) == 2 and parts[1] == "...":
            return all(_type_ok(v, parts[0]) for v in value)
        return len(value) == len(parts) and all(_type_ok(v, q) for v, q in zip(value, parts))
    if t == "bool":
        return isinstance(value, bool)
    if t == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t == "str":
        return isinstance(value, str)
    return True  # a type this checker does not know: the variant validates it


def _type_word(t: str) -> str:
    t = t.replace(" ", "")
    words = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
    if t.startswith("Optional["):
        return _type_word(t[9:-1]) + " (or null)"
    if t.startswith("tuple["):
        return f"a list ({t})"
    return words.get(t, t)


def check_params(variant: str, params: dict[str, Any], where: str) -> None:
    """Parameter names and value types of ``variant`` (BadInput naming the entry and the field)."""
    import dataclasses

    from surgeon.attention.registry import get_variant

    fields = {f.name: str(f.type) for f in dataclasses.fields(get_variant(variant).Params)}
    for k, v in params.items():
        if k not in fields:
            raise BadInput(f"{where}: '{variant}' has no parameter '{k}'",
                           f"valid parameters: {', '.join(sorted(fields)) or 'none'}")
        if not _type_ok(v, fields[k]):
            raise BadInput(f"{where}: {k} = {v!r} is not {_type_word(fields[k])}",
                           f"give {k} as {_type_word(fields[k])} (see `surgeon variants`)")


def check_recipe(recipe: Any) -> None:
    """Everything about a recipe that needs no model: a mapping of globs to entries with a known
    variant, parameters of the right names and types, modulators a list of known modulated
    variants, block_mask_from a site name."""
    from surgeon.attention.registry import VARIANTS, get_variant

    if not isinstance(recipe, dict) or not recipe:
        raise BadInput("the recipe is empty or not a mapping", 'write it as {"<site glob>": {variant: NAME, ...}}')
    for glob, spec in recipe.items():
        if isinstance(spec, str):
            spec = {"variant": spec}
        if isinstance(spec, dict) and set(spec) == {"decode"}:  # a decode mode only
            decode_spec_from(spec["decode"], glob)
            continue
        if not isinstance(spec, dict) or "variant" not in spec:
            raise BadInput(f"recipe entry '{glob}' has no variant", f"valid variants: {', '.join(sorted(VARIANTS))}")
        spec = dict(spec)
        decode_spec_from(spec.pop("decode", None), glob)
        below = spec.pop("dense_below", None)
        if below is not None and (isinstance(below, bool) or not isinstance(below, int) or below < 1):
            raise BadInput(f"recipe entry '{glob}': dense_below = {below!r} is not a positive number of tokens",
                           "give e.g. dense_below: 2048 (shorter inputs run dense)")
        variant = spec.pop("variant")
        if not isinstance(variant, str) or variant not in VARIANTS:
            raise BadInput(f"recipe entry '{glob}' names unknown variant '{variant}'",
                           f"valid variants: {', '.join(sorted(VARIANTS))}")
        mods = spec.pop("modulators", None)
        if mods is not None and not isinstance(mods, list):
            raise BadInput(f"recipe entry '{glob}': modulators = {mods!r} is not a list",
                           "write modulators as a list, e.g. modulators: [{variant: temperature, sigma: 0.1}]")
        for m in mods or []:
            if isinstance(m, str):
                m = {"variant": m}
            if not isinstance(m, dict) or m.get("variant") not in VARIANTS:
                mv = m.get("variant") if isinstance(m, dict) else m
                raise BadInput(f"recipe entry '{glob}' names unknown modulator '{mv}'",
                               f"valid variants: {', '.join(sorted(VARIANTS))}")
            if get_variant(m["variant"]).family != "modulated":
                raise BadInput(f"recipe entry '{glob}': '{m['variant']}' is not a modulated variant",
                               "list only modulated variants under modulators")
            check_params(m["variant"], {k: v for k, v in m.items() if k != "variant"},
                         f"recipe entry '{glob}' modulator {m['variant']}")
        bmf = spec.pop("block_mask_from", None)
        if bmf is not None and not isinstance(bmf, str):
            raise BadInput(f"recipe entry '{glob}': block_mask_from = {bmf!r} is not a site name",
                           "give the name of an earlier anchor site")
        check_params(variant, spec, f"recipe entry '{glob}'")


def policy_from_recipe(recipe: dict[str, Any], fingerprint: str, site_names: list[str],
                       base: Optional[Policy] = None) -> Policy:
    """Apply a recipe ``{glob: {variant: NAME, ...params, modulators: [...], block_mask_from: SITE,
    decode: {mode: NAME, params: {...}}}}`` (``decode``: the sites' decode mode for generation; an
    entry with ``decode`` alone sets the decode mode and keeps each matched site's variant).

    Later globs override earlier ones; sites matched by no glob keep ``base`` (or dense).
    A glob that matches no site is an error naming the sites.
    """
    from surgeon.attention.registry import VARIANTS

    check_recipe(recipe)
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
        if variant not in VARIANTS:  # (check_recipe above)
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
        below = spec.pop("dense_below", None)
        for n in matched:
            sites[n] = SiteChoice(variant=variant, params=spec, block_mask_from=bmf, modulators=mods,
                                  reason=f"recipe:{glob}", decode=dec, dense_below=below)
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
