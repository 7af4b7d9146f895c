"""onnxruntime (CPU) prefill time of exported SmolLM2-135M: sparse rewrite vs dense, in one run.

Builds three ONNX models of smollm2-135m and times them on the same input, interleaved round
by round (so background load hits all alike), batch 1, ``--length`` tokens (default 4096):

* ``dense``   identity rewrite (every site ``surgeon::dense``) exported by
              :func:`surgeon.exporters.pipeline.export_rewritten` — the dense baseline in the same
              representation as the sparse model (an ONNX function per site, standard ops);
* ``sparse``  a HyLRA-like recipe exported the same way: layers 0-1 dense, then pairs of layers —
              an anchor ``block_topk`` (keep ``--keep`` of the allowed 64-token key blocks,
              1 sink block, 1 local block) and a ``reuse`` layer attending to its anchor's
              blocks; block-sparse functions use the gathered lowering (only kept blocks);
* ``native``  (unless ``--no-native``) the captured model without surgeon ops, exported by
              torch.onnx at opset 23, where SDPA becomes the ONNX ``Attention`` op, i.e.
              onnxruntime's own attention kernel.

Both surgeon exports are verified against PyTorch in onnxruntime first (32 and 96 tokens, the
default export check); the sparse one additionally at ``--check-length`` tokens, where the
block selection really is sparse. Results go to benchmarks/results/onnxruntime_cpu.json (+ .png):
machine, versions, date, export times, per-model median/min ms, and the ratios.

    python benchmarks/bench_onnxruntime.py                     # 4096 tokens, 3 rounds
    python benchmarks/bench_onnxruntime.py --length 2048 --rounds 5 --no-native
    python benchmarks/bench_onnxruntime.py --replot              # redraw the PNG from the JSON
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "platform": platform.platform(),
            "python": platform.python_version(), "load_average_at_start": list(load) if load else None}


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    from importlib.metadata import PackageNotFoundError, version

    try:
        surgeon_v = version("surgeon")
    except PackageNotFoundError:
        surgeon_v = "source"
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "transformers": transformers.__version__, "surgeon": surgeon_v}


def sparse_recipe(n_layers: int, keep: float, block: int) -> dict[str, Any]:
    recipe: dict[str, Any] = {}
    for i in range(2, n_layers):
        site = f"model.layers.{i}.self_attn"
        if i % 2 == 0:
            recipe[site] = {"variant": "block_topk", "keep": keep, "block_size": block, "sink_blocks": 1,
                            "local_blocks": 1}
        else:
            recipe[site] = {"variant": "reuse", "block_size": block, "sink_blocks": 1, "local_blocks": 1,
                            "block_mask_from": f"model.layers.{i - 1}.self_attn"}
    return recipe


def make_rewrites(work: Path, keep: float, block: int, log) -> tuple[Any, dict[str, Path], dict[str, float]]:
    from surgeon.capture import capture
    from surgeon.models import load
    from surgeon.passes.policy import identity_policy, policy_from_recipe
    from surgeon.passes.rewrite import rewrite, save_rewritten

    secs: dict[str, float] = {}
    t0 = time.perf_counter()
    lm = load("smollm2-135m")
    cap = capture(lm)
    secs["load_and_capture"] = time.perf_counter() - t0
    names = [s.name for s in cap.sites]
    fp = lm.fingerprint()
    policies = {"dense": identity_policy(fp, names),
                "sparse": policy_from_recipe(sparse_recipe(len(names), keep, block), fp, names)}
    dirs = {}
    for key, pol in policies.items():
        log(f"rewrite {key}")
        t0 = time.perf_counter()
        res = rewrite(cap, pol)
        dirs[key] = save_rewritten(work / f"smol-{key}", cap, res, force=True)
        secs[f"rewrite_{key}"] = time.perf_counter() - t0
    return cap, dirs, secs


LABELS = {"dense": "dense\n(surgeon::dense)", "sparse": "sparse\n(block_topk+reuse)", "native": "native\n(ONNX Attention)"}


def plot(info: dict[str, Any], path: Path, log) -> None:
    """Bar chart of the median times in ``info`` (the JSON written by this script)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # the JSON is the result; the plot is a convenience
        log(f"no plot: {e}")
        return
    stats, n = info["results"], info["setting"]["tokens"]
    keys = list(stats)
    vals = [stats[k]["median_ms"] / 1e3 for k in keys]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    colors = {"dense": "#888", "sparse": "#2a7", "native": "#57c"}
    bars = ax.barh([LABELS.get(k, k) for k in keys], vals, color=[colors.get(k, "#999") for k in keys])
    for b, v in zip(bars, vals):
        ax.text(v, b.get_y() + b.get_height() / 2, f" {v:.1f} s", va="center")
    ax.set_xlabel(f"onnxruntime CPU, {n} tokens, median of {info['setting']['rounds']} runs (s)")
    ax.set_title(f"SmolLM2-135M prefill: dense / sparse = {info['ratios']['dense_over_sparse']:.2f}x")
    ax.set_xlim(0, max(vals) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", type=float, default=0.15)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--check-length", type=int, default=512,
                    help="extra verification length for the sparse export (0: skip)")
    ap.add_argument("--no-native", action="store_true", help="skip the opset-23 export without surgeon ops")
    ap.add_argument("--out", type=Path, default=RESULTS / "onnxruntime_cpu.json")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the exports here (default: a temp folder)")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON at --out")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if args.replot:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"), log)
        return 0

    import numpy as np
    import onnxruntime as ort
    import torch

    from surgeon.exporters import onnx_lowering as L
    from surgeon.exporters.pipeline import export_rewritten

    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    info = {"machine": machine(), "versions": versions(), "date": started}
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-ort-")
        work = Path(tmp.name)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)

    cap, dirs, secs = make_rewrites(work, args.keep, args.block, log)
    models: dict[str, Path] = {}
    exports: dict[str, Any] = {}
    for key, d in dirs.items():
        lengths = (32, 96) + ((args.check_length,) if key == "sparse" and args.check_length else ())
        log(f"export + verify {key} at {lengths}")
        man = export_rewritten(d, fmt="onnx", out=work / f"smol-{key}-onnx", force=True, lengths=lengths)
        models[key] = work / f"smol-{key}-onnx" / man.onnx
        exports[key] = {"seconds": {k: round(v, 1) for k, v in man.seconds.items()}, "surgeon_ops": man.surgeon_ops,
                        "verified": man.verified,
                        "max_abs_err": {f"{r['length']}": r["max_abs_err"] for r in man.verification["results"]},
                        "max_rel_err": {f"{r['length']}": r["max_rel_err"] for r in man.verification["results"]}}
    if not args.no_native:
        log("export native (opset 23, ONNX Attention)")
        t0 = time.perf_counter()
        nat = work / "smol-native-onnx"
        nat.mkdir(exist_ok=True)
        res = L.export_program(cap.program, cap.example, None, nat / "model.onnx", opset=23)
        models["native"] = Path(res.path)
        exports["native"] = {"seconds": {"export": round(time.perf_counter() - t0, 1)}, "opset": res.opset}
    del cap
    gc.collect()

    # one input: batch 1, --length random tokens, no padding
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 49152, (1, args.length), generator=g).numpy()
    mask = np.ones_like(ids)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sessions = {}
    for key, path in models.items():
        log(f"session {key}")
        sessions[key] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": mask}
    outputs = {}
    for key, s in sessions.items():  # warm-up (also the outputs compared below)
        log(f"warm-up {key}")
        t0 = time.perf_counter()
        outputs[key] = s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()})[0][0, -1]
        log(f"  {key}: {time.perf_counter() - t0:.1f} s")
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for r in range(args.rounds):
        for key, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()})
            times[key].append((time.perf_counter() - t0) * 1e3)
            log(f"round {r + 1} {key}: {times[key][-1]:.0f} ms")
    stats = {k: {"median_ms": round(statistics.median(v), 1), "min_ms": round(min(v), 1),
                 "runs_ms": [round(x, 1) for x in v]} for k, v in times.items()}
    ratios = {"dense_over_sparse": round(stats["dense"]["median_ms"] / stats["sparse"]["median_ms"], 3)}
    if "native" in stats:
        ratios["native_over_sparse"] = round(stats["native"]["median_ms"] / stats["sparse"]["median_ms"], 3)
        ratios["dense_over_native"] = round(stats["dense"]["median_ms"] / stats["native"]["median_ms"], 3)

    def rel(a: Any, b: Any) -> float:
        return float(np.abs(a - b).max() / np.abs(b).max())

    fidelity = {"sparse_vs_dense_last_logits_rel": round(rel(outputs["sparse"], outputs["dense"]), 5)}
    if "native" in outputs:
        fidelity["dense_vs_native_last_logits_rel"] = round(rel(outputs["dense"], outputs["native"]), 7)
    info.update({
        "model": "smollm2-135m (30 layers, 9 query / 3 KV heads of 64, float32)",
        "setting": {"tokens": args.length, "batch": 1, "rounds": args.rounds, "threads": args.threads,
                    "providers": ["CPUExecutionProvider"], "output": "logits [1, N, 49152] (all positions)"},
        "sparse_policy": {"layers_0_1": "dense", "even_layers_2_28": f"block_topk keep={args.keep} block={args.block} "
                          "sink_blocks=1 local_blocks=1", "odd_layers_3_29": "reuse of the previous layer's blocks "
                          "(+1 sink, +1 local block)", "lowering": "gather"},
        "prep_seconds": {k: round(v, 1) for k, v in secs.items()},
        "exports": exports, "results": stats, "ratios": ratios, "fidelity_at_length": fidelity,
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    log(f"wrote {args.out}: {json.dumps(ratios)}")
    plot(info, args.out.with_suffix(".png"), log)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
