"""token_topk's CPU fast path against dense causal SDPA, one op, random q/k/v with SmolLM2's
shape (9 query / 3 KV heads, dim 64), interleaved rounds, medians; JSON to --out.

    python benchmarks/bench_token_topk.py --seq-len 4096 8192
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--keep", type=float, default=0.06)
    ap.add_argument("--n-init", type=int, default=16)
    ap.add_argument("--n-local", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "token_topk_cpu.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from surgeon.attention.base import AttnContext, use_impl
    from surgeon.attention.registry import get_variant
    from surgeon.benchmark import device_description

    var = get_variant("token_topk")
    p = var.params_from({"n_init": a.n_init, "n_local": a.n_local, "top_k": 0, "keep": a.keep, "chunk": 64})
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in a.seq_len:
        q = torch.randn(1, 9, n, 64, generator=g)
        k = torch.randn(1, 3, n, 64, generator=g)
        v = torch.randn(1, 3, n, 64, generator=g)
        ctx = AttnContext(causal=True, scale=0.125, kv_heads=3)
        td, tt = [], []
        with torch.no_grad(), use_impl("auto"):
            var.run(q, k, v, ctx, p)
            for r in range(a.repeats):
                for which in ((0, 1) if r % 2 == 0 else (1, 0)):
                    t0 = time.perf_counter()
                    if which == 0:
                        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125,
                                                                         enable_gqa=True)
                        td.append(time.perf_counter() - t0)
                    else:
                        var.run(q, k, v, ctx, p)
                        tt.append(time.perf_counter() - t0)
        d = var.achieved_density(q, k, v, ctx, p) if n <= 4096 else None
        rows.append({"seq_len": n, "dense_ms": 1e3 * statistics.median(td), "token_topk_ms": 1e3 * statistics.median(tt),
                     "speedup": statistics.median(td) / statistics.median(tt), "density": d,
                     "dense_runs_ms": [1e3 * x for x in td], "token_topk_runs_ms": [1e3 * x for x in tt]})
        print(rows[-1]["seq_len"], round(rows[-1]["dense_ms"]), round(rows[-1]["token_topk_ms"]),
              round(rows[-1]["speedup"], 2), d, flush=True)
    out = {"benchmark": "token_topk_op", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "device": device_description("cpu"), "params": p.to_dict(), "threads": a.threads,
           "note": "random q/k/v (selection cost is content-independent); density measured at <= 4096 tokens",
           "command": "python benchmarks/bench_token_topk.py " + " ".join(argv or sys.argv[1:]), "results": rows,
           "python": platform.python_version()}
    Path(a.out).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
