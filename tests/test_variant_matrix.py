"""The shared test matrix: every registered variant passes the same checks.

Adding a variant adds a registry line; these tests then cover it through its hooks
(``degenerate_params``, ``example_params``, ``make_block_mask``).
"""
from __future__ import annotations

import pytest
import torch

from surgeon.attention import AttnContext, all_variants, use_impl
from surgeon.attention.base import encode_config
from surgeon.attention.dense import Dense
from surgeon.attention.ops import op_for

VARIANTS = all_variants()
IDS = [v.name for v in VARIANTS]


def _inputs(b=2, hq=6, hkv=2, n=96, d=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, n, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, n, d, generator=g, dtype=dtype)
    return q, k, v


def _ctx(causal, kv, padding=None, d=16):
    return AttnContext(causal=causal, scale=d ** -0.5, kv_heads=kv, key_padding=padding)


def _run(var, q, k, v, ctx, p, mode):
    bm = var.make_block_mask(q, k, v, ctx, p) if var.consumes_block_mask else None
    with use_impl(mode):
        out = var.run(q, k, v, ctx, p, bm)
    return out[0] if var.produces_block_mask else out


def _causal_ok(var):
    return True


@pytest.mark.parametrize("var", VARIANTS, ids=IDS)
@pytest.mark.parametrize("causal", [True, False])
def test_degenerate_equals_dense(var, causal):
    if var.causal_only and not causal:
        pytest.skip("causal-only variant")
    q, k, v = _inputs()
    pad = torch.ones(2, 96, dtype=torch.bool)
    pad[1, :10] = False  # left padding in the second sequence
    ctx = _ctx(causal, 2, pad)
    dense = Dense().reference(q, k, v, ctx, Dense.Params())
    p = var.degenerate_params(96)
    bm = var.make_block_mask(q, k, v, ctx, p) if var.consumes_block_mask else None
    for mode in ["reference", "auto"]:
        with use_impl(mode):
            out = var.run(q, k, v, ctx, p, bm)
        out = out[0] if var.produces_block_mask else out
        valid = pad[:, None, :, None].expand_as(out) if causal else torch.ones_like(out, dtype=torch.bool)
        torch.testing.assert_close(out[valid], dense[valid], rtol=1e-5, atol=1e-5, msg=f"{var.name} {mode}")


@pytest.mark.parametrize("var", VARIANTS, ids=IDS)
def test_causality(var):
    """Changing token t never changes any output before t."""
    q, k, v = _inputs(b=1)
    ctx = _ctx(True, 2)
    p = var.example_params(96, 6)
    t = 57
    base = _run(var, q, k, v, ctx, p, "reference")
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, :, t:] += 3.0 * torch.randn_like(q2[:, :, t:])
    k2[:, :, t:] += 3.0 * torch.randn_like(k2[:, :, t:])
    v2[:, :, t:] += 3.0 * torch.randn_like(v2[:, :, t:])
    for mode in ["reference", "auto"]:
        out = _run(var, q2, k2, v2, ctx, p, mode)
        torch.testing.assert_close(out[:, :, :t], base[:, :, :t], rtol=1e-6, atol=1e-6, msg=f"{var.name} {mode}")


def _spy_fast_paths(var, monkeypatch) -> list[str]:
    """Make ``var.fast_paths()`` return counting wrappers; the returned list names each fast
    path as it runs."""
    ran: list[str] = []
    real = var.fast_paths

    def wrap(name, fn):
        def spy(*a, **kw):
            ran.append(name)
            return fn(*a, **kw)
        return spy

    monkeypatch.setattr(var, "fast_paths", lambda: {n: wrap(n, f) for n, f in real().items()})
    return ran


@pytest.mark.parametrize("var", VARIANTS, ids=IDS)
@pytest.mark.parametrize("causal", [True, False])
def test_fast_paths_equal_reference(var, causal, monkeypatch):
    if var.causal_only and not causal:
        pytest.skip("causal-only variant")
    q, k, v = _inputs(b=2, n=128, dtype=torch.float32)
    pad = torch.ones(2, 128, dtype=torch.bool)
    pad[1, :7] = False
    ctx = _ctx(causal, 2, pad)
    p = var.example_params(128, 6)
    bm = var.make_block_mask(q, k, v, ctx, p) if var.consumes_block_mask else None
    with use_impl("reference"):
        ref = var.run(q, k, v, ctx, p, bm)
    ref_o = ref[0] if var.produces_block_mask else ref
    valid = pad[:, None, :, None].expand_as(ref_o) if causal else torch.ones_like(ref_o, dtype=torch.bool)
    ran = _spy_fast_paths(var, monkeypatch)
    for name in var.fast_paths():
        if not var.fast_available(name, q, ctx, p):
            continue
        n0 = len(ran)
        with use_impl(name):
            out = var.run(q, k, v, ctx, p, bm)
        assert ran[n0:] == [name], f"{var.name}/{name}: the fast path did not run"
        if var.produces_block_mask:
            assert torch.equal(out[1], ref[1]), f"{var.name}/{name}: block masks differ"
            out = out[0]
        torch.testing.assert_close(out[valid], ref_o[valid], rtol=2e-4, atol=2e-4, msg=f"{var.name}/{name}")


@pytest.mark.parametrize("var", [v for v in VARIANTS if v.fast_paths()], ids=[v.name for v in VARIANTS if v.fast_paths()])
def test_a_declared_fast_path_runs(var, monkeypatch):
    """A variant that declares fast paths runs one under ``auto`` at the matrix's shape (causal
    or not, whichever its paths support): the fast-path comparisons above cannot pass by every
    path declining."""
    q, k, v = _inputs(b=2, n=128, dtype=torch.float32)
    pad = torch.ones(2, 128, dtype=torch.bool)
    pad[1, :7] = False
    p = var.example_params(128, 6)
    ran = _spy_fast_paths(var, monkeypatch)
    for causal in ([True] if var.causal_only else [True, False]):
        ctx = _ctx(causal, 2, pad)
        bm = var.make_block_mask(q, k, v, ctx, p) if var.consumes_block_mask else None
        n0 = len(ran)
        with use_impl("auto"):
            var.run(q, k, v, ctx, p, bm)
        available = [n for n in var.fast_paths() if var.fast_available(n, q, ctx, p)]
        assert ran[n0:] == available[:1], f"{var.name} causal={causal}: ran {ran[n0:]}, available {available}"
    assert ran, f"{var.name} declares fast paths {list(var.fast_paths())} but none ran at this shape"


@pytest.mark.parametrize("var", VARIANTS, ids=IDS)
def test_gqa_batch_and_op_schema(var):
    """The custom op (with repeated K/V as Hugging Face passes them) equals the variant."""
    q, k, v = _inputs(b=3, hq=6, hkv=2, n=64, dtype=torch.float32)
    ctx = _ctx(True, 2)
    p = var.example_params(64, 6)
    bm = var.make_block_mask(q, k, v, ctx, p) if var.consumes_block_mask else None
    with use_impl("reference"):
        want = var.run(q, k, v, ctx, p, bm)
        cfg = encode_config(var.name, p, {"kv_heads": 2})
        got = op_for(var.name)(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), None, None, True,
                               ctx.scale, cfg, bm)
    if var.produces_block_mask:
        torch.testing.assert_close(got[0], want[0])
        assert torch.equal(got[1], want[1].reshape(want[1].shape[0], -1)), "ops pass block masks flat"
    else:
        torch.testing.assert_close(got, want)
    # per-batch independence: running item 1 alone gives the same output
    with use_impl("reference"):
        one = var.run(q[1:2], k[1:2], v[1:2], ctx, p, bm[1:2] if bm is not None else None)
    one = one[0] if var.produces_block_mask else one
    w = want[0] if var.produces_block_mask else want
    torch.testing.assert_close(one, w[1:2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("var", VARIANTS, ids=IDS)
def test_density_reported(var):
    q, k, v = _inputs(b=1, n=128, dtype=torch.float32)
    ctx = _ctx(True, 2)
    p = var.example_params(128, 6)
    bm = var.make_block_mask(q, k, v, ctx, p) if var.consumes_block_mask else None
    achieved = var.achieved_density(q, k, v, ctx, p, bm)
    requested = var.requested_density(p)
    assert 0.0 < achieved <= 1.0 and 0.0 < requested <= 1.0
    if var.family == "sparse":
        assert achieved < 1.0, f"{var.name}: example parameters should be sparse"
