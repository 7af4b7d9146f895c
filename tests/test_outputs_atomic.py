"""Promise 2: outputs appear atomically; a kill at any moment leaves the old or the new output;
temporaries live beside OUT under one name and are cleaned by the next run; one writer at a time.

The real CLI runs in subprocesses on the toy MHA model (a few seconds per run). The kill is made
deterministic by SURGEON_TEST_PAUSE_BEFORE_SWITCH / _AFTER_SWITCH (see surgeon/outputs.py): the
writer creates the named file at that point and waits while it exists.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from surgeon import outputs
from surgeon.errors import BadInput

REPO = Path(__file__).resolve().parents[1]
MODEL = "toy_models:mha_model"
RECIPE_A = '"*": {variant: block_topk, keep: 0.5, block_size: 16}\n'
RECIPE_B = '"*": {variant: block_topk, keep: 0.25, block_size: 16}\n'


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("SURGEON_DEBUG", None)
    env.update(extra)
    return env


def _args(recipe: Path, out: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "surgeon", "rewrite", MODEL, "--recipe", str(recipe), "--out", str(out), *more]


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=300)


def _start(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(flag: Path, proc: subprocess.Popen) -> None:
    t_end = time.monotonic() + 300
    while not flag.exists():
        if proc.poll() is not None:
            raise AssertionError(f"writer exited {proc.returncode} before the switch: {proc.communicate()}")
        assert time.monotonic() < t_end, "writer never reached the switch"
        time.sleep(0.05)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.surgeon-"))


def _keep(rw: Path) -> float:
    return json.loads((rw / "policy.json").read_text())["sites"]["attn"]["params"]["keep"]


@pytest.fixture()
def recipes(tmp_path):
    (tmp_path / "a.yaml").write_text(RECIPE_A)
    (tmp_path / "b.yaml").write_text(RECIPE_B)
    return tmp_path / "a.yaml", tmp_path / "b.yaml"


@pytest.mark.parametrize("when", ["before", "after"])
def test_sigkill_during_replace_leaves_old_or_new_and_next_run_cleans(tmp_path, recipes, when):
    a, b = recipes
    rw = tmp_path / "rw"
    r = _run(_args(a, rw), tmp_path)
    assert r.returncode == 0, r.stderr
    old = _snapshot(rw)
    flag = tmp_path / "paused"
    var = outputs.PAUSE_BEFORE if when == "before" else outputs.PAUSE_AFTER
    proc = _start(_args(b, rw, "--force"), tmp_path, **{var: str(flag)})
    _wait_for(flag, proc)
    pid = int(flag.read_text())
    left = _leftovers(tmp_path, "rw")
    assert f".rw.surgeon-lock" in left and any(n.startswith(f".rw.surgeon-tmp-{pid}-") for n in left), left
    os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    from surgeon.passes.rewrite import load_rewritten

    if when == "before":  # the old output, byte for byte
        assert _snapshot(rw) == old
    else:  # the new output, complete (load_rewritten checks every recorded hash)
        assert _keep(rw) == 0.25 and _snapshot(rw) != old
    load_rewritten(rw)
    assert _leftovers(tmp_path, "rw")  # the killed run's lock and temporary stay until the next run...
    r = _run(_args(a, rw, "--force"), tmp_path)
    assert r.returncode == 0, r.stderr
    assert _leftovers(tmp_path, "rw") == []  # ...which removes them (their pid is dead)
    assert _keep(rw) == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.yaml", "b.yaml", "paused", "rw"]


def test_two_concurrent_writers_one_wins_other_exits_2(tmp_path, recipes):
    a, b = recipes
    rw = tmp_path / "rw"
    flag = tmp_path / "paused"
    first = _start(_args(a, rw), tmp_path, **{outputs.PAUSE_BEFORE: str(flag)})
    _wait_for(flag, first)
    second = _run(_args(b, rw, "--force"), tmp_path)  # while the first holds the lock
    assert second.returncode == 2, second.stderr
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "being written by another surgeon process" in lines[0], second.stderr
    flag.unlink()  # let the first one switch its output in
    assert first.wait(timeout=300) == 0, first.communicate()
    assert _keep(rw) == 0.5  # the winner's output, intact
    assert _leftovers(tmp_path, "rw") == []
    third = _run(_args(b, rw), tmp_path)  # after it: the usual refusal without --force
    assert third.returncode == 2 and "already exists" in third.stderr
    assert _keep(rw) == 0.5


def test_stale_lock_of_dead_pid_is_taken_over_live_one_is_not(tmp_path, recipes):
    a, _ = recipes
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / ".rw.surgeon-lock"
    lock.write_text(f"{dead.pid}\n")
    r = _run(_args(a, tmp_path / "rw"), tmp_path)
    assert r.returncode == 0, r.stderr
    assert not lock.exists() and (tmp_path / "rw" / "rewrite.json").is_file()
    lock2 = tmp_path / ".rw2.surgeon-lock"
    lock2.write_text(f"{os.getpid()}\n")  # this test process: alive
    r = _run(_args(a, tmp_path / "rw2"), tmp_path)
    assert r.returncode == 2 and f"pid {os.getpid()}" in r.stderr
    assert lock2.read_text() == f"{os.getpid()}\n" and not (tmp_path / "rw2").exists()


# ------------------------------------------------------------------ the switch itself (in process)

def _fake_rewrite(d: Path, tag: str) -> None:
    (d / "rewrite.json").write_text(json.dumps({"kind": "rewrite", "tag": tag}))


def test_what_appears_at_out_during_the_run_is_not_replaced(tmp_path):
    out = tmp_path / "rw"
    with outputs.Output(out, "rewrite", folder=True) as o:
        _fake_rewrite(o.temp(), "new")
        out.mkdir()
        (out / "mine.txt").write_text("user data")
        with pytest.raises(BadInput, match="appeared while surgeon was writing"):
            o.commit()
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert _leftovers(tmp_path, "rw") == []


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_switches_whole_folders(tmp_path, monkeypatch, exchange):
    if not exchange:  # the fallback for kernels without renameat2
        monkeypatch.setattr(outputs, "_renameat2", lambda *a: False)
    out = tmp_path / "rw"
    out.mkdir()
    _fake_rewrite(out, "old")
    (out / "old-only.bin").write_bytes(b"x")
    with outputs.Output(out, "rewrite", force=True, folder=True) as o:
        t = o.temp()
        _fake_rewrite(t, "new")
        o.commit()
    assert sorted(p.name for p in out.iterdir()) == ["rewrite.json"]  # no mix of old and new files
    assert json.loads((out / "rewrite.json").read_text())["tag"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rw"]


def test_interrupted_fallback_switch_is_undone_by_the_next_run(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trash = tmp_path / f".rw.surgeon-trash-{dead.pid}-abcd"  # old output moved aside, then the kill
    trash.mkdir()
    _fake_rewrite(trash, "old")
    tmp = tmp_path / f".rw.surgeon-tmp-{dead.pid}-ef01"
    tmp.mkdir()
    outputs.clean_stale(tmp_path / "rw")
    assert json.loads((tmp_path / "rw" / "rewrite.json").read_text())["tag"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rw"]


def test_sigterm_during_replace_cleans_up_and_keeps_old(tmp_path, recipes):
    a, b = recipes
    rw = tmp_path / "rw"
    assert _run(_args(a, rw), tmp_path).returncode == 0
    old = _snapshot(rw)
    flag = tmp_path / "paused"
    proc = _start(_args(b, rw, "--force"), tmp_path, **{outputs.PAUSE_BEFORE: str(flag)})
    _wait_for(flag, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "interrupted" in err, err
    assert _snapshot(rw) == old and _leftovers(tmp_path, "rw") == []  # nothing left behind at all
