"""Artifacts: versioned, fingerprinted, canonical, atomic."""
from __future__ import annotations

import json

import pytest
import torch

from surgeon.errors import ArtifactMismatch, BadInput
from surgeon.passes.policy import Policy, SiteChoice, identity_policy, policy_from_recipe


def test_roundtrip_byte_identical(tmp_path):
    p = identity_policy("abc123", ["a.0", "a.1"])
    p.save(tmp_path / "p.json")
    q = Policy.load(tmp_path / "p.json", model_fingerprint="abc123")
    assert q == p
    q.save(tmp_path / "q.json")
    assert (tmp_path / "p.json").read_bytes() == (tmp_path / "q.json").read_bytes()
    raw = json.loads((tmp_path / "p.json").read_text())
    assert raw["schema_version"] == 1 and raw["kind"] == "policy" and raw["model_fingerprint"] == "abc123"


def test_other_model_and_unknown_version(tmp_path):
    p = identity_policy("abc123", ["a.0"])
    p.save(tmp_path / "p.json")
    with pytest.raises(ArtifactMismatch, match="made for another model.*abc123"):
        Policy.load(tmp_path / "p.json", model_fingerprint="zzz999")
    raw = json.loads((tmp_path / "p.json").read_text())
    raw["schema_version"] = 99
    (tmp_path / "v.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactMismatch, match="schema_version 99.*version 1"):
        Policy.load(tmp_path / "v.json")
    raw["schema_version"] = 1
    raw["kind"] = "profile"
    (tmp_path / "k.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactMismatch, match="'profile' document, not a 'policy'"):
        Policy.load(tmp_path / "k.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BadInput, match="not valid JSON"):
        Policy.load(tmp_path / "bad.json")


def test_no_overwrite_without_force(tmp_path):
    p = identity_policy("f", ["s"])
    p.save(tmp_path / "p.json")
    with pytest.raises(BadInput, match="already exists.*--force"):
        p.save(tmp_path / "p.json")
    p.save(tmp_path / "p.json", force=True)
    assert [x.name for x in tmp_path.iterdir()] == ["p.json"]  # no temporary files left


def test_recipe_globs_and_errors():
    names = [f"model.layers.{i}.self_attn" for i in range(4)]
    pol = policy_from_recipe({"model.layers.*.self_attn": {"variant": "dense"}}, "f", names)
    assert set(pol.sites) == set(names)
    with pytest.raises(BadInput, match="unknown variant 'nope'.*valid variants: .*dense"):
        policy_from_recipe({"model.layers.*": {"variant": "nope"}}, "f", names)
    with pytest.raises(BadInput, match="matches no site.*model.layers.0.self_attn"):
        policy_from_recipe({"encoder.*": {"variant": "dense"}}, "f", names)


def test_model_fingerprint_is_content_hash(minilm):
    import copy
    import dataclasses

    fp = minilm.fingerprint()
    assert len(fp) == 32 and fp == minilm.fingerprint()
    # the same weights in a fresh copy hash alike; one changed weight changes the hash
    twin = dataclasses.replace(minilm, module=copy.deepcopy(minilm.module), _fingerprint=None)
    assert twin.fingerprint() == fp
    changed = dataclasses.replace(minilm, module=copy.deepcopy(minilm.module), _fingerprint=None)
    name, w = next((n, t) for n, t in changed.module.state_dict().items() if t.is_floating_point())
    with torch.no_grad():
        w.view(-1)[0] += 1.0
    assert changed.fingerprint() != fp, name
    assert minilm.fingerprint() == fp  # the session model is untouched
