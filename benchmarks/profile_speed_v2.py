"""Profiler stage times before/after a change, interleaved, with the profiles' bytes compared.

For each ``samples × seq_len`` setting, each code tree (``--before``: a git commit, extracted
with ``git archive`` into a temporary folder; ``after``: this checkout) profiles SmolLM2-135M
in a fresh process, the trees alternating run by run (the machine is shared: only runs side by
side compare). Each run records the wall time of every stage (from the progress callback), the
profile's total, the sha256 of ``profile.to_json()`` and the load average; the result says
whether the two trees wrote byte-identical profiles. Writes
benchmarks/results/profile_speed_cpu_v2.json (rewritten after every run, so a stopped
benchmark keeps what it measured).

    python benchmarks/profile_speed_v2.py --before 00e21c6 --settings 2x256,2x512
    python benchmarks/profile_speed_v2.py --before 00e21c6 --settings 4x2048 --after-only
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(model: str, samples: int, seq_len: int, block_size: int) -> dict:
    """One profile in this process (run with the tree under test first on sys.path)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from surgeon.capture import capture
    from surgeon.models import load
    from surgeon.profiles.collect import profile

    t = time.perf_counter()
    lm = load(model)
    cap = capture(lm)
    lm.fingerprint()
    out: dict = {"load_capture_s": round(time.perf_counter() - t, 2), "load_average_start": list(os.getloadavg())}
    ends: dict[str, float] = {}
    totals: dict[str, int] = {}
    t0 = time.perf_counter()

    def progress(stage: str, done: int, total: int) -> None:
        ends[stage] = time.perf_counter() - t0
        totals[stage] = total

    prof = profile(lm, cap, samples=samples, seq_len=seq_len, block_size=block_size, progress=progress)
    out["profile_s"] = round(time.perf_counter() - t0, 2)
    prev = 0.0
    out["stages"] = {}
    for stage, end in sorted(ends.items(), key=lambda kv: kv[1]):
        out["stages"][stage] = {"s": round(end - prev, 2), "progress_total": totals[stage]}
        prev = end
    out["sha256"] = hashlib.sha256(prof.to_json().encode()).hexdigest()
    out["settings"] = {k: prof.settings[k] for k in ("grad_samples", "grad_seq_len", "sens_samples", "sens_seq_len")}
    out["load_average_end"] = list(os.getloadavg())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="00e21c6", help="git commit of the baseline tree")
    ap.add_argument("--settings", default="2x256,2x512", help="comma-separated SAMPLESxSEQ_LEN")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--after-only", action="store_true", help="time this checkout only")
    ap.add_argument("--repo", default=str(ROOT), help="git repository holding --before (default: this checkout)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "profile_speed_cpu_v2.json"))
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "SAMPLES", "SEQ_LEN"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), int(a.child[2]), a.block_size)))
        return 0
    sys.path.insert(0, str(ROOT))
    from surgeon.benchmark import device_description, load_average

    out_path = Path(a.out)
    res = json.loads(out_path.read_text()) if out_path.exists() else {}
    res.update({"benchmark": "profile_speed_v2", "model": a.model, "block_size": a.block_size,
                "before_commit": a.before,
                "after_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=a.repo, capture_output=True,
                                               text=True).stdout.strip(),
                "device": device_description("cpu"), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    res.setdefault("runs", {})
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"after": ROOT}
        if not a.after_only:
            before = Path(tmp) / "before"
            before.mkdir()
            arch = subprocess.run(["git", "archive", a.before], cwd=a.repo, capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(before)], input=arch, check=True)
            trees = {"before": before, "after": ROOT}
        for spec in a.settings.split(","):
            samples, seq_len = (int(x) for x in spec.lower().split("x"))
            entry = res["runs"].setdefault(spec, {})
            for name, tree in trees.items():
                env = dict(os.environ, PYTHONPATH=str(tree))
                cmd = [sys.executable, str(Path(__file__).resolve()), "--block-size", str(a.block_size),
                       "--child", a.model, str(samples), str(seq_len)]
                p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
                if p.returncode != 0:
                    entry[name] = {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
                else:
                    entry[name] = json.loads(p.stdout.strip().splitlines()[-1])
                if "before" in entry and "after" in entry and "sha256" in entry["before"] and \
                        "sha256" in entry["after"]:
                    b, f = entry["before"], entry["after"]
                    entry["identical_bytes"] = b["sha256"] == f["sha256"]
                    entry["speedup"] = {"profile": round(b["profile_s"] / f["profile_s"], 2)}
                    for st in b["stages"]:
                        if st in f["stages"]:
                            entry["speedup"][st] = round(b["stages"][st]["s"] / max(f["stages"][st]["s"], 1e-9), 2)
                res["load_average"] = load_average()
                out_path.parent.mkdir(parents=True, exist_ok=True)
                out_path.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
                print(f"{spec} {name}: {json.dumps(entry[name])}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
