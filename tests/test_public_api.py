"""``import surgeon`` exposes exactly the documented API names, each importable."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import surgeon

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED = set(surgeon._API)  # the one list of API names


def test_every_documented_name_imports_and_is_callable():
    for name in sorted(DOCUMENTED):
        ns: dict = {}
        exec(f"from surgeon import {name}", ns)
        assert callable(ns[name]), name
        assert getattr(surgeon, name) is ns[name], name
        assert ns[name].__module__ == surgeon._API[name], name


def test_dir_is_exactly_the_documented_names():
    public = {n for n in dir(surgeon) if not n.startswith("_")}
    assert public == DOCUMENTED
    assert set(surgeon.__all__) == DOCUMENTED


def test_the_module_docstring_lists_the_same_names():
    assert set(re.findall(r"``surgeon\.(\w+)``", surgeon.__doc__.split("\n\n")[1])) == DOCUMENTED


def test_api_names_survive_importing_their_namesake_submodules():
    """surgeon/capture.py and surgeon/evaluate.py never replace the API functions."""
    import importlib

    for mod in ("surgeon.api", "surgeon.capture", "surgeon.evaluate"):
        importlib.import_module(mod)
    assert surgeon.capture is surgeon.api.capture and callable(surgeon.capture)
    assert surgeon.evaluate is surgeon.api.evaluate and callable(surgeon.evaluate)
    from surgeon.capture import Captured  # the submodule is still importable

    assert Captured.__module__ == "surgeon.capture"


def test_unknown_names_raise_attribute_error():
    try:
        surgeon.no_such_function
    except AttributeError as e:
        assert "no_such_function" in str(e)
    else:
        raise AssertionError("surgeon.no_such_function did not raise")


def test_import_surgeon_does_no_work():
    code = "import sys, surgeon; print(sorted(m for m in sys.modules if m.startswith('surgeon')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['surgeon']"


def test_plan_takes_a_profile_or_its_path_and_equals_the_planner(minilm, minilm_cap, tmp_path):
    """surgeon.plan(profile | path, budget, options=...) is surgeon.profiles.plan.plan."""
    import pytest

    from surgeon.errors import ArtifactMismatch, BadInput
    from surgeon.profiles import profile
    from surgeon.profiles.plan import plan as planner

    prof = profile(minilm, minilm_cap, samples=1, seq_len=64, block_size=16, sensitivity=False)
    path = tmp_path / "profile.json"
    prof.save(path)
    want = planner(prof, 0.6).to_json()
    assert surgeon.plan(prof, 0.6).to_json() == want
    assert surgeon.plan(path, 0.6, model_fingerprint=minilm.fingerprint()).to_json() == want
    opts = {"head_budget": "uniform"}
    assert surgeon.plan(str(path), 0.6, options=opts).to_json() == planner(prof, 0.6, options=opts).to_json()
    with pytest.raises(BadInput, match="budget"):
        surgeon.plan(prof, -1.0)
    with pytest.raises(ArtifactMismatch):
        surgeon.plan(path, 0.6, model_fingerprint="0" * 32)
