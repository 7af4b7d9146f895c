"""The typed Python API that the CLI mirrors. Each function is one CLI command's work.

    import surgeon
    lm = surgeon.load("smollm2-135m")
    cap = surgeon.capture(lm)
    sites = surgeon.inspect(cap)            # list[Site]
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from surgeon import outputs as _outputs
from surgeon.capture import Captured, Site
from surgeon.capture import capture as _capture
from surgeon.models import DEFAULT_MODEL, LoadedModel
from surgeon.models import load as _load


def load(model: str = DEFAULT_MODEL) -> LoadedModel:
    """Load MODEL: an alias (smollm2-135m, minilm-l6, vit-tiny), a Hugging Face folder, a .gguf file,
    timm:NAME or package.module:factory."""
    return _load(model)


def capture(model: LoadedModel | str = DEFAULT_MODEL) -> Captured:
    """torch.export the model (dynamic batch/sequence) and find its attention sites."""
    lm = _load(model) if isinstance(model, str) else model
    return _capture(lm)


def inspect(model: LoadedModel | Captured | str = DEFAULT_MODEL) -> list[Site]:
    """The attention sites of MODEL."""
    cap = model if isinstance(model, Captured) else capture(model)
    return list(cap.sites)


def variants() -> list[dict[str, Any]]:
    """Registered variants with parameters, defaults, fast paths and exports."""
    from surgeon.attention.registry import all_variants

    return [v.info() for v in all_variants()]


# --------------------------------------------------------------------------- rewrite / eval

def make_policy(lm: LoadedModel, cap: Captured, *, profile: Optional[Path | str] = None,
                budget: Optional[float] = None, recipe: Optional[Path | str | dict] = None):
    """The policy from a profile and a budget, or from a recipe (a recipe may build on the plan)."""
    from surgeon.errors import BadInput
    from surgeon.passes.policy import identity_policy, load_recipe, policy_from_recipe

    if budget is not None and not (0.0 < float(budget) <= 1.0):
        raise BadInput(f"--budget {budget} is outside (0, 1]", "give the fraction of dense attention compute to keep, e.g. 0.15")
    names = [s.name for s in cap.sites]
    base = None
    if profile is not None:
        from surgeon.profiles.plan import plan as _plan
        from surgeon.profiles.profile_doc import Profile

        prof = Profile.load(profile, model_fingerprint=lm.fingerprint())
        if budget is not None or recipe is None:
            base = _plan(prof, 0.15 if budget is None else float(budget))
    elif recipe is None:
        raise BadInput("no --profile and no --recipe", "run `surgeon profile MODEL` first, or give --recipe")
    if recipe is not None:
        data = recipe if isinstance(recipe, dict) else load_recipe(Path(recipe))
        return policy_from_recipe(data, lm.fingerprint(), names, base=base)
    return base if base is not None else identity_policy(lm.fingerprint(), names)


def check_rewrite_inputs(profile: Optional[Path | str] = None, budget: Optional[float] = None,
                         recipe: Optional[Path | str | dict] = None, eval_seq_len: int = 1024,
                         eval_samples: int = 2) -> None:
    """What `surgeon rewrite` can refuse before loading the model: the budget's range, the
    profile (a readable profile artifact), the recipe (structure, variants, parameter types) and
    the fidelity-measurement counts."""
    from surgeon.errors import BadInput
    from surgeon.passes.policy import check_recipe, load_recipe

    for name, v in (("--eval-seq-len", eval_seq_len), ("--eval-samples", eval_samples)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise BadInput(f"{name} {v} must be a positive integer", f"give e.g. {name} 2")

    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not (0.0 < float(budget) <= 1.0)):
        raise BadInput(f"--budget {budget} is outside (0, 1]", "give the fraction of dense attention compute to keep, e.g. 0.15")
    if profile is None and recipe is None:
        raise BadInput("no --profile and no --recipe", "run `surgeon profile MODEL` first, or give --recipe")
    if profile is not None:
        from surgeon.profiles.profile_doc import Profile

        Profile.load(profile)
    if recipe is not None:
        check_recipe(recipe if isinstance(recipe, dict) else load_recipe(Path(recipe)))


@_outputs.holds("rewrite", default="rewritten", inputs=("model", "profile", "recipe"))
def rewrite(model: LoadedModel | str, *, profile: Optional[Path | str] = None, budget: Optional[float] = None,
            recipe: Optional[Path | str | dict] = None, out: Optional[Path | str] = None, force: bool = False,
            eval_seq_len: int = 1024, eval_samples: int = 2, progress: Any = None) -> dict[str, Any]:
    """Plan (or read a recipe), rewrite, measure fidelity on held-out text, and write DIR.

    DIR holds program.pt2, policy.json, rewrite.json and report.json. Returns the report.
    """
    from surgeon.artifacts import canonical_json
    from surgeon.evaluate import evaluate_module
    from surgeon.passes.rewrite import rewrite as _rewrite
    from surgeon.passes.rewrite import save_rewritten
    from surgeon.profiles.data import load_calibration

    out = Path(out or "rewritten")  # checked and locked by @holds
    check_rewrite_inputs(profile, budget, recipe, eval_seq_len, eval_samples)  # before the model loads
    step = progress or (lambda msg: None)
    step("loading model")
    lm = _load(model) if isinstance(model, str) else model
    step("capturing")
    cap = _capture(lm)
    policy = make_policy(lm, cap, profile=profile, budget=budget, recipe=recipe)
    step("rewriting")
    res = _rewrite(cap, policy)
    report: dict[str, Any] = {"model": lm.name, "budget": budget, "counts": res.counts, "sites": []}
    if lm.kind in ("causal-lm", "encoder"):
        seq = min(eval_seq_len, lm.max_positions or eval_seq_len)
        step(f"measuring fidelity on held-out text ({eval_samples} × {seq} tokens)")
        data = load_calibration(None, lm, eval_samples, seq, split="heldout")
        ev = evaluate_module(res.program.module(), lm.kind, data.inputs, seq_len=seq, data=data.source + ":heldout",
                             dense_module=cap.program.module(), measure_sites=True)
        report["fidelity"] = ev.to_dict()
        report["sites"] = ev.sites
        report["fidelity"].pop("sites", None)
    for s in report["sites"]:
        s["params"] = policy.sites[s["site"]].params if s["site"] in policy.sites else {}
    step("writing")
    save_rewritten(out, cap, res, force=force, extra={"report.json": canonical_json(report).encode()})
    report["out"] = str(out)
    return report


def load_rewritten(path: Path | str):
    from surgeon.passes.rewrite import load_rewritten as _lr

    return _lr(path)


def evaluate(model_or_dir: str, *, data: Optional[str] = None, seq_len: Optional[int] = None,
             samples: int = 4) -> dict[str, Any]:
    """Perplexity (language models) or embedding cosine against dense (encoders).

    MODEL_OR_DIR: a model (dense) or a folder written by `surgeon rewrite`. Without ``data``:
    ``samples`` rows of the built-in corpus's held-out split; with ``data`` (a file or folder of
    text): every token of it (``samples`` does not apply). ``seq_len``: tokens per row (default
    1024, or the model's maximum positions if fewer); beyond the model's positions is BadInput.
    """
    from surgeon.errors import ArtifactMismatch, BadInput
    from surgeon.evaluate import evaluate_module
    from surgeon.passes.rewrite import load_rewritten as _lr
    from surgeon.profiles.data import load_calibration, load_eval_rows

    if data is not None and not Path(data).exists():
        raise BadInput(f"no such file or folder: {data}", "give --data a text file, folder of .txt or JSONL")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise BadInput(f"--seq-len {seq_len} must be a positive integer", "give e.g. --seq-len 1024")
    p = Path(model_or_dir)
    if p.is_dir() and (p / "rewrite.json").exists():
        rw = _lr(p)
        try:
            lm = _load(rw.manifest.model)
        except BadInput as e:
            raise BadInput(f"the model {p} was rewritten from ({rw.manifest.model}) cannot be loaded: {e.problem}",
                           "restore that model at the same path, or re-run `surgeon rewrite`") from e
        if lm.fingerprint() != rw.manifest.model_fingerprint:
            raise ArtifactMismatch(f"{p} was made from a different {rw.manifest.model} than the one installed",
                                   "re-run `surgeon rewrite` for the installed model")
        module = rw.module()
        dense = lm.module if lm.kind != "causal-lm" else None
    else:
        lm = _load(model_or_dir)
        module, dense = lm.module, lm.module
    seq = seq_len if seq_len is not None else min(1024, lm.max_positions or 1024)
    if data is not None and lm.is_text:
        cal = load_eval_rows(data, lm, seq)
        where = cal.source
    else:
        cal = load_calibration(data, lm, samples, seq, split="heldout")
        where = cal.source + ":heldout"
    ev = evaluate_module(module, lm.kind, cal.inputs, seq_len=seq, data=where, dense_module=dense)
    return ev.to_dict()


# --------------------------------------------------------------------------- profile

def _check_report_budget(cap: Captured, budget: float, seq_len: int, block_size: int, options: dict) -> None:
    """Refuse, before any calibration work, a report budget no plan can meet at this length."""
    import math

    from surgeon.errors import BadInput
    from surgeon.profiles.plan import block_topk_density
    from surgeon.profiles.solvers import select_overhead

    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
        raise BadInput(f"--budget {budget} is outside (0, 1]", "give the fraction of dense attention compute, e.g. 0.15")
    if seq_len < 1 or block_size < 1:
        return  # the profiler reports these itself
    sb, lb = int(options.get("sink_blocks", 1)), int(options.get("local_blocks", 1))
    floor = sum(float(block_topk_density(seq_len, block_size, 0.0, s.causal, sb, lb)) for s in cap.sites)
    floor = (floor + select_overhead(block_size, "prefill")) / max(len(cap.sites), 1)  # one selecting anchor
    if float(budget) < floor - 1e-9:
        raise BadInput(f"--budget {budget} is below the cheapest plan at {seq_len} tokens with {block_size}-token "
                       f"blocks (≈{floor:.3g} of dense attention: block_topk always keeps its sink, local and "
                       "diagonal blocks)", f"raise --budget to at least {math.ceil(floor * 1000) / 1000:.3f}, or "
                       "profile longer sequences (--seq-len) or smaller blocks (--block-size)")


def _profile_outputs(out: Optional[Path | str], report: Any, force: bool, inputs: tuple) -> tuple[Any, Any]:
    """The profile's two outputs (checked, not yet entered); ``report=...``: report.html beside ``out``."""
    from surgeon.errors import BadInput

    if report is ...:
        report = (Path(out).parent / "report.html") if out is not None else None
    o = _outputs.Output(out, "profile", force=force, inputs=inputs) if out is not None else None
    r = _outputs.Output(report, "report", force=force, inputs=inputs, option="--report") if report is not None else None
    if o is not None and r is not None and o.path == r.path:
        raise BadInput(f"--out and --report are the same file ({o.path})", "give the report another name")
    for x in (o, r):
        if x is not None:
            x.check()
    return o, r


def _check_profile_args(data: Optional[str], samples: Any, seq_len: Any, block_size: Any) -> None:
    """What can be refused without the model: counts and the data path."""
    from surgeon.errors import BadInput

    for name, v in (("--samples", samples), ("--seq-len", seq_len), ("--block-size", block_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise BadInput(f"{name} {v} must be a positive integer", f"give e.g. {name} 8")
    if data is not None and not Path(data).exists():
        raise BadInput(f"no such file or folder: {data}", "give --data a text file, folder of .txt, JSONL or images")
    if data is not None and Path(data).is_file():  # readable, UTF-8, not empty: before the model loads
        from surgeon.profiles.data import text_documents

        if not text_documents(data):
            raise BadInput(f"the calibration data ({data}) holds no text", "give a non-empty text source")


def profile(model: LoadedModel | str = DEFAULT_MODEL, *, data: Optional[str] = None, samples: int = 8,
            seq_len: int = 2048, block_size: int = 64, seed: int = 0, out: Optional[Path | str] = "profile.json",
            report: Optional[Path | str] = ..., budget: float = 0.15, force: bool = False,
            progress: Any = None, **options: Any):
    """Calibrate MODEL: statistics per site/head, write profile.json and report.html (with the
    policy at ``budget``; the report defaults to ``report.html`` beside ``out``, ``None`` writes
    none). Outputs are checked and locked before any work and both are switched in only once
    both are complete (see :mod:`surgeon.outputs`).

    Under torchrun (WORLD_SIZE > 1) the samples are split across ranks and rank 0 alone writes;
    other ranks return ``(None, None)`` (see :mod:`surgeon.profiles.distributed`)."""
    import contextlib

    from surgeon.profiles.collect import profile as _profile
    from surgeon.profiles.plan import plan as _plan
    from surgeon.profiles.report import render_report

    from surgeon.profiles import distributed

    distributed.check_env()
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
        from surgeon.errors import BadInput

        raise BadInput(f"--budget {budget} is outside (0, 1]", "give the fraction of dense attention compute, e.g. 0.15")
    _check_profile_args(data, samples, seq_len, block_size)
    world = distributed.init_from_env()  # torchrun: join the process group (None: one process)
    stack = contextlib.ExitStack()
    try:
        err: Optional[BaseException] = None
        o_prof = o_rep = None
        try:
            if world is None or world.rank == 0:  # rank 0 alone writes
                o_prof, o_rep = _profile_outputs(out, report, force, (data, model if isinstance(model, str) else None))
                for x in (o_prof, o_rep):
                    if x is not None:
                        stack.enter_context(x)
            lm = _load(model) if isinstance(model, str) else model
            if lm.is_text and lm.max_positions and seq_len > lm.max_positions:  # before the capture
                from surgeon.errors import BadInput

                raise BadInput(f"seq_len={seq_len} is beyond {lm.name}'s {lm.max_positions} positions",
                               f"use --seq-len {lm.max_positions} or less")
            cap = _capture(lm)
            if lm.is_text:
                _check_report_budget(cap, budget, seq_len, block_size, options)
        except BaseException as e:  # noqa: BLE001 — distributed: every rank learns of it below
            if world is None:
                raise
            err = e
        if world is not None:
            world.agree(err)
        prof = _profile(lm, cap, data_path=data, samples=samples, seq_len=seq_len, block_size=block_size,
                        seed=seed, progress=progress, **options)
        if prof is None:  # a distributed rank other than 0
            return None, None
        pol = _plan(prof, budget)
        if o_prof is not None:  # both complete before either is switched in
            o_prof.write(prof.to_json().encode())
        if o_rep is not None:
            o_rep.write(render_report(prof, pol).encode())
        for x in (o_prof, o_rep):
            if x is not None:
                x.commit()
        return prof, pol
    finally:
        stack.close()
        distributed.shutdown()


# --------------------------------------------------------------------------- export / build / bench

def export(rewritten: Path | str, fmt: str = "onnx", out: Optional[Path | str] = None, *, opset: int = 18,
           verify: bool = True, force: bool = False, **options: Any):
    """Export a folder written by ``surgeon rewrite`` to ONNX (verified in onnxruntime) or a
    TensorRT engine/bundle; returns the manifest (see :mod:`surgeon.exporters.pipeline`)."""
    from surgeon.exporters.pipeline import export_rewritten

    return export_rewritten(rewritten, fmt, out, opset=opset, verify=verify, force=force, **options)


def build(recipe: Optional[Path | str] = None, out: Path | str = "build", **options: Any) -> dict[str, Any]:
    """profile → rewrite → export with stage caching; returns the summary (OUT/summary.json)."""
    from surgeon.build_stages import build as _build

    return _build(Path(recipe) if recipe is not None else None, Path(out), **options)


def bench(model_or_dir: Any = None, seq_lens: Any = (2048, 4096, 8192), device: str = "cpu", **options: Any) -> dict[str, Any]:
    """Dense against rewritten: whole-model and per-site attention time, achieved density
    (see :mod:`surgeon.benchmark`)."""
    from surgeon.benchmark import bench as _bench

    return _bench(model_or_dir, seq_lens=seq_lens, device=device, **options)


# --------------------------------------------------------------------------- tune

def tune(model: LoadedModel | Captured | str, variant: str, *, data: Optional[str] = None, samples: int = 4,
         seq_len: int = 512, seed: int = 0, scope: str = "global", objective: Optional[str] = None,
         spans: Any = None, layers: Any = None, heads: Any = None, strength: Optional[float] = None,
         grid: Any = None, windows: Any = None, refine: Optional[int] = None, sweeps: Optional[int] = None,
         rounds: Optional[int] = None, k: Optional[int] = None, out: Optional[Path | str] = "recipe.yaml",
         force: bool = False, progress: Any = None, **options: Any) -> dict[str, Any]:
    """Calibrate a modulated variant (temperature, head_boost, sink_redistribute, identity_blend,
    local_boost) on the calib split and write a ``surgeon rewrite --recipe`` YAML (calibration
    numbers as header comments) plus ``<out stem>.tune.json`` (see :mod:`surgeon.profiles.tune`).

    ``objective``: ``"module:function"``, ``fn(output, input_ids[, dense]) -> float`` to minimise
    (default: calibration cross-entropy). Everything that can be checked without the model is
    checked first; nothing is written on error. ``out=None`` writes nothing. Returns the sidecar
    document with ``out``/``sidecar`` paths added."""
    import contextlib

    from surgeon.profiles import tune as _tune

    text_like = not (isinstance(model, str) and (model == "vit-tiny" or model.startswith("timm:")))
    opts = _tune.check_options(variant, scope=scope, objective=objective, spans=spans, layers=layers, heads=heads,
                               strength=strength, grid=grid, windows=windows, refine=refine, sweeps=sweeps,
                               rounds=rounds, k=k, seq_len=seq_len if text_like else None, **options)
    with contextlib.ExitStack() as stack:
        if out is not None:  # both outputs checked and locked before any work
            ins = [x for x in (data, model if isinstance(model, str) else None) if x]
            for x in (_outputs.Output(out, "tune-recipe", force=force, inputs=ins),
                      _outputs.Output(_tune.sidecar_path(Path(out)), "tune", force=force, inputs=ins)):
                stack.enter_context(x)
        if isinstance(model, Captured):
            lm, cap = model.model, model
        else:
            lm = _load(model) if isinstance(model, str) else model
            cap = _capture(lm)
        res = _tune.tune(lm, cap, opts, data=data, samples=samples, seq_len=seq_len, seed=seed, progress=progress)
        doc = res.document()
        if out is not None:
            o, side = _tune.write_outputs(res, Path(out), force=force)
            doc["out"], doc["sidecar"] = str(o), str(side)
    return doc
