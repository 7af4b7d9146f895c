"""Promise 5: every user error is exit 2 with one line (no traceback, no progress line before
it), found before the model is loaded where that is possible.

"Before the model loads" is shown by naming a model that cannot be imported: if the check ran
after loading, the error would be about the model.
"""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from surgeon.cli import app

runner = CliRunner()
NO_MODEL = "surgeon_no_such_module_xyz:factory"


def run(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, env=env)


def only_error_line(r, *needles):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output  # nothing else: no bar, no traceback
    for n in needles:
        assert n in lines[0], (n, r.output)
    assert "internal error" not in lines[0]


@pytest.mark.parametrize("entry,needles", [
    ('{variant: block_topk, keep: "lots"}', ["keep = 'lots' is not a number"]),
    ("{variant: block_topk, modulators: 5}", ["modulators = 5 is not a list"]),
    ("{variant: block_topk, block_size: 1.5}", ["block_size = 1.5 is not an integer"]),
    ("{variant: block_topk, kep: 0.2}", ["no parameter 'kep'", "keep"]),
    ("{variant: block_topk, modulators: [block_topk]}", ["not a modulated variant"]),
    ("{variant: temperature, sigma: [1, 2]}", ["sigma"]),
])
def test_recipe_value_types_before_the_model_loads(tmp_path, entry, needles):
    (tmp_path / "r.yaml").write_text(f'"*": {entry}\n')
    only_error_line(run("rewrite", NO_MODEL, "--recipe", tmp_path / "r.yaml", "--out", tmp_path / "rw"), *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.fixture(scope="module")
def profile_json(tmp_path_factory):
    from surgeon import api

    d = tmp_path_factory.mktemp("pe")
    api.profile("minilm-l6", samples=1, seq_len=64, block_size=16, budget=1.0, out=d / "p.json", report=None)
    return d / "p.json"


@pytest.mark.parametrize("field", ["hash_ratios", "overlap", "sites.0.hess", "layer_sensitivity"])
def test_profile_arrays_of_the_wrong_length(profile_json, tmp_path, field):
    raw = json.loads(profile_json.read_text())
    if field.startswith("sites"):
        raw["sites"][0]["hess"] = raw["sites"][0]["hess"][:-1]
    elif field == "overlap":
        raw["overlap"][2] = raw["overlap"][2][:3]
    else:
        raw[field] = raw[field] + [0.5]
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    name = field.split(".")[-1]
    only_error_line(run("rewrite", NO_MODEL, "--profile", tmp_path / "bad.json", "--budget", "0.5",
                        "--out", tmp_path / "rw"), "not a valid profile", name)
    # and the intact one passes that check (then fails on the missing model)
    r = run("rewrite", NO_MODEL, "--profile", profile_json, "--budget", "0.5", "--out", tmp_path / "rw")
    only_error_line(r, "cannot import module")
    assert not (tmp_path / "rw").exists()


@pytest.mark.parametrize("args,needles", [
    (["--samples", "0"], ["--samples 0"]),
    (["--seq-len", "-3"], ["--seq-len -3"]),
    (["--block-size", "0"], ["--block-size 0"]),
    (["--data", "surgeon-missing.txt"], ["no such file"]),
    (["--budget", "2"], ["outside (0, 1]"]),
])
def test_profile_arguments_before_the_model_loads(tmp_path, args, needles):
    only_error_line(run("profile", NO_MODEL, "--out", tmp_path / "p.json", *args), *needles)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("env,needles", [
    ({"RANK": "x"}, ["RANK='x' is not an integer"]),
    ({"WORLD_SIZE": "two"}, ["WORLD_SIZE='two'"]),
    ({"WORLD_SIZE": "2", "RANK": "7"}, ["RANK=7 is not below WORLD_SIZE=2"]),
    ({"LOCAL_RANK": "-1"}, ["LOCAL_RANK=-1 is out of range"]),
])
def test_bad_torchrun_environment(tmp_path, env, needles):
    only_error_line(run("profile", NO_MODEL, "--out", tmp_path / "p.json", env=env), *needles)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("factory,needles", [
    ("toy_models:raising_factory", ["raised RuntimeError: the weights are not here"]),
    ("toy_models:raising_example", ["example function", "raised ValueError: cannot make"]),
    ("toy_models:not_a_module", ["not a torch.nn.Module"]),
])
def test_user_code_that_raises(tmp_path, factory, needles):
    only_error_line(run("inspect", factory), *needles)
    (tmp_path / "r.yaml").write_text('"*": dense\n')
    only_error_line(run("rewrite", factory, "--recipe", tmp_path / "r.yaml", "--out", tmp_path / "rw"), *needles)
    assert not (tmp_path / "rw").exists()


def test_unusable_output_paths(tmp_path):
    (tmp_path / "r.yaml").write_text('"*": dense\n')
    (tmp_path / "afile").write_text("x")
    only_error_line(run("rewrite", NO_MODEL, "--recipe", tmp_path / "r.yaml", "--out", tmp_path / "afile" / "rw"),
                    "is not a folder")
    only_error_line(run("rewrite", NO_MODEL, "--recipe", tmp_path / "r.yaml", "--out", "/proc/surgeon-x/rw"),
                    "cannot")
    only_error_line(run("profile", NO_MODEL, "--out", tmp_path / "afile" / "p.json"), "is not a folder")
    only_error_line(run("profile", NO_MODEL, "--out", tmp_path / ("n" * 300)), "not a usable output name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "r.yaml"]


def test_build_checks_the_recipe_before_any_stage(tmp_path):
    (tmp_path / "b.yaml").write_text(f"model: {NO_MODEL}\nexport_format: tflite\n")
    only_error_line(run("build", "--recipe", tmp_path / "b.yaml", "--out", tmp_path / "out"), "export_format")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.yaml"]


@pytest.mark.parametrize("body,needles", [
    ("budget: 1.5\n", ["field 'budget'"]),
    ("samples: 0\n", ["field 'samples'"]),
    ("seq_len: lots\n", ["field 'seq_len'"]),
])
def test_build_recipe_values_name_the_recipe_field(tmp_path, body, needles):
    (tmp_path / "b.yaml").write_text(f"model: {NO_MODEL}\n{body}")
    only_error_line(run("build", "--recipe", tmp_path / "b.yaml", "--out", tmp_path / "out"), *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.yaml"]


def test_profile_data_checked_before_the_model_loads(tmp_path):
    (tmp_path / "e.txt").write_text("  \n\n ")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00\x81" * 64)
    only_error_line(run("profile", NO_MODEL, "--data", tmp_path / "e.txt", "--out", tmp_path / "p.json"),
                    "holds no text")
    only_error_line(run("profile", NO_MODEL, "--data", tmp_path / "b.txt", "--out", tmp_path / "p.json"),
                    "not UTF-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.txt", "e.txt"]


def test_output_name_with_nul_byte(tmp_path):
    from surgeon import api
    from surgeon.errors import BadInput

    (tmp_path / "r.yaml").write_text('"*": dense\n')  # the CLI's usage check refuses NUL itself (exit 2)
    with pytest.raises(BadInput, match="not a usable path"):
        api.rewrite(NO_MODEL, recipe=tmp_path / "r.yaml", out=str(tmp_path / "a\x00b"))
    with pytest.raises(BadInput, match="not a usable path"):
        api.profile(NO_MODEL, out="p\x00.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.parametrize("flag", ["--eval-samples", "--eval-seq-len"])
def test_rewrite_eval_counts_before_the_model_loads(tmp_path, flag):
    (tmp_path / "r.yaml").write_text('"*": dense\n')
    only_error_line(run("rewrite", NO_MODEL, "--recipe", tmp_path / "r.yaml", flag, "0", "--out", tmp_path / "rw"),
                    f"{flag} 0 must be a positive integer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]
