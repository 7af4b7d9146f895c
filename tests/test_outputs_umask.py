"""Promise 6: written files and folders follow the umask (0666 / 0777 minus the umask), like
any other tool's — not the owner-only modes of mkstemp/mkdtemp."""
from __future__ import annotations

import os
import stat

import pytest
from typer.testing import CliRunner

from surgeon.cli import app
from surgeon.passes.policy import identity_policy

runner = CliRunner()


@pytest.fixture()
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_rewrite_folder_and_artifacts_follow_umask(tmp_path, umask_027):
    (tmp_path / "r.yaml").write_text('"*": {variant: block_topk, keep: 0.5, block_size: 16}\n')
    r = runner.invoke(app, ["rewrite", "toy_models:mha_model", "--recipe", str(tmp_path / "r.yaml"),
                            "--out", str(tmp_path / "deep" / "rw")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rw = tmp_path / "deep" / "rw"
    assert _mode(tmp_path / "deep") == 0o750 and _mode(rw) == 0o750
    files = [p for p in rw.rglob("*") if p.is_file()]
    assert files and {_mode(p) for p in files} == {0o640}, {p.name: oct(_mode(p)) for p in files}
    identity_policy("f", ["a"]).save(tmp_path / "p.json")
    assert _mode(tmp_path / "p.json") == 0o640


def test_profile_outputs_follow_umask(tmp_path, umask_027):
    r = runner.invoke(app, ["profile", "minilm-l6", "--samples", "1", "--seq-len", "64", "--block-size", "16",
                            "--budget", "1.0", "--out", str(tmp_path / "p.json")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert _mode(tmp_path / "p.json") == 0o640 and _mode(tmp_path / "report.html") == 0o640
