"""Block-sparse variants and their CPU kernels: selection exactness, kernel equivalence, edges.

Complements the shared matrix (tests/test_variant_matrix.py) with brute-force checks of the
block_topk / delta selections, the gather and band kernels against plain masked attention
(odd shapes, padding, per-head budgets, grouped K/V), and the anchor → consumer block-mask edge.
"""
from __future__ import annotations

import math

import pytest
import torch

import surgeon.kernels.blocksparse_cpu as bsk
import surgeon.kernels.geometry as geo
from surgeon.kernels.dispatch import block_sparse_attention
from surgeon.errors import BadInput
from surgeon.attention import AttnContext, recording, use_impl
from surgeon.attention.base import Variant, attention_from_keep, encode_config
from surgeon.attention.block_topk import BlockTopK, BlockTopKParams
from surgeon.attention.delta import Delta, DeltaParams, DeltaSparse, DeltaSparseParams, page_scores
from surgeon.attention.dense import Dense
from surgeon.attention.ops import op_for
from surgeon.attention.reuse import Reuse, ReuseParams
from surgeon.attention.window_sink import WindowSink, WindowSinkParams


def _qkv(b=2, hq=6, hkv=2, nq=80, nk=None, d=8, seed=0, dtype=torch.float64):
    nk = nq if nk is None else nk
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype)
    return q, k, v


def _pad(b, n, left=(0, 9)):
    m = torch.ones(b, n, dtype=torch.bool)
    for i, L in enumerate(left[:b]):
        m[i, :L] = False
    return m


def _valid_rows(out, ctx, nq, nk):
    """Rows compared: for causal sites only real query rows."""
    if ctx.causal and ctx.key_padding is not None:
        return ctx.key_padding[:, nk - nq:][:, None, :, None].expand_as(out)
    return torch.ones_like(out, dtype=torch.bool)


# --------------------------------------------------------------------------- brute force

def _brute_topk(q, k, ctx, fracs, bs, sink, local):
    """Selection by explicit loops over (batch, head, query block), from the written rule."""
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    nqb, nkb = math.ceil(nq / bs), math.ceil(nk / bs)
    off = nk - nq
    kp = ctx.key_padding if ctx.key_padding is not None else torch.ones(b, nk, dtype=torch.bool)
    out = torch.zeros(b, hq, nqb, nkb, dtype=torch.bool)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for qb in range(nqb):
                first, last = off + qb * bs, off + min((qb + 1) * bs, nq) - 1
                if ctx.causal:
                    rows = [r for r in range(qb * bs - bs + 1, qb * bs + 1) if r >= 0]
                else:
                    rows = list(range(qb * bs, min((qb + 1) * bs, nq)))
                rows = [r for r in rows if bool(kp[bi, off + r])] if (ctx.causal or nq == nk) else rows
                qbar = q[bi, h, rows].mean(0) if rows else torch.zeros(q.shape[-1], dtype=q.dtype)
                diag = min(max(last // bs, 0), nkb - 1)
                allowed = [kb for kb in range(nkb) if (not ctx.causal or kb * bs <= last)]
                forced = set()
                for kb in allowed:
                    kend = min(kb * bs + bs, nk) - 1
                    if kb < sink or diag - local < kb <= diag or (ctx.causal and kend > first):
                        forced.add(kb)
                budget = max(math.ceil(float(fracs[h]) * len(allowed) - 1e-9), len(forced))
                cands = []
                for kb in allowed:
                    if kb in forced:
                        continue
                    real = [j for j in range(kb * bs, min(kb * bs + bs, nk)) if bool(kp[bi, j])]
                    if not real:
                        continue
                    kbar = k[bi, kh, real].mean(0)
                    cands.append((-(float(qbar @ kbar) * ctx.scale), kb))
                cands.sort()
                chosen = sorted(forced) + [kb for _, kb in cands[: budget - len(forced)]]
                out[bi, h, qb, chosen] = True
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nk,bs", [(80, 80, 16), (75, 75, 16), (40, 70, 8)])
def test_topk_selection_matches_brute_force(causal, nq, nk, bs):
    if not causal and nq != nk:
        nk = nq
    q, k, v = _qkv(nq=nq, nk=nk, seed=nq + nk)
    ctx = AttnContext(causal=causal, scale=0.3, kv_heads=2, key_padding=_pad(2, nk, (0, 11)))
    for p in [BlockTopKParams(keep=0.3, block_size=bs),
              BlockTopKParams(keep=0.5, block_size=bs, head_keep=(0.05, 0.2, 0.4, 0.6, 0.8, 1.0),
                              sink_blocks=2, local_blocks=2),
              BlockTopKParams(keep=0.25, block_size=bs, sink_blocks=0, local_blocks=0)]:
        got = BlockTopK().select(q, k, ctx, p)
        fr = p.head_keep if p.head_keep is not None else (p.keep,) * 6
        want = _brute_topk(q, k, ctx, fr, bs, p.sink_blocks, p.local_blocks)
        assert torch.equal(got, want), p


def test_per_head_budgets_count_exactly():
    """Without padding each (head, query block) keeps max(⌈keep_h·n_allowed⌉, #forced) blocks."""
    q, k, v = _qkv(b=1, nq=160, d=8, seed=3)
    ctx = AttnContext(causal=True, scale=0.35, kv_heads=2)
    hk = (0.1, 0.15, 0.2, 0.5, 0.75, 1.0)
    sel = BlockTopK().select(q, k, ctx, BlockTopKParams(keep=0.5, block_size=16, head_keep=hk,
                                                         sink_blocks=1, local_blocks=2))
    for h, f in enumerate(hk):
        for qb in range(10):
            n_allowed = qb + 1
            forced = len({0} | {qb, qb - 1} - {-1})
            assert int(sel[0, h, qb].sum()) == max(math.ceil(f * n_allowed - 1e-9), forced)
            assert not bool(sel[0, h, qb, qb + 1:].any())  # never beyond the diagonal


def test_keep_one_equals_dense_odd_block_size():
    q, k, v = _qkv(nq=77, seed=5)
    for causal in [True, False]:
        ctx = AttnContext(causal=causal, scale=0.3, kv_heads=2, key_padding=_pad(2, 77, (0, 13)))
        dense = Dense().reference(q, k, v, ctx, Dense.Params())
        p = BlockTopKParams(keep=1.0, block_size=10, sink_blocks=0, local_blocks=0)
        for mode in ["reference", "gather"]:
            with use_impl(mode):
                out, bm = BlockTopK().run(q, k, v, ctx, p)
            ok = _valid_rows(out, ctx, 77, 77)
            torch.testing.assert_close(out[ok], dense[ok], rtol=1e-10, atol=1e-10)


def test_topk_causal_in_block_perturbation():
    """A token inside a query block never changes earlier rows of that block (pooling is causal-safe)."""
    q, k, v = _qkv(b=1, nq=96, seed=7)
    ctx = AttnContext(causal=True, scale=0.3, kv_heads=2)
    p = BlockTopKParams(keep=0.25, block_size=16, local_blocks=0, sink_blocks=0)
    base, _ = BlockTopK().run(q, k, v, ctx, p)
    for t in [33, 47, 48, 80]:
        q2, k2 = q.clone(), k.clone()
        q2[:, :, t:] *= -3.0
        k2[:, :, t:] += 5.0
        with use_impl("gather"):
            out, _ = BlockTopK().run(q2, k2, v, ctx, p)
        torch.testing.assert_close(out[:, :, :t], base[:, :, :t], rtol=1e-12, atol=1e-12)


def test_bad_head_keep_and_params():
    q, k, v = _qkv()
    ctx = AttnContext(causal=True, scale=0.3, kv_heads=2)
    with pytest.raises(BadInput, match="head_keep has 2 entries"):
        BlockTopK().run(q, k, v, ctx, BlockTopKParams(head_keep=(0.1, 0.2), block_size=16))
    with pytest.raises(BadInput, match="keep=0.0"):
        BlockTopKParams(keep=0.0)
    with pytest.raises(BadInput, match="head_keep"):
        BlockTopKParams(head_keep=(0.5, 1.5))
    with pytest.raises(BadInput, match="block_size"):
        BlockTopKParams(block_size=0)
    p = BlockTopKParams.from_dict({"keep": 0.2, "head_keep": [0.1, 0.3]})
    assert p.head_keep == (0.1, 0.3)


# --------------------------------------------------------------------------- gather kernel

def _random_mask(b, h, nqb, nkb, p, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, nqb, nkb, generator=g) < p


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nk,qb,kb", [(64, 64, 16, 16), (70, 70, 16, 8), (30, 83, 8, 16), (50, 50, 32, 32)])
def test_gather_kernel_equals_masked_attention(dtype, causal, nq, nk, qb, kb):
    q, k, v = _qkv(b=2, nq=nq, nk=nk, dtype=dtype, seed=nq * 3 + kb)
    pad = _pad(2, nk, (0, 7))
    ctx = AttnContext(causal=causal, scale=0.4, kv_heads=2, key_padding=pad)
    nqb, nkb = math.ceil(nq / qb), math.ceil(nk / kb)
    bm = _random_mask(2, 6, nqb, nkb, 0.35, seed=nq)  # includes empty rows and non-causal blocks
    want = attention_from_keep(q, k, v, ctx, geo.upsample_block_mask(bm, nq, nk, qb, kb))
    got = block_sparse_attention(q, k, v, bm, q_block=qb, k_block=kb, causal=causal, scale=0.4,
                                 key_padding=pad)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    ok = _valid_rows(got, ctx, nq, nk)
    torch.testing.assert_close(got[ok], want[ok], rtol=tol, atol=tol)


def test_gather_kernel_grouped_heads_and_small_chunks(monkeypatch):
    """Group-shared masks (shared K/V gathers) and tiny chunks (multi-block chunks with padded slots)."""
    q, k, v = _qkv(b=2, hq=6, hkv=2, nq=96, seed=11)
    ctx = AttnContext(causal=True, scale=0.4, kv_heads=2)
    grp = _random_mask(2, 2, 12, 12, 0.4, seed=2).repeat_interleave(3, dim=1)
    per_head = _random_mask(2, 6, 12, 12, 0.4, seed=3)
    for bm in [grp, per_head]:
        want = attention_from_keep(q, k, v, ctx, geo.upsample_block_mask(bm, 96, 96, 8, 8))
        for elems, blocks in [(1 << 22, 4), (600, 3), (1, 1)]:
            monkeypatch.setattr(bsk, "_CHUNK_SCORE_ELEMS", elems)
            monkeypatch.setattr(bsk, "_MAX_CHUNK_QBLOCKS", blocks)
            got = block_sparse_attention(q, k, v, bm, q_block=8, k_block=8, causal=True, scale=0.4)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_fp32_fast_path_tracks_fp64_reference():
    q, k, v = _qkv(b=1, hq=9, hkv=3, nq=256, d=32, seed=4)
    ctx = AttnContext(causal=True, scale=32 ** -0.5, kv_heads=3)
    p = BlockTopKParams(keep=0.2, block_size=32)
    ref, m64 = BlockTopK().reference(q, k, v, ctx, p)
    with use_impl("gather"):
        out, m32 = BlockTopK().run(q.float(), k.float(), v.float(), ctx, p)
    assert torch.equal(m32, m64)  # well-separated random scores: same selection in both precisions
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_block_pair_counts_and_density_match_token_count():
    for causal, nq, nk, qb, kb in [(True, 50, 50, 16, 8), (True, 20, 45, 8, 16), (False, 33, 33, 8, 8)]:
        pad = _pad(2, nk, (0, 5))
        counts = geo.block_pair_counts(nq, nk, qb, kb, causal, pad, torch.device("cpu"))
        ctx = AttnContext(causal=causal, scale=1.0, kv_heads=1, key_padding=pad)
        from surgeon.attention.base import allowed_mask
        allow = allowed_mask(ctx, 2, nq, nk, torch.device("cpu"))[:, 0].double()
        nqb, nkb = math.ceil(nq / qb), math.ceil(nk / kb)
        bm = _random_mask(2, 3, nqb, nkb, 0.5, seed=nq)
        tok = geo.upsample_block_mask(bm, nq, nk, qb, kb).double() * allow[:, None]
        assert geo.block_mask_density(bm, counts) == pytest.approx(float(tok.sum() / (3 * allow.sum())))


# --------------------------------------------------------------------------- block-mask edge

def test_anchor_to_reuse_edge_through_ops():
    """block_topk's mask feeds reuse: same q/k/v and params give the anchor's output."""
    q, k, v = _qkv(b=2, nq=64, dtype=torch.float32, seed=9)
    bt = BlockTopKParams(keep=0.3, block_size=16)
    ru = ReuseParams(block_size=16)
    with use_impl("auto"):
        a_out, a_mask = op_for("block_topk")(q, k, v, None, None, True, 0.3, encode_config("block_topk", bt, {"kv_heads": 2}))
        r_out = op_for("reuse")(q, k, v, None, None, True, 0.3, encode_config("reuse", ru, {"kv_heads": 2}), a_mask)
    assert a_mask.dtype == torch.bool and a_mask.numel() == 2 * 6 * 4 * 4
    torch.testing.assert_close(r_out, a_out, rtol=1e-6, atol=1e-6)
    ctx = AttnContext(causal=True, scale=0.3, kv_heads=2)
    with pytest.raises(BadInput, match="block_size"):
        Reuse().run(q, k, v, ctx, ReuseParams(block_size=8), a_mask.reshape(2, 6, 4, 4))
    with pytest.raises(BadInput, match="block mask of its anchor"):
        Reuse().run(q, k, v, ctx, ru, None)


def test_reuse_all_true_mask_is_dense_and_adds_sinks():
    q, k, v = _qkv(nq=48, seed=12)
    ctx = AttnContext(causal=True, scale=0.3, kv_heads=2, key_padding=_pad(2, 48, (0, 5)))
    p = ReuseParams(block_size=16, sink_blocks=0, local_blocks=0)
    ones = torch.ones(2, 6, 3, 3, dtype=torch.bool)
    dense = Dense().reference(q, k, v, ctx, Dense.Params())
    for mode in ["reference", "gather"]:
        with use_impl(mode):
            out = Reuse().run(q, k, v, ctx, p, ones)
        ok = _valid_rows(out, ctx, 48, 48)
        torch.testing.assert_close(out[ok], dense[ok], rtol=1e-10, atol=1e-10)
    empty = torch.zeros(2, 6, 3, 3, dtype=torch.bool)
    eff = Reuse().effective_mask(q, k, ctx, ReuseParams(block_size=16, sink_blocks=1, local_blocks=1), empty)
    want = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    assert torch.equal(eff[0, 0], want) and torch.equal(eff[1, 5], want)


def test_delta_to_delta_sparse_edge():
    q, k, v = _qkv(b=1, nq=128, seed=13)
    ctx = AttnContext(causal=True, scale=0.3, kv_heads=2)
    dp = DeltaParams(keep=0.25, page_size=8, q_block=16, recent_pages=1, sink_pages=1, score_queries=8)
    out, pages = Delta().run(q, k, v, ctx, dp)
    assert pages.shape == Delta().block_mask_shape(q, k, dp) == (1, 6, 8, 16)
    assert all(torch.equal(pages[:, h], pages[:, 0]) for h in range(6))  # unified head selection
    torch.testing.assert_close(out, Dense().reference(q, k, v, ctx, Dense.Params()))
    sp = DeltaSparseParams(page_size=8, q_block=16, recent_pages=1, sink_pages=1)
    with use_impl("reference"):
        ref = DeltaSparse().run(q, k, v, ctx, sp, pages)
    with use_impl("gather"):
        fast = DeltaSparse().run(q, k, v, ctx, sp, pages)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    # the sparse layer adds nothing the Δ-layer already forced: its mask is the Δ-layer's
    assert torch.equal(DeltaSparse().effective_mask(q, k, ctx, sp, pages), pages)
    with pytest.raises(BadInput, match="page_size and q_block"):
        DeltaSparse().run(q, k, v, ctx, DeltaSparseParams(page_size=16, q_block=16), pages)


def _brute_page_scores(q, k, ctx, page, qblock, sq):
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    kk = k.repeat_interleave(hq // k.shape[1], dim=1)
    p = torch.softmax((q @ kk.transpose(-1, -2)) * ctx.scale + torch.full((nq, nk), float("-inf")).triu(1),
                      dim=-1)  # causal, Nq == Nk, no padding
    pm = p.amax(dim=1)  # [B, Nq, Nk]
    nqb, npg = math.ceil(nq / qblock), math.ceil(nk / page)
    out = torch.zeros(b, nqb, npg, dtype=q.dtype)
    for qb in range(nqb):
        rows = [r for r in range(qb * qblock - sq + 1, qb * qblock + 1) if r >= 0]
        for pg in range(npg):
            out[:, qb, pg] = pm[:, rows, pg * page:(pg + 1) * page].sum(dim=(1, 2))
    return out


def test_delta_page_scores_and_selection_brute_force(monkeypatch):
    q, k, v = _qkv(b=2, nq=100, seed=14)
    ctx = AttnContext(causal=True, scale=0.3, kv_heads=2)
    want = _brute_page_scores(q, k, ctx, 8, 16, 5)
    for elems in [1 << 22, 1]:  # one chunk, one query block per chunk
        monkeypatch.setattr("surgeon.attention.delta._SCORE_CHUNK_ELEMS", elems)
        torch.testing.assert_close(page_scores(q, k, ctx, 8, 16, 5), want, rtol=1e-12, atol=1e-12)
    dp = DeltaParams(keep=0.3, page_size=8, q_block=16, sink_pages=1, recent_pages=2, score_queries=5)
    sel = Delta().select(q, k, ctx, dp)[:, 0]
    for bi in range(2):
        for qb in range(7):
            first, last = qb * 16, min(qb * 16 + 16, 100) - 1
            allowed = last // 8 + 1
            forced = {0} | {pg for pg in range(allowed) if pg * 8 + 7 >= first - 16 + 1}
            budget = max(math.ceil(0.3 * allowed - 1e-9), len(forced))
            rest = sorted((pg for pg in range(allowed) if pg not in forced), key=lambda pg: (-float(want[bi, qb, pg]), pg))
            chosen = forced | set(rest[: budget - len(forced)])
            assert set(torch.nonzero(sel[bi, qb]).flatten().tolist()) == chosen


def test_delta_sparse_density_recorded():
    q, k, v = _qkv(b=1, nq=128, dtype=torch.float32, seed=15)
    ctx = AttnContext(causal=True, scale=0.3, kv_heads=2, site="layers.3")
    var = DeltaSparse()
    p = var.example_params(128, 6)
    bm = var.make_block_mask(q, k, v, ctx, p)
    with recording() as rec, use_impl("gather"):
        var.run(q, k, v, ctx, p, bm)
    assert len(rec.records) == 1 and rec.records[0]["site"] == "layers.3"
    assert rec.records[0]["achieved"] == pytest.approx(Variant.achieved_density(var, q, k, v, ctx, p, bm))
    assert 0.0 < rec.records[0]["achieved"] < 1.0


# --------------------------------------------------------------------------- window_sink

def _brute_window(nq, nk, causal, sink, window):
    m = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        p = nk - nq + i
        for j in range(nk):
            inband = (p - window < j <= p) if causal else abs(p - j) < window
            m[i, j] = j < sink or inband
    return m


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nk,sink,window,chunk", [(70, 70, 4, 9, 16), (20, 90, 3, 25, 8), (64, 64, 0, 1, 32),
                                                       (64, 64, 70, 5, 16)])
def test_window_sink_kernel_and_mask(causal, nq, nk, sink, window, chunk):
    if not causal and nq != nk:
        return
    q, k, v = _qkv(nq=nq, nk=nk, seed=nq + window)
    pad = _pad(2, nk, (0, 6))
    ctx = AttnContext(causal=causal, scale=0.3, kv_heads=2, key_padding=pad)
    p = WindowSinkParams(sink_tokens=sink, window=window)
    var = WindowSink()
    keep = var.keep_mask(q, k, v, ctx, p)[0, 0]
    assert torch.equal(keep, _brute_window(nq, nk, causal, sink, window))
    ref = var.reference(q, k, v, ctx, p)
    got = bsk.band_attention(q, k, v, sink_tokens=sink, window=window, causal=causal, scale=0.3,
                             key_padding=pad, chunk=chunk)
    ok = _valid_rows(got, ctx, nq, nk)
    torch.testing.assert_close(got[ok], ref[ok], rtol=1e-12, atol=1e-12)
    assert var.achieved_density(q, k, v, ctx, p) == pytest.approx(Variant.achieved_density(var, q, k, v, ctx, p))


# --------------------------------------------------------------------------- densities

@pytest.mark.parametrize("var,p", [(BlockTopK(), BlockTopKParams(keep=0.3, block_size=8, head_keep=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6))),
                                   (Reuse(), ReuseParams(block_size=8))])
def test_block_density_override_matches_token_count(var, p):
    q, k, v = _qkv(nq=60, seed=16)
    for causal in [True, False]:
        ctx = AttnContext(causal=causal, scale=0.3, kv_heads=2, key_padding=_pad(2, 60, (0, 9)))
        bm = var.make_block_mask(q, k, v, ctx, p) if var.consumes_block_mask else None
        assert var.achieved_density(q, k, v, ctx, p, bm) == pytest.approx(
            Variant.achieved_density(var, q, k, v, ctx, p, bm))


# --------------------------------------------------------------------------- layouts, pooling, declines

@pytest.mark.parametrize("var,p", [(BlockTopK(), BlockTopKParams(keep=0.3, block_size=16)),
                                   (Reuse(), ReuseParams(block_size=16)),
                                   (WindowSink(), WindowSinkParams(sink_tokens=3, window=20)),
                                   (Delta(), DeltaParams(keep=0.3, page_size=8, q_block=16, score_queries=4)),
                                   (DeltaSparse(), DeltaSparseParams(page_size=8, q_block=16, recent_pages=1))])
def test_fast_paths_accept_transposed_inputs(var, p):
    """Hugging Face passes q/k/v as transposes of [B, N, H, D]: non-contiguous inputs work."""
    q, k, v = _qkv(b=2, nq=72, seed=17)
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    ctx = AttnContext(causal=True, scale=0.3, kv_heads=2)
    bm = var.make_block_mask(q, k, v, ctx, p) if var.consumes_block_mask else None
    with use_impl("reference"):
        want = var.run(q, k, v, ctx, p, bm)
    (name,) = var.fast_paths()
    with use_impl(name):
        got = var.run(qt, kt, vt, ctx, p, bm)
    if var.produces_block_mask:
        assert torch.equal(got[1], want[1])
        got, want = got[0], want[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_pooling_means_over_real_tokens():
    q, k, _ = _qkv(b=2, hq=3, hkv=3, nq=45, seed=18)
    pad = _pad(2, 45, (0, 20))
    qb = geo.pooled_queries(q, 16, causal=True, q_valid=pad)
    # causal window of block 1: rows 1..16; in batch 1 only rows 20.. are real → rows none → zeros
    torch.testing.assert_close(qb[0, :, 1], q[0, :, 1:17].mean(dim=1))
    assert torch.equal(qb[1, :, 1], torch.zeros_like(qb[1, :, 1]))
    torch.testing.assert_close(qb[1, :, 2], q[1, :, 20:33].mean(dim=1))
    torch.testing.assert_close(qb[0, :, 0], q[0, :, 0])
    nc = geo.pooled_queries(q, 16, causal=False, q_valid=None)
    torch.testing.assert_close(nc[0, :, 2], q[0, :, 32:45].mean(dim=1))  # ragged last block
    kb, real = geo.pooled_keys(k, 16, pad)
    torch.testing.assert_close(kb[1, :, 1], k[1, :, 20:32].mean(dim=1))
    assert real.tolist() == [[True, True, True], [False, True, True]]


def test_fast_paths_decline_masks_and_modulation():
    q, k, v = _qkv(nq=32)
    plain = AttnContext(causal=True, scale=0.3, kv_heads=2)
    masked = AttnContext(causal=True, scale=0.3, kv_heads=2, attn_mask=torch.ones(1, 1, 32, 32, dtype=torch.bool))
    modulated = AttnContext(causal=True, scale=0.3, kv_heads=2, logit_fn=lambda z: z * 0.5)
    for var in [BlockTopK(), Reuse(), WindowSink(), DeltaSparse()]:
        p = var.example_params(32, 6)
        (name,) = var.fast_paths()
        assert var.fast_available(name, q, plain, p)
        assert not var.fast_available(name, q, masked, p)
        assert not var.fast_available(name, q, modulated, p)
    # the reference honours a modulation hook: halving the logits changes the output
    p = BlockTopKParams(keep=0.5, block_size=8)
    with use_impl("auto"):
        a, _ = BlockTopK().run(q, k, v, plain, p)
        b_, _ = BlockTopK().run(q, k, v, modulated, p)
    assert (a - b_).abs().max() > 1e-3
