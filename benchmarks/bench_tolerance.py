"""Issue 14's evidence: the tolerance contract on a real model, end to end.

For MODEL (default SmolLM2-135M) and a profile (given, or made here), runs
``surgeon.api.rewrite(..., tolerance=T, lengths=L)`` — planner on validation rows of the
calibration split, held-out gate at every length — and then, for the iso-quality table, measures
each family's best point (the most aggressive knob within margin·T on validation) on the
*held-out* split at every length, with its whole-prefill and attention speedups at the longest
length (interleaved with dense, from the planner). Writes JSON and copies the frontier plot.

    python benchmarks/bench_tolerance.py --profile p.json --lengths 4096,8192
    python benchmarks/bench_tolerance.py --model minilm-l6 --tolerance 0.005 --lengths 128,512 \
        --make-profile /tmp/minilm.json --samples 4 --seq-len 512 --block-size 32 --suffix _minilm
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _say(msg: str) -> None:
    print(f"[{_dt.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--profile", default=None, help="profile.json (else --make-profile)")
    ap.add_argument("--make-profile", default=None, help="profile here first and write it to this path")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--lengths", default="4096,8192")
    ap.add_argument("--families", default=None)
    ap.add_argument("--eval-samples", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--suffix", default="")
    ap.add_argument("--no-frontier-timing", action="store_true", help="skip timing every checked point")
    ap.add_argument("--bench-repeats", type=int, default=2)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    from surgeon import api
    from surgeon.benchmark import device_description, load_average
    from surgeon.evaluate import evaluate_module
    from surgeon.models import load
    from surgeon.capture import capture
    from surgeon.passes.policy import Policy
    from surgeon.passes.rewrite import rewrite
    from surgeon.profiles.data import load_calibration
    from surgeon.profiles.profile_doc import Profile
    from surgeon.profiles.tolerance import ToleranceSettings, family_policy

    res_dir = ROOT / "benchmarks" / "results"
    t_all = time.perf_counter()
    load_before = load_average()
    lm = load(a.model)
    cap = capture(lm)
    timings: dict[str, float] = {}
    prof_path = a.profile
    if prof_path is None:
        prof_path = a.make_profile or str(Path(tempfile.mkdtemp()) / "profile.json")
        t0 = time.perf_counter()
        _say(f"profiling {a.samples} × {a.seq_len} tokens")
        api.profile(lm, samples=a.samples, seq_len=a.seq_len, block_size=a.block_size, out=prof_path,
                    report=None, force=True, progress=None)
        timings["profile_s"] = time.perf_counter() - t0
    lengths = [int(x) for x in a.lengths.split(",") if x]
    opts: dict = {"bench_repeats": a.bench_repeats}
    if a.families:
        opts["families"] = tuple(a.families.split(","))
    if a.no_frontier_timing:
        opts["frontier_timing"] = False
    out_dir = Path(tempfile.mkdtemp()) / "rw"
    t0 = time.perf_counter()
    rep = api.rewrite(lm, profile=prof_path, out=out_dir, tolerance=a.tolerance, lengths=lengths,
                      eval_samples=a.eval_samples, plan_options=opts, progress=_say)
    timings["plan_rewrite_gate_s"] = time.perf_counter() - t0
    pol = Policy.load(out_dir / "policy.json")
    rec = pol.planner or {}
    prof = Profile.load(prof_path)
    settings = ToleranceSettings(tolerance=a.tolerance, lengths=tuple(lengths), **opts)
    # iso-quality table: every family's best validation point, measured on held-out text
    heldout = {n: load_calibration(None, lm, a.eval_samples, n, split="heldout") for n in lengths}
    dense_mod = cap.program.module()
    table = []
    for c in rec.get("candidates", []):
        row = dict(c)
        if c["family"] == rec.get("chosen"):  # the gate measured the chosen point already
            row["heldout"] = {str(g["seq_len"]): g["loss"] for g in rep.get("gate", [])}
        elif c.get("knob") is not None and c.get("speedup") is not None:
            _say(f"held-out check of {c['family']} {c['knob']}")
            fp = family_policy(c["family"], c["knob"], prof, cap, lm, lengths[-1], settings)
            mod = rewrite(cap, fp).program.module()
            row["heldout"] = {}
            for n, data in heldout.items():
                ev = evaluate_module(mod, lm.kind, data.inputs, seq_len=n, data="heldout", dense_module=dense_mod).to_dict()
                row["heldout"][str(n)] = ev["ppl_increase"] if "ppl_increase" in ev else 1.0 - ev["cosine"]
        table.append(row)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    doc = {
        "what": "tolerance contract (issue 14): planner on validation rows, held-out gate, iso-quality table",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
        "machine": device_description("cpu"), "threads": a.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_before": load_before, "load_average_after": load_average(),
        "model": a.model, "profile": {"path": str(prof_path), "data": prof.data, "seq_len": prof.settings.get("seq_len")},
        "tolerance": a.tolerance, "lengths": lengths, "timings": timings,
        "seconds": time.perf_counter() - t_all,
        "result": {k: rep.get(k) for k in ("counts", "gate", "ok", "worst_loss")},
        "plan": {k: rec.get(k) for k in ("chosen", "note", "speed_length", "frontier_length", "margin", "crossover")},
        "iso_quality": table, "checks": rec.get("checks", []),
    }
    res_dir.mkdir(parents=True, exist_ok=True)
    js = res_dir / f"tolerance_cpu{a.suffix}.json"
    js.write_text(json.dumps(doc, indent=2) + "\n")
    if (out_dir / "frontier.png").exists():
        shutil.copy(out_dir / "frontier.png", res_dir / f"tolerance_cpu{a.suffix}.png")
    _say(f"wrote {js}: {rec.get('note')}; held-out {rep.get('gate')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
