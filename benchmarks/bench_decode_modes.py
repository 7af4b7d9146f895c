"""Decode modes on SmolLM2-135M: quality through the decode path and decode speed, against dense.

Issue 15's evidence. For each held-out sequence of ``--context`` tokens (text the planner and the
profile never saw: ``builtin:pydoc_data.topics:heldout``):

1. one dense prefill of the first ``context - steps - 1`` tokens fills transformers' KV cache;
2. every decode mode gets its own copy of that cache and of the model (``surgeon.apply`` with a
   policy that is dense in prefill and runs the mode in decode), then the last ``steps`` tokens are
   teacher-forced one step at a time through the cache: each step feeds the true token and scores
   the next one, so all ``steps`` predictions come from the decode path;
3. the modes run interleaved step by step (mode order rotated each step), so machine noise hits
   them alike; per step the wall time of the whole forward and of the attention calls alone
   (``run_site`` for one-query calls, i.e. the decode mode) are recorded.

Reported per mode: perplexity of the last ``steps`` tokens and its increase over dense's decode
path, kept fraction of the visible cache (``surgeon.generation.hf.decode_stats``), and median
decode-attention ms / whole-step ms with their speedups over dense (ratios of medians). A sanity
row checks that dense's decode path reproduces the full-sequence forward's NLL.

``--ttft`` also times the prefill (time to first token) of the prompt under each ``--prefill``
policy (dense and the sparse policies that stayed within tolerance 0.01 in
``benchmarks/results/tolerance_cpu.json``), interleaved, through ``surgeon.apply``.

    OMP_NUM_THREADS=1 python benchmarks/bench_decode_modes.py --samples 2 --context 8192 --steps 256 \
        --out benchmarks/results/decode_modes_cpu.json --plot benchmarks/results/decode_modes_cpu.png
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _tidal(names: list[str], anchors: list[int], params: dict[str, Any]) -> dict[str, Any]:
    """TidalDecode-style layout: layers before the first anchor dense, anchors token_select, the
    others reuse the most recent anchor's selection (token_reuse)."""
    out: dict[str, Any] = {}
    last = None
    for i, n in enumerate(names):
        if i in anchors:
            out[n] = {"mode": "token_select", "params": dict(params)}
            last = n
        elif last is not None:
            out[n] = {"mode": "token_reuse", "params": {"anchor": last}}
    return out


def mode_layouts(names: list[str], context: int) -> dict[str, dict[str, Any]]:
    """Mode label → {site: decode spec} (sites not named decode dense)."""
    every = lambda spec: {n: spec for n in names}  # noqa: E731
    ts = lambda **p: {"mode": "token_select", "params": p}  # noqa: E731
    layouts = {
        "dense": {},
        # TokenSelect's defaults: 128 initial + 512 local + 2048 voted tokens, reuse while cos ≥ 0.9
        "token_select": every(ts(n_init=128, n_local=512, top_k=2048, reuse_threshold=0.9)),
        "token_select_1k": every(ts(n_init=128, n_local=512, top_k=1024, reuse_threshold=0.9)),
        # TidalDecode as published: layers 0-1 dense, selection at layers 2 and L/2, the rest reuse
        "tidal_reuse": _tidal(names, [2, len(names) // 2], dict(n_init=128, n_local=512, top_k=2048,
                                                                 reuse_threshold=0.9)),
        # HyLRA-style: a fresh selection every second layer from layer 2, the next layer reuses it
        "reuse_every2": _tidal(names, list(range(2, len(names), 2)), dict(n_init=128, n_local=512, top_k=2048,
                                                                          reuse_threshold=0.9)),
    }
    ps = lambda **p: {"mode": "page_select", "params": p}  # noqa: E731
    # Quest: 16-token pages, the top pages per KV head by the min/max key bound (2048 / 1024 tokens)
    layouts["page_select"] = every(ps(page_size=16, top_pages=128))
    layouts["page_select_1k"] = every(ps(page_size=16, top_pages=64))
    # DELTA: layers 0-1 full, Δ-layers at 2 and L/2 (exact attention + page set), the rest reuse
    deltas = [2, len(names) // 2]
    layouts["delta"] = _delta(names, deltas, dict(page_size=16, top_pages=128, recent_pages=8))
    layouts["delta_1k"] = _delta(names, deltas, dict(page_size=16, top_pages=64, recent_pages=8))
    return layouts


def _delta(names: list[str], planners: list[int], params: dict[str, Any]) -> dict[str, Any]:
    """DELTA's layer groups: layers before the first Δ-layer full (dense), Δ-layers ``delta_plan``,
    every other layer ``token_reuse`` of the most recent Δ-layer (DELTA's sparse layers)."""
    out: dict[str, Any] = {}
    last = None
    for i, n in enumerate(names):
        if i in planners:
            out[n] = {"mode": "delta_plan", "params": dict(params)}
            last = n
        elif last is not None:
            out[n] = {"mode": "token_reuse", "params": {"anchor": last}}
    return out


def decode_policy(fp: str, names: list[str], layout: dict[str, Any]):
    from surgeon.passes.policy import Policy, SiteChoice, decode_spec_from

    sites = {n: SiteChoice(variant="dense", reason="decode benchmark",
                           decode=decode_spec_from(layout.get(n), n)) for n in names}
    return Policy(model_fingerprint=fp, source="bench_decode_modes", sites=sites)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--modes", default="", help="comma list of mode labels (default: all)")
    ap.add_argument("--ttft", action="store_true", help="also time prefill under --prefill policies")
    ap.add_argument("--prefill", default="dense,token_topk:0.8",
                    help="prefill policies for --ttft: dense, or FAMILY:KNOB of the tolerance planner's uniform families")
    ap.add_argument("--ttft-repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--plot", type=Path, default=None)
    a = ap.parse_args(argv)

    import torch
    from transformers import DynamicCache

    from surgeon.benchmark import device_description, load_average
    from surgeon.evaluate import next_token_nll
    from surgeon.generation import hf as shf
    from surgeon.models import load
    from surgeon.profiles.data import load_calibration

    torch.manual_seed(0)
    t_start = time.perf_counter()
    lm = load(a.model)
    hf = shf._hf_of(lm).eval()
    names = shf._attention_module_names(hf)
    fp = lm.fingerprint()
    data = load_calibration(None, lm, a.samples, a.context, split="heldout")
    ids_all = data.inputs[0]
    _say(f"{a.model}: {len(names)} sites, {ids_all.shape[0]} held-out rows of {ids_all.shape[1]} tokens")

    layouts = mode_layouts(names, a.context)
    if a.modes:
        want = [m.strip() for m in a.modes.split(",") if m.strip()]
        layouts = {k: v for k, v in layouts.items() if k in want or k == "dense"}
    models = {}
    for label, layout in layouts.items():
        m = copy.deepcopy(hf)
        shf.apply(m, decode_policy(fp, names, layout), verify=False)
        models[label] = m

    # attention time of one-query calls, per mode
    att_time = {"t": 0.0}
    orig_run_site = shf.run_site

    def timed_run_site(plan, q, k, v, mask):
        if q.shape[2] != 1:
            return orig_run_site(plan, q, k, v, mask)
        t0 = time.perf_counter()
        out = orig_run_site(plan, q, k, v, mask)
        att_time["t"] += time.perf_counter() - t0
        return out

    shf.run_site = timed_run_site
    n_pre = a.context - a.steps - 1
    per_mode = {label: {"nll": [], "step_ms": [], "attn_ms": [], "stats": []} for label in models}
    sanity = []
    ttft_rows = []
    la_before = load_average()
    with torch.no_grad():
        for r in range(ids_all.shape[0]):
            ids = ids_all[r:r + 1]
            _say(f"row {r}: dense prefill of {n_pre} tokens")
            t0 = time.perf_counter()
            cache = DynamicCache()
            hf(input_ids=ids[:, :n_pre], cache=cache, use_cache=True, logits_to_keep=1)
            prefill_s = time.perf_counter() - t0
            caches = {label: copy.deepcopy(cache) for label in models}
            for label, m in models.items():  # a prefill resets stateful decode modes
                m._surgeon_state.decode_state.clear()
            nll = {label: 0.0 for label in models}
            labels = list(models)
            for s in range(a.steps):
                pos = n_pre + s
                tok = ids[:, pos:pos + 1]
                target = ids[:, pos + 1]
                order = labels[s % len(labels):] + labels[:s % len(labels)]
                for label in order:
                    att_time["t"] = 0.0
                    t0 = time.perf_counter()
                    out = models[label](input_ids=tok, cache=caches[label], use_cache=True,
                                        position_ids=torch.tensor([[pos]]))
                    dt = time.perf_counter() - t0
                    per_mode[label]["step_ms"].append(1000 * dt)
                    per_mode[label]["attn_ms"].append(1000 * att_time["t"])
                    lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
                    nll[label] += -float(lp[target[0]])
                if s % 32 == 31:
                    _say(f"row {r}: step {s + 1}/{a.steps}, load {load_average()[0]:.1f}")
            for label in models:
                per_mode[label]["nll"].append(nll[label] / a.steps)
                per_mode[label]["stats"].append(shf.decode_stats(models[label]))
            # sanity: dense's decode path against one full-sequence forward on the same tokens
            full = hf(input_ids=ids[:, :a.context]).logits
            tot, cnt = next_token_nll(full[:, n_pre:a.context], ids[:, n_pre:a.context])
            sanity.append({"row": r, "decode_path_nll": nll["dense"] / a.steps,
                           "full_forward_nll": tot / cnt, "prefill_s": prefill_s})
            del caches, cache, full

        if a.ttft:
            from surgeon.passes.policy import uniform_policy

            ids = ids_all[0:1, :n_pre]
            pols = {}
            for spec in [p.strip() for p in a.prefill.split(",") if p.strip()]:
                if spec == "dense":
                    pols[spec] = None
                    continue
                fam, knob = spec.split(":")
                k = float(knob)
                params = {"token_topk": {"keep": k, "n_init": 64, "n_local": 128},
                          "block_topk": {"keep": k, "block_size": 64}}[fam]
                pols[spec] = uniform_policy(fp, names, fam, params)
            for rep in range(a.ttft_repeats):
                for spec, pol in (list(pols.items()) if rep % 2 == 0 else list(pols.items())[::-1]):
                    m = hf
                    if pol is not None:
                        m = copy.deepcopy(hf)
                        shf.apply(m, pol, verify=False)
                    t0 = time.perf_counter()
                    m(input_ids=ids, use_cache=True, logits_to_keep=1)
                    dt = time.perf_counter() - t0
                    ttft_rows.append({"prefill": spec, "repeat": rep, "tokens": int(ids.shape[1]), "seconds": dt})
                    _say(f"ttft {spec}: {dt:.1f} s")
                    if pol is not None:
                        del m
    shf.run_site = orig_run_site

    dense = per_mode["dense"]
    dense_ppl = math.exp(statistics.mean(dense["nll"]))
    dense_attn = statistics.median(dense["attn_ms"])
    dense_step = statistics.median(dense["step_ms"])
    rows = []
    for label, pm in per_mode.items():
        ppl = math.exp(statistics.mean(pm["nll"]))
        attn = statistics.median(pm["attn_ms"])
        step = statistics.median(pm["step_ms"])
        kept = [st["kept_fraction"] for stats in pm["stats"] for st in stats.values() if st["kept_fraction"] is not None]
        sel = sum(st["selected"] for stats in pm["stats"] for st in stats.values())
        reu = sum(st["reused"] for stats in pm["stats"] for st in stats.values())
        rows.append({"mode": label, "layout": layouts[label], "ppl": ppl, "ppl_increase": ppl / dense_ppl - 1.0,
                     "nll_per_row": pm["nll"], "attn_ms_median": attn, "step_ms_median": step,
                     "attn_speedup": dense_attn / attn if attn > 0 else None,
                     "step_speedup": dense_step / step if step > 0 else None,
                     "kept_fraction_mean": statistics.mean(kept) if kept else 1.0,
                     "fresh_selections": sel, "reused_selections": reu,
                     "within_1pct": ppl / dense_ppl - 1.0 <= 0.01})
        _say(f"{label:22s} ppl {ppl:8.4f} ({100 * (ppl / dense_ppl - 1):+.2f} %)  attn {attn:7.2f} ms "
             f"({dense_attn / attn:4.2f}x)  step {step:7.1f} ms ({dense_step / step:4.2f}x)")
    ttft = {}
    for spec in {r["prefill"] for r in ttft_rows}:
        ttft[spec] = statistics.median(r["seconds"] for r in ttft_rows if r["prefill"] == spec)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    doc = {
        "what": "decode modes (issue 15): teacher-forced decode-path perplexity and decode attention speed vs dense",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": device_description(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_before": la_before, "load_average_after": load_average(),
        "model": a.model, "data": "builtin:pydoc_data.topics:heldout", "rows": int(ids_all.shape[0]),
        "context": a.context, "prefill_tokens": n_pre, "steps": a.steps,
        "dense_ppl": dense_ppl, "modes": rows, "sanity": sanity,
        "ttft": {"rows": ttft_rows, "median_s": ttft,
                 "ratio_vs_dense": {k: ttft["dense"] / v for k, v in ttft.items()} if "dense" in ttft else {}},
        "seconds": time.perf_counter() - t_start,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    _say(f"wrote {a.out}")
    if a.plot:
        plot(doc, a.plot)
        _say(f"wrote {a.plot}")
    return 0


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in doc["modes"]:
        ax.scatter(r["attn_speedup"], 100 * r["ppl_increase"], s=40)
        ax.annotate(f"{r['mode']} (kept {r['kept_fraction_mean']:.2f})", (r["attn_speedup"], 100 * r["ppl_increase"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(1.0, color="grey", ls="--", lw=1, label="+1 % tolerance")
    ax.axvline(2.0, color="grey", ls=":", lw=1, label="2x target")
    ax.set_xlabel(f"decode attention speedup vs dense (context {doc['context']}, median per step)")
    ax.set_ylabel(f"perplexity increase of the last {doc['steps']} tokens (%)")
    ax.set_title(f"{doc['model']}: decode modes, teacher-forced through the KV cache ({doc['rows']} held-out rows)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
