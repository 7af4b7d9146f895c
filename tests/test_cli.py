"""The CLI: output formats, exit codes and one-line errors for bad input (nothing written)."""
from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from surgeon.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help_lists_commands():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("inspect", "variants", "profile", "rewrite", "eval", "export", "build", "bench"):
        assert cmd in r.output


def test_inspect_json_minilm():
    r = run("inspect", "minilm-l6", "--json")
    assert r.exit_code == 0, r.output
    sites = json.loads(r.stdout)
    assert len(sites) == 6
    for s in sites:
        assert {"name", "layer", "heads", "kv_heads", "head_dim", "causal", "kind"} <= set(s)
        assert s["causal"] is False and s["heads"] == 12 and s["head_dim"] == 32


def test_inspect_table_mha():
    r = run("inspect", "toy_models:mha_model")
    assert r.exit_code == 0, r.output
    assert "attn" in r.stdout and "MultiheadAttention" in r.stdout


def test_variants_json():
    r = run("variants", "--json")
    assert r.exit_code == 0
    info = {v["name"]: v for v in json.loads(r.stdout)}
    assert "dense" in info and info["dense"]["fast_paths"] == ["sdpa"]
    for v in info.values():
        assert {"parameters", "fast_paths", "exports", "family"} <= set(v)


def _one_line_error(r, code, *needles):
    assert r.exit_code == code, r.output
    err = r.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in r.output
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize("args,needles", [
    (["inspect", "no-such-model"], ["unknown model 'no-such-model'", "smollm2-135m"]),
    (["inspect", "/nonexistent/model.gguf"], ["no such file"]),
    (["inspect", "toy_models:no_attention"], ["has no attention"]),
    (["inspect", "toy_models:data_dependent"], ["could not be captured"]),
    (["inspect", "toy_models:not_a_module"], ["not a torch.nn.Module"]),
    (["inspect", "no_such_pkg.mod:factory"], ["cannot import module"]),
])
def test_bad_models_exit_2(args, needles, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run(*args)
    _one_line_error(r, 2, *needles)
    assert os.listdir(tmp_path) == [], "nothing may be written"


def test_file_that_is_not_a_model(tmp_path, monkeypatch):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    r = run("inspect", str(bad))
    _one_line_error(r, 2, "is not a model")
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + b"\0" * 64)
    r = run("inspect", str(corrupt))
    _one_line_error(r, 2, "could not be loaded as a GGUF model")
    folder = tmp_path / "empty_dir"
    folder.mkdir()
    r = run("inspect", str(folder))
    _one_line_error(r, 2, "not a Hugging Face model folder")
    assert sorted(os.listdir(tmp_path)) == ["broken.gguf", "empty_dir", "notes.txt"]


def test_bench_json_fields_and_bad_lengths(minilm_dir_for_cli):
    r = run("bench", str(minilm_dir_for_cli), "--seq-len", "64,96", "--repeats", "1", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["device"]["device"] == "cpu" and [x["seq_len"] for x in d["results"]] == [64, 96]
    for x in d["results"]:
        assert {"seq_len", "dense_ms", "rewritten_ms", "speedup", "density"} <= set(x)
        assert x["speedup"] == pytest.approx(x["dense_ms"] / x["rewritten_ms"])
    r = run("bench", str(minilm_dir_for_cli), "--seq-len", "64,abc")
    assert r.exit_code == 2 and "comma-separated" in r.output
    r = run("bench", str(minilm_dir_for_cli), "--seq-len", "100000")
    assert r.exit_code == 2 and "fits" in r.output


@pytest.fixture(scope="module")
def minilm_dir_for_cli(tmp_path_factory, minilm, minilm_cap):
    from surgeon.passes.policy import uniform_policy
    from surgeon.passes.rewrite import rewrite, save_rewritten

    names = [s.name for s in minilm_cap.sites]
    pol = uniform_policy(minilm.fingerprint(), names, "block_topk", {"keep": 0.3, "block_size": 16})
    out = tmp_path_factory.mktemp("cli-bench") / "rw"
    save_rewritten(out, minilm_cap, rewrite(minilm_cap, pol))
    return out
