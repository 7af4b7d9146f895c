"""Token-, chunk-, level- and region-sparse variants: token_topk, dhsa, pyramid, knn, routing.

Complements the shared matrix (tests/test_variant_matrix.py) with brute-force checks of each
selection rule, odd shapes (ragged chunks, decode-style Nq < Nk, padding), the gather kernel's
fused and plain paths, density bookkeeping, parameter validation and modulation handling.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from surgeon.errors import BadInput
from surgeon.kernels import gather_cpu
from surgeon.kernels.blocksparse_cpu import (
    block_geometry,
    pooled_keys,
    pooled_queries,
    query_validity,
    sink_local_blocks,
    upsample_block_mask,
)
from surgeon.attention import AttnContext, get_variant, recording, use_impl
from surgeon.attention.base import attention_from_keep, repeat_kv
from surgeon.attention.dense import Dense
from surgeon.attention.dhsa import DHSA, DHSAParams, chunk_reps, select_chunks
from surgeon.attention.knn import KNN, KNNParams
from surgeon.attention.pyramid import Pyramid, PyramidParams, assign_levels, build_bank, pyramid_gather
from surgeon.attention.routing import Routing, RoutingParams, grid_of
from surgeon.attention.token_topk import TokenTopK, TokenTopKParams, select_tokens, selection_keep


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


def _ctx(causal, kv=2, pad=None, d=8, **kw):
    return AttnContext(causal=causal, scale=d ** -0.5, kv_heads=kv, key_padding=pad, **kw)


def _valid_rows(out, pad, causal):
    if causal and pad is not None and pad.shape[1] == out.shape[2]:
        return pad[:, None, :, None].expand_as(out)
    return torch.ones_like(out, dtype=torch.bool)


def _check_fast(var, q, k, v, ctx, p, tol=1e-9):
    with use_impl("reference"):
        ref = var.run(q, k, v, ctx, p)
    valid = _valid_rows(ref, ctx.key_padding, ctx.causal)
    n = 0
    for name in var.fast_paths():
        if not var.fast_available(name, q, ctx, p):
            continue
        with use_impl(name):
            out = var.run(q, k, v, ctx, p)
        torch.testing.assert_close(out[valid], ref[valid], rtol=tol, atol=tol, msg=f"{var.name}/{name}")
        n += 1
    assert n >= 1, f"{var.name}: no fast path ran"
    return ref


# ----------------------------------------------------------------------------- gather kernel

@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_gathered_attention_matches_masked_attention(fused, shared):
    b, hq, hkv, n, d, grp = 2, 6, 2, 50, 8, 16
    q, k, v = _qkv(b, hq, hkv, n, d=d)
    pad = _pad(b, n, (0, 5))
    ng = math.ceil(n / grp)
    g = torch.Generator().manual_seed(3)
    hs = 1 if shared else hq
    # past keys: a random subset of positions before each group's first row, some empty slots
    idx = torch.full((b, hs, ng, 12), -1, dtype=torch.long)
    for a in range(1, ng):
        for h in range(hs):
            for bi in range(b):
                perm = torch.randperm(a * grp, generator=g)[:10]
                idx[bi, h, a, :10] = perm
    start = torch.arange(ng) * grp
    out = gather_cpu.gathered_attention(q, k, v, idx, group=grp, scale=0.3,
                                        key_bias=gather_cpu.padding_bias(pad, q.dtype), diag_start=start,
                                        diag_len=grp, fused=fused)
    keep = torch.zeros(b, hs, ng, n + 1, dtype=torch.bool)
    keep.scatter_(-1, torch.where(idx >= 0, idx, n), True)
    keep = keep[..., :n]
    j = torch.arange(n)
    keep = keep | ((j[None, :] >= start[:, None]) & (j[None, :] < start[:, None] + grp))
    keep = keep.repeat_interleave(grp, dim=2)[:, :, :n]
    ctx = AttnContext(causal=True, scale=0.3, kv_heads=hkv, key_padding=pad)
    want = attention_from_keep(q, k, v, ctx, keep)
    valid = _valid_rows(want, pad, True)
    torch.testing.assert_close(out[valid], want[valid], rtol=1e-10, atol=1e-10)
    # rows whose keys are all padding give exactly 0
    assert float(out[1, :, :5].abs().max()) == 0.0


def test_gathered_attention_bias_is_added_to_logits():
    q, k, v = _qkv(1, 2, 1, 4, nk=6)
    bias = torch.tensor([[0.0, math.log(3.0), float("-inf"), 0.5, 0.0, 0.0]], dtype=q.dtype)
    idx = torch.tensor([[[[0, 1, 2, 3, -1]]]])
    out = gather_cpu.gathered_attention(q, k, v, idx, group=4, scale=1.0, key_bias=bias)
    z = torch.matmul(q, repeat_kv(k, 2).transpose(-1, -2))[..., :4] + bias[:, None, None, :4]
    want = torch.matmul(torch.softmax(z, -1), repeat_kv(v, 2)[:, :, :4])
    torch.testing.assert_close(out, want)


def test_merge_lse_equals_joint_softmax():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 7, generator=g, dtype=torch.float64)
    vv = torch.randn(7, 4, generator=g, dtype=torch.float64)
    a, c = slice(0, 3), slice(3, 7)
    o1, l1 = torch.softmax(z[:, a], -1) @ vv[a], torch.logsumexp(z[:, a], -1)
    o2, l2 = torch.softmax(z[:, c], -1) @ vv[c], torch.logsumexp(z[:, c], -1)
    torch.testing.assert_close(gather_cpu.merge_lse(o1, l1, o2, l2), torch.softmax(z, -1) @ vv)
    empty = torch.full_like(l2, float("-inf"))
    torch.testing.assert_close(gather_cpu.merge_lse(o1, l1, torch.zeros_like(o2), empty), o1)


# ----------------------------------------------------------------------------- token_topk

def _token_topk_brute(q, k, ctx, p):
    """Per-chunk selection straight from the spec (loops), bool [B, Nq, Nk]."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    off = nk - nq
    real = ctx.key_padding if ctx.key_padding is not None else torch.ones(b, nk, dtype=torch.bool)
    keep = torch.zeros(b, nq, nk, dtype=torch.bool)
    for bi in range(b):
        for r0 in range(0, nq, p.chunk):
            r1 = min(nq, r0 + p.chunk)
            s, e = off + r0, off + r1 - 1
            if ctx.causal:
                rows = range(max(0, r0 - p.chunk + 1), r0 + 1)  # window ending at the chunk's first row
                lim, end = s, e + 1
            else:
                rows = range(r0, r1)
                lim = end = nk
            rows = [i for i in rows if real[bi, off + i]]
            qbar = q[bi, :, rows].mean(dim=1) if rows else torch.zeros(hq, d, dtype=q.dtype)
            cands = [j for j in range(p.n_init, lim - p.n_local) if real[bi, j]]
            sel = set(range(min(p.n_init, lim)))
            sel |= set(range(max(min(p.n_init, lim), lim - p.n_local), end))
            kk = math.ceil(p.keep * end - 1e-9) if p.keep > 0 else p.top_k
            if cands and kk > 0:
                c = torch.tensor(cands)
                vote = torch.zeros(len(cands), dtype=q.dtype)
                for h in range(hq):
                    vote += torch.softmax(k[bi, h // g, c] @ qbar[h], dim=0)
                order = sorted(range(len(cands)), key=lambda t: (-float(vote[t]), cands[t]))
                sel |= {cands[t] for t in order[:kk]}
            for j in sel:
                keep[bi, r0:r1, j] = True
    return keep


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("keep_frac", [0.0, 0.2])
def test_token_topk_selection_matches_spec(causal, keep_frac):
    q, k, v = _qkv(2, 6, 2, 90, d=8)
    pad = _pad(2, 90, (0, 11))
    ctx = _ctx(causal, pad=pad)
    p = TokenTopKParams(n_init=3, n_local=10, top_k=7, keep=keep_frac, chunk=16)
    got = selection_keep(select_tokens(q, k, ctx, p), 90, 90, p.chunk)[:, 0]
    assert torch.equal(got, _token_topk_brute(q, k, ctx, p))


def test_token_topk_decode_shapes_and_ragged_chunks():
    var = TokenTopK()
    q, k, v = _qkv(2, 6, 2, 37, nk=103)  # offset 66: chunks not aligned to 16
    pad = _pad(2, 103, (0, 6))
    p = TokenTopKParams(n_init=4, n_local=9, top_k=11, chunk=16)
    ctx = _ctx(True, pad=pad)
    keep = selection_keep(select_tokens(q, k, ctx, p), 37, 103, p.chunk)[:, 0]
    assert torch.equal(keep, _token_topk_brute(q, k, ctx, p))
    _check_fast(var, q.float(), k.float(), v.float(), ctx, p, tol=1e-5)
    # decode: a single query row
    _check_fast(var, q[:, :, -1:], k, v, ctx, p)


def test_token_topk_selection_is_shared_by_heads_and_sized():
    q, k, v = _qkv(1, 6, 2, 128)
    p = TokenTopKParams(n_init=4, n_local=8, top_k=10, chunk=16)
    sel = select_tokens(q, k, _ctx(True), p)
    assert sel.idx.shape[1] == 1  # one list per chunk for all heads
    last = sel.idx[0, 0, -1]
    # last chunk (first position 112): 4 init + 10 voted + 8 local keys before it, plus its own keys
    assert int((last >= 0).sum()) == 4 + 10 + 8
    assert set(last[last >= 0].tolist()) >= set(range(4)) | set(range(104, 112))


# ----------------------------------------------------------------------------- dhsa

@pytest.mark.parametrize("causal", [True, False])
def test_dhsa_selection_is_chunkwise_token_topk(causal):
    """Every row keeps whole chunks: forced ones, then the best-scoring chunks until their real
    keys reach N_b (the chunk holding the N_b-th key is kept whole)."""
    b, hq, hkv, n, c = 2, 4, 2, 75, 8  # ragged last chunk
    q, k, v = _qkv(b, hq, hkv, n)
    pad = _pad(b, n, (0, 13))
    ctx = _ctx(causal, pad=pad)
    p = DHSAParams(chunk=c, budget=0.3, sink_chunks=1, local_chunks=1)
    sel = select_chunks(q, k, ctx, p)
    geo = block_geometry(n, n, c, c, causal, q.device)
    khat, cnt = chunk_reps(k, c, pad)
    qhat = pooled_queries(q, c, causal, query_validity(pad, n, n, causal))
    s = torch.einsum("bhqd,bhkd->bhqk", qhat, repeat_kv(khat, hq))
    forced = (sink_local_blocks(geo, 1, 1) | geo.partial) & geo.allowed
    for bi in range(b):
        for h in range(hq):
            for a in range(geo.nqb):
                nb = math.ceil(0.3 * ((int(geo.q_last[a]) + 1) if causal else n) - 1e-9)
                f = forced[a]
                cand = [j for j in range(geo.nkb) if geo.allowed[a, j] and cnt[bi, j] > 0 and not f[j]]
                cand.sort(key=lambda j: (-float(s[bi, h, a, j]), j))
                budget = float(cnt[bi][f].sum())
                want = set(torch.nonzero(f).flatten().tolist())
                for j in cand:
                    if budget >= nb:
                        break
                    want.add(j)
                    budget += float(cnt[bi, j])
                got = set(torch.nonzero(sel[bi, h, a]).flatten().tolist())
                assert got == want, (bi, h, a)


def test_dhsa_length_normalised_reps():
    k = torch.arange(2 * 1 * 10 * 2, dtype=torch.float64).view(2, 1, 10, 2)
    pad = _pad(2, 10, (0, 3))
    reps, cnt = chunk_reps(k, 4, pad)
    assert cnt.tolist() == [[4, 4, 2], [1, 4, 2]]
    torch.testing.assert_close(reps[1, 0, 0], k[1, 0, 3] / 1.0)
    torch.testing.assert_close(reps[0, 0, 2], k[0, 0, 8:10].sum(0) / math.sqrt(2))


@pytest.mark.parametrize("causal", [True, False])
def test_dhsa_fast_paths_odd_shapes(causal):
    var = DHSA()
    q, k, v = _qkv(2, 6, 2, 45, nk=79, dtype=torch.float32) if causal else _qkv(2, 6, 2, 79, dtype=torch.float32)
    pad = _pad(2, 79, (0, 10))
    _check_fast(var, q, k, v, _ctx(causal, pad=pad), DHSAParams(chunk=16, budget=0.25), tol=1e-5)
    _check_fast(var, q, k, v, _ctx(causal, pad=pad), DHSAParams(chunk=16, budget_tokens=20, sink_chunks=0,
                                                               local_chunks=2), tol=1e-5)


# ----------------------------------------------------------------------------- pyramid

@pytest.mark.parametrize("causal", [True, False])
def test_pyramid_reference_matches_triton_reference(causal):
    """Our vectorised reference and the Triton kernel's loop reference agree on the same levels."""
    from surgeon.kernels.triton_pyramid import pyramid_attention_reference

    q, k, v = _qkv(2, 4, 2, 70, nk=153) if causal else _qkv(2, 4, 2, 150)  # causal offset 83
    pad = _pad(2, k.shape[2], (0, 7))
    ctx = _ctx(causal, pad=pad)
    p = PyramidParams(block_size=16, intervals=((1, 0.0, 0.2), (2, 0.2, 0.4), (4, 0.4, 0.6), (8, 0.6, 0.9)))
    lv = assign_levels(q, k, ctx, p)
    assert {int(x) for x in lv.unique()} == {0, 1, 2, 4, 8}
    ours = Pyramid().reference(q, k, v, ctx, p)
    theirs = pyramid_attention_reference(q, k, v, lv, ctx.scale, causal, pad, block=16)
    valid = _valid_rows(ours, pad, causal)
    torch.testing.assert_close(ours[valid], theirs[valid], rtol=1e-10, atol=1e-10)
    for fused in (True, False):
        g = pyramid_gather(q, k, v, lv, ctx, 16, p.levels_used(), fused=fused)
        torch.testing.assert_close(g[valid], ours[valid], rtol=1e-10, atol=1e-10)


def test_pyramid_ln_f_correction_is_exact_for_constant_blocks():
    """A pooled block whose keys and values are all equal carries exactly the mass of its tokens."""
    b, h, n, d, bs = 1, 1, 64, 4, 16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    kb = torch.randn(n // bs, d, generator=g, dtype=torch.float64)
    vb = torch.randn(n // bs, d, generator=g, dtype=torch.float64)
    k = kb.repeat_interleave(bs, 0)[None, None]
    v = vb.repeat_interleave(bs, 0)[None, None]
    ctx = _ctx(False, kv=1, d=d)
    dense = Dense().reference(q, k, v, ctx, Dense.Params())
    for f in (2, 4, 8):
        p = PyramidParams(block_size=bs, intervals=((f, 0.0, 1.0),))
        assert bool((assign_levels(q, k, ctx, p) == f).all())
        torch.testing.assert_close(Pyramid().reference(q, k, v, ctx, p), dense)


def test_pyramid_levels_follow_rank_intervals():
    q, k, v = _qkv(1, 2, 1, 160)
    ctx = _ctx(False, kv=1)
    p = PyramidParams(block_size=16)  # PSA preset; 10 key blocks per row
    lv = assign_levels(q, k, ctx, p)
    s = pooled_queries(q, 16, False, None) @ repeat_kv(pooled_keys(k, 16, None)[0], 2).transpose(-1, -2)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    ranked = lv.gather(-1, order)[0, 0, 0].tolist()
    # ⌈.05·10⌉=1 full, ⌈.15·10⌉−1=1 at 2x, ⌈.25·10⌉−2=1 at 4x, 5−3=2 at 8x, the rest skipped
    assert ranked == [1, 2, 4, 8, 8, 0, 0, 0, 0, 0]


def test_pyramid_causal_diagonal_is_full_resolution():
    q, k, v = _qkv(1, 2, 1, 96)
    ctx = _ctx(True, kv=1)
    lv = assign_levels(q, k, ctx, PyramidParams(block_size=16, intervals=((8, 0.0, 1.0),)))
    nb = lv.shape[-1]
    assert bool((torch.diagonal(lv[0, 0]) == 1).all())
    assert bool((lv[0, 0].triu(1) == 0).all())
    assert bool((lv[0, 0].tril(-1) == 8).sum() == nb * (nb - 1) // 2)


def test_pyramid_bank_pools_real_tokens_only():
    k = torch.arange(1 * 1 * 20 * 1, dtype=torch.float64).view(1, 1, 20, 1)
    pad = torch.ones(1, 20, dtype=torch.bool)
    pad[0, :3] = False
    bank = build_bank(k, k, pad, 8, (1, 4))
    s4 = bank.start[4]
    assert bank.bias[0, s4].item() == pytest.approx(math.log(1.0))  # group [0,4): one real token (3)
    assert bank.k[0, 0, s4, 0].item() == 3.0
    assert bank.bias[0, s4 + 5].item() == float("-inf")  # group [20,24) is past Nk
    assert bank.pos[s4 + 1].item() == 7


def test_pyramid_refuses_modulation_and_float_masks():
    q, k, v = _qkv(1, 2, 1, 32)
    p = Pyramid().example_params(32, 2)
    with pytest.raises(BadInput, match="modulation"):
        Pyramid().reference(q, k, v, _ctx(True, kv=1, logit_fn=lambda z: z), p)
    with pytest.raises(BadInput, match="float attn_mask"):
        Pyramid().reference(q, k, v, _ctx(False, kv=1, attn_mask=torch.zeros(1, 1, 32, 32, dtype=q.dtype)), p)
    # a bool mask is honoured exactly under the dense preset
    am = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0)) > 0.3
    ctx = _ctx(False, kv=1, attn_mask=am)
    dense = Dense().reference(q, k, v, ctx, Dense.Params())
    torch.testing.assert_close(Pyramid().reference(q, k, v, ctx, Pyramid().degenerate_params(32)), dense)


def test_pyramid_triton_path_is_cuda_only_and_density_is_cost_weighted():
    var = Pyramid()
    q, k, v = _qkv(1, 2, 1, 64, dtype=torch.float32)
    p = PyramidParams(block_size=16, intervals=((2, 0.0, 1.0),))
    assert not var.fast_available("triton", q, _ctx(True, kv=1), p)
    # non-causal, every block at 2x: half the dense cost
    assert var.achieved_density(q, k, v, _ctx(False, kv=1), p, None) == pytest.approx(0.5)
    assert var.requested_density(p) == pytest.approx(0.5)


def test_pyramid_params_validation_and_roundtrip():
    with pytest.raises(BadInput, match="level"):
        PyramidParams(intervals=((3, 0.0, 0.5),))
    with pytest.raises(BadInput, match="lo"):
        PyramidParams(intervals=((1, -0.1, 0.5),))
    with pytest.raises(BadInput, match="non-overlapping"):
        PyramidParams(intervals=((1, 0.0, 0.5), (2, 0.4, 0.6)))
    with pytest.raises(BadInput, match="multiple of level 8"):
        PyramidParams(block_size=12, intervals=((8, 0.0, 0.5),))
    p = PyramidParams(block_size=32)
    assert PyramidParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p


# ----------------------------------------------------------------------------- knn

def _knn_brute(q, k, v, ctx, kcount, context_token):
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    kk, vv = repeat_kv(k, hq), repeat_kv(v, hq)
    out = torch.zeros(b, hq, nq, v.shape[3], dtype=q.dtype)
    real = ctx.key_padding if ctx.key_padding is not None else torch.ones(b, nk, dtype=torch.bool)
    for bi in range(b):
        for h in range(hq):
            for i in range(nq):
                pos = nk - nq + i
                allowed = [j for j in range(nk) if real[bi, j] and (j <= pos or not ctx.causal)]
                if not allowed:
                    continue
                a = torch.tensor(allowed)
                z = kk[bi, h, a] @ q[bi, h, i] * ctx.scale
                top = torch.topk(z, kcount(len(allowed))).indices
                zz, vs = z[top], vv[bi, h, a[top]]
                if context_token:
                    zz = torch.cat([zz, (q[bi, h, i] @ kk[bi, h, a].mean(0) * ctx.scale)[None]])
                    vs = torch.cat([vs, vv[bi, h, a].mean(0)[None]])
                out[bi, h, i] = torch.softmax(zz, 0) @ vs
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_knn_matches_brute_force(causal):
    q, k, v = _qkv(2, 4, 2, 30)
    pad = _pad(2, 30, (0, 4))
    ctx = _ctx(causal, pad=pad)
    var = KNN()
    p = KNNParams(frac=0.3)
    ref = _check_fast(var, q, k, v, ctx, p)
    want = _knn_brute(q, k, v, ctx, lambda n: math.ceil(0.3 * n - 1e-9), True)
    valid = _valid_rows(ref, pad, causal)
    torch.testing.assert_close(ref[valid], want[valid])
    p = KNNParams(top_k=5, context_token=False)
    ref = _check_fast(var, q, k, v, ctx, p)
    torch.testing.assert_close(ref[valid], _knn_brute(q, k, v, ctx, lambda n: min(5, n), False)[valid])


def test_knn_context_token_matters_and_ties_are_kept():
    q, k, v = _qkv(1, 2, 1, 20)
    ctx = _ctx(False, kv=1)
    dense = Dense().reference(q, k, v, ctx, Dense.Params())
    full = KNN().reference(q, k, v, ctx, KNNParams(top_k=20, context_token=True))
    assert float((full - dense).abs().max()) > 1e-3
    k2 = k.clone()
    k2[:, :, 1] = k2[:, :, 0]  # keys 0 and 1 tie for every query
    keep = KNN().keep_mask(q, k2, v, ctx, KNNParams(top_k=1, context_token=False))
    both = keep[..., 0] & keep[..., 1]
    assert bool((keep.sum(-1) == torch.where(both, 2, 1)).all())


def test_knn_chunked_path_spans_several_row_chunks():
    import surgeon.attention.knn as knn_mod

    q, k, v = _qkv(1, 3, 1, 300, nk=420, dtype=torch.float32)
    pad = _pad(1, 420, (5,))
    assert 300 > knn_mod._ROWS
    for causal in (True, False):
        _check_fast(KNN(), q, k, v, _ctx(causal, kv=1, pad=pad), KNNParams(frac=0.2), tol=1e-5)


# ----------------------------------------------------------------------------- routing

def _routing_brute(q, k, ctx, p, h, w):
    """Non-causal routing keep mask [B, N, N] built region by region."""
    b, hq, n, d = q.shape
    g = hq // k.shape[1]
    x, s = p.n_extra, p.n_win
    regions = [[] for _ in range(s * s)]
    for y in range(h):
        for xx in range(w):
            regions[(y * s // h) * s + xx * s // w].append(x + y * w + xx)
    real = ctx.key_padding if ctx.key_padding is not None else torch.ones(b, n, dtype=torch.bool)
    keep = torch.zeros(b, n, n, dtype=torch.bool)
    keep[:, :x, :] = True
    keep[:, :, :x] = True
    for bi in range(b):
        qr, kr, has = [], [], []
        for toks in regions:
            qt = [t for t in toks if real[bi, t]]
            kt = qt
            qr.append(q[bi][:, qt].mean(1) if qt else torch.zeros(hq, d, dtype=q.dtype))
            kr.append(k[bi][:, kt].mean(1) if kt else torch.zeros(k.shape[1], d, dtype=q.dtype))
            has.append(bool(kt))
        for i, toks in enumerate(regions):
            aff = []
            for j in range(len(regions)):
                score = sum(float(qr[i][hh] @ kr[j][hh // g]) for hh in range(hq)) * ctx.scale
                aff.append((-score if has[j] else math.inf, j))
            chosen = [j for sc, j in sorted(aff)[: p.topk] if sc < math.inf]
            for t in toks:
                for j in chosen:
                    keep[bi, t, regions[j]] = True
    return keep


def test_routing_matches_brute_force_on_uneven_grid():
    p = RoutingParams(grid_h=5, grid_w=7, n_extra=2, n_win=3, topk=3)
    n = 2 + 35
    q, k, v = _qkv(2, 4, 2, n)
    pad = _pad(2, n, (0, 4))
    ctx = _ctx(False, pad=pad)
    from surgeon.attention.routing import routing_keep

    got = routing_keep(q, k, ctx, p)[:, 0]
    assert torch.equal(got, _routing_brute(q, k, ctx, p, 5, 7))
    _check_fast(Routing(), q, k, v, ctx, p)


def test_routing_causal_is_per_token_and_causal():
    p = RoutingParams(grid_h=6, grid_w=6, n_extra=1, n_win=3, topk=2)
    q, k, v = _qkv(1, 4, 2, 37)
    ctx = _ctx(True)
    assert not Routing().fast_available("gather", q, ctx, p)
    from surgeon.attention.routing import route_tokens

    grid = grid_of(37, p, q.device, q.dtype)
    sel = route_tokens(q, k, ctx, p, grid)  # [1, 37, 9]
    i = 30
    qs = q[0, :, i]
    scores = []
    for r in range(9):
        js = [j for j in range(i + 1) if int(grid.reg[j]) == r]
        if not js:
            scores.append(-math.inf)
            continue
        kbar = k[0][:, js].mean(1)
        scores.append(sum(float(qs[h] @ kbar[h // 2]) for h in range(4)))
    best = sorted(range(9), key=lambda r: (-scores[r], r))[:2]
    assert set(torch.nonzero(sel[0, i]).flatten().tolist()) == {r for r in best if scores[r] > -math.inf}


def test_routing_grid_inference_and_errors():
    assert (grid_of(50, RoutingParams(n_extra=1, n_win=7), torch.device("cpu"), torch.float32).h == 7)
    g = grid_of(24, RoutingParams(grid_w=6, n_win=2, topk=1), torch.device("cpu"), torch.float32)
    assert (g.h, g.w) == (4, 6)
    with pytest.raises(BadInput, match="not a square"):
        grid_of(50, RoutingParams(n_win=2, topk=1), torch.device("cpu"), torch.float32)
    with pytest.raises(BadInput, match="n_win"):
        grid_of(16, RoutingParams(n_win=5, topk=1), torch.device("cpu"), torch.float32)
    with pytest.raises(BadInput, match="topk"):
        RoutingParams(n_win=2, topk=5)
    q, k, v = _qkv(1, 2, 1, 16, nk=20)
    with pytest.raises(BadInput, match="non-causal"):
        Routing().reference(q, k, v, _ctx(False, kv=1), RoutingParams(grid_h=4, grid_w=5, n_win=2, topk=1))


# ----------------------------------------------------------------------------- shared properties

SPARSE = [TokenTopK(), DHSA(), Pyramid(), KNN(), Routing()]
SPARSE += [get_variant(n) for n in ("head_hybrid", "token_topp", "vertical_slash")]  # single-output adaptive variants


@pytest.mark.parametrize("var", SPARSE, ids=[v.name for v in SPARSE])
def test_recorded_density_matches_achieved(var):
    n = 96
    q, k, v = _qkv(1, 6, 2, n, dtype=torch.float32)
    causal = var.name != "routing"
    ctx = _ctx(causal)
    p = var.example_params(n, 6)
    want = var.achieved_density(q, k, v, ctx, p)
    for mode in ["reference"] + [f for f in var.fast_paths() if var.fast_available(f, q, ctx, p)]:
        with use_impl(mode), recording() as rec:
            var.run(q, k, v, ctx, p)
        assert len(rec.records) == 1 and rec.records[0]["variant"] == var.name
        assert rec.records[0]["achieved"] == pytest.approx(want, rel=1e-9), mode
    if var.name != "pyramid":  # pyramid's density is cost-weighted, not a pair count
        allow = torch.ones(n, n, dtype=torch.bool).tril() if causal else torch.ones(n, n, dtype=torch.bool)
        keep = var.keep_mask(q, k, v, ctx, p) & allow
        assert want == pytest.approx(float(keep.sum()) / (6 * float(allow.sum())), rel=1e-9)


@pytest.mark.parametrize("var", SPARSE, ids=[v.name for v in SPARSE])
def test_fast_paths_decline_modulated_contexts(var):
    q, k, v = _qkv(1, 6, 2, 64, dtype=torch.float32)
    ctx = _ctx(var.name != "routing", logit_fn=lambda z: z)
    p = var.example_params(64, 6)
    assert not any(var.fast_available(f, q, ctx, p) for f in var.fast_paths())
    if var.name == "pyramid":
        return
    # the reference applies the hook: a logit edit that is the identity changes nothing
    plain = var.reference(q, k, v, _ctx(var.name != "routing"), p)
    torch.testing.assert_close(var.reference(q, k, v, ctx, p), plain)
    # and a real edit (heavy bias on key 0) shows up in the output
    edited = AttnContext(causal=ctx.causal, scale=ctx.scale, kv_heads=2,
                         logit_fn=lambda z: z + torch.where(torch.arange(z.shape[-1]) == 0, 50.0, 0.0))
    out = var.reference(q, k, v, edited, p)
    v0 = repeat_kv(v, 6)[:, :, 0:1].expand_as(out)
    assert float((out - v0).abs().max()) < 1e-3


@pytest.mark.parametrize("make,name", [
    (lambda: TokenTopKParams(top_k=-1), "top_k"), (lambda: TokenTopKParams(keep=1.5), "keep"),
    (lambda: TokenTopKParams(chunk=0), "chunk"), (lambda: TokenTopKParams(n_local=-2), "n_local"),
    (lambda: DHSAParams(budget=0.0), "budget"), (lambda: DHSAParams(chunk=0), "chunk"),
    (lambda: DHSAParams(budget_tokens=-3), "budget_tokens"), (lambda: DHSAParams(sink_chunks=-1), "sink_chunks"),
    (lambda: KNNParams(frac=0.0), "frac"), (lambda: KNNParams(top_k=-1), "top_k"),
    (lambda: KNNParams(context_token="yes"), "context_token"), (lambda: RoutingParams(n_win=0), "n_win"),
    (lambda: RoutingParams(n_extra=-1), "n_extra"), (lambda: RoutingParams(grid_h=-1), "grid_h"),
    (lambda: PyramidParams(block_size=0), "block_size"),
])
def test_bad_params_are_rejected_with_the_parameter_name(make, name):
    with pytest.raises(BadInput) as e:
        make()
    msg = str(e.value)
    assert msg.startswith(f"{name}=") and ("use" in msg or "give" in msg), msg


def test_example_params_are_sparse_at_test_lengths():
    for var in SPARSE:
        for n in (64, 96, 128):
            q, k, v = _qkv(1, 6, 2, n, dtype=torch.float32)
            causal = var.name != "routing"
            d = var.achieved_density(q, k, v, _ctx(causal), var.example_params(n, 6))
            assert 0.0 < d < 1.0, (var.name, n, d)


def test_blockwise_upsample_consistency_for_dhsa_keep_mask():
    q, k, v = _qkv(1, 4, 2, 50)
    ctx = _ctx(True)
    p = DHSAParams(chunk=8, budget=0.4)
    keep = DHSA().keep_mask(q, k, v, ctx, p)
    assert torch.equal(keep, upsample_block_mask(select_chunks(q, k, ctx, p), 50, 50, 8, 8))
