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
    p = var.example_params(64, HQ)
    _check_single(name, p, causal, [(2, 48, 48, 0), (1, 64, 64, 5)])
    if causal:  # queries are the last Nq of Nk positions (chunked prefill / decode shape)
        _check_single(name, p, causal, [(2, 47, 64, 7), (1, 50, 57, 9)])


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
