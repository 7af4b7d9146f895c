"""``surgeon build``: profile → rewrite → export in one command, for a CI model-build stage.

Every stage is keyed by a fingerprint of its inputs (model weights, calibration data settings,
budget/recipe, the upstream stage's key and the surgeon version). A second run with the same
inputs finds the key in ``OUT/state.json`` with its outputs present and skips the stage.
``OUT/summary.json`` is the machine-readable result.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from surgeon import __version__
from surgeon.artifacts import atomic_write_text, canonical_json
from surgeon.errors import BadInput, CheckFailed
from surgeon.outputs import builds


class BuildRecipe(BaseModel):
    """build.yaml. Every field has a default: an empty recipe builds the embedded default model."""

    model_config = ConfigDict(extra="forbid")
    model: str = "smollm2-135m"
    data: Optional[str] = None
    samples: int = Field(default=4, ge=1)
    seq_len: int = Field(default=2048, ge=1)
    block_size: int = Field(default=64, ge=1)
    seed: int = 0
    tolerance: Optional[float] = Field(default=0.01, description="quality-first (default): the fastest rewrite "
                                       "whose held-out loss stays within this; fail (exit 1) above it")
    lengths: list[int] = Field(default_factory=list, description="serving lengths the tolerance holds at "
                               "(default: seq_len and the model's maximum)")
    families: Optional[list[str]] = None  # planner families (default: all, see surgeon.profiles.tolerance)
    budget: Optional[float] = Field(default=None, gt=0.0, le=1.0,
                                    description="expert mode instead of tolerance: compute budget")
    recipe: Optional[dict[str, Any]] = None  # site-glob recipe applied on top of the plan
    eval_seq_len: int = Field(default=2048, ge=1)
    eval_samples: int = Field(default=2, ge=1)
    export_format: Literal["onnx", "tensorrt"] = "onnx"
    opset: int = 18
    verify: bool = True
    max_ppl_increase: Optional[float] = Field(default=None, description="fail (exit 1) above this held-out increase")


def load_build_recipe(path: Optional[Path]) -> BuildRecipe:
    if path is None:
        return BuildRecipe()
    import yaml

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"no such build recipe: {path}", "give a YAML file (see README: surgeon build)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except Exception as e:
        raise BadInput(f"{path} is not valid YAML ({type(e).__name__})", "fix the build recipe syntax") from e
    try:
        return BuildRecipe.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        raise BadInput(f"{path}: field '{loc}': {first.get('msg')}",
                       f"valid fields: {', '.join(BuildRecipe.model_fields)}") from e


def _key(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


@dataclass
class StageResult:
    name: str
    status: str  # "ran" | "cached"
    seconds: float
    outputs: list[str]
    key: str
    metrics: dict[str, Any] = field(default_factory=dict)


@builds("out")
def build(recipe: Optional[Path] = None, out: Path = Path("build"), *, say: Callable[[str], None] = lambda m: None,
          progress: Any = None) -> dict[str, Any]:
    """Run the stages; returns the summary (also written to OUT/summary.json)."""
    from surgeon import api
    from surgeon.models import load

    rc = load_build_recipe(recipe)
    if rc.budget is not None or rc.recipe is not None:
        tolerance = None  # expert modes: the budget plan / the recipe; max_ppl_increase gates them
    else:
        from surgeon.profiles.tolerance import ToleranceSettings, check_tolerance

        tolerance = check_tolerance(rc.tolerance if rc.tolerance is not None else 0.01)
        ToleranceSettings(tolerance=tolerance, lengths=tuple(rc.lengths),
                          **({"families": tuple(rc.families)} if rc.families else {}))  # validates before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.json"
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.is_file() else {}
    stages: list[StageResult] = []
    t_all = time.perf_counter()

    def cached(name: str, key: str, outputs: list[Path]) -> bool:
        return state.get(name, {}).get("key") == key and all(p.exists() for p in outputs)

    def record(res: StageResult) -> None:
        stages.append(res)
        state[res.name] = {"key": res.key, "outputs": res.outputs, "metrics": res.metrics}
        atomic_write_text(state_path, canonical_json(state), force=True, own=True)
        say(f"{res.name}: {'skipped (cached, inputs unchanged)' if res.status == 'cached' else 'done'} "
            f"in {res.seconds:.1f} s → {', '.join(res.outputs)}")

    say(f"loading {rc.model}")
    lm = load(rc.model)
    fp = lm.fingerprint()

    # ---- profile
    prof_json, prof_html = out / "profile.json", out / "report.html"
    k_prof = _key("profile", __version__, fp, rc.data, rc.samples, rc.seq_len, rc.block_size, rc.seed, rc.budget)
    prof_budget = rc.budget  # None: the report's illustrative plan at the default budget
    t0 = time.perf_counter()
    if cached("profile", k_prof, [prof_json, prof_html]):
        record(StageResult("profile", "cached", 0.0, [str(prof_json), str(prof_html)], k_prof,
                           state["profile"].get("metrics", {})))
    else:
        say("profile: calibrating")
        prof, pol = api.profile(lm, data=rc.data, samples=rc.samples, seq_len=rc.seq_len, block_size=rc.block_size,
                                seed=rc.seed, out=prof_json, report=prof_html, budget=prof_budget, force=True,
                                progress=progress)
        record(StageResult("profile", "ran", time.perf_counter() - t0, [str(prof_json), str(prof_html)], k_prof,
                           {"data_fingerprint": prof.data_fingerprint}))

    # ---- rewrite
    rw_dir = out / "rewritten"
    k_rw = _key("rewrite", __version__, k_prof, rc.budget, rc.recipe, rc.eval_seq_len, rc.eval_samples, tolerance,
                rc.lengths, rc.families)
    t0 = time.perf_counter()
    if cached("rewrite", k_rw, [rw_dir / "rewrite.json"]):
        record(StageResult("rewrite", "cached", 0.0, [str(rw_dir)], k_rw, state["rewrite"].get("metrics", {})))
    else:
        say("rewrite: planning, rewriting, measuring fidelity")
        rep = api.rewrite(lm, profile=prof_json, budget=rc.budget, recipe=rc.recipe, out=rw_dir, force=True,
                          eval_seq_len=rc.eval_seq_len, eval_samples=rc.eval_samples, tolerance=tolerance,
                          lengths=rc.lengths, progress=progress,
                          plan_options={"families": tuple(rc.families)} if rc.families else None)
        sites = rep.get("sites", [])
        dens = [s["achieved_density"] for s in sites]
        metrics = {"counts": rep["counts"], "fidelity": rep.get("fidelity"), "mode": rep.get("mode"),
                   "tolerance": rep.get("tolerance"), "gate": rep.get("gate"), "ok": rep.get("ok"),
                   "worst_loss": rep.get("worst_loss"), "plan_note": (rep.get("plan") or {}).get("note"),
                   "mean_achieved_density": sum(dens) / len(dens) if dens else None}
        record(StageResult("rewrite", "ran", time.perf_counter() - t0, [str(rw_dir)], k_rw, metrics))

    # ---- export
    ex_dir = out / ("onnx" if rc.export_format == "onnx" else "tensorrt")
    k_ex = _key("export", __version__, k_rw, rc.export_format, rc.opset, rc.verify)
    t0 = time.perf_counter()
    if cached("export", k_ex, [ex_dir / "manifest.json"]):
        record(StageResult("export", "cached", 0.0, [str(ex_dir)], k_ex, state["export"].get("metrics", {})))
    else:
        from surgeon.exporters.pipeline import export_rewritten

        say(f"export: {rc.export_format} (opset {rc.opset}){' with onnxruntime verification' if rc.verify else ''}")
        man = export_rewritten(rw_dir, fmt=rc.export_format, out=ex_dir, opset=rc.opset, verify=rc.verify, force=True)
        md = man.model_dump(mode="json") if hasattr(man, "model_dump") else dict(man)
        metrics = {k: md[k] for k in ("verified", "verification", "engine", "reason", "surgeon_ops") if k in md}
        record(StageResult("export", "ran", time.perf_counter() - t0, [str(ex_dir)], k_ex, metrics))

    summary = {
        "kind": "build-summary", "schema_version": 1, "surgeon_version": __version__, "model": rc.model,
        "model_fingerprint": fp, "recipe": rc.model_dump(mode="json"), "seconds": time.perf_counter() - t_all,
        "stages": [s.__dict__ for s in stages], "ok": True,
    }
    rw_metrics = next((s.metrics for s in stages if s.name == "rewrite"), {})
    fid = rw_metrics.get("fidelity")
    failure = None
    if tolerance is not None:
        summary["tolerance"] = tolerance
        summary["gate"] = rw_metrics.get("gate")
        summary["plan"] = rw_metrics.get("plan_note")
        if rw_metrics.get("ok") is False:
            failure = (f"held-out loss {100 * rw_metrics['worst_loss']:.2f}% exceeds the tolerance "
                       f"{100 * tolerance:.2f}%")
            summary["ok"] = False
            summary["failure"] = failure
    if failure is None and rc.max_ppl_increase is not None and fid and "ppl_increase" in fid and fid["ppl_increase"] > rc.max_ppl_increase:
        failure = (f"held-out perplexity rose {100 * fid['ppl_increase']:.2f}% "
                   f"(limit {100 * rc.max_ppl_increase:.2f}%)")
        summary["ok"] = False
        summary["failure"] = failure
    atomic_write_text(out / "summary.json", canonical_json(summary), force=True, own=True)
    if failure:
        raise CheckFailed(failure, "loosen tolerance (or max_ppl_increase) in the build recipe, or calibrate on "
                                   "more data")
    return summary
