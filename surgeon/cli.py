"""The ``surgeon`` command line: a thin shell over :mod:`surgeon.api`.

Exit codes: 0 success · 1 a check failed (verification, fidelity) · 2 bad input or usage ·
3 internal error (a bug: please report it with SURGEON_DEBUG=1 output).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="surgeon: a model-surgery compiler for attention (capture → profile → rewrite → export).\n\n"
                       "Exit codes: 0 success, 1 a check failed, 2 bad input or usage, 3 internal error.")
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)

MODEL_HELP = ("model: alias (smollm2-135m, minilm-l6, vit-tiny), Hugging Face folder, .gguf file, timm:NAME "
              "or package.module:factory")


def _fail(msg: str, code: int) -> None:
    err.print(f"error: {msg}", markup=False, highlight=False)
    raise typer.Exit(code)


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one-line messages and documented exit codes."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        from surgeon.errors import SurgeonError

        try:
            return fn(*a, **kw)
        except typer.Exit:
            raise
        except SurgeonError as e:
            if os.environ.get("SURGEON_DEBUG"):
                raise
            table = getattr(e, "table", None)
            if table:  # verification failures print their error table before the one-line error
                err.print(table, markup=False, highlight=False)
            _fail(e.one_line(), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 2)
        except Exception as e:  # a bug: one line by default, the traceback with SURGEON_DEBUG=1
            if os.environ.get("SURGEON_DEBUG"):
                raise
            _fail(f"internal error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''} "
                  "(re-run with SURGEON_DEBUG=1 for the traceback and report it)", 3)

    return wrapper


def _status(msg: str):
    return err.status(msg, spinner="dots")


@app.command()
@guarded
def inspect(model: str = typer.Argument("smollm2-135m", help=MODEL_HELP),
            json_out: bool = typer.Option(False, "--json", help="print a JSON list of sites")) -> None:
    """Capture MODEL with torch.export and list its attention sites."""
    from surgeon import api

    with _status(f"loading {model}"):
        lm = api.load(model)
    with _status("capturing with torch.export"):
        cap = api.capture(lm)
    if json_out:
        print(json.dumps([s.to_dict() for s in cap.sites], indent=2))
        return
    title = f"{lm.name}: {len(cap.sites)} attention sites (captured by {cap.method} in {cap.seconds:.1f} s)"
    if lm.random_weights:
        title += " — RANDOM WEIGHTS (architecture only)"
    t = Table(title=title)
    for c in ("name", "layer", "heads", "kv_heads", "head_dim", "causal", "mask", "kind"):
        t.add_column(c, no_wrap=c == "name")
    for s in cap.sites:
        t.add_row(s.name, str(s.layer), str(s.heads), str(s.kv_heads), str(s.head_dim), str(s.causal).lower(),
                  s.mask_kind, s.kind)
    out.print(t)


@app.command()
@guarded
def variants(json_out: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """List the registered attention variants: parameters, defaults, fast paths, exports."""
    from surgeon import api

    info = api.variants()
    if json_out:
        print(json.dumps(info, indent=2))
        return
    t = Table(title=f"{len(info)} registered variants")
    for c in ("name", "family", "parameters (defaults)", "fast paths", "exports"):
        t.add_column(c)
    for v in info:
        params = ", ".join(f"{p['name']}={p['default']}" for p in v["parameters"]) or "—"
        t.add_row(v["name"], v["family"], params, ", ".join(v["fast_paths"]) or "—", ", ".join(v["exports"]))
    out.print(t)


@contextlib.contextmanager
def _stage_bars(enabled: bool = True):
    """Rich progress bars on stderr, one per stage; yields ``progress(stage, done, total)``.

    Nothing is drawn before the first stage reports, so an error found by the early checks is
    the only line printed."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=err, transient=False, disable=not enabled)
    tasks: dict[str, Any] = {}
    started = False

    def progress(stage: str, done: int, total: int) -> None:
        nonlocal started
        if not started:
            prog.start()
            started = True
        if stage not in tasks:
            tasks[stage] = prog.add_task(stage, total=total)
        prog.update(tasks[stage], completed=done, total=total)

    try:
        yield progress
    finally:
        if started:
            prog.stop()


class _Steps:
    """Spinner status lines for multi-stage commands (stderr); drawn from the first step on, so
    an error found before any step prints alone."""

    def __init__(self) -> None:
        self.status = None

    def __call__(self, msg: str) -> None:
        if self.status is None:
            self.status = err.status(msg, spinner="dots")
            self.status.start()
        else:
            self.status.update(msg)

    def stop(self) -> None:
        if self.status is not None:
            self.status.stop()


@app.command()
@guarded
def profile(model: str = typer.Argument("smollm2-135m", help=MODEL_HELP),
            data: Optional[str] = typer.Option(None, "--data", help="text file, folder of .txt, JSONL with 'text', or "
                                               "a folder of images (vision); default: the built-in offline corpus"),
            samples: int = typer.Option(8, "--samples", help="calibration samples"),
            seq_len: int = typer.Option(2048, "--seq-len", help="tokens per sample"),
            block_size: int = typer.Option(64, "--block-size", help="key/query block size for block statistics"),
            out_path: Path = typer.Option(Path("profile.json"), "--out", help="profile artifact"),
            report: Optional[Path] = typer.Option(None, "--report", help="self-contained HTML report "
                                                  "(default: report.html next to --out)"),
            seed: int = typer.Option(0, "--seed", help="random seed (same inputs and seed → identical profile)"),
            budget: Optional[float] = typer.Option(None, "--budget", help="budget of the illustrative policy shown "
                                                   "in the report (default 0.15, or the cheapest feasible plan)"),
            force: bool = typer.Option(False, "--force", help="overwrite existing outputs")) -> None:
    """Calibration profiling: HeSS, mass concentration, entropy, sinks, HyLRA overlap, layer sensitivity.

    Distributed: `torchrun --nproc-per-node N -m surgeon profile ...` splits the samples across
    ranks (gloo on CPU, nccl on GPUs); rank 0 writes the same profile one process would."""
    from surgeon import api
    from surgeon.profiles.distributed import check_env

    check_env()
    rank = int(os.environ.get("RANK", "0") or 0)  # under torchrun only rank 0 draws progress and reports
    if report is None:
        report = out_path.parent / "report.html"
    with _stage_bars(enabled=rank == 0) as progress:
        prof, pol = api.profile(model, data=data, samples=samples, seq_len=seq_len, block_size=block_size,
                                seed=seed, out=out_path, report=report, budget=budget, force=force, progress=progress)
    if prof is None:  # a distributed rank other than 0: rank 0 wrote the profile
        return
    counts: dict[str, int] = {}
    for ch in pol.sites.values():
        counts[ch.variant] = counts.get(ch.variant, 0) + 1
    out.print(f"profile → {out_path}   report → {report}")
    out.print(f"policy at budget {pol.budget if pol.budget is not None else budget}: "
              + ", ".join(f"{k}×{v}" for k, v in sorted(counts.items())))


def _int_list(value: Optional[str], flag: str) -> list[int]:
    from surgeon.errors import BadInput

    if not value:
        return []
    try:
        return [int(x) for x in value.replace(" ", "").split(",") if x]
    except ValueError:
        raise BadInput(f"{flag} {value!r} is not a comma-separated list of integers",
                       f"pass e.g. {flag} 2048,8192") from None


@app.command()
@guarded
def rewrite(model: str = typer.Argument("smollm2-135m", help=MODEL_HELP),
            profile: Optional[Path] = typer.Option(None, "--profile", help="profile.json from `surgeon profile`"),
            tolerance: Optional[float] = typer.Option(None, "--tolerance",
                                                      help="allowed relative quality loss on held-out text, in (0, 1): "
                                                           "perplexity increase (LMs) or 1 − cosine (encoders); the "
                                                           "default mode, 0.01 unless given"),
            lengths: Optional[str] = typer.Option(None, "--lengths", help="serving lengths the tolerance must hold "
                                                  "at, e.g. 2048,8192 (default: the profile's length and the "
                                                  "model's maximum)"),
            families: Optional[str] = typer.Option(None, "--families", help="planner families to search, comma-"
                                                   "separated (default: surgeon,block_topp,token_topk,"
                                                   "head_hybrid,window_sink; also hylra, block_topk, "
                                                   "token_topp, vertical_slash)"),
            budget: Optional[float] = typer.Option(None, "--budget",
                                                   help="expert mode: fraction of dense attention compute kept, in "
                                                        "(0, 1], no quality guarantee"),
            recipe: Optional[Path] = typer.Option(None, "--recipe",
                                                  help="YAML/JSON mapping site-name globs to {variant: NAME, params…}"),
            out_dir: Path = typer.Option(Path("rewritten"), "--out", help="output folder"),
            force: bool = typer.Option(False, "--force", help="overwrite --out"),
            eval_seq_len: int = typer.Option(1024, "--eval-seq-len", help="budget/recipe modes: held-out tokens per "
                                             "sample for fidelity (tolerance mode measures at --lengths)"),
            eval_samples: int = typer.Option(2, "--eval-samples", help="held-out samples for fidelity"),
            json_out: bool = typer.Option(False, "--json", help="print the report as JSON")) -> None:
    """Plan the fastest rewrite within --tolerance (default), or at --budget, or from --recipe;
    rewrite MODEL, measure fidelity on held-out text, write DIR.

    Exit 1 when the held-out loss exceeds the tolerance at any serving length (DIR is written,
    its report.json says ok: false)."""
    from surgeon import api

    lens = _int_list(lengths, "--lengths")
    opts = {"families": tuple(f for f in families.replace(" ", "").split(",") if f)} if families else None
    steps = _Steps()
    try:
        rep = api.rewrite(model, profile=profile, budget=budget, recipe=recipe, out=out_dir, force=force,
                          eval_seq_len=eval_seq_len, eval_samples=eval_samples, progress=steps,
                          tolerance=tolerance, lengths=lens, plan_options=opts)
    finally:
        steps.stop()
    if rep is None:  # a distributed rank other than 0: rank 0 wrote DIR
        return
    if json_out:
        print(json.dumps(rep, indent=2))
    else:
        t = Table(title=f"{rep['model']} rewritten → {rep['out']}  ({', '.join(f'{k}×{v}' for k, v in rep['counts'].items())})")
        for c in ("site", "variant", "requested", "achieved", "rel. error vs dense"):
            t.add_column(c, no_wrap=c == "site")
        for s in rep["sites"]:
            t.add_row(s["site"], s["variant"], f"{s['requested_density']:.3f}", f"{s['achieved_density']:.3f}",
                      f"{s['rel_error']:.2e}")
        out.print(t)
        if rep.get("plan"):
            out.print(f"plan: {rep['plan']['note']}")
        for g in rep.get("gate", []):
            what = (f"perplexity {g['ppl']:.3f} vs dense {g['dense_ppl']:.3f} ({100 * g['loss']:+.2f}%)" if "ppl" in g
                    else f"1 − cosine {g['loss']:.2e}")
            out.print(f"held-out at {g['seq_len']} tokens: {what} on {g['tokens']} tokens")
        f = rep.get("fidelity")
        if f and not rep.get("gate"):
            if "ppl" in f:
                out.print(f"held-out perplexity {f['ppl']:.3f} vs dense {f['dense_ppl']:.3f} "
                          f"({100 * f['ppl_increase']:+.2f}%) on {f['tokens']} tokens")
            else:
                out.print(f"held-out embedding cosine vs dense {f['cosine']:.5f} on {f['tokens']} tokens")
    if rep.get("ok") is False:
        _fail(f"held-out loss {100 * rep['worst_loss']:.2f}% exceeds the tolerance {100 * rep['tolerance']:.2f}% "
              f"(report: {rep['out']}/report.json); loosen --tolerance or profile more data", 1)


@app.command(name="eval")
@guarded
def eval_cmd(model_or_dir: str = typer.Argument("smollm2-135m", help="a model, or a folder from `surgeon rewrite`"),
             data: Optional[str] = typer.Option(None, "--data", help="text file, folder, or JSONL, evaluated whole "
                                                "(default: the built-in corpus, held-out split)"),
             seq_len: Optional[int] = typer.Option(None, "--seq-len", help="tokens per row (default 1024, or the "
                                                   "model's maximum positions if fewer)"),
             samples: int = typer.Option(4, "--samples", help="rows of the built-in corpus (with --data the whole "
                                         "file is used)"),
             json_out: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """Perplexity (language models) or embedding cosine against dense (encoders) on held-out text."""
    from surgeon import api

    with _status("evaluating"):
        res = api.evaluate(model_or_dir, data=data, seq_len=seq_len, samples=samples)
    if json_out:
        print(json.dumps(res, indent=2))
        return
    if "ppl" in res:
        out.print(f"perplexity {res['ppl']:.4f} over {res['tokens']} tokens (seq_len {res['seq_len']}, {res['data']})")
    else:
        out.print(f"embedding cosine vs dense {res['cosine']:.6f} over {res['tokens']} tokens ({res['data']})")


@app.command()
@guarded
def export(rewritten_dir: Path = typer.Argument(..., metavar="DIR", help="a folder from `surgeon rewrite`"),
           fmt: str = typer.Option("onnx", "--format", help="onnx | tensorrt"),
           out_dir: Optional[Path] = typer.Option(None, "--out", help="output folder (default: DIR-onnx / DIR-tensorrt)"),
           opset: int = typer.Option(18, "--opset", help="ONNX opset"),
           no_verify: bool = typer.Option(False, "--no-verify", help="skip the onnxruntime comparison"),
           precision: str = typer.Option("fp16", "--precision", help="TensorRT precision: fp16 | bf16 | fp32"),
           kv_cache: bool = typer.Option(False, "--kv-cache", help="causal LMs: export for generation with a KV cache "
                                         "(inputs input_ids, attention_mask, position_ids, past_key_values.{i}.key/"
                                         "value; outputs logits, present.{i}.key/value; prefill is past length 0) "
                                         "instead of the full-sequence graph; --format onnx only"),
           last_token_logits: bool = typer.Option(False, "--last-token-logits", help="with --kv-cache: logits of the "
                                                  "last position only ([batch, 1, vocab])"),
           decode: str = typer.Option("dense", "--decode", help="with --kv-cache: attention of decode steps, dense "
                                      "(over the whole cache, as `surgeon generate`; sparse sites then get a "
                                      "prefill/decode graph pair sharing one weight file) | variant (one graph; "
                                      "each site's variant also runs at decode)"),
           attention: str = typer.Option("surgeon", "--attention", help="with --kv-cache: lowering of dense sites, "
                                         "surgeon (ONNX functions of standard ops, any runtime) | gqa (onnxruntime's "
                                         "com.microsoft.GroupQueryAttention: measured 1.07-1.12x faster decode on "
                                         "CPU; onnxruntime only, batches without left padding)"),
           force: bool = typer.Option(False, "--force", help="overwrite --out")) -> None:
    """Export a rewritten program to ONNX (surgeon ops as ONNX functions), verified in onnxruntime;
    with --format tensorrt also a TensorRT bundle, and the engine where TensorRT and a GPU exist.

    Without --kv-cache the graph maps (input_ids, attention_mask) to logits of every position
    (no cache: scoring, not generation). With --kv-cache (causal LMs) the graph carries the KV
    cache that `surgeon generate --onnx` and edge runtimes use (see surgeon.exporters.kv_export)."""
    from surgeon.errors import BadInput
    from surgeon.exporters.pipeline import export_rewritten

    if last_token_logits and not kv_cache:
        raise BadInput("--last-token-logits needs --kv-cache", "add --kv-cache")
    if (decode != "dense" or attention != "surgeon") and not kv_cache:
        raise BadInput("--decode and --attention need --kv-cache", "add --kv-cache")
    if kv_cache and fmt != "onnx":
        raise BadInput(f"--kv-cache exports ONNX only, not --format {fmt}", "use --format onnx with --kv-cache")
    steps = _Steps()
    try:
        if kv_cache:
            from surgeon.exporters.kv_export import export_kv

            man = export_kv(rewritten_dir, out=out_dir, opset=opset, verify=not no_verify, force=force,
                            last_token_logits=last_token_logits, decode=decode, attention=attention,
                            progress=steps)
        else:
            man = export_rewritten(rewritten_dir, fmt=fmt, out=out_dir, opset=opset, verify=not no_verify,
                                   force=force, progress=steps, precision=precision)
    finally:
        steps.stop()
    md = man.model_dump(mode="json")
    out.print(f"exported → {md.get('out') or out_dir or ''}")
    for k in ("surgeon_ops", "verified", "engine", "reason"):
        if k in md and md[k] is not None:
            out.print(f"  {k}: {md[k]}")


@app.command()
@guarded
def build(recipe: Optional[Path] = typer.Option(None, "--recipe", help="build.yaml (default: the embedded "
                                                "smollm2-135m, built-in corpus, tolerance 0.01)"),
          out_dir: Path = typer.Option(Path("build"), "--out", help="build folder (stages cached by fingerprints)"),
          json_out: bool = typer.Option(False, "--json", help="print the summary as JSON")) -> None:
    """profile → rewrite → export in one command (CI model-build stage); writes OUT/summary.json.

    Quality-first by default: the fastest rewrite whose held-out loss stays within the recipe's
    tolerance (0.01) at its serving lengths. Stages whose inputs are unchanged since the last run
    are skipped. Exit 1 (summary ok: false) when the held-out loss exceeds the tolerance (or
    max_ppl_increase in budget mode) or the export verification fails."""
    from surgeon.build_stages import build as _build

    summary = _build(recipe, out_dir, say=lambda m: err.print(m, markup=False, highlight=False))
    if json_out:
        print(json.dumps(summary, indent=2))
        return
    out.print(f"build ok in {summary['seconds']:.0f} s → {out_dir}/summary.json")
    if summary.get("plan"):
        out.print(f"  plan: {summary['plan']}")
    for g in summary.get("gate") or []:
        out.print(f"  held-out at {g['seq_len']} tokens: {100 * g['loss']:+.2f}% (tolerance "
                  f"{100 * summary['tolerance']:.2f}%)")
    for st in summary["stages"]:
        out.print(f"  {st['name']:8s} {st['status']:7s} {st['seconds']:7.1f} s  {', '.join(st['outputs'])}")


@app.command()
@guarded
def bench(model_or_dir: str = typer.Argument("smollm2-135m", metavar="[MODEL_OR_DIR]",
                                             help="a folder from `surgeon rewrite` (its policy), or a model "
                                                  "(rewritten here with uniform block_topk at --budget, no profile)"),
          seq_len: str = typer.Option("2048,4096,8192", "--seq-len", "--seq-lens",
                                      help="comma-separated sequence lengths"),
          device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
          repeats: int = typer.Option(3, "--repeats", help="timed rounds per length (medians reported)"),
          budget: float = typer.Option(0.15, "--budget", help="keep fraction when MODEL_OR_DIR is a bare model"),
          json_out: bool = typer.Option(False, "--json", help="print the result as one JSON object")) -> None:
    """Dense against rewritten: whole-model prefill time, per-site attention time, achieved density."""
    from surgeon import api
    from surgeon.errors import BadInput

    try:
        lens = [int(x) for x in seq_len.replace(" ", "").split(",") if x]
    except ValueError:
        raise BadInput(f"--seq-len {seq_len!r} is not a comma-separated list of integers",
                       "pass e.g. --seq-len 2048,4096,8192") from None
    steps = _Steps()
    try:
        res = api.bench(model_or_dir, seq_lens=lens, device=device, repeats=repeats, budget=budget, progress=steps)
    finally:
        steps.stop()
    if json_out:
        print(json.dumps(res, indent=2, default=str))
        return
    from rich.table import Table

    d = res["device"]
    t = Table(title=f"{res['model']} on {d.get('gpu') or d.get('cpu') or device}: {res['policy_source']}")
    for c in ("seq_len", "dense ms", "rewritten ms", "speedup", "attn dense ms", "attn rewritten ms", "attn speedup",
              "density"):
        t.add_column(c, justify="right")
    for r in res["results"]:
        f = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
        t.add_row(str(r["seq_len"]), f(r["dense_ms"]), f(r["rewritten_ms"]), f(r["speedup"], 2) + "x",
                  f(r.get("attn_dense_ms")), f(r.get("attn_rewritten_ms")), f(r.get("attn_speedup"), 2) + "x",
                  f(r["density"], 3))
    out.print(t)
    if res.get("skipped_seq_lens"):
        out.print(f"skipped lengths outside the model's range: {res['skipped_seq_lens']}")


@app.command()
@guarded
def tune(model: str = typer.Argument("smollm2-135m", help=MODEL_HELP),
         variant: str = typer.Option(..., "--variant", help="temperature | head_boost | sink_redistribute | "
                                     "identity_blend | local_boost"),
         data: Optional[str] = typer.Option(None, "--data", help="calibration text (file, folder, JSONL); its calib "
                                            "split is used (default: the built-in corpus)"),
         samples: int = typer.Option(4, "--samples", help="calibration rows"),
         seq_len: int = typer.Option(512, "--seq-len", help="tokens per row"),
         scope: str = typer.Option("global", "--scope", help="temperature/local_boost: one value for all chosen "
                                   "layers (global) or one per layer by coordinate descent (layer)"),
         objective: Optional[str] = typer.Option(None, "--objective", help="module:function, fn(output, input_ids"
                                                 "[, dense]) -> float to MINIMISE (default: calibration "
                                                 "cross-entropy, surgeon.profiles.objectives:calibration_ce)"),
         spans: Optional[str] = typer.Option(None, "--spans", help="head_boost: key spans to boost; sink_redistribute: "
                                             "the target span; start:end[,start:end] (end exclusive; default: the "
                                             "model's span metadata, else the first min(16, N/2) tokens)"),
         layers: Optional[str] = typer.Option(None, "--layers", help="layers to tune, e.g. 2-5,7 (default: the "
                                              "variant's: all; head_boost ≥ 2; sink_redistribute 2…L-2; "
                                              "local_boost the middle third)"),
         heads: Optional[str] = typer.Option(None, "--heads", help="query heads to consider, e.g. 0,3-5 "
                                             "(head_boost, sink_redistribute, identity_blend, local_boost)"),
         strength: Optional[float] = typer.Option(None, "--strength", help="head_boost alpha (0.7), identity_blend u "
                                                  "(0.5), sink_redistribute p (0.6)"),
         grid: Optional[str] = typer.Option(None, "--grid", help="values searched: temperature sigma, local_boost "
                                            "gamma, head_boost alpha (comma-separated; 0 = dense)"),
         windows: Optional[str] = typer.Option(None, "--windows", help="local_boost windows searched (default 2,5,10)"),
         refine: Optional[int] = typer.Option(None, "--refine", help="golden-section steps after the grid (default 4)"),
         sweeps: Optional[int] = typer.Option(None, "--sweeps", help="--scope layer: coordinate-descent sweeps (1)"),
         rounds: Optional[int] = typer.Option(None, "--rounds", help="identity_blend: HeadHunter rounds (1)"),
         k: Optional[int] = typer.Option(None, "--k", help="identity_blend: heads picked per round (4)"),
         seed: int = typer.Option(0, "--seed", help="row sampling seed (same inputs and seed → identical outputs)"),
         out_path: Path = typer.Option(Path("recipe.yaml"), "--out", help="recipe YAML (the search goes to "
                                       "<stem>.tune.json next to it)"),
         force: bool = typer.Option(False, "--force", help="overwrite existing outputs"),
         json_out: bool = typer.Option(False, "--json", help="print the calibration document as JSON")) -> None:
    """Calibrate a modulated variant on calibration data and write a recipe for `surgeon rewrite --recipe`."""
    from surgeon import api

    with _stage_bars() as progress:
        doc = api.tune(model, variant, data=data, samples=samples, seq_len=seq_len, seed=seed, scope=scope,
                       objective=objective, spans=spans, layers=layers, heads=heads, strength=strength, grid=grid,
                       windows=windows, refine=refine, sweeps=sweeps, rounds=rounds, k=k, out=out_path, force=force,
                       progress=progress)
    if json_out:
        print(json.dumps(doc, indent=2))
        return
    ob = doc["objective"]
    t = Table(title=f"{doc['model']}: {doc['variant']} tuned on {doc['data']['samples']} x {doc['data']['seq_len']} "
                    f"calibration tokens")
    t.add_column("site", no_wrap=True)
    t.add_column("variant")
    t.add_column("parameters")
    for name, spec in doc["recipe"].items():
        params = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "variant")
        t.add_row(name, spec["variant"], params or "—")
    out.print(t)
    out.print(f"objective {ob['spec']} (minimised): dense {ob['before_dense']:.6f} → tuned {ob['after']:.6f} "
              f"({ob['change']:+.6f}) over {ob['evaluations']} evaluations")
    out.print(f"recipe → {doc['out']}   search → {doc['sidecar']}")


@app.command()
@guarded
def generate(model_or_dir: str = typer.Argument(..., metavar="MODEL_OR_DIR",
                                                help="a causal LM (dense) or a folder from `surgeon rewrite` "
                                                     "(its source model with its policy installed)"),
             prompt: Optional[str] = typer.Option(None, "--prompt", help="the prompt text"),
             prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="read the prompt from a UTF-8 file"),
             max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="tokens to generate (stops earlier at "
                                                "end of sequence)"),
             temperature: float = typer.Option(0.0, "--temperature", help="0: greedy; > 0: sample from "
                                               "softmax(logits / T)"),
             seed: int = typer.Option(0, "--seed", help="sampling seed (same seed, same tokens)"),
             onnx: Optional[Path] = typer.Option(None, "--onnx", metavar="EXPORT_DIR",
                                                 help="run the loop in onnxruntime on an export with a KV cache"),
             chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the tokenizer's chat template"),
             ignore_eos: bool = typer.Option(False, "--ignore-eos", help="always generate --max-new-tokens tokens"),
             json_out: bool = typer.Option(False, "--json", help="print text, token ids, time to first token and "
                                           "decode tokens/s as one JSON object")) -> None:
    """Generate text with a KV cache: prefill runs each site's policy variant, decode each site's decode mode."""
    from surgeon import api
    from surgeon.errors import BadInput

    if (prompt is None) == (prompt_file is None):
        raise BadInput("give exactly one of --prompt and --prompt-file", "pass --prompt TEXT or --prompt-file F")
    if max_new_tokens <= 0:
        raise BadInput(f"--max-new-tokens {max_new_tokens} must be a positive integer", "give at least 1")
    if prompt_file is not None:
        try:
            prompt = prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"cannot read --prompt-file {prompt_file} ({type(e).__name__})",
                           "give a readable UTF-8 text file") from e
    with _status(f"generating with {model_or_dir}"):
        res = api.generate(model_or_dir, prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                           onnx=onnx, chat=chat, stop_at_eos=not ignore_eos)
    if json_out:
        print(json.dumps(res.to_dict(), indent=2))
        return
    print(res.text)
    err.print(f"{res.prompt_tokens} prompt tokens, {res.new_tokens} new ({res.stop}) on {res.backend}: "
              f"time to first token {res.ttft_s:.3f} s, decode {res.decode_tokens_per_s:.1f} tokens/s",
              markup=False, highlight=False)


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM (a CI timeout, torchrun stopping a job) unwinds like Ctrl-C: temporaries are removed,
    locks released, the previous output left as it was; exit 2 "interrupted"."""
    raise KeyboardInterrupt


def main() -> None:
    import signal

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminated)
    app()


if __name__ == "__main__":
    main()
