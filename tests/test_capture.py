"""Capture and attention sites on real models; dynamic shapes; identity rewrite; round trips."""
from __future__ import annotations

import pytest
import torch

from surgeon.capture import capture, export_module
from surgeon.passes.policy import identity_policy
from surgeon.passes.rewrite import load_rewritten, rewrite, save_rewritten
from surgeon.attention import use_impl

EXPECT = {
    "smollm2": dict(n=30, heads=9, kv_heads=3, head_dim=64, causal=True),
    "minilm": dict(n=6, heads=12, kv_heads=12, head_dim=32, causal=False),
    "vit": dict(n=12, heads=3, kv_heads=3, head_dim=64, causal=False),
    "mha": dict(n=1, heads=4, kv_heads=4, head_dim=16, causal=False),
}


@pytest.fixture(params=list(EXPECT))
def model_and_cap(request):
    lm = request.getfixturevalue(request.param)
    cap = request.getfixturevalue(request.param + "_cap")
    return request.param, lm, cap


def test_sites(model_and_cap):
    key, lm, cap = model_and_cap
    e = EXPECT[key]
    assert len(cap.sites) == e["n"]
    for i, s in enumerate(cap.sites):
        assert (s.heads, s.kv_heads, s.head_dim, s.causal) == (e["heads"], e["kv_heads"], e["head_dim"], e["causal"])
        assert s.name and s.layer == i
    assert len({s.name for s in cap.sites}) == e["n"]
    if key == "smollm2":
        assert cap.sites[12].name == "model.layers.12.self_attn"
        assert cap.sites[0].mask_kind == "causal+padding"
    if key == "minilm":
        assert cap.sites[0].mask_kind == "padding"
    if key == "vit":
        assert cap.sites[0].mask_kind == "none" and cap.sites[0].spans[1]["grid"] == [14, 14]
        assert lm.random_weights
    if key == "mha":
        assert cap.sites[0].kind == "module:MultiheadAttention"


def _inputs(lm, n, seed):
    if lm.is_text:
        return lm.example_inputs(n, batch=2, padding=True, seed=seed)
    if lm.kind == "vision":
        return lm.example_inputs(n, batch=2, seed=seed)
    return lm.example_fn(n, 2)


def _compare(lm, a, b, ex):
    if lm.is_text:
        valid = ex[1].bool()
        a, b = a[valid], b[valid]
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_identity_rewrite_float32(model_and_cap, mode):
    key, lm, cap = model_and_cap
    if key == "smollm2" and mode == "reference":
        pytest.skip("the float64 test runs smollm2 through the reference op")
    res = rewrite(cap, identity_policy(lm.fingerprint(), [s.name for s in cap.sites]))
    assert res.counts == {"dense": len(cap.sites)}
    targets = {str(n.target) for n in res.program.graph.nodes if n.op == "call_function"}
    assert "surgeon.dense.default" in targets
    assert "aten.scaled_dot_product_attention.default" not in targets
    orig, new = cap.program.module(), res.program.module()
    lengths = (24, 61) if lm.seq_dynamic or lm.kind == "module" else (0, 0)
    for n in lengths:
        ex = _inputs(lm, n, seed=n)
        with torch.no_grad(), use_impl(mode):
            a, b = orig(*ex), new(*ex)
            c = lm.module(*ex)  # the eager model
        assert _compare(lm, a, b, ex) < 1e-5
        assert _compare(lm, c, b, ex) < 1e-5


def test_dynamic_shapes_one_capture(smollm2, smollm2_cap):
    """One capture serves short and long sequences (16 … max positions)."""
    m = smollm2_cap.program.module()
    for n in (16, 300):
        ex = smollm2.example_inputs(n, batch=1, seed=n)
        with torch.no_grad():
            torch.testing.assert_close(m(*ex), smollm2.module(*ex), rtol=1e-4, atol=1e-4)
    rng = smollm2_cap.program.range_constraints
    assert any(int(r.lower) == 16 and int(r.upper) == 8192 for r in rng.values())


@pytest.mark.parametrize("key", ["minilm", "smollm2"])
def test_identity_rewrite_float64_to_rounding(request, key):
    lm = request.getfixturevalue(key)
    cap = capture(lm, dtype=torch.float64)
    res = rewrite(cap, identity_policy(lm.fingerprint(), [s.name for s in cap.sites]))
    ex = lm.example_inputs(40, batch=2, padding=True, seed=3)
    with torch.no_grad(), use_impl("reference"):
        a, b = cap.program.module()(*ex), res.program.module()(*ex)
    assert _compare(lm, a, b, ex) < 1e-12


def test_reexport_and_save_load_roundtrip(minilm, minilm_cap, tmp_path):
    res = rewrite(minilm_cap, identity_policy(minilm.fingerprint(), [s.name for s in minilm_cap.sites]))
    # a rewritten graph re-exports with torch.export
    ex = minilm.example_inputs(33, batch=2, padding=True)
    again = export_module(res.program.module(), ex, minilm_cap.dynamic, minilm.inputs)
    out = save_rewritten(tmp_path / "rw", minilm_cap, res)
    loaded = load_rewritten(out)
    for n in (20, 50):
        ex = minilm.example_inputs(n, batch=2, padding=True, seed=n)
        with torch.no_grad():
            a = res.program.module()(*ex)
            b = loaded.module()(*ex)
            c = again.module()(*ex)
        assert torch.equal(a, b), "save/load must round-trip exactly"
        assert torch.equal(a, c)
    assert loaded.manifest.model_fingerprint == minilm.fingerprint()
    assert loaded.tokenizer is not None
