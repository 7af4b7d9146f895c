"""Wall time and peak memory of ``surgeon.profiles.collect.profile`` on the CPU.

Default: smollm2-135m, 8 samples × 2048 tokens (the acceptance setting: < 10 min on 2 cores).
Writes benchmarks/results/profile_speed_cpu.json with the wall time per stage, the peak RSS,
the settings actually used (from the profile), library versions, the machine's load average
(other processes on a 2-core machine distort timings a lot) and the date.

    python benchmarks/profile_speed.py                       # the acceptance run
    python benchmarks/profile_speed.py --memory-seq-len 8192 # + a fresh process profiling 1 × 8192
    python benchmarks/profile_speed.py --evidence            # + HeSS / layer-policy evidence

Peak RSS is the VmHWM of the process that profiles (it includes the model and the capture); the
memory check runs in its own process (exec'd, so its high-water mark is its own).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mib() -> float:
    """Peak resident set size of this process in MiB: VmHWM from /proc (reset by exec), else
    ru_maxrss (which a child inherits from the parent it was forked from on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_once(model: str, samples: int, seq_len: int, block_size: int, evidence: bool, budget: float,
             save_profile: str = "") -> dict:
    import torch

    from surgeon.capture import capture
    from surgeon.models import load
    from surgeon.profiles.collect import profile
    from surgeon.profiles.evidence import compare_head_budgets, compare_layer_policies
    from surgeon.profiles.plan import plan_details
    from surgeon.profiles.report import render_report

    out: dict = {"load_average_start": list(os.getloadavg())}
    t = time.perf_counter()
    lm = load(model)
    out["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cap = capture(lm)
    out["capture_s"] = time.perf_counter() - t
    t = time.perf_counter()
    lm.fingerprint()
    out["fingerprint_s"] = time.perf_counter() - t
    out["rss_before_profile_mib"] = _rss_mib()
    stages: dict[str, float] = {}
    t0 = time.perf_counter()

    def progress(stage: str, done: int, total: int) -> None:
        stages[stage] = time.perf_counter() - t0

    prof = profile(lm, cap, samples=samples, seq_len=seq_len, block_size=block_size, progress=progress)
    out["profile_s"] = time.perf_counter() - t0
    out["stage_end_s"] = stages
    out["rss_peak_mib"] = _rss_mib()
    t = time.perf_counter()
    det = plan_details(prof, budget)
    out["plan_s"] = time.perf_counter() - t
    t = time.perf_counter()
    render_report(prof, det.policy)
    out["report_s"] = time.perf_counter() - t
    out["settings"] = prof.settings
    out["plan"] = {"budget": budget, "keep": det.keep, "cost": det.cost, "rollback": det.rollback,
                   "roles": det.roles}
    out["profile_json_bytes"] = len(prof.to_json())
    if save_profile:
        prof.save(Path(save_profile), force=True)
    out["torch_threads"] = torch.get_num_threads()
    if evidence:
        n = seq_len  # evaluate at the profile's length: the plan's densities are modelled there
        t = time.perf_counter()
        out["evidence_head_budgets"] = compare_head_budgets(lm, cap, prof, budget, samples=2, seq_len=n)
        out["evidence_layer_policies"] = compare_layer_policies(lm, cap, prof, budget, samples=2, seq_len=n)
        out["evidence_s"] = time.perf_counter() - t
    out["load_average_end"] = list(os.getloadavg())
    return out


def versions() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--budget", type=float, default=0.15)
    ap.add_argument("--evidence", action="store_true", help="also run the HeSS / layer-policy comparisons")
    ap.add_argument("--memory-seq-len", type=int, default=0, help="also profile 1 sample at this length in a fresh process")
    ap.add_argument("--save-profile", default="", help="also write the profile JSON here")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "profile_speed_cpu.json"))
    ap.add_argument("--json-stdout", action="store_true", help="print the result as JSON instead of writing --out")
    a = ap.parse_args(argv)
    res = {"benchmark": "profile_speed", "model": a.model, "samples": a.samples, "seq_len": a.seq_len,
           "block_size": a.block_size, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "versions": versions()}
    res.update(run_once(a.model, a.samples, a.seq_len, a.block_size, a.evidence, a.budget, a.save_profile))
    if a.memory_seq_len:
        cmd = [sys.executable, __file__, "--model", a.model, "--samples", "1", "--seq-len", str(a.memory_seq_len),
               "--block-size", str(a.block_size), "--json-stdout"]
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if p.returncode == 0:
            res["memory_check"] = json.loads(p.stdout.strip().splitlines()[-1])
        else:
            res["memory_check"] = {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed"}
    if a.json_stdout:
        print(json.dumps(res, sort_keys=True, default=str))
        return 0
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2, sort_keys=True, default=str) + "\n")
    print(f"profile: {res['profile_s']:.1f} s, peak RSS {res['rss_peak_mib']:.0f} MiB → {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
