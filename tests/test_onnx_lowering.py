"""ONNX lowering of surgeon ops: one function node per op, stock onnxruntime equals PyTorch."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from surgeon.errors import BadInput
from surgeon.exporters import onnx_lowering as L
from surgeon.attention import AttnContext, all_variants, get_variant, use_impl
from surgeon.attention.base import encode_config
from surgeon.attention.dense import DenseParams
from surgeon.attention.ops import op_for
from surgeon.attention.registry import VARIANTS

HQ, HKV, D = 6, 2, 8


def _config(variant: str = "dense", params=None, kv_heads: int = HKV, site: str = "s", layer: int = 0) -> str:
    return encode_config(variant, params or DenseParams(), {"kv_heads": kv_heads, "site": site, "layer": layer})


class TinyAttention(torch.nn.Module):
    """Two attention layers written like Hugging Face Llama: q/k/v projections, K/V repeated to
    Hq heads (``repeat_kv``), key padding from ``attention_mask``; attention is ``surgeon::dense``."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        dim = HQ * D
        self.q = torch.nn.ModuleList(torch.nn.Linear(dim, HQ * D) for _ in range(layers))
        self.kv = torch.nn.ModuleList(torch.nn.Linear(dim, 2 * HKV * D) for _ in range(layers))
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3
        self.configs = [_config(site=f"layers.{i}.self_attn", layer=i) for i in range(layers)]

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        pad = attention_mask.to(torch.bool)
        h = x
        for lq, lkv, cfg in zip(self.q, self.kv, self.configs):
            q = lq(h).view(b, n, HQ, D).transpose(1, 2)
            k, v = lkv(h).view(b, n, 2 * HKV, D).transpose(1, 2).chunk(2, dim=1)
            k = k[:, :, None].expand(b, HKV, HQ // HKV, n, D).reshape(b, HQ, n, D)
            v = v[:, :, None].expand(b, HKV, HQ // HKV, n, D).reshape(b, HQ, n, D)
            o = op_for("dense")(q, k, v, pad, None, True, D ** -0.5, cfg)
            h = h + o.transpose(1, 2).reshape(b, n, HQ * D)
        return h


def _left_padded(b: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, HQ * D, generator=g)
    am = torch.ones(b, n, dtype=torch.int64)
    for i in range(1, b):
        am[i, : min(n - 1, 3 * i)] = 0  # left padding, growing with the row
    return x, am


def test_dense_export_gqa_causal_left_padding(tmp_path):
    model = TinyAttention().eval()
    example = _left_padded(2, 12, 0)
    path = tmp_path / "tiny.onnx"
    res = L.export_program(model, example, L.batch_seq_dynamic_shapes(example), path)

    assert path.exists() and res.external_data == "tiny.onnx.data" and (tmp_path / res.external_data).exists()
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    nodes = [n for n in proto.graph.node if n.domain == "surgeon"]
    assert [n.op_type for n in nodes] == ["dense", "dense"]
    funcs = [f for f in proto.functions if f.domain == "surgeon"]
    # Both sites have the same static facts (only site/layer differ): one shared overload.
    assert [(f.name, f.overload) for f in funcs] == [("dense", nodes[0].overload)] == [("dense", nodes[1].overload)]
    # The body is standard ONNX only: stock runtimes can run it.
    assert all(n.domain == "" and onnx.defs.has(n.op_type) for n in funcs[0].node)
    assert res.surgeon_nodes == {"dense": 2} and res.functions == [("surgeon", "dense", nodes[0].overload)]
    # Node keeps the op's facts for a plugin; batch and sequence axes are symbolic.
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[1].attribute}
    assert json.loads(attrs["config"])["site"] == "layers.1.self_attn" and attrs["causal"] == 1
    assert attrs["inputs"] == b"q,k,v,key_padding"
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input]
    assert dims[0][:2] == ["batch", "seq"] and dims[1] == ["batch", "seq"]

    cases = [_left_padded(3, 7, 1), _left_padded(2, 19, 2)]
    report = L.verify_onnx(path, model, cases, rtol=1e-4, atol=1e-4)
    assert len(report) == 2 and all(r["ok"] for r in report), report
    assert max(r["max_abs_err"] for r in report) < 1e-4


def _rand(shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _run_single(proto: onnx.ModelProto, feeds: dict[str, torch.Tensor]) -> np.ndarray:
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: feeds[n].numpy() for n in names})[0]


# (k heads given to the op, kv_heads in config, causal, mask kind)
CASES = [
    (HKV, HKV, True, "key_padding"),  # unrepeated GQA K/V
    (HQ, HKV, False, "bool_mask"),  # repeated K/V, explicit bool mask with a fully-masked row
    (HQ, HQ, False, "float_mask"),  # MHA, additive mask with -inf entries
    (HKV, HKV, True, "decode"),  # causal with Nq < Nk: queries are the last positions
    (HQ, HKV, False, "none"),
]


@pytest.mark.parametrize("hk,kvh,causal,kind", CASES, ids=[c[3] for c in CASES])
def test_dense_lowering_matches_op(hk, kvh, causal, kind):
    proto = None
    for b, nk, seed in ((2, 9, 0), (3, 21, 1)):  # two lengths through one model
        nq = 3 if kind == "decode" else nk
        q, k, v = _rand((b, HQ, nq, D), seed), _rand((b, hk, nk, D), seed + 10), _rand((b, hk, nk, D), seed + 20)
        if hk == HQ and kvh < HQ:  # repeated like HF: identical heads within a group
            k = k[:, :: HQ // kvh].repeat_interleave(HQ // kvh, 1)
            v = v[:, :: HQ // kvh].repeat_interleave(HQ // kvh, 1)
        feeds: dict[str, torch.Tensor] = {"q": q, "k": k, "v": v}
        kp = am = None
        if kind in ("key_padding", "decode"):
            kp = torch.ones(b, nk, dtype=torch.bool)
            kp[1, :4] = False
            feeds["key_padding"] = kp
        elif kind == "bool_mask":
            am = torch.rand(b, 1, nq, nk, generator=torch.Generator().manual_seed(seed)) > 0.3
            am[0, 0, 2] = False  # a row with no allowed key → output 0
            feeds["attn_mask"] = am
        elif kind == "float_mask":
            am = _rand((1, HQ, nq, nk), seed + 30)
            am[..., 1, :] = float("-inf")
            am[..., 3, ::2] = float("-inf")
            feeds["attn_mask"] = am
        cfg = _config(kv_heads=kvh)
        scale = 0.3
        if proto is None:
            proto = L.single_op_model("dense", cfg, causal, scale,
                                      {"q": q, "k": k, "v": v, "key_padding": kp, "attn_mask": am})
            assert [(f.domain, f.name) for f in proto.functions] == [("surgeon", "dense")]
        got = _run_single(proto, feeds)
        want = op_for("dense")(q, k, v, kp, am, causal, scale, cfg)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
        if kind == "bool_mask":
            assert np.all(got[0, :, 2] == 0)
        if kind == "float_mask":
            assert np.all(got[:, :, 1] == 0)


def test_distinct_facts_get_distinct_overloads():
    """Two dense nodes differing in scale: two overloads of surgeon::dense, each used correctly."""
    def val(name, dims, dtype=ir.DataType.FLOAT):
        return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(dims))

    q, k, v = val("q", ["B", HQ, "N", D]), val("k", ["B", HKV, "N", D]), val("v", ["B", HKV, "N", D])
    outs = []
    nodes = []
    for i, scale in enumerate((0.1, 0.5)):
        o = val(f"o{i}", ["B", HQ, "N", D])
        attrs = [ir.AttrString("config", _config(site=f"s{i}")), ir.AttrInt64("causal", 1),
                 ir.AttrFloat32("scale", scale), ir.AttrString("inputs", "q,k,v")]
        nodes.append(ir.Node("surgeon", "dense", [q, k, v], attributes=attrs, outputs=[o]))
        outs.append(o)
    model = ir.Model(ir.Graph([q, k, v], outs, nodes=nodes, opset_imports={"": 18, "surgeon": 1}, name="g"), ir_version=10)
    assert L.attach_functions(model) == {"dense": 2}
    assert len(L.surgeon_functions(model)) == 2 and nodes[0].overload != nodes[1].overload
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    tq, tk, tv = _rand((1, HQ, 5, D), 0), _rand((1, HKV, 5, D), 1), _rand((1, HKV, 5, D), 2)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"q": tq.numpy(), "k": tk.numpy(), "v": tv.numpy()})
    for g, scale in zip(got, (0.1, 0.5)):
        want = op_for("dense")(tq, tk, tv, None, None, True, scale, _config())
        np.testing.assert_allclose(g, want.numpy(), rtol=1e-4, atol=1e-5)


def test_translation_table_covers_every_variant():
    table = L.translation_table()
    assert set(table) == {op_for(n) for n in VARIANTS}
    assert "dense" in L.lowered_variants()


def test_missing_lowering_is_bad_input():
    with pytest.raises(BadInput, match="no ONNX lowering"):
        L.get_lowering("no_such_variant")


def test_verify_onnx_reports_mismatch_and_needs_two_shapes(tmp_path):
    model = TinyAttention(layers=1).eval()
    example = _left_padded(2, 8, 0)
    path = tmp_path / "one.onnx"
    L.export_program(model, example, L.batch_seq_dynamic_shapes(example), path, external_data=False)
    assert not (tmp_path / "one.onnx.data").exists()
    other = TinyAttention(layers=1).eval()
    with torch.no_grad():
        other.q[0].weight.mul_(1.5)
    cases = [_left_padded(2, 5, 3), _left_padded(1, 11, 4)]
    report = L.verify_onnx(path, other, cases)
    assert len(report) == 2 and not any(r["ok"] for r in report)
    assert all(r["mismatched"] > 0 and r["max_abs_err"] > 1e-3 for r in report)
    with pytest.raises(BadInput, match="distinct input shape"):
        L.verify_onnx(path, model, [cases[0], cases[0]])


def test_export_rejects_bad_path(tmp_path):
    model = TinyAttention(layers=1).eval()
    example = _left_padded(2, 8, 0)
    with pytest.raises(BadInput, match=r"\.onnx"):
        L.export_program(model, example, None, tmp_path / "model.bin")


def _check_single(name: str, p, causal: bool, shapes, scale: float = D ** -0.5) -> None:
    """One single-op model per call; run at each (b, nq, nk, seed) and compare with the op."""
    var = get_variant(name)
    cfg = encode_config(name, p, {"kv_heads": HKV, "site": f"t.{name}", "layer": 3})
    sess = None
    for b, nq, nk, seed in shapes:
        q, k, v = _rand((b, HQ, nq, D), seed), _rand((b, HKV, nk, D), seed + 1), _rand((b, HKV, nk, D), seed + 2)
        kp = torch.ones(b, nk, dtype=torch.bool)
        kp[-1, :5] = False  # left padding in the last row
        feeds = {"q": q, "k": k, "v": v, "key_padding": kp}
        if var.consumes_block_mask:
            ctx = AttnContext(causal=causal, scale=scale, kv_heads=HKV, key_padding=kp)
            feeds["block_mask"] = var.make_block_mask(q, k, v, ctx, p)
        if sess is None:
            proto = L.single_op_model(name, cfg, causal, scale, feeds)
            assert {(f.domain, f.name) for f in proto.functions} == {("surgeon", name)}
            assert all(n.domain == "" for f in proto.functions for n in f.node)
            onnx.checker.check_model(proto, full_check=True)
            sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        got = sess.run(None, {i.name: feeds[i.name].numpy() for i in sess.get_inputs()})
        with use_impl("reference"):
            want = op_for(name)(q, k, v, kp, None, causal, scale, cfg, feeds.get("block_mask"))
        want = list(want) if isinstance(want, (tuple, list)) else [want]
        assert len(got) == len(want) == (2 if var.produces_block_mask else 1)
        np.testing.assert_allclose(got[0], want[0].numpy(), rtol=1e-4, atol=2e-5, err_msg=f"{name} nq={nq} nk={nk}")
        for g, w in zip(got[1:], want[1:]):
            np.testing.assert_array_equal(g, w.numpy(), err_msg=f"{name} block mask nq={nq} nk={nk}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_lowering_matches_op(name, causal):
    """Every registered variant with a lowering (example params): one function, two lengths
    and batch sizes through one model, equal to the op's reference; block masks bit-equal."""
    var = get_variant(name)
    if name not in L.lowered_variants():
        pytest.skip(f"variant '{name}' has no ONNX lowering yet")
    if var.causal_only and not causal:
        pytest.skip("causal-only variant")
    layout, nk_last = _LAYOUT_CASES.get(name, (None, 57))
    p = var.example_params(64, HQ) if layout is None else var.params_from(layout)
    _check_single(name, p, causal, [(2, 48, 48, 0), (1, 64, 64, 5)])
    if causal:  # queries are the last Nq of Nk positions (chunked prefill / decode shape)
        _check_single(name, p, causal, [(2, 47, 64, 7), (1, 50, nk_last, 9)])


# Variants whose parameters fix the token layout, so one model cannot take every length: params
# that fit the lengths above, and the length used instead of 57 (routing: 8 extra tokens and an
# 8-row grid whose width follows the length; 57 leaves 49 grid tokens, no 8-row grid).
_LAYOUT_CASES = {"routing": ({"grid_h": 8, "n_extra": 8, "n_win": 4, "topk": 4}, 56)}


def _extra_params():
    """Non-default options with enough blocks/pages that selections matter (registered only)."""
    cases = {
        "block_topk": {"keep": 0.3, "block_size": 4, "head_keep": [0.1, 0.2, 0.3, 0.5, 0.7, 1.0],
                       "sink_blocks": 0, "local_blocks": 2},
        "delta": {"keep": 0.5, "page_size": 4, "q_block": 8, "sink_pages": 0, "recent_pages": 0,
                  "score_queries": 5},
        "delta_sparse": {"page_size": 4, "q_block": 8, "sink_pages": 2, "recent_pages": 1},
        "reuse": {"block_size": 4, "sink_blocks": 2, "local_blocks": 0},
        "window_sink": {"sink_tokens": 2, "window": 5},
        "head_boost": {"alpha": 1.2, "spans": [[0, 3], [30, 40]], "last_row_only": True},
        "temperature": {"beta": -1.0},
        "sink_redistribute": {"p": 0.2, "rho": 0.9, "summ": 0.05, "sinks": [0, 3], "target": [2, 30],
                              "after_target_only": False},
        "local_boost": {"gamma": 2.0, "window": 7, "decay": 0.0, "first_key": 10},
        "identity_blend": {"u": 1.0, "heads": [5]},
        # 6 (48) and 5 (41, ragged last block) blocks of 8: every level is used
        "pyramid": {"block_size": 8, "intervals": [[1, 0.0, 0.2], [2, 0.2, 0.4], [4, 0.4, 0.6], [8, 0.6, 0.85]]},
        # 6 extra tokens, then a grid 7 wide: 6x7 (48) and 5x7 (41), 3x3 regions, 2 kept
        "routing": {"grid_w": 7, "n_extra": 6, "n_win": 3, "topk": 2},
        # token/chunk selections with budgets well below the visible keys
        "token_topk": {"n_init": 2, "n_local": 3, "top_k": 0, "keep": 0.25, "chunk": 5},
        "knn": {"top_k": 5, "context_token": False},
        "dhsa": {"chunk": 4, "budget_tokens": 10, "sink_chunks": 0, "local_chunks": 2},
        "block_topp": {"p": 0.7, "head_p": [0.3, 0.5, 0.7, 0.9, 0.95, 1.0], "block_size": 4, "stride": 3,
                       "sink_blocks": 0, "local_blocks": 2, "min_blocks": 3, "max_fraction": 0.8, "dense_below": 9},
        "head_hybrid": {"kinds": ["sparse", "streaming"], "sparse": "block_topk", "keep": 0.3, "block_size": 4,
                        "sink_tokens": 2, "window": 5, "sink_blocks": 0, "local_blocks": 1},
        "token_topp": {"n_init": 2, "n_local": 3, "p": 0.6, "min_tokens": 2, "max_tokens": 9, "chunk": 5,
                       "scaled": False},
        "vertical_slash": {"n_vertical": 3, "n_slash": 4, "last_q": 3, "block_size": 8, "sink_tokens": 1, "local": 2},
    }
    return [(n, d) for n, d in sorted(cases.items()) if n in VARIANTS]


@pytest.mark.parametrize("name,params", _extra_params(), ids=[n for n, _ in _extra_params()])
def test_variant_options_match_op(name, params):
    var = get_variant(name)
    _check_single(name, var.params_from(params), True, [(2, 48, 48, 11), (1, 41, 41, 12)])


def test_block_mask_edge_exports(tmp_path):
    """A producer's block mask feeding a consumer stays an explicit edge between two function nodes."""
    lowered = set(L.lowered_variants())
    prods = [v for v in all_variants() if v.produces_block_mask and v.name in lowered]
    cons = [v for v in all_variants() if v.consumes_block_mask and v.name in lowered]
    pair = next(((a, c) for a in prods for c in cons
                 if a.block_mask_shape(torch.empty(1, 1, 64, 1), torch.empty(1, 1, 64, 1), a.example_params(64, HQ))
                 == c.block_mask_shape(torch.empty(1, 1, 64, 1), torch.empty(1, 1, 64, 1), c.example_params(64, HQ))),
                None)
    if pair is None:
        pytest.skip("no registered producer/consumer pair of block masks with a lowering")
    anchor, user = pair
    cfgs = [encode_config(v.name, v.example_params(64, HQ), {"kv_heads": HKV, "site": f"l{i}", "layer": i})
            for i, v in enumerate(pair)]

    class Chain(TinyAttention):
        def forward(self, x, attention_mask):
            b, n, _ = x.shape
            pad = attention_mask.to(torch.bool)
            h, bm = x, None
            for i, (lq, lkv) in enumerate(zip(self.q, self.kv)):
                q = lq(h).view(b, n, HQ, D).transpose(1, 2)
                k, v = lkv(h).view(b, n, 2 * HKV, D).transpose(1, 2).chunk(2, dim=1)
                if i == 0:
                    o, bm = op_for(anchor.name)(q, k, v, pad, None, True, D ** -0.5, cfgs[0])
                else:
                    o = op_for(user.name)(q, k, v, pad, None, True, D ** -0.5, cfgs[1], bm)
                h = h + o.transpose(1, 2).reshape(b, n, HQ * D)
            return h, bm

    model = Chain().eval()
    example = _left_padded(2, 40, 0)
    res = L.export_program(model, example, L.batch_seq_dynamic_shapes(example), tmp_path / "chain.onnx")
    assert res.surgeon_nodes == {anchor.name: 1, user.name: 1}
    proto = onnx.load(res.path, load_external_data=False)
    a_node, u_node = [n for n in proto.graph.node if n.domain == "surgeon"]
    assert a_node.output[1] == u_node.input[-1]  # the edge
    report = L.verify_onnx(res.path, model, [_left_padded(2, 33, 1), _left_padded(3, 70, 2)])
    assert len(report) == 4 and all(r["ok"] for r in report), report


POOLED_CASES = [
    ("pyramid", {"block_size": 8, "intervals": [[1, 0.0, 0.2], [2, 0.2, 0.4], [4, 0.4, 0.6], [8, 0.6, 0.85]]},
     [(2, 48, 48, 11), (1, 41, 41, 12)]),
    ("routing", {"grid_w": 7, "n_extra": 6, "n_win": 3, "topk": 2}, [(2, 48, 48, 11), (1, 41, 41, 12)]),
    # square grid inferred from the length: 7x7 and 6x6 after one extra token
    ("routing", {"n_extra": 1, "n_win": 3, "topk": 3}, [(2, 50, 50, 13), (3, 37, 37, 14)]),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name,params,shapes", POOLED_CASES, ids=["pyramid", "routing", "routing_square"])
def test_pooled_options_match_op(name, params, shapes, causal):
    """pyramid/routing lowerings with non-default layouts, both attention directions."""
    if name not in L.lowered_variants():
        pytest.skip(f"variant '{name}' has no ONNX lowering yet")
    _check_single(name, get_variant(name).params_from(params), causal, shapes)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name,params", [(n, p) for n, p, _ in POOLED_CASES[:2]], ids=["pyramid", "routing"])
def test_pooled_bool_attn_mask_matches_op(name, params, causal):
    """A bool attn_mask [B,1,Nq,Nk] (pyramid pools it over each group) on top of key padding."""
    if name not in L.lowered_variants():
        pytest.skip(f"variant '{name}' has no ONNX lowering yet")
    cfg = encode_config(name, get_variant(name).params_from(params), {"kv_heads": HKV, "site": "t", "layer": 0})
    sess = None
    for b, n, seed in ((2, 48, 20), (1, 41, 21)):
        q, k, v = _rand((b, HQ, n, D), seed), _rand((b, HKV, n, D), seed + 1), _rand((b, HKV, n, D), seed + 2)
        kp = torch.ones(b, n, dtype=torch.bool)
        kp[-1, :3] = False
        am = torch.rand(b, 1, n, n, generator=torch.Generator().manual_seed(seed)) > 0.1
        feeds = {"q": q, "k": k, "v": v, "key_padding": kp, "attn_mask": am}
        if sess is None:
            proto = L.single_op_model(name, cfg, causal, 0.4, feeds)
            onnx.checker.check_model(proto, full_check=True)
            sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        got = sess.run(None, {i.name: feeds[i.name].numpy() for i in sess.get_inputs()})[0]
        with use_impl("reference"):
            want = op_for(name)(q, k, v, kp, am, causal, 0.4, cfg)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=2e-5, err_msg=f"{name} n={n}")


SELECT_CASES = [
    ("token_topk", {"n_init": 2, "n_local": 3, "top_k": 0, "keep": 0.25, "chunk": 5}),
    ("token_topk", {"n_init": 0, "n_local": 0, "top_k": 3, "chunk": 1}),
    ("token_topp", {"n_init": 2, "n_local": 3, "p": 0.5, "min_tokens": 1, "chunk": 5}),
    ("vertical_slash", {"n_vertical": 2, "n_slash": 3, "last_q": 3, "block_size": 5, "sink_tokens": 1, "local": 2}),
    ("knn", {"top_k": 3, "context_token": True}),
    ("knn", {"top_k": 0, "frac": 0.2, "context_token": False}),
    ("dhsa", {"chunk": 4, "budget_tokens": 10, "sink_chunks": 0, "local_chunks": 2}),
    ("dhsa", {"chunk": 5, "budget": 0.2, "sink_chunks": 2, "local_chunks": 0}),
]


def _select_feeds(b, nq, nk, seed, kvh, mask):
    q, k, v = _rand((b, HQ, nq, D), seed), _rand((b, kvh, nk, D), seed + 1), _rand((b, kvh, nk, D), seed + 2)
    feeds = {"q": q, "k": k, "v": v}
    if mask in ("padding", "float"):
        kp = torch.ones(b, nk, dtype=torch.bool)
        for i in range(1, b):
            kp[i, : 4 * i + 1] = False  # left padding growing with the row (whole query chunks padded)
        feeds["key_padding"] = kp
    if mask == "bool":
        am = torch.rand(b, 1, nq, nk, generator=torch.Generator().manual_seed(seed)) > 0.3
        am[0, 0, min(1, nq - 1)] = False  # a row with nothing allowed → 0
        feeds["attn_mask"] = am
    if mask == "float":
        am = _rand((1, HQ, nq, nk), seed + 3)
        am[..., min(2, nq - 1), ::3] = float("-inf")
        feeds["attn_mask"] = am
    return feeds


@pytest.mark.parametrize("mask", ["padding", "bool", "float", "none"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name,params", SELECT_CASES, ids=[f"{n}{i}" for i, (n, _) in enumerate(SELECT_CASES)])
def test_select_lowerings_match_op(name, params, causal, mask):
    """token_topk/knn/dhsa with small budgets: MHA and GQA, masks of every kind, batch > 1 with
    per-row padding; then Nq < Nk, where one model with distinct Nq/Nk symbols must still read
    the query padding when the lengths turn out equal (non-causal ``query_validity``)."""
    if name not in L.lowered_variants():
        pytest.skip(f"variant '{name}' has no ONNX lowering yet")
    p = get_variant(name).params_from(params)
    scale = 0.35
    dense_gap = 0.0
    for kvh, shapes in ((HQ, [(2, 23, 23, 1), (3, 40, 40, 2)]),
                        (HKV, [(2, 17, 30, 3), (3, 24, 24, 4), (1, 1, 20, 5)])):
        cfg = encode_config(name, p, {"kv_heads": kvh, "site": "t", "layer": 0})
        dcfg = encode_config("dense", DenseParams(), {"kv_heads": kvh})
        sess = None
        for b, nq, nk, seed in shapes:
            feeds = _select_feeds(b, nq, nk, seed, kvh, mask)
            if sess is None:
                proto = L.single_op_model(name, cfg, causal, scale, feeds)
                assert all(n.domain == "" for f in proto.functions for n in f.node)
                onnx.checker.check_model(proto, full_check=True)
                sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
            got = sess.run(None, {n: t.numpy() for n, t in feeds.items()})[0]
            args = (feeds["q"], feeds["k"], feeds["v"], feeds.get("key_padding"), feeds.get("attn_mask"), causal,
                    scale)
            with use_impl("reference"):
                want = op_for(name)(*args, cfg).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5, err_msg=f"{name} {mask} nq={nq} nk={nk}")
            dense_gap = max(dense_gap, float(np.abs(op_for("dense")(*args, dcfg).numpy() - want).max()))
    assert dense_gap > 1e-2  # the selection really dropped keys


# Modulated variants composed onto a selection site (config ``modulators``), one of each edit kind.
SELECT_MODULATORS = [
    ("local_boost", {"gamma": 3.0, "window": 3, "decay": 0.5, "heads": [1, 2, 5], "first_key": 2}),
    ("temperature", {"sigma": 0.4}),
    ("sink_redistribute", {"p": 0.2, "rho": 0.9, "summ": 0.05, "sinks": [0, 3], "target": [2, 20],
                           "after_target_only": False}),
    ("identity_blend", {"u": 0.4, "heads": [0, 5]}),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name,params", [SELECT_CASES[0], SELECT_CASES[2], SELECT_CASES[4]],
                         ids=["token_topk", "knn", "dhsa"])
def test_select_lowerings_compose_modulators(name, params, causal):
    """The selection lowerings apply a site's modulators where the reference applies the hooks
    (knn: top-K over the edited logits, prob edit on the token probabilities only)."""
    if name not in L.lowered_variants():
        pytest.skip(f"variant '{name}' has no ONNX lowering yet")
    if any(m not in VARIANTS for m, _ in SELECT_MODULATORS):
        pytest.skip("a modulated variant is not registered")
    mods = [{"variant": m, "params": get_variant(m).params_from(d).to_dict()} for m, d in SELECT_MODULATORS]
    p = get_variant(name).params_from(params)
    cfg = encode_config(name, p, {"kv_heads": HKV, "site": "t", "layer": 0, "modulators": mods})
    plain = encode_config(name, p, {"kv_heads": HKV, "site": "t", "layer": 0})
    sess, moved = None, 0.0
    for b, n, seed in ((2, 32, 40), (1, 27, 41)):
        feeds = _select_feeds(b, n, n, seed, HKV, "padding")
        if sess is None:
            proto = L.single_op_model(name, cfg, causal, 0.35, feeds)
            sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        got = sess.run(None, {k: t.numpy() for k, t in feeds.items()})[0]
        args = (feeds["q"], feeds["k"], feeds["v"], feeds["key_padding"], None, causal, 0.35)
        with use_impl("reference"):
            want = op_for(name)(*args, cfg).numpy()
            moved = max(moved, float(np.abs(op_for(name)(*args, plain).numpy() - want).max()))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=3e-5, err_msg=f"{name}+modulators n={n}")
    assert moved > 1e-3  # the modulation changed the output
