"""Bad input to `surgeon profile` and `surgeon rewrite`: one-line error, exit 2, nothing written."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from surgeon.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _one_line_error(r, *needles):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.output
    for n in needles:
        assert n in r.output, (n, r.output)


# --------------------------------------------------------------------------- profile

@pytest.mark.parametrize("case", ["empty", "short", "missing", "binary", "seq_len", "budget"])
def test_profile_bad_input_exit_2_and_no_files(case, tmp_path):
    out, rep = tmp_path / "p.json", tmp_path / "r.html"
    args = ["profile", "minilm-l6", "--out", out, "--report", rep, "--samples", "2", "--seq-len", "64",
            "--block-size", "16", "--budget", "0.9"]
    if case == "empty":
        (tmp_path / "e.txt").write_text("  \n\n ")
        args += ["--data", tmp_path / "e.txt"]
        needles = ["holds no text"]
    elif case == "short":
        (tmp_path / "s.txt").write_text("a few words only")
        args += ["--data", tmp_path / "s.txt"]
        needles = ["tokens but 2 samples × 64 tokens need 128"]
    elif case == "missing":
        args += ["--data", tmp_path / "nope.txt"]
        needles = ["no such file"]
    elif case == "binary":
        (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00\x81" * 64)
        args += ["--data", tmp_path / "b.txt"]
        needles = ["not UTF-8"]
    elif case == "seq_len":
        args[args.index("--seq-len") + 1] = "100000"
        needles = ["beyond"]
    else:
        args[args.index("--budget") + 1] = "1.5"
        needles = ["outside (0, 1]"]
    _one_line_error(run(*args), *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in tmp_path.iterdir() if p.suffix in (".txt",))  # no profile, report or temp file


def test_profile_existing_output_needs_force(tmp_path):
    out = tmp_path / "p.json"
    out.write_text("keep me")
    _one_line_error(run("profile", "minilm-l6", "--out", out, "--report", tmp_path / "r.html"), "already exists",
                    "--force")
    assert out.read_text() == "keep me" and not (tmp_path / "r.html").exists()


def test_profile_impossible_budget_refused_before_calibration(tmp_path):
    # an explicit budget no plan can meet is refused; an implicit one never fails (tests/test_tolerance.py)
    r = run("profile", "smollm2-135m", "--samples", "1", "--seq-len", "128", "--block-size", "64",
            "--budget", "0.15", "--out", tmp_path / "p.json", "--report", tmp_path / "r.html")
    _one_line_error(r, "below the cheapest plan at 128 tokens", "raise --budget to at least")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- rewrite

@pytest.fixture(scope="module")
def minilm_profile(tmp_path_factory):
    from surgeon import api

    d = tmp_path_factory.mktemp("mp")
    api.profile("minilm-l6", samples=1, seq_len=64, block_size=16, budget=1.0, out=d / "profile.json", report=None)
    return d / "profile.json"


def test_rewrite_profile_from_another_model(minilm_profile, tmp_path):
    r = run("rewrite", "vit-tiny", "--profile", minilm_profile, "--budget", "0.5", "--out", tmp_path / "rw")
    _one_line_error(r, "fingerprint")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("budget", ["0", "-0.1", "1.5"])
def test_rewrite_budget_outside_unit_interval(minilm_profile, tmp_path, budget):
    r = run("rewrite", "minilm-l6", "--profile", minilm_profile, "--budget", budget, "--out", tmp_path / "rw")
    _one_line_error(r, "outside (0, 1]")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("recipe,needles", [
    ('"encoder.layer.*": {variant: nope}\n', ["unknown variant 'nope'", "block_topk", "dense"]),
    ('"decoder.*": {variant: block_topk, keep: 0.2}\n', ["matches no site", "encoder.layer.0"]),
    ('"encoder.layer.*": {variant: block_topk, keep: 2.0}\n', ["keep"]),
])
def test_rewrite_bad_recipe(tmp_path, recipe, needles):
    (tmp_path / "r.yaml").write_text(recipe)
    r = run("rewrite", "minilm-l6", "--recipe", tmp_path / "r.yaml", "--out", tmp_path / "rw")
    _one_line_error(r, *needles)
    assert not (tmp_path / "rw").exists()
