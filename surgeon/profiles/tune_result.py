"""The result of ``surgeon tune``: the recipe YAML and its ``.tune.json`` sidecar.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from surgeon.profiles.tune_options import SCHEMA_VERSION, TuneOptions


@dataclass
class TuneResult:
    """One tuning run. ``recipe``: site name → ``{variant, params…}`` (a ``surgeon rewrite``
    recipe); ``before``/``after``: the mean objective of dense / of the recipe on the calibration
    rows; ``details``: variant-specific measurements; ``trace``: every point asked for, in order
    (``cached``: the same choice was scored before); ``evaluations``: distinct choices run."""

    model: str
    model_fingerprint: str
    options: TuneOptions
    data: dict[str, Any]
    data_fingerprint: str
    before: float
    after: float
    recipe: dict[str, dict[str, Any]]
    details: dict[str, Any] = field(default_factory=dict)
    trace: list[dict[str, Any]] = field(default_factory=list)
    evaluations: int = 0

    @property
    def variant(self) -> str:
        return self.options.variant

    def document(self) -> dict[str, Any]:
        """The sidecar JSON document."""
        return {"kind": "tune", "schema_version": SCHEMA_VERSION, "model": self.model,
                "model_fingerprint": self.model_fingerprint, "variant": self.variant,
                "settings": self.options.settings(), "data": self.data, "data_fingerprint": self.data_fingerprint,
                "objective": {"spec": self.options.objective, "minimise": True, "before_dense": self.before,
                              "after": self.after, "change": self.after - self.before,
                              "evaluations": self.evaluations},
                "recipe": self.recipe, "details": self.details, "trace": self.trace}

    def recipe_yaml(self, sidecar: Optional[str] = None) -> str:
        import yaml

        o = self.options
        d = self.data
        lines = [f"# surgeon tune --variant {o.variant} --scope {o.scope}: {self.model} "
                 f"(model fingerprint {self.model_fingerprint})",
                 f"# calibration: {d.get('source')} {d.get('split')} split, {d.get('samples')} x {d.get('seq_len')} "
                 f"tokens (data fingerprint {self.data_fingerprint})",
                 f"# objective (minimised) {o.objective}: before (dense) {self.before:.6f} -> after "
                 f"{self.after:.6f} ({self.after - self.before:+.6f}) over {self.evaluations} evaluations"]
        if sidecar:
            lines.append(f"# search and measurements: {sidecar}")
        for name, spec in self.recipe.items():
            body = yaml.safe_dump(spec, default_flow_style=True, sort_keys=False, width=1 << 20).strip()
            lines.append(f"{_yaml_key(name)}: {body}")
        return "\n".join(lines) + "\n"


def _yaml_key(name: str) -> str:
    import json

    return json.dumps(name)


def sidecar_path(out: Path) -> Path:
    """``recipe.yaml`` → ``recipe.tune.json`` (next to it)."""
    out = Path(out)
    return out.with_name(out.stem + ".tune.json")


def write_outputs(result: TuneResult, out: Path, force: bool = False) -> tuple[Path, Path]:
    """Write the recipe YAML and its sidecar JSON atomically, both complete before either is
    switched in (see :mod:`surgeon.outputs`); returns both paths."""
    from surgeon.artifacts import canonical_json
    from surgeon.outputs import Output

    out = Path(out)
    side = sidecar_path(out)
    with Output(out, "tune-recipe", force=force) as o, Output(side, "tune", force=force) as s:
        s.write(canonical_json(result.document()).encode())
        o.write(result.recipe_yaml(side.name).encode())
        s.commit()
        o.commit()
    return out, side
