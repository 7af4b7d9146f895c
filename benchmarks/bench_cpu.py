"""CPU benchmark suite: SmolLM2-135M, block-sparse rewrites against dense attention.

Parts (``--parts``, default all; each writes its own JSON under ``--out``):

a  ``cpu_attention_ops.json`` — one attention op alone at ``--op-len`` (8192) tokens on the
   real q/k/v of a middle layer: ``surgeon::dense`` (causal SDPA) against ``surgeon::block_topk``
   (gather fast path) at each of ``--op-budgets``; all ops timed round-robin in the same run.
b  ``cpu_prefill.json`` — whole-model prefill at ``--prefill-len`` (8192), batch 1, last-token
   logits, the ``--prefill-budget`` (0.15) policy against the same graph with every site dense
   (:func:`surgeon.benchmark.bench_program`: alternating rounds, per-site op times inside the prefill).
c  ``cpu_perplexity.json`` — held-out perplexity at ``--ppl-len`` (4096) tokens, the
   ``--ppl-budget`` (0.2) policy against dense (the original captured program).
d  ``cpu_curve.json`` + ``cpu_curve.png`` — speed–fidelity curve over ``--curve-budgets``:
   x = attention speedup of the whole model at ``--ppl-len``, y = held-out perplexity increase.

Policies: with ``--profile PROFILE`` the plan of that profile at each budget
(``surgeon.api.make_policy`` → ``surgeon.profiles.plan.plan``); otherwise a uniform fallback —
the first ``--dense-layers`` (2) layers dense, every other site ``block_topk`` with
``keep = (budget·L − d) / (L − d)`` so the mean kept fraction over the L sites equals the budget
(d shrinks while that keep would fall below budget/2; selection overhead, 1/64² of dense, is
ignored). Each JSON says which (``policy_kind``).

Attention speedup of the model (part d's x, also reported by c): every distinct op
configuration of the policy is timed on the same middle-layer q/k/v at ``--ppl-len``, round-robin
with dense; the model figure is Σ_sites t_dense / Σ_sites t(site's config) (all sites have the same
shape). Model density is the mean over sites of the achieved density recorded by those calls.

The machine is shared: dense and rewritten are always timed interleaved in one run and ratios
are what to read; the load average (and OMP_WAIT_POLICY) is recorded in every JSON. ``--threads``
defaults to 1: on this 2-core machine, while other processes kept the load average at 4–8, two
torch threads with OpenMP's default (active) wait policy made the block-sparse path collapse —
its many small parallel regions each wait for a descheduled thread (block_topk at 4096 tokens:
2.4–6.3 s with 2 threads against 60–190 ms with 1) — while dense SDPA barely changed. With
``OMP_WAIT_POLICY=PASSIVE`` in the environment (it must be set before torch starts) 2 threads are
fine again (63 ms); on an idle machine the default policy is fine too.

    python benchmarks/bench_cpu.py                          # everything (~20 min at load 5-8)
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_cpu.py --threads 2 --suffix _t2_passive
    python benchmarks/bench_cpu.py --parts a                # the attention op alone
    python benchmarks/bench_cpu.py --parts c d --samples 2  # fidelity and the curve
    python benchmarks/bench_cpu.py --parts c --make-profile /tmp/profile.json  # plan from a fresh profile
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surgeon.benchmark import bench_program, device_description, load_average  # noqa: E402
from surgeon.capture import _sdpa_args, sdpa_nodes  # noqa: E402
from surgeon.passes.policy import Policy, SiteChoice  # noqa: E402
from surgeon.passes.rewrite import rewrite, site_config  # noqa: E402
from surgeon.attention.base import decode_config, encode_config, recording  # noqa: E402
from surgeon.attention.ops import op_for, register_all  # noqa: E402
from surgeon.attention.registry import get_variant  # noqa: E402

MODEL = "smollm2-135m"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- header

def _versions() -> dict[str, Any]:
    import numpy
    import transformers

    import surgeon

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"surgeon": surgeon.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "git_commit": commit}


def header(args: argparse.Namespace, part: str) -> dict[str, Any]:
    return {"part": part, "model": MODEL, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": device_description("cpu"), "versions": _versions(),
            "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")},
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "load_average_start": load_average()}


def write_json(path: Path, doc: dict[str, Any]) -> None:
    doc["load_average_end"] = load_average()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
    log(f"wrote {path}")


# --------------------------------------------------------------------------- helpers

class _Stop(Exception):
    pass


def site_inputs(cap: Any, ids: torch.Tensor, mask: torch.Tensor, index: int) -> dict[str, Any]:
    """The real inputs of site ``index`` as its ``surgeon::`` op receives them: q, k, v (as the
    graph passes them), key_padding (``attention_mask != 0`` for padding sites), attn_mask
    (explicit sites), causal, scale. Runs the dense program up to that site only."""
    gm = cap.program.module()
    nodes = sdpa_nodes(gm.graph)
    site = cap.sites[index]
    node = nodes[index]
    a = _sdpa_args(node)
    got: dict[str, Any] = {}

    def grab(query, key, value, attn_mask=None):
        got.update(q=query, k=key, v=value, attn_mask=attn_mask)
        raise _Stop

    grab.__name__ = "bench_grab_site"
    node.target = grab
    node.args = (a["query"], a["key"], a["value"], a["attn_mask"])
    node.kwargs = {}
    gm.recompile()
    with torch.no_grad():
        try:
            gm(ids, mask)
        except _Stop:
            pass
    kp = (mask != 0) if "padding" in site.mask_kind else None
    return {"q": got["q"], "k": got["k"], "v": got["v"], "key_padding": kp,
            "attn_mask": got["attn_mask"] if site.mask_kind == "explicit" else None,
            "causal": bool(site.causal), "scale": float(site.scale), "site": site}


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, dict[str, Any]]:
    """One warm-up call each, then ``rounds`` round-robin rounds; median/min/all in ms."""
    for f in fns.values():
        f()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append((time.perf_counter() - t0) * 1e3)
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "runs_ms": v} for k, v in ts.items()}


def _strip_site(cfg: str) -> str:
    d = decode_config(cfg)
    d.pop("site", None)
    d.pop("layer", None)
    return json.dumps(d, sort_keys=True)


def op_callable(x: dict[str, Any], cfg: str, block_mask: Optional[torch.Tensor] = None) -> Callable[[], Any]:
    op = op_for(decode_config(cfg)["variant"])
    return lambda: op(x["q"], x["k"], x["v"], x["key_padding"], x["attn_mask"], x["causal"], x["scale"], cfg,
                      block_mask)


def op_density(x: dict[str, Any], cfg: str, block_mask: Optional[torch.Tensor] = None) -> tuple[float, Any]:
    """(achieved density, the op's output) of one untimed call under the recorder."""
    with torch.no_grad(), recording() as rec:
        out = op_callable(x, cfg, block_mask)()
    return (float(rec.records[-1]["achieved"]) if rec.records else 1.0), out


def policy_attention_speed(cap: Any, policy: Policy, x: dict[str, Any], rounds: int) -> dict[str, Any]:
    """Time every distinct op configuration of ``policy`` on one site's real inputs ``x``,
    round-robin with dense; Σ over sites gives the model's attention time and speedup."""
    by_name = {s.name: s for s in cap.sites}
    ref_site = x["site"]
    dense_cfg = encode_config("dense", get_variant("dense").params_from({}),
                              {"kv_heads": ref_site.kv_heads, "site": ref_site.name, "layer": ref_site.layer})
    fns: dict[str, Callable[[], Any]] = {"dense": op_callable(x, dense_cfg)}
    dens: dict[str, float] = {"dense": 1.0}
    masks: dict[str, Any] = {}
    site_key: dict[str, str] = {}
    for s in cap.sites:
        ch = policy.sites.get(s.name, SiteChoice(variant="dense"))
        # the config as it would run at the reference site (same shape for every site)
        cfg = site_config(by_name[ref_site.name], ch)
        anchor_key = None
        if get_variant(ch.variant).consumes_block_mask:
            anchor_key = site_key[ch.block_mask_from]
        key = _strip_site(cfg) + (f"|anchor={anchor_key}" if anchor_key else "")
        if decode_config(cfg)["variant"] == "dense" and not decode_config(cfg).get("modulators"):
            key = "dense"
        site_key[s.name] = key
        if key in fns:
            continue
        bm = masks.get(anchor_key) if anchor_key else None
        d, out = op_density(x, cfg, bm)
        dens[key] = d
        if get_variant(ch.variant).produces_block_mask:
            masks[key] = out[1]
        fns[key] = op_callable(x, cfg, bm)
    with torch.no_grad():
        t = interleaved(fns, rounds)
    L = len(cap.sites)
    dense_total = L * t["dense"]["median_ms"]
    pol_total = sum(t[site_key[s.name]]["median_ms"] for s in cap.sites)
    configs = [{"config": k, "sites": sum(1 for v in site_key.values() if v == k), "density": dens[k],
                **{kk: vv for kk, vv in t[k].items()}} for k in fns]
    return {"seq_len": int(x["q"].shape[2]), "reference_site": ref_site.name,
            "attn_dense_ms": dense_total, "attn_policy_ms": pol_total, "attn_speedup": dense_total / pol_total,
            "density": sum(dens[site_key[s.name]] for s in cap.sites) / L, "configs": configs}


def budget_policy(lm: Any, cap: Any, budget: float, args: argparse.Namespace) -> tuple[Policy, dict[str, Any]]:
    """The policy for ``budget``: the profile's plan, or the uniform fallback (module doc)."""
    if args.profile is not None:
        from surgeon.api import make_policy

        pol = make_policy(lm, cap, profile=args.profile, budget=budget)
        return pol, {"policy_kind": f"plan(profile={args.profile}, budget={budget})",
                     "variants": _counts(pol, cap)}
    L = len(cap.sites)
    d = min(args.dense_layers, L - 1)
    while d > 0 and (budget * L - d) / (L - d) < 0.5 * budget:
        d -= 1
    keep = min(1.0, (budget * L - d) / (L - d))
    sites = {}
    for s in cap.sites:
        if s.layer < d:
            sites[s.name] = SiteChoice(variant="dense", reason=f"fallback: first {d} layers dense")
        else:
            sites[s.name] = SiteChoice(variant="block_topk", params={"keep": round(keep, 6),
                                                                     "block_size": args.block_size},
                                       reason="fallback: uniform block_topk")
    pol = Policy(model_fingerprint=lm.fingerprint(), budget=budget, source="bench_cpu:uniform-fallback", sites=sites)
    return pol, {"policy_kind": "uniform fallback (no profile): first layers dense, block_topk elsewhere",
                 "dense_layers": d, "keep": keep, "block_size": args.block_size, "variants": _counts(pol, cap)}


def _counts(pol: Policy, cap: Any) -> dict[str, int]:
    c: dict[str, int] = {}
    for s in cap.sites:
        v = pol.sites.get(s.name, SiteChoice(variant="dense")).variant
        c[v] = c.get(v, 0) + 1
    return c


def nll(module: torch.nn.Module, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL over rows of ids [R, N] (one row at a time) and the token count."""
    from surgeon.evaluate import lm_nll

    return lm_nll(module, ids, torch.ones_like(ids))


# --------------------------------------------------------------------------- parts

def part_ops(lm: Any, cap: Any, args: argparse.Namespace) -> None:
    doc = header(args, "a: attention op alone")
    n = args.op_len
    from surgeon.profiles.data import load_calibration

    data = load_calibration(None, lm, 1, n, "heldout")
    mid = len(cap.sites) // 2
    log(f"(a) capturing the real q/k/v of site {cap.sites[mid].name} at {n} tokens")
    x = site_inputs(cap, data.inputs[0], data.inputs[1], mid)
    site = x["site"]
    static = {"kv_heads": site.kv_heads, "site": site.name, "layer": site.layer}
    cfgs = {"dense (sdpa)": encode_config("dense", get_variant("dense").params_from({}), static)}
    bt = get_variant("block_topk")
    for b in args.op_budgets:
        cfgs[f"block_topk keep={b:g}"] = encode_config("block_topk", bt.params_from({"keep": b, "block_size": args.block_size}),
                                                       static)
    dens = {k: op_density(x, c)[0] for k, c in cfgs.items()}
    log(f"(a) timing {len(cfgs)} ops, {args.rounds} interleaved rounds")
    with torch.no_grad():
        t = interleaved({k: op_callable(x, c) for k, c in cfgs.items()}, args.rounds)
    base = t["dense (sdpa)"]["median_ms"]
    rows = []
    for k in cfgs:
        rows.append({"op": k, "keep": None if k.startswith("dense") else float(k.split("=")[1]), "density": dens[k],
                     **t[k], "speedup": base / t[k]["median_ms"],
                     "speedup_per_round": [d / r for d, r in zip(t["dense (sdpa)"]["runs_ms"], t[k]["runs_ms"])]})
        log(f"    {k:24} density {dens[k]:.3f}  median {t[k]['median_ms']:9.1f} ms  x{base / t[k]['median_ms']:.2f}")
    doc.update({"seq_len": n, "site": site.name, "shape": {"q": list(x["q"].shape), "k": list(x["k"].shape)},
                "inputs": f"real q/k/v of {site.name} on held-out text ({data.source})",
                "note": "each op called as the rewritten graph calls it (surgeon::<variant> with the model's "
                        "key_padding); dense = F.scaled_dot_product_attention(is_causal) through surgeon::dense",
                "rows": rows})
    write_json(args.out / f"cpu_attention_ops{args.suffix}.json", doc)


def part_prefill(lm: Any, cap: Any, args: argparse.Namespace) -> None:
    doc = header(args, "b: whole-model prefill")
    pol, info = budget_policy(lm, cap, args.prefill_budget, args)
    log(f"(b) rewriting with the budget-{args.prefill_budget} policy ({info['policy_kind']})")
    res = rewrite(cap, pol)
    log(f"(b) timing prefill at {args.prefill_len} tokens, {args.repeats} alternating rounds")
    out = bench_program(res.program, lm, seq_lens=(args.prefill_len,), repeats=args.repeats, progress=log)
    r = out["results"][0]
    log(f"    dense {r['dense_ms']:.0f} ms, rewritten {r['rewritten_ms']:.0f} ms: x{r['speedup']:.2f}; attention "
        f"{r['attn_dense_ms']:.0f} → {r['attn_rewritten_ms']:.0f} ms: x{r['attn_speedup']:.2f}; density {r['density']:.3f}")
    doc.update({"budget": args.prefill_budget, "policy": info, "bench": out})
    write_json(args.out / f"cpu_prefill{args.suffix}.json", doc)


def part_fidelity(lm: Any, cap: Any, args: argparse.Namespace, budgets: list[float], curve: bool) -> None:
    from surgeon.profiles.data import load_calibration

    n = args.ppl_len
    doc_c, doc_d = header(args, "c: held-out perplexity"), header(args, "d: speed–fidelity curve")
    data = load_calibration(None, lm, args.samples, n, "heldout")
    ids = data.inputs[0]
    mid = len(cap.sites) // 2
    x = site_inputs(cap, ids[:1], torch.ones_like(ids[:1]), mid)
    log(f"(c/d) dense perplexity on {args.samples} × {n} held-out tokens")
    t0 = time.perf_counter()
    dn, count = nll(cap.program.module(), ids)
    dense_ppl = math.exp(dn / count)
    log(f"    dense ppl {dense_ppl:.4f} ({time.perf_counter() - t0:.0f} s)")
    points = []
    for b in budgets:
        pol, info = budget_policy(lm, cap, b, args)
        log(f"(c/d) budget {b}: rewrite ({info['policy_kind']})")
        res = rewrite(cap, pol)
        sp = policy_attention_speed(cap, pol, x, args.rounds)
        s, _ = nll(res.program.module(), ids)
        ppl = math.exp(s / count)
        pt = {"budget": b, "policy": info, "ppl": ppl, "ppl_increase": ppl / dense_ppl - 1.0,
              "attn_speedup": sp["attn_speedup"], "density": sp["density"], "attention": sp}
        points.append(pt)
        log(f"    ppl {ppl:.4f} ({100 * pt['ppl_increase']:+.2f}%), attention x{sp['attn_speedup']:.2f}, "
            f"density {sp['density']:.3f}")
        del res
    common = {"seq_len": n, "samples": args.samples, "tokens": count, "data": data.describe(),
              "dense_ppl": dense_ppl, "fidelity_module": "the rewritten program (surgeon.passes.rewrite.rewrite) "
              "vs the original captured program; full logits, surgeon.evaluate.lm_nll",
              "speed": "attention speedup of the whole model from op times on the real q/k/v of "
                       f"{x['site'].name} at {n} tokens, each config interleaved with dense (see module doc)"}
    if args.ppl_budget in budgets:
        doc = doc_c
        p = next(q for q in points if q["budget"] == args.ppl_budget)
        doc.update(common)
        doc.update({"budget": args.ppl_budget, "target": "ppl within +2% of dense", **p})
        write_json(args.out / f"cpu_perplexity{args.suffix}.json", doc)
    if curve:
        doc = doc_d
        doc.update(common)
        doc["points"] = points
        write_json(args.out / f"cpu_curve{args.suffix}.json", doc)
        plot_curve(points, dense_ppl, n, args.out / f"cpu_curve{args.suffix}.png", doc["machine"], args.threads)


def plot_curve(points: list[dict[str, Any]], dense_ppl: float, n: int, path: Path, machine: dict[str, Any],
               threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["attn_speedup"] for p in points]
    ys = [100 * p["ppl_increase"] for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.plot(xs, ys, "o-", color="tab:blue")
    for p, xv, yv in zip(points, xs, ys):
        ax.annotate(f"{p['budget']:g}", (xv, yv), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(2, color="tab:red", lw=0.8, ls="--", label="+2% target")
    ax.axvline(1, color="grey", lw=0.8)
    ax.set_xlabel(f"attention speedup vs dense SDPA ({n} tokens, {threads} thread{'s' if threads > 1 else ''})")
    ax.set_ylabel("held-out perplexity increase (%)")
    kind = "plan from a profile" if points and points[0]["policy"]["policy_kind"].startswith("plan") else \
        "uniform fallback (first layers dense, block_topk elsewhere)"
    ax.set_title(f"SmolLM2-135M, block-sparse rewrites (labels: budget)\n{kind}; dense ppl {dense_ppl:.3f}",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.text(0.99, 0.01, f"{machine.get('cpu', '')}, torch {machine.get('torch', '')}", ha="right", fontsize=6,
             color="grey")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    log(f"wrote {path}")


# --------------------------------------------------------------------------- main

def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--parts", nargs="+", default=["a", "b", "c", "d"], choices=["a", "b", "c", "d"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--suffix", default="", help="appended to output file names (e.g. _t2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see the module doc)")
    ap.add_argument("--profile", type=Path, default=None, help="a profile.json: policies from its plan")
    ap.add_argument("--make-profile", type=Path, default=None,
                    help="profile the model first (calib split), save the profile here and plan from it")
    ap.add_argument("--profile-samples", type=int, default=4)
    ap.add_argument("--profile-seq-len", type=int, default=2048)
    ap.add_argument("--dense-layers", type=int, default=2, help="fallback policy: leading dense layers")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds for op timings")
    ap.add_argument("--op-len", type=int, default=8192)
    ap.add_argument("--op-budgets", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2, 0.3, 0.5])
    ap.add_argument("--prefill-len", type=int, default=8192)
    ap.add_argument("--prefill-budget", type=float, default=0.15)
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds for the prefill")
    ap.add_argument("--ppl-len", type=int, default=4096)
    ap.add_argument("--ppl-budget", type=float, default=0.2)
    ap.add_argument("--samples", type=int, default=2, help="held-out rows of --ppl-len tokens")
    ap.add_argument("--curve-budgets", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    register_all()
    from surgeon.capture import capture
    from surgeon.models import load

    t0 = time.perf_counter()
    log(f"loading and capturing {MODEL} (torch threads {torch.get_num_threads()}, load {load_average()})")
    lm = load(MODEL)
    cap = capture(lm)
    if args.make_profile is not None:
        from surgeon.profiles.collect import profile

        log(f"profiling ({args.profile_samples} × {args.profile_seq_len} calibration tokens)")
        tp = time.perf_counter()
        prof = profile(lm, cap, samples=args.profile_samples, seq_len=args.profile_seq_len,
                       block_size=args.block_size, progress=lambda st, d, t: log(f"    {st} {d}/{t}") if d == t else None)
        prof.save(args.make_profile, force=True)
        args.profile = args.make_profile
        log(f"    wrote {args.make_profile} ({time.perf_counter() - tp:.0f} s)")
    if "a" in args.parts:
        part_ops(lm, cap, args)
    if "b" in args.parts:
        part_prefill(lm, cap, args)
    if "c" in args.parts or "d" in args.parts:
        budgets = sorted(set(args.curve_budgets) | {args.ppl_budget}) if "d" in args.parts else [args.ppl_budget]
        if "c" not in args.parts and args.ppl_budget not in args.curve_budgets:
            budgets.remove(args.ppl_budget)
        part_fidelity(lm, cap, args, budgets, curve="d" in args.parts)
    log(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
