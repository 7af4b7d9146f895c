"""float16 ONNX at opset 18: the function bodies type-check and run in onnxruntime (CPU) in float16.

``IsInf`` takes float16 only from opset 20, so the shared ``is_finite`` helper must not use it;
these tests build float16 single-op models at opset 18 (the exporter's default) and compare them
with the torch op run in float32 on the same (float16-rounded) inputs.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from surgeon.attention import get_variant
from surgeon.attention.base import encode_config
from surgeon.attention.ops import op_for
from surgeon.exporters import onnx_kit as K
from surgeon.exporters import onnx_lowering as L
from test_onnx_lowering import D, HKV, HQ

OPSET = 18
SCALE = D ** -0.5
RTOL = 2e-3  # float16 keeps 11 significant bits (2^-11 ≈ 4.9e-4); softmax and two matmuls add a few ulps

PARAMS = {
    "dense": {},
    "block_topk": {"keep": 0.4, "block_size": 4, "sink_blocks": 1, "local_blocks": 1},
}
SHAPES = [(2, 32, 32, 0), (1, 27, 27, 5)]  # (b, nq, nk, seed): two lengths through one model


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    onnx.checker.check_model(proto, full_check=True)  # type inference of the float16 body at opset 18
    assert all(n.domain == "" for f in proto.functions for n in f.node)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _inputs(b: int, nq: int, nk: int, seed: int):
    """float16 q/k/v and key padding whose first 4 keys of the last row are padding, so the
    causal rows 0..3 of that row see no key (their softmax max is −inf: the is_finite path)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, HQ, nq, D, generator=g).half()
    k = torch.randn(b, HKV, nk, D, generator=g).half()
    v = torch.randn(b, HKV, nk, D, generator=g).half()
    kp = torch.ones(b, nk, dtype=torch.bool)
    kp[-1, :4] = False
    return q, k, v, kp


def _op32(name: str, cfg: str, q, k, v, kp, causal: bool):
    with torch.no_grad():
        out = op_for(name)(q.float(), k.float(), v.float(), kp, None, causal, SCALE, cfg)
    return [t.numpy() for t in out] if isinstance(out, (tuple, list)) else [out.numpy()]


# (variant, block-sparse lowering mode): block_topk through both of its bodies
CASES = [("dense", "mask")] + [("block_topk", m) for m in L.LOWERING_MODES]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name,mode", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_fp16_single_op_opset18_matches_fp32_torch(name, mode, causal):
    cfg = encode_config(name, get_variant(name).params_from(PARAMS[name]), {"kv_heads": HKV, "site": "s", "layer": 0})
    sess = None
    for b, nq, nk, seed in SHAPES:
        q, k, v, kp = _inputs(b, nq, nk, seed)
        feeds = {"q": q, "k": k, "v": v, "key_padding": kp}
        if sess is None:
            proto = L.single_op_model(name, cfg, causal, SCALE, feeds, opset=OPSET, lowering=mode)
            assert {o.domain: o.version for o in proto.opset_import}[""] == OPSET
            assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
            sess = _session(proto)
        got = sess.run(None, {i.name: feeds[i.name].numpy() for i in sess.get_inputs()})
        want = _op32(name, cfg, q, k, v, kp, causal)
        assert got[0].dtype == np.float16 and got[0].shape == want[0].shape
        g32 = got[0].astype(np.float32)
        assert np.isfinite(g32).all()
        scale = float(np.abs(want[0]).max())
        np.testing.assert_allclose(g32, want[0], rtol=RTOL, atol=RTOL * scale,
                                   err_msg=f"{name} mode={mode} causal={causal} nq={nq}")
        if causal:  # rows with no visible key are exactly 0, as in torch
            assert np.all(g32[-1, :, :4] == 0) and np.all(want[0][-1, :, :4] == 0)
        for gm, wm in zip(got[1:], want[1:]):  # block selection: the same blocks as float32 torch
            np.testing.assert_array_equal(gm, wm, err_msg=f"{name} block mask nq={nq}")


@pytest.mark.parametrize("dtype", [ir.DataType.FLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE],
                         ids=["float16", "float32", "float64"])
def test_is_finite_at_opset18(dtype):
    """``is_finite`` equals ``np.isfinite`` (±inf, NaN, the largest finite values, subnormals) and
    type-checks at opset 18 for every float type onnxruntime's CPU provider runs."""
    np_dtype = {ir.DataType.FLOAT16: np.float16, ir.DataType.FLOAT: np.float32, ir.DataType.DOUBLE: np.float64}[dtype]
    fin = np.finfo(np_dtype)
    x = np.array([0.0, -0.0, 1.5, -2.0, np.inf, -np.inf, np.nan, fin.max, -fin.max, fin.tiny, fin.smallest_subnormal],
                 dtype=np_dtype)
    facts = K.LoweringFacts(variant="dense", q_heads=1, k_heads=1, kv_heads=1, inputs=("q", "k", "v"),
                            attn_mask_bool=None, self_attention=True, num_outputs=1, opset=OPSET)
    op = K.LoweringBuilder(facts)
    xin = ir.Value(name="x", type=ir.TensorType(dtype), shape=ir.Shape(["N"]))
    y = K.is_finite(op, xin)
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.BOOL), ir.Shape(["N"])
    graph = ir.Graph([xin], [y], nodes=op.nodes, opset_imports={"": OPSET}, name="is_finite")
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=10))
    assert "IsInf" not in {n.op_type for n in proto.graph.node}
    got = _session(proto).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, np.isfinite(x))
