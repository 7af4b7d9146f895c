"""Decode speed with a KV cache: transformers (PyTorch) against onnxruntime (a KV-cache export).

For each context length C the cache is filled with random keys/values of length C (decode time
does not depend on their values, and no C-token prefill is needed), then ``--steps`` decode steps
of one token each are timed one by one, after ``--warmup`` untimed steps:

* ``pytorch``      the transformers model (SDPA) with a ``DynamicCache``;
* ``onnxruntime[:LABEL]``  the decode graph of each ``--export`` (``surgeon export DIR --format onnx --kv-cache``),
                   fed each step's ``present.*`` as the next ``past_key_values.*``.

Both use ``--threads`` threads. Reported per backend and C: median and min ms per step and
tokens/s (1000 / median ms).

    python benchmarks/bench_decode.py --export surgeon=rw-onnx --export gqa=rw-onnx-gqa --contexts 1024,4096,8192
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _summary(times: list[float]) -> dict[str, Any]:
    med = statistics.median(times)
    return {"median_ms": 1000 * med, "min_ms": 1000 * min(times), "tokens_per_s": 1.0 / med, "steps": len(times)}


def bench_pytorch(hf: Any, ctx: int, steps: int, warmup: int, seed: int) -> dict[str, Any]:
    from transformers import DynamicCache

    cfg = hf.config
    L, hkv = cfg.num_hidden_layers, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    for i in range(L):
        cache.update(torch.randn(1, hkv, ctx, d, generator=g), torch.randn(1, hkv, ctx, d, generator=g), i)
    tok = torch.tensor([[42]])
    times = []
    with torch.no_grad():
        for t in range(warmup + steps):
            n = ctx + t
            t0 = time.perf_counter()
            out = hf(input_ids=tok, attention_mask=torch.ones(1, n + 1, dtype=torch.long),
                     position_ids=torch.tensor([[n]]), cache=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            if t >= warmup:
                times.append(time.perf_counter() - t0)
    return _summary(times)


def bench_ort(export: Path, ctx: int, steps: int, warmup: int, threads: int, seed: int) -> dict[str, Any]:
    from surgeon.generation.onnx_loop import load_kv_model

    m = load_kv_model(export, threads=threads)
    sess = m.decode_session
    rng = np.random.default_rng(seed)
    names = [f"past_key_values.{i}.{k}" for i in range(m.num_layers) for k in ("key", "value")]
    feed = {n: rng.standard_normal((1, m.kv_heads, ctx, m.head_dim), dtype=np.float32) for n in names}
    tok = 42
    times = []
    for t in range(warmup + steps):
        n = ctx + t
        feed.update(input_ids=np.array([[tok]], np.int64), attention_mask=np.ones((1, n + 1), np.int64),
                    position_ids=np.array([[n]], np.int64))
        t0 = time.perf_counter()
        res = sess.run(None, feed)
        tok = int(np.argmax(res[0][0, -1]))
        if t >= warmup:
            times.append(time.perf_counter() - t0)
        for name, arr in zip(names, res[1:]):
            feed[name] = arr
    return _summary(times)


def _describe(export: Path) -> dict[str, Any]:
    kv = json.loads((export / "manifest.json").read_text()).get("kv_cache") or {}
    pv = kv.get("prefill_variants") or {}
    return {"graphs": kv.get("graphs"), "attention": kv.get("attention", "surgeon"),
            "decode_attention": kv.get("decode_attention"), "last_token_logits": kv.get("last_token_logits"),
            "prefill_variant_counts": {v: list(pv.values()).count(v) for v in sorted(set(pv.values()))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--export", action="append", default=[], metavar="[LABEL=]DIR",
                    help="a KV-cache export folder (repeatable; omit: PyTorch only)")
    ap.add_argument("--contexts", default="1024,4096,8192")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from surgeon.models import load

    lm = load(a.model)
    hf = lm.module.hf
    exports: dict[str, Path] = {}
    for spec in a.export:
        label, _, path = spec.rpartition("=")
        exports[f"onnxruntime:{label}" if label else "onnxruntime"] = Path(path)
    rows = []
    for ctx in [int(x) for x in a.contexts.split(",") if x]:
        row: dict[str, Any] = {"context": ctx, "pytorch": bench_pytorch(hf, ctx, a.steps, a.warmup, a.seed)}
        for label, path in exports.items():
            row[label] = bench_ort(path, ctx, a.steps, a.warmup, a.threads, a.seed)
        row["load_average_1m"] = os.getloadavg()[0]  # other processes on the machine (timings are wall clock)
        rows.append(row)
        print(json.dumps(row), flush=True)
    doc = {
        "benchmark": "decode tokens/s with a KV cache (one token per step, batch 1, float32)",
        "model": lm.name, "threads": a.threads, "steps": a.steps, "warmup": a.warmup,
        "exports": {label: _describe(path) for label, path in exports.items()},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__},
        "results": rows,
    }
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
