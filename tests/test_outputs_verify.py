"""Promise 4: loading an artifact verifies what its manifest records (sha256 of every file of a
rewrite folder): a changed, truncated, swapped or missing file is exit 2 in one line naming it."""
from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from surgeon.cli import app
from surgeon.errors import BadInput
from surgeon.passes.rewrite import load_rewritten

runner = CliRunner()
MODEL = "toy_models:mha_model"


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("v")
    for name, keep in (("a", 0.5), ("b", 0.25)):
        (d / f"{name}.yaml").write_text(f'"*": {{variant: block_topk, keep: {keep}, block_size: 16}}\n')
        r = run("rewrite", MODEL, "--recipe", d / f"{name}.yaml", "--out", d / name)
        assert r.exit_code == 0, r.output
    return d / "a", d / "b"


def _tampered(src, tmp_path, how):
    d = tmp_path / "t"
    shutil.copytree(src[0], d)
    if how == "edit-policy":
        p = d / "policy.json"
        p.write_text(p.read_text().replace("0.5", "0.75"))
        return d, "policy.json"
    if how == "truncate-program":
        with open(d / "program.pt2", "r+b") as f:
            f.truncate(1000)
        return d, "program.pt2"
    if how == "swap-program":  # another valid program: only the hash tells
        shutil.copy(src[1] / "program.pt2", d / "program.pt2")
        return d, "program.pt2"
    (d / "report.json").unlink()
    return d, "report.json"


@pytest.mark.parametrize("how", ["edit-policy", "truncate-program", "swap-program", "missing-report"])
def test_tampered_rewrite_folder_is_exit_2_naming_the_file(pair, tmp_path, how):
    d, name = _tampered(pair, tmp_path, how)
    with pytest.raises(BadInput, match=name):
        load_rewritten(d)
    for cmd in (["eval", d], ["export", d, "--out", tmp_path / "x", "--no-verify"]):
        r = run(*cmd)
        assert r.exit_code == 2, r.output
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and str(d / name) in lines[0], r.output
        assert "sha256" in lines[0] or "missing" in lines[0]
    assert not (tmp_path / "x").exists()


def test_untouched_folder_loads(pair):
    rw = load_rewritten(pair[0])
    assert set(rw.manifest.files) >= {"program.pt2", "policy.json", "report.json"}


def test_tensorrt_bundle_files_are_verified(tmp_path):
    import hashlib
    import json

    from surgeon.exporters.trt_plugins import build_engine as B

    (tmp_path / "model.onnx").write_bytes(b"onnx bytes")
    (tmp_path / "model.engine").write_bytes(b"old engine")
    files = {n: hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("model.onnx", "model.engine")}
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "export-manifest", "tensorrt": {"precision": "fp16"},
                                                        "files": files}))
    assert B.load_manifest(tmp_path)["files"] == files
    (tmp_path / "model.engine").write_bytes(b"rebuilt engine")  # the script rebuilds engines: not checked
    B.load_manifest(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"onnx byte")
    with pytest.raises(B.BundleError, match="model.onnx does not match the sha256"):
        B.load_manifest(tmp_path)
    assert B.main(["--bundle", str(tmp_path)]) == B.EXIT_USAGE
