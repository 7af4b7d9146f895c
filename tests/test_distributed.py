"""`surgeon profile` under torchrun: 2 CPU ranks (gloo) give the single-process profile; a failing
rank stops the job and nothing is written.

Both runs use one thread per process (torchrun's default for N > 1), so the per-sample
computations are the same on both sides; the comparison still follows the contract (exact for
integers and strings, 1e-6 relative for floats).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMMON = ["smollm2-135m", "--samples", "3", "--seq-len", "128", "--block-size", "16", "--seed", "3", "--budget", "0.5"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("SURGEON_TEST_FAIL_RANK", None)
    env.update(extra)
    return env


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
            "-m", "surgeon", "profile"]


def _compare(a, b, path="$"):
    """Exact for everything but floats; floats within 1e-6 relative (1e-12 absolute near 0)."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), path
        if math.isnan(a) or math.isnan(b):
            assert math.isnan(a) and math.isnan(b), path
        else:
            assert abs(a - b) <= 1e-6 * max(abs(a), abs(b)) + 1e-12, f"{path}: {a} != {b}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            _compare(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _compare(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("single")
    r = subprocess.run([sys.executable, "-m", "surgeon", "profile", *COMMON, "--out", str(d / "profile.json"),
                        "--report", str(d / "report.html")], env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "profile.json"


def test_two_gloo_ranks_equal_one_process(single, tmp_path):
    out = tmp_path / "profile.json"
    r = subprocess.run([*_torchrun(2), *COMMON, "--out", str(out), "--report", str(tmp_path / "report.html")],
                       env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert out.is_file() and (tmp_path / "report.html").is_file()
    a, b = json.loads(single.read_text()), json.loads(out.read_text())
    assert a["data"]["samples"] == 3 and len(a["sites"]) == 30
    # the split really happened: sensitivity (2 rows) and statistics came from both ranks
    assert all(s["sensitivity"] is not None for s in b["sites"])
    _compare(a, b)
    # one thread on both sides: the same additions in the same order, so the files are identical
    assert single.read_bytes() == out.read_bytes()
    assert "profile →" in r.stdout and r.stdout.count("profile →") == 1  # rank 0 alone reports


def test_a_failing_rank_stops_the_job_and_writes_nothing(tmp_path):
    out = tmp_path / "profile.json"
    r = subprocess.run([*_torchrun(2), *COMMON, "--out", str(out), "--report", str(tmp_path / "report.html")],
                       env=_env(SURGEON_TEST_FAIL_RANK="1"), capture_output=True, text=True, timeout=900)
    assert r.returncode != 0
    text = r.stdout + r.stderr
    assert "distributed profile stopped (1 of 2 ranks failed)" in text
    assert "rank 1: RuntimeError: injected failure" in text
    assert not out.exists() and not (tmp_path / "report.html").exists()
    assert not list(tmp_path.iterdir())  # no temporary or partial file either


def test_tolerance_planning_under_torchrun_gives_the_single_process_search(tmp_path):
    """`surgeon rewrite --tolerance` under torchrun divides the families' closed-loop checks across
    2 ranks; rank 0 writes. Every check (family, knob, validation losses, pass) and every family's
    best knob equal the single process's; only the timings (and so the choice among them) are
    machine measurements."""
    prof = tmp_path / "p.json"
    r = subprocess.run([sys.executable, "-m", "surgeon", "profile", "minilm-l6", "--samples", "1", "--seq-len", "64",
                        "--block-size", "16", "--out", str(prof), "--report", str(tmp_path / "r.html")],
                       env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    args = ["minilm-l6", "--profile", str(prof), "--lengths", "64", "--families", "block_topk,window_sink",
            "--eval-samples", "1"]
    one = subprocess.run([sys.executable, "-m", "surgeon", "rewrite", *args, "--out", str(tmp_path / "one")],
                         env=_env(), capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = _torchrun(2)[:-1] + ["rewrite", *args, "--out", str(tmp_path / "two")]
    two = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "policy.json").read_text())["planner"]
    b = json.loads((tmp_path / "two" / "policy.json").read_text())["planner"]
    strip = lambda cs: [{k: c[k] for k in ("family", "knob", "losses", "passed", "sparse_sites")} for c in cs]  # noqa: E731
    _compare(strip(a["checks"]), strip(b["checks"]))
    assert [(c["family"], c["knob"]) for c in a["candidates"]] == [(c["family"], c["knob"]) for c in b["candidates"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "p.json", "r.html", "two"]
