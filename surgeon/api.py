"""The typed Python API that the CLI mirrors. Each function is one CLI command's work.

    import surgeon
    lm = surgeon.load("smollm2-135m")
    cap = surgeon.capture(lm)
    sites = surgeon.inspect(cap)            # list[Site]
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

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


def rewrite(model: LoadedModel | str, *, profile: Optional[Path | str] = None, budget: Optional[float] = None,
            recipe: Optional[Path | str | dict] = None, out: Optional[Path | str] = None, force: bool = False,
            eval_seq_len: int = 1024, eval_samples: int = 2, progress: Any = None) -> dict[str, Any]:
    """Plan (or read a recipe), rewrite, measure fidelity on held-out text, and write DIR.

    DIR holds program.pt2, policy.json, rewrite.json and report.json. Returns the report.
    """
    from surgeon.artifacts import canonical_json, check_writable_output
    from surgeon.evaluate import evaluate_module
    from surgeon.passes.rewrite import rewrite as _rewrite
    from surgeon.passes.rewrite import save_rewritten
    from surgeon.profiles.data import load_calibration

    out = Path(out or "rewritten")
    check_writable_output(out, force)
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


def evaluate(model_or_dir: str, *, data: Optional[str] = None, seq_len: int = 1024, samples: int = 4) -> dict[str, Any]:
    """Perplexity (language models) or embedding cosine against dense (encoders) on held-out text.

    MODEL_OR_DIR: a model (dense) or a folder written by `surgeon rewrite`.
    """
    from surgeon.evaluate import evaluate_module
    from surgeon.passes.rewrite import load_rewritten as _lr
    from surgeon.profiles.data import load_calibration

    p = Path(model_or_dir)
    if p.is_dir() and (p / "rewrite.json").exists():
        rw = _lr(p)
        lm = _load(rw.manifest.model)
        if lm.fingerprint() != rw.manifest.model_fingerprint:
            from surgeon.errors import ArtifactMismatch

            raise ArtifactMismatch(f"{p} was made from a different {rw.manifest.model} than the one installed",
                                   "re-run `surgeon rewrite` for the installed model")
        module = rw.module()
        dense = lm.module if lm.kind != "causal-lm" else None
    else:
        lm = _load(model_or_dir)
        module, dense = lm.module, lm.module
    seq = seq_len
    if lm.kind == "causal-lm" or lm.kind == "encoder":
        seq = min(seq_len, lm.max_positions or seq_len)
    cal = load_calibration(data, lm, samples, seq, split="heldout")
    ev = evaluate_module(module, lm.kind, cal.inputs, seq_len=seq, data=cal.source + ":heldout", dense_module=dense)
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


def profile(model: LoadedModel | str = DEFAULT_MODEL, *, data: Optional[str] = None, samples: int = 8,
            seq_len: int = 2048, block_size: int = 64, seed: int = 0, out: Optional[Path | str] = "profile.json",
            report: Optional[Path | str] = "report.html", budget: float = 0.15, force: bool = False,
            progress: Any = None, **options: Any):
    """Calibrate MODEL: statistics per site/head, write profile.json and report.html (with the
    policy at ``budget``). Outputs are checked before any work and written atomically.

    Under torchrun (WORLD_SIZE > 1) the samples are split across ranks and rank 0 alone writes;
    other ranks return ``(None, None)`` (see :mod:`surgeon.profiles.distributed`)."""
    from surgeon.artifacts import check_writable_output
    from surgeon.profiles.collect import profile as _profile
    from surgeon.profiles.plan import plan as _plan
    from surgeon.profiles.report import write_report

    from surgeon.profiles import distributed

    world = distributed.init_from_env()  # torchrun: join the process group (None: one process)
    try:
        err: Optional[BaseException] = None
        try:
            if world is None or world.rank == 0:  # rank 0 alone writes
                for p in (out, report):
                    if p is not None:
                        check_writable_output(Path(p), force)
            lm = _load(model) if isinstance(model, str) else model
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
        if out is not None:
            prof.save(Path(out), force=force)
        if report is not None:
            write_report(prof, pol, Path(report), force=force)
        return prof, pol
    finally:
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
    from surgeon.artifacts import check_writable_output
    from surgeon.profiles import tune as _tune

    text_like = not (isinstance(model, str) and (model == "vit-tiny" or model.startswith("timm:")))
    opts = _tune.check_options(variant, scope=scope, objective=objective, spans=spans, layers=layers, heads=heads,
                               strength=strength, grid=grid, windows=windows, refine=refine, sweeps=sweeps,
                               rounds=rounds, k=k, seq_len=seq_len if text_like else None, **options)
    if out is not None:
        check_writable_output(Path(out), force)
        check_writable_output(_tune.sidecar_path(Path(out)), force)
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
                              seed, chat)
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
                   prompt_ids: Optional[list[int]], max_new_tokens: int, temperature: float, seed: int, chat: bool):
    """``surgeon generate --onnx``: tokenise here, run the loop of :mod:`surgeon.generation.onnx_loop`."""
    import importlib
    import importlib.util

    from surgeon.errors import BadInput
    from surgeon.generation import loop

    if importlib.util.find_spec("surgeon.generation.onnx_loop") is None:
        raise BadInput(f"ONNX generation needs an export with a KV cache, and this surgeon cannot run one ({export_dir})",
                       "generate with PyTorch (drop --onnx)")
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
    res = onnx_loop.generate_onnx(export_dir, ids, max_new_tokens, temperature, seed)
    if isinstance(res, loop.GenerationResult):
        return res
    d = dict(res) if isinstance(res, dict) else {"token_ids": list(res)}
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
