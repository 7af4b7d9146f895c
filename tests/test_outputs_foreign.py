"""Promise 1: no command deletes or overwrites a path it did not create, --force or not.

--force replaces only a previous surgeon output of the same kind; the current directory, its
parents, an input and anything surgeon did not write are refused with exit 2 before any work.
"""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from surgeon.cli import app

runner = CliRunner()
MODEL = "toy_models:mha_model"
RECIPE = '"*": {variant: block_topk, keep: 0.5, block_size: 16}\n'


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _exit2(r, *needles):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.output
    for n in needles:
        assert n in r.output, (n, r.output)


def _tree(d):
    return {p.relative_to(d).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


@pytest.fixture()
def work(tmp_path, monkeypatch):
    """A user's folder: their own files, a recipe, and a previous rewrite output."""
    (tmp_path / "notes.txt").write_text("not surgeon's")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.json").write_text('{"kind": "mine"}')
    (tmp_path / "r.yaml").write_text(RECIPE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory):
    d = tmp_path_factory.mktemp("rw")
    (d / "r.yaml").write_text(RECIPE)
    r = run("rewrite", MODEL, "--recipe", d / "r.yaml", "--out", d / "rw")
    assert r.exit_code == 0, r.output
    return d / "rw"


@pytest.mark.parametrize("target", [".", "..", "./", "data/.."])
def test_rewrite_never_replaces_the_current_directory(work, target):
    before = _tree(work)
    _exit2(run("rewrite", MODEL, "--recipe", "r.yaml", "--out", target, "--force"), "current directory")
    assert _tree(work) == before


def test_force_refuses_what_surgeon_did_not_write(work):
    before = _tree(work)
    _exit2(run("rewrite", MODEL, "--recipe", "r.yaml", "--out", "data", "--force"), "surgeon did not write",
           "same kind")
    _exit2(run("rewrite", MODEL, "--recipe", "r.yaml", "--out", "notes.txt", "--force"), "surgeon did not write")
    _exit2(run("profile", "minilm-l6", "--out", "data/x.json", "--force"), "surgeon did not write")
    _exit2(run("profile", "minilm-l6", "--out", "p.json", "--report", "notes.txt", "--force"), "surgeon did not write")
    _exit2(run("tune", "minilm-l6", "--variant", "temperature", "--out", "notes.txt", "--force"),
           "surgeon did not write")
    assert _tree(work) == before


def test_inputs_are_never_outputs(work):
    before = _tree(work)
    _exit2(run("rewrite", MODEL, "--recipe", "r.yaml", "--out", "r.yaml", "--force"), "is an input")
    (work / "corpus").mkdir()
    (work / "corpus" / "a.txt").write_text("hello " * 200)
    before = _tree(work)
    _exit2(run("profile", "minilm-l6", "--data", "corpus/a.txt", "--out", "corpus", "--force"))
    assert _tree(work) == before


def test_force_replaces_a_previous_output_of_the_same_kind_only(work, rewritten):
    assert run("rewrite", MODEL, "--recipe", "r.yaml", "--out", "rw").exit_code == 0
    _exit2(run("rewrite", MODEL, "--recipe", "r.yaml", "--out", "rw"), "already exists", "--force")
    (work / "r2.yaml").write_text(RECIPE.replace("0.5", "0.25"))
    r = run("rewrite", MODEL, "--recipe", "r2.yaml", "--out", "rw", "--force")
    assert r.exit_code == 0, r.output
    assert json.loads((work / "rw" / "policy.json").read_text())["sites"]["attn"]["params"]["keep"] == 0.25
    # a rewrite folder is not a profile, a report or an export
    before = _tree(work)
    _exit2(run("profile", "minilm-l6", "--out", "rw", "--force"), "surgeon did not write", "'rewrite' output")
    _exit2(run("export", rewritten, "--out", "rw", "--force"), "surgeon did not write", "'rewrite' output")
    assert _tree(work) == before


def test_export_never_replaces_cwd_or_foreign_folders(work, rewritten):
    before = _tree(work)
    _exit2(run("export", rewritten, "--out", ".", "--force"), "current directory")
    _exit2(run("export", rewritten, "--out", "data", "--force"), "surgeon did not write", "export folder")
    _exit2(run("export", rewritten, "--out", rewritten, "--force"), "overlaps")
    assert _tree(work) == before


def test_build_refuses_a_foreign_folder(work):
    before = _tree(work)
    _exit2(run("build", "--out", "data"), "surgeon did not write", "build folder")
    _exit2(run("build", "--out", "."), "current directory")
    assert _tree(work) == before
