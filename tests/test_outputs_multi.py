"""Promise 3: a multi-file command writes all or nothing — `surgeon profile` (profile.json and
report.html, the report beside --out unless --report says otherwise) and `surgeon build`."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from surgeon.cli import app
from surgeon.errors import BadInput

runner = CliRunner()
PROFILE = ["profile", "minilm-l6", "--samples", "1", "--seq-len", "64", "--block-size", "16", "--budget", "1.0"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_report_defaults_beside_out_not_in_cwd(tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    r = run(*PROFILE, "--out", tmp_path / "elsewhere" / "p.json")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["p.json", "report.html"]
    assert not list((tmp_path / "cwd").iterdir())
    r = run(*PROFILE, "--out", tmp_path / "other" / "p.json")  # a second profile elsewhere: no clash
    assert r.exit_code == 0, r.output


def test_out_and_report_the_same_file(tmp_path):
    for force in ([], ["--force"]):
        r = run(*PROFILE, "--out", tmp_path / "x", "--report", tmp_path / "x", *force)
        assert r.exit_code == 2 and "the same file" in r.output, r.output
    assert not list(tmp_path.iterdir())


def test_a_failing_report_leaves_neither_file(tmp_path, monkeypatch):
    import surgeon.profiles.report as report

    def broken(*a, **k):
        raise BadInput("the report cannot be drawn (injected)")

    old = run(*PROFILE, "--out", tmp_path / "p.json")
    assert old.exit_code == 0, old.output
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(report, "render_report", broken)
    r = run(*PROFILE, "--seed", "1", "--out", tmp_path / "p.json", "--force")
    assert r.exit_code == 2 and "injected" in r.output
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old pair intact, no temporaries
    r = run(*PROFILE, "--out", tmp_path / "q.json")
    assert r.exit_code == 2
    assert {p.name for p in tmp_path.iterdir()} == {"p.json", "report.html"}  # no q.json without its report


@pytest.mark.parametrize("recipe", ["model: toy_models:no_attention\n", "model: minilm-l6\nsamples: 0\n"])
def test_a_failed_build_leaves_no_out_folder(tmp_path, recipe):
    (tmp_path / "b.yaml").write_text(recipe)
    r = run("build", "--recipe", tmp_path / "b.yaml", "--out", tmp_path / "out" / "build")
    assert r.exit_code == 2, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.yaml"]


BUILD = ("model: minilm-l6\nsamples: 1\nseq_len: 64\nblock_size: 16\nbudget: 1.0\neval_seq_len: 64\n"
         "eval_samples: 1\nverify: false\n")


def test_build_failing_in_its_last_stage_leaves_no_out_then_builds_and_caches(tmp_path, monkeypatch):
    import surgeon.exporters.pipeline as pipeline

    (tmp_path / "b.yaml").write_text(BUILD)
    real = pipeline.export_rewritten

    def broken(*a, **k):
        raise BadInput("export refused (injected)")

    monkeypatch.setattr(pipeline, "export_rewritten", broken)
    r = run("build", "--recipe", tmp_path / "b.yaml", "--out", tmp_path / "out")
    assert r.exit_code == 2 and "injected" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.yaml"]  # profile and rewrite went with it
    monkeypatch.setattr(pipeline, "export_rewritten", real)
    r = run("build", "--recipe", tmp_path / "b.yaml", "--out", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["onnx", "profile.json", "report.html", "rewritten", "state.json",
                                                     "summary.json"]
    r = run("build", "--recipe", tmp_path / "b.yaml", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    import json

    assert [s["status"] for s in json.loads(r.stdout)["stages"]] == ["cached"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.yaml", "out"]  # no lock or temporaries left
