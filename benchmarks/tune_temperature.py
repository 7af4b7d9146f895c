"""Evidence for ``surgeon tune --variant temperature``: held-out perplexity, dense vs calibrated σ.

Calibrates one global σ (SSA position temperature, methods.md §7, training-free form) on the
``calib`` split of the built-in corpus at a long context, then measures held-out perplexity of
the dense model and of the calibrated recipe on the ``heldout`` split at several lengths (the
rows never overlap the calibration documents). Writes benchmarks/results/tune_temperature_cpu.json
with the settings, the whole σ search, the numbers, timings, library versions, the machine's
load average and the date, and the command line.

    python benchmarks/tune_temperature.py                       # smollm2-135m, 2 x 4096 calib
    python benchmarks/tune_temperature.py --seq-len 2048 --eval-lens 1024,2048
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def versions() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=4096, help="calibration tokens per row")
    ap.add_argument("--samples", type=int, default=2, help="calibration rows")
    ap.add_argument("--grid", default="0,0.005,0.01,0.02,0.05,0.1", help="sigma grid (then golden-section refine)")
    ap.add_argument("--refine", type=int, default=4)
    ap.add_argument("--eval-lens", default="1024,2048,4096", help="held-out lengths")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens per length (rows = tokens / len)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/tune_temperature_cpu.json"))
    a = ap.parse_args(argv)

    import torch

    from surgeon.capture import capture
    from surgeon.models import load
    from surgeon.passes.policy import policy_from_recipe
    from surgeon.profiles.evidence import evaluate_policies
    from surgeon.profiles.data import load_calibration
    from surgeon.profiles.tune import check_options, tune

    res: dict = {"benchmark": "tune_temperature", "command": " ".join(shlex.quote(x) for x in [sys.executable] + sys.argv),
                 "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
                 "load_average_start": list(os.getloadavg()), "model": a.model,
                 "settings": {"calib_seq_len": a.seq_len, "calib_samples": a.samples, "grid": a.grid,
                              "refine": a.refine, "eval_lens": a.eval_lens, "eval_tokens": a.eval_tokens,
                              "seed": a.seed, "scope": "global"}}
    t0 = time.perf_counter()
    lm = load(a.model)
    cap = capture(lm)
    res["load_capture_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    opts = check_options("temperature", grid=a.grid, refine=a.refine, seq_len=a.seq_len)
    r = tune(lm, cap, opts, samples=a.samples, seq_len=a.seq_len, seed=a.seed,
             progress=lambda st, d, n: print(f"  {st}: {d}/{n}", file=sys.stderr, flush=True))
    res["tune_s"] = time.perf_counter() - t
    sigma = r.details["global"]["sigma"]
    res["calibration"] = {"sigma": sigma, "ce_dense": r.before, "ce_tuned": r.after,
                          "ppl_dense": math.exp(r.before), "ppl_tuned": math.exp(r.after),
                          "evaluations": r.evaluations, "data": r.data,
                          "search": [{"sigma": e["sigma"], "ce": e["objective"]} for e in r.trace if "sigma" in e]}
    res["recipe"] = r.recipe
    print(f"calibrated sigma = {sigma} (calib CE {r.before:.5f} -> {r.after:.5f}) in {res['tune_s']:.0f} s",
          file=sys.stderr, flush=True)

    names = [s.name for s in cap.sites]
    policy = policy_from_recipe({k: dict(v) for k, v in r.recipe.items()}, lm.fingerprint(), names)
    rows = []
    for L in [int(x) for x in a.eval_lens.split(",") if x]:
        n = max(1, a.eval_tokens // L)
        t = time.perf_counter()
        data = load_calibration(None, lm, n, L, "heldout", seed=a.seed)
        ev = evaluate_policies(lm, cap, {"tuned": policy}, data)["tuned"]
        row = {"seq_len": L, "samples": n, "tokens": n * (L - 1), "ce_dense": ev["dense_ce"], "ce_tuned": ev["ce"],
               "ppl_dense": math.exp(ev["dense_ce"]), "ppl_tuned": math.exp(ev["ce"]),
               "ppl_change_pct": 100.0 * (math.exp(ev["ce"] - ev["dense_ce"]) - 1.0),
               "seconds": time.perf_counter() - t}
        rows.append(row)
        print(f"held-out {L}: ppl dense {row['ppl_dense']:.4f} tuned {row['ppl_tuned']:.4f} "
              f"({row['ppl_change_pct']:+.3f}%)", file=sys.stderr, flush=True)
    res["heldout"] = rows
    res["total_s"] = time.perf_counter() - t0
    res["load_average_end"] = list(os.getloadavg())
    res["torch_threads"] = torch.get_num_threads()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
