"""GPU benchmark: surgeon's Triton block-sparse and pyramid kernels vs dense SDPA and FlexAttention.

Usage (on a machine with an NVIDIA GPU, from the repository root):

    python benchmarks/bench_gpu_kernels.py                 # 8k–64k tokens, densities 0.05–0.5
    python benchmarks/bench_gpu_kernels.py --quick         # 8k and 32k, densities 0.1 and 0.5
    python benchmarks/bench_gpu_kernels.py --budget-s 300  # stop starting new lengths after 300 s

For a lent GPU with a short time budget, ``--quick --budget-s 300`` is the suggested call.

Shape: the SmolLM2-135M attention (9 query heads, 3 KV heads, head dim 64), batch 1, causal
prefill, bfloat16 by default. For each length N it times

* ``sdpa``: dense causal ``F.scaled_dot_product_attention`` (FlashAttention backend when
  available, else PyTorch's choice; the backend is recorded);
and for each density d (fraction of the causal key blocks kept per query block; the diagonal
and the first block are always kept, the rest drawn at random):
* ``flex``: compiled FlexAttention with the same 64-token block mask (``BlockMask.from_kv_blocks``);
* ``blocksparse_kernel``: the Triton kernel on precomputed index lists;
* ``blocksparse``: the full wrapper (mask → index lists, one host sync, kernel);
* ``pyramid``: the pyramid wrapper (pooled K/V build + kernel) on the same selected blocks,
  whose non-diagonal blocks cycle through levels 1, 2, 4, 8 (``pyramid_key_density`` gives
  the resulting fraction of causal keys, pooled keys counted once);
* ``build_pyramid``: the pooled K/V build alone.
It also records the max |difference| between the block-sparse kernel and FlexAttention
outputs (same semantics) and, at the first length, between the kernel with a full causal mask
and SDPA.

Writes ``benchmarks/results/<card-name>-kernels.json`` (device, versions, date, all timings in
milliseconds: median over repetitions) after every length, and a PNG plot beside it at the end.
Without a CUDA GPU it exits with status 2 and a message. ``--smoke`` runs tiny shapes on the
CPU under ``TRITON_INTERPRET=1`` to check the script itself (timings meaningless).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]


def _fail(msg: str, code: int = 2) -> None:
    sys.stderr.write(f"bench_gpu_kernels: {msg}\n")
    raise SystemExit(code)


def _parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", default="8192,16384,32768,65536", help="comma-separated sequence lengths")
    ap.add_argument("--densities", default="0.05,0.1,0.2,0.5", help="comma-separated block densities")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    ap.add_argument("--quick", action="store_true", help="N in {8192, 32768}, densities {0.1, 0.5}")
    ap.add_argument("--budget-s", type=float, default=0.0, help="do not start a new length after this many seconds")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--card-name", default="", help="file-name prefix (default: from the GPU name)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1 (script check)")
    args = ap.parse_args(argv)
    if args.quick:
        args.ns, args.densities = "8192,32768", "0.1,0.5"
    if args.smoke:
        args.ns, args.densities, args.reps, args.warmup = "256,320", "0.25,0.5", 2, 1
        args.heads, args.kv_heads, args.head_dim = 4, 2, 32
    args.ns = [int(x) for x in str(args.ns).split(",") if x]
    args.densities = [float(x) for x in str(args.densities).split(",") if x]
    return args


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def _timer(device: Any, torch: Any) -> Callable[[Callable[[], Any], int, int], float]:
    def bench(fn: Callable[[], Any], warmup: int, reps: int) -> float:
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e))
            return statistics.median(times)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return bench


def _causal_selection(torch: Any, hq: int, nb: int, density: float, gen: Any, device: Any) -> Any:
    """bool [1,hq,nb,nb]: per query block i keep max(1, round(density*(i+1))) of blocks 0..i,
    always the diagonal and block 0, the rest at random."""
    score = torch.rand(1, hq, nb, nb, generator=gen).to(device)
    i = torch.arange(nb, device=device)
    causal = i[None, :] <= i[:, None]
    score = torch.where(causal, score, torch.full_like(score, -1.0))
    score[..., :, 0] = 2.0  # block 0 is causal for every query block
    score[..., i, i] = 3.0
    keep_n = torch.clamp(torch.round(density * (i + 1).double()).long(), min=1)
    keep_n = torch.minimum(keep_n, i + 1)
    rank = score.argsort(dim=-1, descending=True).argsort(dim=-1)
    return (rank < keep_n[:, None]) & causal


def _pyramid_levels(torch: Any, sel: Any) -> Any:
    """int8 levels: selected non-diagonal blocks cycle 1, 2, 4, 8 (in key order); diagonal 1."""
    nb = sel.shape[-1]
    order = sel.to(torch.int64).cumsum(-1) - 1
    table = torch.tensor([1, 2, 4, 8], dtype=torch.int8, device=sel.device)
    lv = torch.where(sel, table[order.clamp_min(0) % 4], torch.zeros((), dtype=torch.int8, device=sel.device))
    eye = torch.eye(nb, dtype=torch.bool, device=sel.device)
    return torch.where(eye, torch.ones_like(lv), lv)


def _flex_runner(torch: Any, sel: Any, block: int, n: int, scale: float, compiled: Any) -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import BlockMask

    nb = sel.shape[-1]
    eye = torch.eye(nb, dtype=torch.bool, device=sel.device)
    partial, full = sel & eye, sel & ~eye

    def to_kv(m: Any) -> tuple[Any, Any]:
        cnt = m.sum(-1, dtype=torch.int32)
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return cnt.contiguous(), idx.contiguous()

    sel_b = sel.expand(1, sel.shape[1], nb, nb).contiguous()

    def causal_mod(b: Any, h: Any, qi: Any, ki: Any) -> Any:
        # The selection is in the mask_mod too: eager flex applies only mask_mod (it ignores
        # the block lists); compiled flex calls it on the partial (diagonal) blocks alone.
        return (qi >= ki) & sel_b[b, h, qi // block, ki // block]

    pc, pi = to_kv(partial)
    fc, fi = to_kv(full)
    bm = BlockMask.from_kv_blocks(pc, pi, fc, fi, BLOCK_SIZE=block, mask_mod=causal_mod, seq_lengths=(n, n))

    def run(q: Any, k: Any, v: Any) -> Any:
        return compiled(q, k, v, block_mask=bm, scale=scale, enable_gqa=True)

    return run


def _plot(result: dict[str, Any], png: Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    lengths = result["lengths"]
    if not lengths:
        return "no lengths measured: no plot"
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.6), squeeze=False)
    for ax, rec in zip(axes[0], lengths):
        dens = [r["density"] for r in rec["densities"]]
        for key, style in (("blocksparse_kernel", "o-"), ("blocksparse", "o--"), ("pyramid", "s-"), ("flex", "^-")):
            ys = [r.get(key) for r in rec["densities"]]
            pts = [(d, y) for d, y in zip(dens, ys) if isinstance(y, (int, float))]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=key)
        if isinstance(rec.get("sdpa"), (int, float)):
            ax.axhline(rec["sdpa"], color="k", ls=":", label="sdpa (dense)")
        ax.set_title(f"N = {rec['n']}")
        ax.set_xlabel("block density (of causal)")
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{result['device']['name']} · {result['config']['dtype']} · "
                 f"Hq={result['config']['heads']} Hkv={result['config']['kv_heads']} D={result['config']['head_dim']}")
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
    return None


def _write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse_args(argv)
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if interp and not args.smoke:
        _fail("TRITON_INTERPRET=1 is set: the kernels would run in the CPU interpreter; unset it (or pass --smoke)")
    if args.smoke and not interp:
        _fail("--smoke needs TRITON_INTERPRET=1 in the environment")
    try:
        import torch
    except ImportError:
        _fail("PyTorch is not installed")
    if not args.smoke and not torch.cuda.is_available():
        _fail("no CUDA GPU is visible (torch.cuda.is_available() is False); this script times GPU kernels, "
              "run it on a machine with an NVIDIA GPU (or pass --smoke with TRITON_INTERPRET=1 to check the script)")
    try:
        import triton
    except ImportError:
        _fail("Triton is not installed: pip install triton")
    sys.path.insert(0, str(ROOT))
    import torch.nn.functional as F

    from surgeon.kernels.triton_blocksparse import blocksparse_attention, blocksparse_attention_from_indices
    from surgeon.kernels.triton_common import block_mask_to_indices
    from surgeon.kernels.triton_pyramid import build_pyramid, pyramid_attention

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = getattr(torch, args.dtype) if not args.smoke else torch.float32
    bench = _timer(device, torch)
    hq, hkv, d, block = args.heads, args.kv_heads, args.head_dim, args.block
    scale = d ** -0.5
    name = "cpu-smoke" if args.smoke else torch.cuda.get_device_name(0)
    card = args.card_name or _slug(name)
    out_dir = Path(args.out_dir)
    json_path = out_dir / f"{card}-kernels.json"
    png_path = out_dir / f"{card}-kernels.png"
    dev_info: dict[str, Any] = {"name": name, "card": card}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        dev_info.update({"capability": list(torch.cuda.get_device_capability(0)),
                         "memory_gib": round(props.total_memory / 2**30, 1), "sm_count": props.multi_processor_count})
    result: dict[str, Any] = {
        "schema": "surgeon.benchmark.gpu_kernels/1",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": dev_info,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                     "cuda": torch.version.cuda},
        "config": {"heads": hq, "kv_heads": hkv, "head_dim": d, "block": block, "dtype": str(dtype).split(".")[-1],
                   "batch": 1, "causal": True, "reps": args.reps, "warmup": args.warmup, "seed": args.seed,
                   "timing": "median ms per call (CUDA events)" if device.type == "cuda" else "median ms (CPU)",
                   "smoke": bool(args.smoke)},
        "lengths": [],
    }
    flex_compiled = None
    if not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            if not args.smoke:
                # One compile per length and block mask; keep dynamo from giving up (falling back
                # to eager flex, which ignores the block lists) after its default recompile limit.
                import torch._dynamo

                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                torch._dynamo.config.fail_on_recompile_limit_hit = True  # an error is recorded, not eager timings
            flex_compiled = flex_attention if args.smoke else torch.compile(flex_attention, dynamic=False)
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            result["flex_error"] = f"{type(e).__name__}: {e}"[:500]
    t_start = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    for li, n in enumerate(args.ns):
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            result["stopped_early"] = f"budget of {args.budget_s} s reached before N={n}"
            break
        sys.stderr.write(f"[bench] N={n}\n")
        q = torch.randn(1, hq, n, d, generator=gen).to(device=device, dtype=dtype)
        k = torch.randn(1, hkv, n, d, generator=gen).to(device=device, dtype=dtype)
        v = torch.randn(1, hkv, n, d, generator=gen).to(device=device, dtype=dtype)
        nb = -(-n // block)
        rec: dict[str, Any] = {"n": n, "densities": []}

        def sdpa() -> Any:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

        rec["sdpa_backend"] = "default"
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            try:
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    sdpa()
                    rec["sdpa"] = bench(sdpa, args.warmup, args.reps)
                rec["sdpa_backend"] = "flash"
            except RuntimeError:
                rec["sdpa"] = bench(sdpa, args.warmup, args.reps)
        else:
            rec["sdpa"] = bench(sdpa, args.warmup, args.reps)
        if li == 0:
            full = torch.ones(1, 1, nb, nb, dtype=torch.bool, device=device).tril()
            ref = sdpa().float()
            rec["max_abs_diff_full_mask_vs_sdpa"] = float((blocksparse_attention(q, k, v, full, scale, True, block=block)
                                                           .float() - ref).abs().max())
            rec["max_abs_diff_pyramid_level1_vs_sdpa"] = float(
                (pyramid_attention(q, k, v, full.to(torch.int8), scale, True, block=block).float() - ref).abs().max())
        for dens in args.densities:
            sel = _causal_selection(torch, hq, nb, dens, gen, device)
            causal_blocks = nb * (nb + 1) / 2
            r: dict[str, Any] = {"density": dens, "achieved_block_density": float(sel.sum()) / (hq * causal_blocks)}
            idx, cnt = block_mask_to_indices(sel)
            r["blocksparse_kernel"] = bench(
                lambda: blocksparse_attention_from_indices(q, k, v, idx, cnt, scale, True, block=block),
                args.warmup, args.reps)
            r["blocksparse"] = bench(lambda: blocksparse_attention(q, k, v, sel, scale, True, block=block),
                                     args.warmup, args.reps)
            lv = _pyramid_levels(torch, sel)
            inv = torch.where(lv > 0, 1.0 / lv.clamp_min(1).float(), torch.zeros((), device=device))
            r["pyramid_key_density"] = float(inv.sum()) / (hq * causal_blocks)
            r["pyramid"] = bench(lambda: pyramid_attention(q, k, v, lv, scale, True, block=block),
                                 args.warmup, args.reps)
            r["build_pyramid"] = bench(lambda: build_pyramid(k, v, None, block), args.warmup, args.reps)
            if flex_compiled is not None:
                try:
                    run = _flex_runner(torch, sel, block, n, scale, flex_compiled)
                    o_flex = run(q, k, v)
                    r["flex"] = bench(lambda: run(q, k, v), args.warmup, args.reps)
                    o_bs = blocksparse_attention_from_indices(q, k, v, idx, cnt, scale, True, block=block)
                    r["max_abs_diff_blocksparse_vs_flex"] = float((o_bs.float() - o_flex.float()).abs().max())
                except Exception as e:  # noqa: BLE001 - recorded, not fatal
                    r["flex_error"] = f"{type(e).__name__}: {e}"[:500]
            for key in ("blocksparse_kernel", "blocksparse", "pyramid", "flex"):
                if isinstance(r.get(key), float) and r[key] > 0:
                    r[f"speedup_{key}_vs_sdpa"] = rec["sdpa"] / r[key]
            rec["densities"].append(r)
            sys.stderr.write(f"[bench]   d={dens}: " + ", ".join(
                f"{kk}={vv:.3f}" for kk, vv in r.items() if isinstance(vv, float) and not kk.startswith("speedup")) + "\n")
        result["lengths"].append(rec)
        result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        _write_json(result, json_path)
        del q, k, v
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    note = _plot(result, png_path)
    if note:
        result["plot"] = note
    else:
        result["plot"] = png_path.name
    _write_json(result, json_path)
    sys.stdout.write(f"wrote {json_path}" + (f" and {png_path}\n" if not note else f" ({note})\n"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
