"""Held-out perplexity and measured density of the adaptive variants on SmolLM2-135M.

Each configuration runs one variant on layers 2–29 (layers 0–1 dense), on the built-in
held-out split (never used for calibration), next to its fixed-budget sibling near the same
measured density. Density and relative output error per site come from the ops' own records
(``surgeon.attention.base.recording``), so they describe the selections as they really ran.

    python benchmarks/adaptive_variants_fidelity.py --seq-len 1024 --samples 2
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = [
    {"variant": "block_topk", "keep": 0.38, "block_size": 64},
    {"variant": "block_topp", "p": 0.9, "block_size": 64, "stride": 16},
    {"variant": "block_topk", "keep": 0.43, "block_size": 64},
    {"variant": "block_topp", "p": 0.95, "block_size": 64, "stride": 16},
    {"variant": "token_topk", "n_init": 64, "n_local": 128, "top_k": 0, "keep": 0.2, "chunk": 64},
    {"variant": "token_topp", "n_init": 64, "n_local": 128, "p": 0.9, "chunk": 64},
    {"variant": "vertical_slash", "n_vertical": 64, "n_slash": 128, "last_q": 16, "block_size": 128,
     "sink_tokens": 4, "local": 64},
    {"variant": "head_hybrid", "kinds": ["dense", "streaming", "sparse"], "sink_tokens": 64, "window": 256,
     "p": 0.9, "block_size": 64},
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all configurations)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adaptive_variants_fidelity.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from surgeon.benchmark import device_description
    from surgeon.capture import capture
    from surgeon.evaluate import evaluate_module
    from surgeon.models import load
    from surgeon.passes.policy import policy_from_recipe
    from surgeon.passes.rewrite import rewrite
    from surgeon.profiles.data import load_calibration

    lm = load("smollm2-135m")
    cap = capture(lm)
    names = [s.name for s in cap.sites]
    data = load_calibration(None, lm, a.samples, a.seq_len, "heldout")
    dense_layers = {"model.layers.0.self_attn": "dense", "model.layers.1.self_attn": "dense"}
    rows = []
    for spec in CONFIGS:
        if a.only and spec["variant"] not in a.only:
            continue
        pol = policy_from_recipe({"model.layers.*.self_attn": dict(spec), **dense_layers}, lm.fingerprint(), names)
        mod = rewrite(cap, pol).program.module()
        t0 = time.perf_counter()
        r = evaluate_module(mod, "causal-lm", data.inputs, seq_len=a.seq_len, data="heldout",
                            dense_module=lm.module, measure_sites=True)
        sparse = [s for s in r.sites if s["variant"] != "dense"]
        row = {"config": spec, "ppl": r.value, "dense_ppl": r.dense_value, "ppl_increase": r.value / r.dense_value - 1,
               "mean_density": sum(s["achieved_density"] for s in sparse) / max(len(sparse), 1),
               "mean_rel_error": sum(s["rel_error"] for s in sparse) / max(len(sparse), 1),
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    doc = {"benchmark": "adaptive_variants_fidelity", "model": "smollm2-135m", "seq_len": a.seq_len,
           "samples": a.samples, "data": "built-in held-out split", "layers": "2-29 (0-1 dense)",
           "threads": a.threads, "device": device_description(), "python": platform.python_version(),
           "torch": torch.__version__, "date": _dt.date.today().isoformat(), "results": rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
