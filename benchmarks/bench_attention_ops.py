"""Time the block-sparse attention ops against dense causal SDPA on the CPU.

Shape: SmolLM2-135M attention (B=1, Hq=9, Hkv=3, D=64), causal prefill, float32.
For each length and keep fraction it times, interleaved round by round with the dense
baseline (so background load hits both alike), median and min of ``--rounds`` runs after a
warm-up:

* ``dense_sdpa``          F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)
* ``block_topk/gather``   selection (pooled QK, top-k) + gather kernel
* ``block_topk/kernel``   the gather kernel alone on a fixed selection
* ``reuse/gather``        the gather kernel on an incoming block_topk mask (+ sinks/local)
* ``delta/sdpa``          the Δ-layer: dense SDPA + page scoring/selection
* ``delta_sparse/gather`` page-subset attention on the Δ-layer's pages (keep = the fraction)
* ``window_sink/band``    sliding window + 4 sinks, window sized so the density ≈ keep
* ``flex/compiled``       (``--flex``) FlexAttention compiled with the same block_topk mask

Density is the achieved fraction of the dense causal (query, key) pairs.

    python benchmarks/bench_attention_ops.py                      # 2048 4096 8192 × 0.1 0.15 0.2
    python benchmarks/bench_attention_ops.py --lengths 8192 --keeps 0.15 --rounds 7 --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgeon.kernels.dispatch import block_sparse_attention  # noqa: E402
from surgeon.kernels.geometry import block_mask_density, block_pair_counts  # noqa: E402
from surgeon.attention.base import AttnContext  # noqa: E402
from surgeon.attention.block_topk import BlockTopK, BlockTopKParams  # noqa: E402
from surgeon.attention.delta import Delta, DeltaParams, DeltaSparse, DeltaSparseParams  # noqa: E402
from surgeon.attention.reuse import Reuse, ReuseParams  # noqa: E402
from surgeon.attention.window_sink import WindowSink, WindowSinkParams, window_density  # noqa: E402


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, clock: Callable[[], float] = time.perf_counter
                ) -> dict[str, dict[str, float]]:
    """Median/min ms per function; one warm-up call each, then ``rounds`` interleaved rounds."""
    for f in fns.values():
        f()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = clock()
            f()
            ts[k].append((clock() - t0) * 1e3)
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v)} for k, v in ts.items()}


def flex_fn(q, k, v, sel: torch.Tensor, block: int) -> Callable[[], Any]:
    """Compiled FlexAttention over the block mask ``sel`` [B,Hq,nqb,nkb] (diagonal blocks causal)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    nqb = sel.shape[2]
    diag = torch.eye(nqb, dtype=torch.bool)[None, None]
    full = sel & ~diag
    part = sel & diag

    def to_kv(m):
        num = m.sum(-1).to(torch.int32)
        idx = torch.sort(torch.where(m, torch.arange(m.shape[-1]), m.shape[-1]), dim=-1).values
        return num, idx.clamp_max(m.shape[-1] - 1).to(torch.int32)

    def causal(b, h, qi, ki):
        return qi >= ki

    pn, pi = to_kv(part)
    fn_, fi = to_kv(full)
    bm = BlockMask.from_kv_blocks(pn, pi, fn_, fi, BLOCK_SIZE=block, mask_mod=causal,
                                  seq_lengths=(q.shape[2], k.shape[2]))
    comp = torch.compile(flex_attention, dynamic=False)
    return lambda: comp(q, k, v, block_mask=bm, enable_gqa=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.1, 0.15, 0.2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--only", nargs="*", default=None, help="subset of op names to time")
    ap.add_argument("--flex", action="store_true", help="also time compiled FlexAttention (slow first compile)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or process CPU time (a proxy on a busy machine; use with --threads 1)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    b, hq, hkv, d = 1, 9, 3, 64
    rows: list[dict[str, Any]] = []
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.clock} clock, "
          f"B={b} Hq={hq} Hkv={hkv} D={d}, causal fp32")
    print(f"{'N':>6} {'keep':>5} {'op':22} {'density':>8} {'median ms':>10} {'min ms':>8} {'x dense':>8}")
    for n in args.lengths:
        g = torch.Generator().manual_seed(n)
        q = torch.randn(b, hq, n, d, generator=g)
        k = torch.randn(b, hkv, n, d, generator=g)
        v = torch.randn(b, hkv, n, d, generator=g)
        ctx = AttnContext(causal=True, scale=d ** -0.5, kv_heads=hkv)
        counts = block_pair_counts(n, n, args.block, args.block, True, None, q.device)
        for keep in args.keeps:
            bt, pt = BlockTopK(), BlockTopKParams(keep=keep, block_size=args.block)
            sel = bt.select(q, k, ctx, pt)
            rp = ReuseParams(block_size=args.block)
            dp = DeltaParams(keep=keep)
            pages = Delta().select(q, k, ctx, dp)
            sp = DeltaSparseParams()
            wfrac = 1.0 - math.sqrt(1.0 - keep)  # causal window density ≈ 2w − w²
            wp = WindowSinkParams(sink_tokens=4, window=max(1, round(wfrac * n)))
            ops: dict[str, tuple[Callable[[], Any], float]] = {
                "dense_sdpa": (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=ctx.scale,
                                                                      enable_gqa=True), 1.0),
                "block_topk/gather": (lambda: bt._gather(q, k, v, ctx, pt), block_mask_density(sel, counts)),
                "block_topk/kernel": (lambda: block_sparse_attention(q, k, v, sel, q_block=args.block,
                                                                     k_block=args.block, causal=True,
                                                                     scale=ctx.scale), block_mask_density(sel, counts)),
                "reuse/gather": (lambda: Reuse()._gather(q, k, v, ctx, rp, sel),
                                 block_mask_density(Reuse().effective_mask(q, k, ctx, rp, sel), counts)),
                "delta/sdpa": (lambda: Delta()._sdpa(q, k, v, ctx, dp), 1.0),
                "delta_sparse/gather": (lambda: DeltaSparse()._gather(q, k, v, ctx, sp, pages),
                                        DeltaSparse().achieved_density(q, k, v, ctx, sp, pages)),
                "window_sink/band": (lambda: WindowSink()._band(q, k, v, ctx, wp),
                                     window_density(n, n, True, wp, None, q.device)),
            }
            if args.flex:
                ops["flex/compiled"] = (flex_fn(q, k, v, sel, args.block), block_mask_density(sel, counts))
            if args.only:
                ops = {k_: v_ for k_, v_ in ops.items() if k_ == "dense_sdpa" or k_ in args.only}
            res = interleaved({name: fn for name, (fn, _) in ops.items()}, args.rounds, clock)
            base = res["dense_sdpa"]["median_ms"]
            for name, (_, dens) in ops.items():
                r = res[name]
                row = {"n": n, "keep": keep, "op": name, "density": dens, **r, "speedup": base / r["median_ms"]}
                rows.append(row)
                print(f"{n:>6} {keep:>5} {name:22} {dens:8.3f} {r['median_ms']:10.1f} {r['min_ms']:8.1f} "
                      f"{row['speedup']:8.2f}")
            sys.stdout.flush()
    if args.json is not None:
        args.json.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                         "clock": args.clock, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
