"""The typed Python API that the CLI mirrors. Each function is one CLI command's work.

    import surgeon
    lm = surgeon.load("smollm2-135m")
    cap = surgeon.capture(lm)
    sites = surgeon.inspect(cap)            # list[Site]
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

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


def rewrite(model: LoadedModel | str, *, profile: Optional[Path | str] = None, budget: Optional[float] = None,
            recipe: Optional[Path | str | dict] = None, out: Optional[Path | str] = None, force: bool = False,
            eval_seq_len: int = 1024, eval_samples: int = 2, progress: Any = None,
            tolerance: Optional[float] = None, lengths: Sequence[int] = (),
            plan_options: Optional[dict[str, Any]] = None) -> Optional[dict[str, Any]]:
    """Plan, rewrite, measure fidelity on held-out text, and write DIR.

    Modes: **tolerance** (the default with a profile and no budget): the fastest policy whose
    validation loss stays within ``tolerance`` (default 0.01: +1 % perplexity for causal LMs,
    1 − cosine for encoders) at the serving ``lengths`` (default: the profile's length and the
    model's maximum), see :mod:`surgeon.profiles.tolerance`; the held-out gate is measured at
    the same lengths and the report's ``ok`` is false when any exceeds the tolerance.
    **budget** (expert): the profile plan at a compute budget; **recipe**: site globs → variants
    (on top of the budget plan when both are given).

    DIR holds program.pt2, policy.json, rewrite.json and report.json (tolerance mode also
    report.html and frontier.png). Returns the report. Under torchrun (tolerance mode) the
    planner's searches are divided across ranks; rank 0 writes, the others return None.
    """
    from surgeon.errors import BadInput

    ins = [v for v in (model, profile, recipe) if isinstance(v, (str, os.PathLike)) and os.fspath(v)
           and Path(v).exists()]  # never an output (the recipe is read into a dict below)
    # ---- every check that needs no model comes first
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not 0.0 < float(budget) <= 1.0):
        raise BadInput(f"--budget {budget} is outside (0, 1]", "give the fraction of dense attention compute to keep, e.g. 0.15")
    mode = "budget" if budget is not None else ("recipe" if recipe is not None else "tolerance")
    settings = None
    if tolerance is not None and mode != "tolerance":
        raise BadInput(f"--tolerance cannot be combined with --{mode}",
                       "give --tolerance alone (quality-first) or --budget (expert mode)")
    if mode == "tolerance":
        from surgeon.profiles.tolerance import ToleranceSettings, check_tolerance

        if profile is None:
            raise BadInput("no --profile and no --recipe", "run `surgeon profile MODEL` first, or give --recipe")
        T = check_tolerance(0.01 if tolerance is None else tolerance)
        try:
            settings = ToleranceSettings(tolerance=T, lengths=tuple(int(n) for n in lengths), **(plan_options or {}))
        except TypeError as e:
            raise BadInput(f"unknown planner option ({e})", "see surgeon.profiles.tolerance.ToleranceSettings") from e
    check_rewrite_inputs(profile, budget, recipe, eval_seq_len, eval_samples)  # before the model loads
    if recipe is not None and not isinstance(recipe, dict):
        from surgeon.passes.policy import load_recipe

        recipe = load_recipe(Path(recipe))
    out = Path(out or "rewritten")
    world = None
    if mode == "tolerance":
        from surgeon.profiles import distributed

        world = distributed.init_from_env()  # torchrun: the planner's checks are divided across ranks
    try:
        if world is not None and world.rank != 0:  # rank 0 alone checks, locks and writes OUT
            return _rewrite_planned(model, mode, settings, profile, budget, recipe, out, force, eval_seq_len,
                                    eval_samples, progress, world)
        with _outputs.Output(out, "rewrite", force=force, inputs=ins):  # checked and locked for the whole run
            return _rewrite_planned(model, mode, settings, profile, budget, recipe, out, force, eval_seq_len,
                                    eval_samples, progress, world)
    finally:
        if world is not None:
            from surgeon.profiles import distributed

            distributed.shutdown()


def _rewrite_planned(model, mode, settings, profile, budget, recipe, out, force, eval_seq_len, eval_samples,
                     progress, world) -> Optional[dict[str, Any]]:
    from surgeon.artifacts import canonical_json
    from surgeon.evaluate import evaluate_module
    from surgeon.passes.rewrite import rewrite as _rewrite
    from surgeon.passes.rewrite import save_rewritten
    from surgeon.profiles.data import load_calibration

    step = progress or (lambda msg: None)
    step("loading model")
    lm = _load(model) if isinstance(model, str) else model
    step("capturing")
    cap = _capture(lm)
    report: dict[str, Any] = {"model": lm.name, "mode": mode, "budget": budget, "sites": []}
    if mode == "tolerance":
        from surgeon.profiles.profile_doc import Profile
        from surgeon.profiles.tolerance import plan_within_tolerance

        prof = Profile.load(profile, model_fingerprint=lm.fingerprint())
        outcome = plan_within_tolerance(lm, cap, prof, settings, progress=step)
        if outcome is None:  # a distributed rank other than 0: rank 0 finishes and writes
            return None
        policy = outcome.policy
        report["tolerance"] = settings.tolerance
        report["plan"] = {k: v for k, v in outcome.to_dict().items() if k != "checks"}
        gate_lengths = outcome.lengths
    else:
        policy = make_policy(lm, cap, profile=profile, budget=budget, recipe=recipe)
        gate_lengths = []
    step("rewriting")
    res = _rewrite(cap, policy)
    report["counts"] = res.counts
    if lm.kind in ("causal-lm", "encoder"):
        sparse = any(c.variant != "dense" for c in policy.sites.values())
        if mode == "tolerance":
            report["gate"] = []
            for n in gate_lengths:
                step(f"measuring fidelity on held-out text ({eval_samples} × {n} tokens)")
                data = load_calibration(None, lm, eval_samples, n, split="heldout")
                ev = evaluate_module(res.program.module(), lm.kind, data.inputs, seq_len=n,
                                     data=data.source + ":heldout", dense_module=cap.program.module(),
                                     measure_sites=n == gate_lengths[-1])
                d = ev.to_dict()
                loss = d["ppl_increase"] if "ppl_increase" in d else 1.0 - d["cosine"]
                report["gate"].append({"seq_len": n, "loss": loss, **{k: v for k, v in d.items() if k != "sites"}})
                if n == gate_lengths[-1]:
                    report["fidelity"] = {k: v for k, v in d.items() if k != "sites"}
                    report["sites"] = ev.sites
            worst = max((g["loss"] for g in report["gate"]), default=0.0)
            report["ok"] = bool(worst <= settings.tolerance) or not sparse
            report["worst_loss"] = worst
        else:
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
    extra = {"report.json": canonical_json(report).encode()}
    if mode == "tolerance":
        from surgeon.profiles.frontier import frontier_png, render_rewrite_report

        extra["report.html"] = render_rewrite_report(report, policy.planner).encode()
        png = frontier_png(policy.planner or {})
        if png:
            extra["frontier.png"] = png
    save_rewritten(out, cap, res, force=force, extra=extra)
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

def _report_budget_floor(cap: Captured, seq_len: int, block_size: int, options: dict) -> float:
    """The cheapest plan's cost at this length (block_topk always keeps its forced blocks)."""
    from surgeon.profiles.plan import block_topk_density
    from surgeon.profiles.solvers import select_overhead

    sb, lb = int(options.get("sink_blocks", 1)), int(options.get("local_blocks", 1))
    floor = sum(float(block_topk_density(seq_len, block_size, 0.0, s.causal, sb, lb)) for s in cap.sites)
    return (floor + select_overhead(block_size, "prefill")) / max(len(cap.sites), 1)  # one selecting anchor


def _check_report_budget(cap: Captured, budget: float, seq_len: int, block_size: int, options: dict) -> None:
    """Refuse, before any calibration work, a report budget no plan can meet at this length."""
    import math

    from surgeon.errors import BadInput

    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
        raise BadInput(f"--budget {budget} is outside (0, 1]", "give the fraction of dense attention compute, e.g. 0.15")
    if seq_len < 1 or block_size < 1:
        return  # the profiler reports these itself
    floor = _report_budget_floor(cap, seq_len, block_size, options)
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
            report: Optional[Path | str] = ..., budget: Optional[float] = None, force: bool = False,
            progress: Any = None, **options: Any):
    """Calibrate MODEL: statistics per site/head, write profile.json and report.html (with the
    policy at ``budget``; None: 0.15, raised to the cheapest feasible plan at this length, so a
    budget the user did not give never fails the profile; the report defaults to ``report.html``
    beside ``out``, ``None`` writes none). Outputs are checked and locked before any work and both
    are switched in only once both are complete (see :mod:`surgeon.outputs`).

    Under torchrun (WORLD_SIZE > 1) the samples are split across ranks and rank 0 alone writes;
    other ranks return ``(None, None)`` (see :mod:`surgeon.profiles.distributed`)."""
    import contextlib

    from surgeon.profiles.collect import profile as _profile
    from surgeon.profiles.plan import plan as _plan
    from surgeon.profiles.report import render_report

    from surgeon.profiles import distributed

    distributed.check_env()
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not 0.0 < float(budget) <= 1.0):
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
            if budget is not None and lm.is_text:
                _check_report_budget(cap, budget, seq_len, block_size, options)
            elif budget is None:
                # the report's illustrative budget plan: 0.15, or the cheapest plan where 0.15 cannot be met
                # (a budget the user did not give never fails the profile)
                budget = 0.15
                if lm.is_text and seq_len >= 1 and block_size >= 1:
                    import math

                    floor = _report_budget_floor(cap, seq_len, block_size, options)
                    if floor > budget:
                        budget = min(1.0, math.ceil(floor * 1000) / 1000)
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


# --------------------------------------------------------------------------- generation

def apply(model: Any, policy_or_rewrite_dir: Any, *, verify: bool = True):
    """Install a surgeon policy (a Policy, a policy.json or a `surgeon rewrite` folder) into a live
    transformers model through its attention and attention-mask interfaces, so that
    ``model.generate()`` runs it with transformers' caches; returns the model. Prefill runs each
    site's policy variant (logits equal the rewritten program's); decode steps run each site's
    decode mode (default dense over the cache). See :mod:`surgeon.generation.hf`."""
    from surgeon.generation.hf import apply as _apply

    return _apply(model, policy_or_rewrite_dir, verify=verify)


def _prompt_ids(tokenizer: Any, prompt: Optional[str], prompt_ids: Optional[list[int]], chat: bool) -> list[int]:
    from surgeon.errors import BadInput, UnsupportedModel

    if (prompt is None) == (prompt_ids is None):
        raise BadInput("give exactly one of a prompt text and prompt token ids", "pass --prompt TEXT or --prompt-file F")
    if prompt_ids is not None:
        return [int(i) for i in prompt_ids]
    if tokenizer is None:
        raise UnsupportedModel("the model has no tokenizer", "give a text model (or prompt token ids)")
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(prompt)["input_ids"]]


def generate(model_or_dir: Any = DEFAULT_MODEL, prompt: Optional[str] = None, *,
             prompt_ids: Optional[list[int]] = None, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0, policy: Any = None, onnx: Optional[Path | str] = None, stop_at_eos: bool = True,
             chat: bool = False):
    """Generate text with a KV cache; returns a :class:`surgeon.generation.loop.GenerationResult`.

    MODEL_OR_DIR: a model (alias, file, folder; or a loaded :class:`LoadedModel`) — dense, or with
    ``policy`` (a Policy, policy.json or rewrite folder) installed — or a folder written by
    ``surgeon rewrite``: its source model is loaded, its fingerprint checked and its policy
    installed (:func:`apply`). Prefill runs each site's policy variant, each decode step its
    decode mode. Greedy at ``temperature`` 0, else sampling seeded by ``seed``. ``onnx``: run the
    loop in onnxruntime on an export with a KV cache instead (the model still gives the tokenizer).
    Nothing is written to disk.
    """
    from surgeon.errors import ArtifactMismatch, BadInput, UnsupportedModel
    from surgeon.generation import loop

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise BadInput(f"--max-new-tokens {max_new_tokens} must be a positive integer", "give at least 1")
    src_dir: Optional[Path] = None
    if isinstance(model_or_dir, (str, Path)) and Path(model_or_dir).is_dir() and (Path(model_or_dir) / "rewrite.json").is_file():
        if policy is not None:
            raise BadInput(f"{model_or_dir} is a rewrite folder and already carries its policy", "drop the extra policy")
        src_dir = Path(model_or_dir)
    if onnx is not None:
        return _generate_onnx(model_or_dir, src_dir, Path(onnx), prompt, prompt_ids, max_new_tokens, temperature,
                              seed, chat, stop_at_eos=stop_at_eos)
    if src_dir is not None:
        from surgeon.generation.hf import resolve

        pol, _sites, source = resolve(src_dir)
        lm = _load(source)
        if lm.fingerprint() != pol.model_fingerprint:
            raise ArtifactMismatch(f"{src_dir} was made from a different {source} than the one installed",
                                   "re-run `surgeon rewrite` for the installed model")
        policy, label = src_dir, str(src_dir)
    else:
        lm = _load(model_or_dir) if isinstance(model_or_dir, (str, Path)) else model_or_dir
        label = "dense" if policy is None else str(getattr(policy, "source", "") or policy)
    if not isinstance(lm, LoadedModel):
        raise BadInput(f"generate needs a model name, a rewrite folder or a LoadedModel, got {type(lm).__name__}",
                       "pass a model alias or a folder written by `surgeon rewrite`")
    if lm.kind != "causal-lm":
        raise UnsupportedModel(f"{lm.name} is a{'n' if lm.kind[0] in 'aeiou' else ''} {lm.kind} model, not a causal "
                               "language model", "generate needs a decoder (causal LM), e.g. smollm2-135m")
    ids = _prompt_ids(lm.tokenizer, prompt, prompt_ids, chat)
    loop.check_request(len(ids), max_new_tokens, lm.max_positions, temperature)
    hf = lm.module.hf
    from surgeon.generation.hf import apply as _apply, remove as _remove

    if policy is not None and src_dir is None:
        from surgeon.generation.hf import resolve

        pol_obj = resolve(policy)[0]
        if pol_obj.model_fingerprint and pol_obj.model_fingerprint != lm.fingerprint():
            raise ArtifactMismatch(f"the policy was made for a different model than {lm.name} (fingerprint mismatch)",
                                   "give a policy made for this model, or re-run `surgeon rewrite` for it")
        policy = pol_obj
    try:
        if policy is not None:
            _apply(hf, policy, verify=False)
        return loop.run(hf, lm.tokenizer, ids, max_new_tokens, max_positions=lm.max_positions,
                        temperature=temperature, seed=seed, stop_at_eos=stop_at_eos, model=lm.name, policy=label)
    finally:
        if policy is not None:
            _remove(hf)


def _generate_onnx(model_or_dir: Any, src_dir: Optional[Path], export_dir: Path, prompt: Optional[str],
                   prompt_ids: Optional[list[int]], max_new_tokens: int, temperature: float, seed: int, chat: bool,
                   stop_at_eos: bool = True):
    """``surgeon generate --onnx``: tokenise here, run the loop of :mod:`surgeon.generation.onnx_loop`."""
    import importlib
    import importlib.util

    from surgeon.errors import BadInput
    from surgeon.generation import loop

    if importlib.util.find_spec("surgeon.generation.onnx_loop") is None:
        raise BadInput(f"ONNX generation needs an export with a KV cache, and this surgeon cannot run one ({export_dir})",
                       "generate with PyTorch (drop --onnx)")
    importlib.import_module("surgeon.generation.onnx_loop").kv_manifest(export_dir)  # refuse a cacheless export first
    tok, maxpos, name = None, 0, str(model_or_dir)
    if src_dir is not None and (src_dir / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        from surgeon.passes.rewrite import RewriteManifest

        tok = AutoTokenizer.from_pretrained(str(src_dir / "tokenizer"))
        man = RewriteManifest.load(src_dir / "rewrite.json")
        maxpos, name = man.max_positions, man.model
    elif prompt is not None:
        lm = _load(model_or_dir) if isinstance(model_or_dir, (str, Path)) else model_or_dir
        tok, maxpos, name = lm.tokenizer, lm.max_positions, lm.name
    ids = _prompt_ids(tok, prompt, prompt_ids, chat)
    loop.check_request(len(ids), max_new_tokens, maxpos, temperature)
    onnx_loop = importlib.import_module("surgeon.generation.onnx_loop")
    res = onnx_loop.generate_onnx(export_dir, ids, max_new_tokens, temperature, seed, stop_at_eos=stop_at_eos)
    if isinstance(res, loop.GenerationResult):
        return res
    d = res.to_dict() if hasattr(res, "to_dict") else dict(res) if isinstance(res, dict) else {"token_ids": list(res)}
    new = [int(i) for i in d.pop("token_ids")]
    text = d.pop("text", None)
    if text is None:
        text = tok.decode(new, skip_special_tokens=True) if tok is not None else ""
    known = set(loop.GenerationResult.__dataclass_fields__)
    base = {"ttft_s": 0.0, "decode_s": 0.0, "decode_tokens_per_s": 0.0, "stop": "length"}
    base.update({k: v for k, v in d.items() if k in known})
    extra = {k: v for k, v in d.items() if k not in known}
    return loop.GenerationResult(text=text, token_ids=new, prompt_tokens=len(ids), new_tokens=len(new),
                                 backend="onnxruntime", model=name, policy=str(export_dir),
                                 temperature=float(temperature), seed=int(seed), extra=extra,
                                 **{k: v for k, v in base.items() if k not in ("text", "token_ids", "prompt_tokens",
                                                                                "new_tokens", "backend", "model",
                                                                                "policy", "temperature", "seed",
                                                                                "extra")})
