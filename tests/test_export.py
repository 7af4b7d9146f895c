"""The export stage: rewritten folder → ONNX verified in onnxruntime, and the TensorRT bundle.

Models: MiniLM (the session fixture, identity rewrite) and short SmolLM2-shaped Llamas (random
weights, 9 query / 3 KV heads of 64, 2 or 5 layers: full SmolLM2 exports take minutes). The
5-layer one runs every block-sparse variant that has an ONNX lowering, wired like a recipe
(block_topk → reuse, delta → delta_sparse, window_sink).
"""
from __future__ import annotations

import importlib.util
import json
import os
import py_compile
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from surgeon.artifacts import file_sha256
from surgeon.errors import BadInput, CheckFailed
from surgeon.exporters import onnx_lowering as L
from surgeon.exporters import tensorrt as T
from surgeon.exporters.pipeline import SUPPORTED_OPSETS, ExportManifest, VerificationFailed, export_rewritten
from surgeon.passes.policy import identity_policy, policy_from_recipe
from surgeon.passes.rewrite import rewrite, save_rewritten
from surgeon.attention import AttnContext, get_variant, use_impl
from surgeon.attention.base import encode_config
from surgeon.attention.ops import op_for
from surgeon.attention.registry import VARIANTS

ROOT = Path(__file__).resolve().parents[1]

SPARSE_RECIPE = {
    "model.layers.0.self_attn": {"variant": "block_topk", "keep": 0.3, "block_size": 16},
    "model.layers.1.self_attn": {"variant": "reuse", "block_size": 16, "block_mask_from": "model.layers.0.self_attn"},
    "model.layers.2.self_attn": {"variant": "delta", "keep": 0.3, "page_size": 8, "q_block": 16, "sink_pages": 1,
                                 "recent_pages": 2, "score_queries": 8},
    "model.layers.3.self_attn": {"variant": "delta_sparse", "page_size": 8, "q_block": 16, "sink_pages": 1,
                                 "recent_pages": 2, "block_mask_from": "model.layers.2.self_attn"},
    "model.layers.4.self_attn": {"variant": "window_sink", "sink_tokens": 4, "window": 24},
}


def _tiny_llama(layers: int):
    """A SmolLM2-shaped Llama (hidden 576, 9/3 heads of 64) with random weights, captured."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from surgeon.capture import capture
    from surgeon.models import _from_hf_model

    cfg = LlamaConfig(vocab_size=512, hidden_size=576, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=1024)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(layers)
        hf = LlamaForCausalLM(cfg).eval()
    lm = _from_hf_model(f"tiny-smollm2-{layers}", "tests", hf)
    return lm, capture(lm)


def _rewritten(tmp_path_factory, name: str, lm, cap, policy) -> Path:
    return save_rewritten(tmp_path_factory.mktemp(name) / "rw", cap, rewrite(cap, policy))


@pytest.fixture(scope="module")
def tiny_dense_rw(tmp_path_factory) -> Path:
    lm, cap = _tiny_llama(2)
    pol = identity_policy(lm.fingerprint(), [s.name for s in cap.sites])
    return _rewritten(tmp_path_factory, "tiny-dense", lm, cap, pol)


@pytest.fixture(scope="module")
def tiny_sparse(tmp_path_factory):
    lm, cap = _tiny_llama(5)
    names = [s.name for s in cap.sites]
    recipe = {k: v for k, v in SPARSE_RECIPE.items() if v["variant"] in VARIANTS}
    pol = policy_from_recipe(recipe, lm.fingerprint(), names)
    return lm, cap, _rewritten(tmp_path_factory, "tiny-sparse", lm, cap, pol)


@pytest.fixture(scope="module")
def minilm_rw(tmp_path_factory, minilm, minilm_cap) -> Path:
    pol = identity_policy(minilm.fingerprint(), [s.name for s in minilm_cap.sites])
    return _rewritten(tmp_path_factory, "minilm", minilm, minilm_cap, pol)


def _no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]


def _check_files(out: Path, man: ExportManifest) -> None:
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(man.files) == on_disk
    for name, digest in man.files.items():
        assert file_sha256(out / name) == digest, name
    assert (out / "manifest.json").read_text() == man.to_json()
    assert ExportManifest.load(out / "manifest.json").to_json() == man.to_json()


# --------------------------------------------------------------------------- ONNX


def test_minilm_identity_export(minilm, minilm_rw):
    out = minilm_rw.parent / "onnx"
    man = export_rewritten(minilm_rw, out=out, lengths=(24, 80))
    _check_files(out, man)
    assert man.format == "onnx" and man.model == "minilm-l6" and man.opset == 18 and man.verified is True
    assert man.surgeon_ops == {"dense": 6} and man.external_data == "model.onnx.data"
    assert [f["domain"] for f in man.functions] == ["surgeon"]
    assert man.engine is None and man.reason is None and man.tensorrt is None
    assert man.inputs == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                          {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]}]
    assert man.outputs == [{"name": "last_hidden_state", "dtype": "float32", "shape": ["batch", "seq", 384]}]
    ver = man.verification
    assert ver["lengths"] == [24, 80] and ver["providers"] == ["CPUExecutionProvider"]
    assert [r["length"] for r in ver["results"]] == [24, 80]
    assert all(r["ok"] and r["max_abs_err"] < 1e-4 and r["compared"] == "real tokens" for r in ver["results"])
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    # a third shape (batch 3, 50 tokens, padded) through onnxruntime equals the original model
    ids = torch.randint(5, 30000, (3, 50), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, 50, dtype=torch.long)
    mask[2, :20] = 0
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = minilm.module(ids, mask).numpy()
    real = mask.numpy() != 0
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)
    _no_leftovers(out.parent)
    with pytest.raises(BadInput, match="already exists"):
        export_rewritten(minilm_rw, out=out)


def test_tiny_smollm2_dense_newest_opset_and_force_is_reproducible(tiny_dense_rw):
    out = tiny_dense_rw.parent / "onnx"
    hi = SUPPORTED_OPSETS[1]
    man = export_rewritten(tiny_dense_rw, out=out, opset=hi)
    assert man.opset == hi and man.verified and man.surgeon_ops == {"dense": 2}
    assert man.verification["lengths"] == [32, 96] and man.vocab_size == 512
    assert man.outputs[0]["name"] == "logits" and man.outputs[0]["shape"] == ["batch", "seq", 512]
    first = (out / "manifest.json").read_bytes()
    again = export_rewritten(tiny_dense_rw, out=out, opset=hi, force=True)
    assert (out / "manifest.json").read_bytes() == first  # same inputs → byte-identical artifacts
    assert again.files == man.files
    _no_leftovers(out.parent)


def test_every_lowered_sparse_variant_exports_and_bundles(tiny_sparse, tmp_path):
    lm, cap, rw = tiny_sparse
    want = {v["variant"] for v in SPARSE_RECIPE.values() if v["variant"] in VARIANTS}
    lowered = set(L.lowered_variants())
    if not want <= lowered:
        with pytest.raises(BadInput, match="no ONNX lowering"):
            export_rewritten(rw, out=tmp_path / "x")
        pytest.skip(f"variants without ONNX lowering: {sorted(want - lowered)}")
    out = tmp_path / "bundle"
    seen: list[str] = []
    man = export_rewritten(rw, fmt="tensorrt", out=out, lengths=(40, 100), progress=seen.append)
    _check_files(out, man)
    assert seen[0].startswith("loading") and seen[-1].startswith("wrote")
    assert man.verified and set(man.surgeon_ops) == want and sum(man.surgeon_ops.values()) == 5
    assert man.lowering == "gather"
    for r in man.verification["results"]:
        assert r["ok"] and r["max_abs_err"] < 1e-4, r
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    nodes = {n.op_type: n for n in proto.graph.node if n.domain == "surgeon"}
    # the anchors' block masks are explicit edges into their consumers
    assert nodes["block_topk"].output[1] in nodes["reuse"].input
    assert nodes["delta"].output[1] in nodes["delta_sparse"].input
    assert all(n.domain == "" and onnx.defs.has(n.op_type) for f in proto.functions for n in f.node)
    # TensorRT is not installed here: bundle only, engine to be built on the target
    assert man.format == "tensorrt" and man.engine is None and "TensorRT" in man.reason
    assert {"model.onnx", "model.onnx.data", "model_trt.onnx", "build_engine.py", "README.txt",
            "plugins/surgeon_qdp.py", "plugins/surgeon_runtime.py"} <= set(man.files)
    assert "build_engine.py" in (out / "README.txt").read_text()
    _check_trt_model(out, man)
    _check_plugin_module(out, man)
    for script in ("build_engine.py", "plugins/surgeon_qdp.py", "plugins/surgeon_runtime.py"):
        py_compile.compile(str(out / script), doraise=True)
    # the build script stops with exit 2 and a clear message where TensorRT is missing
    from surgeon.exporters.trt_plugins import build_engine as B

    assert B.main(["--bundle", str(out)]) == B.EXIT_USAGE
    shapes = B.profile_shapes(json.loads((out / "manifest.json").read_text()), {"seq": (16, 64, 256)})
    assert shapes == {"input_ids": [[1, 16], [1, 64], [8, 256]], "attention_mask": [[1, 16], [1, 64], [8, 256]]}


def _check_trt_model(out: Path, man: ExportManifest) -> None:
    """model_trt.onnx: surgeon nodes are plugin nodes fed int32 masks; graph wiring intact."""
    proto = onnx.load(str(out / "model_trt.onnx"), load_external_data=False)
    assert not [f for f in proto.functions if f.domain == "surgeon"]
    plugins = {p["id"].split("::")[1]: p for p in man.tensorrt["plugins"]}
    assert set(plugins) == {"block_topk_qkvp", "reuse_qkvpb", "delta_qkvp", "delta_sparse_qkvpb", "window_sink_qkvp"}
    produced = {i.name for i in proto.graph.input} | {i.name for i in proto.graph.initializer}
    cast_to = {}
    for n in proto.graph.node:
        assert all(x in produced for x in n.input if x), f"{n.name} reads a value not yet produced"
        assert not (set(n.output) & produced), f"{n.name} redefines a value"
        produced |= set(n.output)
        if n.op_type == "Cast":
            cast_to[n.output[0]] = onnx.helper.get_attribute_value(n.attribute[0])
        if n.domain == "surgeon":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert n.op_type in plugins and attrs["plugin_namespace"] == b"surgeon"
            names = attrs["inputs"].decode().split(",")
            for name, x in zip(names, n.input):
                if name in ("key_padding", "block_mask"):
                    assert cast_to.get(x) == onnx.TensorProto.INT32
    assert [o.name for o in proto.graph.output] == ["logits"]
    ext = {e.value for i in proto.graph.initializer for e in i.external_data if e.key == "location"}
    assert ext == {"model.onnx.data"}  # shares the weights of model.onnx


def _check_plugin_module(out: Path, man: ExportManifest) -> None:
    """The generated registrations import without TensorRT and refuse to register."""
    spec = importlib.util.spec_from_file_location("surgeon_qdp_under_test", out / "plugins" / "surgeon_qdp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.PLUGINS == [p["id"] for p in man.tensorrt["plugins"]]
    for p in man.tensorrt["plugins"]:
        assert callable(getattr(mod, f"_register_{p['id'].split('::')[1]}"))
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(RuntimeError, match="TensorRT"):
            mod.register()
    assert mod._blocks(encode_config("delta", get_variant("delta").example_params(64, 9), {})) == (16, 8)


# --------------------------------------------------------------------------- errors


def test_bad_inputs_fail_before_any_work(tmp_path, tiny_dense_rw):
    with pytest.raises(BadInput, match="not a surgeon rewrite"):
        export_rewritten(tmp_path, out=tmp_path.parent / "never")
    with pytest.raises(BadInput, match="not a folder"):
        export_rewritten(tmp_path / "missing")
    lo, hi = SUPPORTED_OPSETS
    for opset in (lo - 1, hi + 1):
        with pytest.raises(BadInput, match=f"from {lo} to {hi}"):
            export_rewritten(tiny_dense_rw, out=tmp_path / "o", opset=opset)
    with pytest.raises(BadInput, match="onnx, tensorrt"):
        export_rewritten(tiny_dense_rw, fmt="tflite", out=tmp_path / "o")
    with pytest.raises(BadInput, match="overlaps"):
        export_rewritten(tiny_dense_rw, out=tiny_dense_rw / "onnx")
    with pytest.raises(BadInput, match="two or more distinct"):
        export_rewritten(tiny_dense_rw, out=tmp_path / "o", lengths=(32, 32))
    with pytest.raises(BadInput, match="outside the model's sequence range 16..1024"):
        export_rewritten(tiny_dense_rw, out=tmp_path / "o", lengths=(32, 4096))
    assert not (tmp_path / "o").exists()
    _no_leftovers(tmp_path)


def test_variant_without_lowering_is_bad_input_before_export(tiny_sparse, tmp_path, monkeypatch):
    """Every registered variant has a lowering today; a variant without one (a new plugin variant)
    must be refused before any export work: simulated by unregistering window_sink's lowering."""
    lm, cap, _ = tiny_sparse
    name = "window_sink"
    monkeypatch.setattr(get_variant(name), "lowerings", lambda: {})
    assert name not in L.lowered_variants()
    site = cap.sites[0]
    params = get_variant(name).example_params(64, site.heads).to_dict()
    pol = policy_from_recipe({site.name: {"variant": name, **params}}, lm.fingerprint(), [s.name for s in cap.sites])
    rw = save_rewritten(tmp_path / "rw", cap, rewrite(cap, pol))
    with pytest.raises(BadInput, match=f"{name} of this rewrite have no ONNX lowering"):
        export_rewritten(rw, out=tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
    _no_leftovers(tmp_path)


def test_failed_comparison_is_check_failed_with_table_and_writes_nothing(tiny_dense_rw, tmp_path, monkeypatch):
    real_run = ort.InferenceSession.run

    def off_by_one(self, output_names, feed, *a, **kw):  # a runtime that disagrees with PyTorch
        return [o + 1.0 for o in real_run(self, output_names, feed, *a, **kw)]

    monkeypatch.setattr(ort.InferenceSession, "run", off_by_one)
    out = tmp_path / "onnx"
    with pytest.raises(VerificationFailed) as ei:
        export_rewritten(tiny_dense_rw, out=out)
    e = ei.value
    assert isinstance(e, CheckFailed) and e.exit_code == 1
    assert "2 of 2 comparisons" in e.problem and "logits" in e.problem
    assert e.table.splitlines()[0].split()[:3] == ["batch", "length", "output"]
    assert len(e.table.splitlines()) == 3 and all(line.endswith("NO") for line in e.table.splitlines()[1:])
    assert all(abs(r["max_abs_err"] - 1.0) < 1e-3 for r in e.rows)
    assert not out.exists()
    _no_leftovers(tmp_path)


# --------------------------------------------------------------------------- lowerings and plugin runtime


@pytest.mark.parametrize("name", [n for n in L.gathered_variants() if n in VARIANTS])
def test_gathered_lowering_equals_token_mask_lowering_and_op(name):
    """The gathered bodies give the op's outputs (block masks bit-equal) for causal and
    bidirectional sites, GQA, left padding, ragged blocks and Nq < Nk."""
    hq, hkv, d = 6, 2, 8
    var = get_variant(name)
    p = var.example_params(64, hq)
    for causal in (True, False):
        cfg = encode_config(name, p, {"kv_heads": hkv, "site": "t", "layer": 0})
        protos = {}
        shapes = [(2, 45, 45, 0), (1, 64, 64, 1)] + ([(2, 33, 70, 2)] if causal else [])
        for b, nq, nk, seed in shapes:
            g = torch.Generator().manual_seed(seed)
            q, k, v = (torch.randn(b, h, n, d, generator=g) for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))
            kp = torch.ones(b, nk, dtype=torch.bool)
            kp[-1, :7] = False
            feeds = {"q": q, "k": k, "v": v, "key_padding": kp}
            if var.consumes_block_mask:
                ctx = AttnContext(causal=causal, scale=0.3, kv_heads=hkv, key_padding=kp)
                feeds["block_mask"] = var.make_block_mask(q, k, v, ctx, p).reshape(b, -1)
            with use_impl("reference"):
                want = op_for(name)(q, k, v, kp, None, causal, 0.3, cfg, feeds.get("block_mask"))
            want = list(want) if isinstance(want, (tuple, list)) else [want]
            for mode in L.LOWERING_MODES:
                if (mode, nq == nk) not in protos:
                    protos[(mode, nq == nk)] = L.single_op_model(name, cfg, causal, 0.3, feeds, lowering=mode)
                sess = ort.InferenceSession(protos[(mode, nq == nk)].SerializeToString(),
                                            providers=["CPUExecutionProvider"])
                got = sess.run(None, {i.name: feeds[i.name].numpy() for i in sess.get_inputs()})
                np.testing.assert_allclose(got[0], want[0].numpy(), rtol=1e-4, atol=2e-5,
                                           err_msg=f"{name} {mode} causal={causal} nq={nq} nk={nk}")
                for gm, wm in zip(got[1:], want[1:]):
                    np.testing.assert_array_equal(gm.reshape(wm.shape), wm.numpy())
    # the modes really are two bodies, and the default one is the token-mask body
    bodies = {m: [[n.op_type for n in f.node] for f in protos[(m, True)].functions] for m in L.LOWERING_MODES}
    assert bodies["gather"] != bodies["mask"]
    assert L.get_lowering(name) is var.lowerings()["mask"]
    assert L.get_lowering(name, "gather") is var.lowerings()["gather"]


def test_plugin_runtime_computes_the_op_from_int32_masks():
    """surgeon_runtime.compute (the TensorRT plugins' body) on CPU: int32 padding/block masks in,
    int32 flattened block mask out, same values as the op."""
    from surgeon.exporters.trt_plugins.surgeon_runtime import compute

    hq, hkv, d, n = 6, 2, 16, 48
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, d, generator=g) for h in (hq, hkv, hkv))
    kp = torch.ones(2, n, dtype=torch.bool)
    kp[1, :9] = False
    bt = get_variant("block_topk")
    cfg = encode_config("block_topk", bt.example_params(n, hq), {"kv_heads": hkv, "site": "a", "layer": 0})
    out, mask = compute("block_topk", {"q": q, "k": k, "v": v, "key_padding": kp.to(torch.int32)}, cfg, True, 0.25)
    w_out, w_mask = op_for("block_topk")(q, k, v, kp, None, True, 0.25, cfg)
    assert mask.dtype == torch.int32 and mask.shape == w_mask.reshape(2, -1).shape
    assert torch.equal(mask.bool(), w_mask.reshape(2, -1)) and torch.allclose(out, w_out, atol=1e-6)
    rcfg = encode_config("reuse", get_variant("reuse").params_from({"block_size": 16}), {"kv_heads": hkv})
    (r_out,) = compute("reuse", {"q": q, "k": k, "v": v, "key_padding": kp.to(torch.int32), "block_mask": mask},
                       rcfg, True, 0.25)
    w = op_for("reuse")(q, k, v, kp, None, True, 0.25, rcfg, w_mask.reshape(2, -1))
    assert torch.allclose(r_out, w, atol=1e-6)


_TRITON_SCRIPT = r"""
import json, torch
from surgeon.exporters.trt_plugins import surgeon_runtime as R
import surgeon.kernels.dispatch as dispatch
import surgeon.kernels.triton_blocksparse as tbs
from surgeon.kernels.triton_common import interpreter_active, kernel_supports
from surgeon.attention import get_variant, use_impl
from surgeon.attention.base import encode_config
from surgeon.attention.ops import op_for
calls = []
real = tbs.blocksparse_attention
def spy(*a, **kw):
    calls.append(1)
    return real(*a, **kw)
tbs.blocksparse_attention = spy
# stand in for a CUDA device: the interpreter runs the kernel on CPU tensors
dispatch.triton_eligible = lambda q, k, v, qb, kb: qb == kb and kernel_supports(q, k, v, qb)
hq, hkv, d, n = 4, 2, 16, 40
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, h, n, d, generator=g) for h in (hq, hkv, hkv))
kp = torch.ones(2, n, dtype=torch.bool); kp[1, :6] = False
cfg = encode_config("block_topk", get_variant("block_topk").example_params(n, hq), {"kv_heads": hkv})
rcfg = encode_config("reuse", get_variant("reuse").params_from({"block_size": 16}), {"kv_heads": hkv})
tri = R.compute("block_topk", {"q": q, "k": k, "v": v, "key_padding": kp.to(torch.int32)}, cfg, True, 0.25)
n_topk = len(calls)
with use_impl("reference"):
    w_out, w_mask = op_for("block_topk")(q, k, v, kp, None, True, 0.25, cfg)
    w_r = op_for("reuse")(q, k, v, kp, None, True, 0.25, rcfg, w_mask)
n0 = len(calls)
tri_r = R.compute("reuse", {"q": q, "k": k, "v": v, "key_padding": kp.to(torch.int32),
                            "block_mask": w_mask.to(torch.int32)}, rcfg, True, 0.25)
n_reuse = len(calls) - n0
print(json.dumps({"interpreter": interpreter_active(), "ran": n_topk >= 1 and n_reuse >= 1,
                  "out": float((tri[0] - w_out).abs().max()),
                  "mask": bool(torch.equal(tri[1].bool().reshape(w_mask.shape), w_mask)),
                  "reuse": float((tri_r[0] - w_r).abs().max())}))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_plugin_runtime_triton_path_under_interpreter():
    """block_topk/reuse plugins run the op, whose dispatch reaches the Triton block-sparse kernel;
    on the CPU it runs under TRITON_INTERPRET=1 (set before triton is imported, hence a
    subprocess) with the dispatcher's CUDA check standing in for a GPU."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["interpreter"] and r["ran"] and r["mask"]
    assert r["out"] < 2e-5 and r["reuse"] < 2e-5


def test_plugin_source_and_names():
    specs = [{"id": "surgeon::dense_qkv", "op": "dense_qkv", "variant": "dense", "inputs": ["q", "k", "v"],
              "num_outputs": 1},
             {"id": "surgeon::block_topk_qkvp", "op": "block_topk_qkvp", "variant": "block_topk",
              "inputs": ["q", "k", "v", "key_padding"], "num_outputs": 2}]
    src = T.plugin_source(specs)
    compile(src, "surgeon_qdp.py", "exec")
    assert '@trtp.register("surgeon::block_topk_qkvp")' in src and '@trtp.impl("surgeon::dense_qkv")' in src
    assert "-> Tuple[trtp.TensorDesc, trtp.TensorDesc]" in src and "_mask_desc(q, k, config)" in src
    assert T.plugin_name("reuse", ["q", "k", "v", "key_padding", "block_mask"]) == "reuse_qkvpb"
    assert T.default_profile({"batch": (1, 256), "seq": (16, 8192)}) == {"batch": [1, 1, 8], "seq": [16, 512, 4096]}
