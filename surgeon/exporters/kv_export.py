"""ONNX export of causal language models WITH a KV cache, in the form edge runtimes expect.

    from surgeon.exporters.kv_export import export_kv
    man = export_kv("smol-rw")      # → smol-rw-onnx/{model.onnx, model.onnx.data, manifest.json, tokenizer/}

CLI: ``surgeon export DIR --format onnx --kv-cache [--last-token-logits]``. The full-sequence
export (:func:`surgeon.exporters.pipeline.export_rewritten`, no cache) stays the default of
``surgeon export``; the cache export is asked for explicitly because its graph is a different
program (it rebuilds the decoder from the model's weights, see below).

The graph (prefill is ``past_sequence_length`` = 0):

    inputs   input_ids                 int64 [batch_size, sequence_length]
             attention_mask            int64 [batch_size, total_sequence_length]  (past + new; 0 = padding)
             position_ids              int64 [batch_size, sequence_length]
             past_key_values.{i}.key   float [batch_size, kv_heads, past_sequence_length, head_dim]
             past_key_values.{i}.value float [batch_size, kv_heads, past_sequence_length, head_dim]
    outputs  logits                    float [batch_size, sequence_length | 1, vocab]
             present.{i}.key           float [batch_size, kv_heads, total_sequence_length, head_dim]
             present.{i}.value         float [batch_size, kv_heads, total_sequence_length, head_dim]

(the names and the layout of onnxruntime-genai / Optimum decoder exports; ONE graph serves
prefill and decode when every site decodes as it prefills, else a prefill/decode pair, below). With
``last_token_logits`` the logits are those of the last position only (``[batch_size, 1, vocab]``):
generation needs no more, and the LM head is then computed once per sequence instead of per token.

How the graph is built: :class:`KVDecoder` is an explicit decoder forward over plain tensors —
embedding, rotary embedding at ``position_ids``, per layer RMSNorm → q/k/v projections → rope →
``K = concat(past K, new K)`` → the site's ``surgeon::<variant>`` op → o_proj → MLP, final norm,
LM head — using the model's own submodules (Llama, Mistral, Qwen2/3-style decoders). Each layer's
attention is the op the rewrite put at that site (same config string, so the same ONNX function
of domain ``surgeon``), called with the new queries and the whole cache; surgeon ops place the
queries at the last Nq of the Nk key positions, so the call is causal with the cache offset. At
prefill (past 0) it is exactly the rewritten program's call. Before export, the decoder's prefill
logits are checked against the rewritten program's (``source_check`` in the manifest; an error
raises :class:`CheckFailed`).

Decode attention (``decode``):

* ``"dense"`` (default; the decode mode ``surgeon.apply`` / ``surgeon generate`` use): decode
  steps attend densely over the whole cache. When every site is dense (the identity rewrite) the
  one graph does both; otherwise the folder holds two graphs with the same inputs and outputs,
  ``model.onnx`` (prefill: the sites' variants) and ``decode.onnx`` (dense sites), whose weights
  both live in ``model.onnx.data`` (:func:`share_weights`). ``manifest.json`` → ``kv_cache.graphs``
  names which file serves which phase;
* ``"variant"``: one graph; each site's variant also runs at decode, over the cache, with the one
  query at the last position (block-pooled selections then treat that query as its own query
  block, so decode logits are not those of the full-sequence program at that position).

Attention lowering (``attention``): ``"surgeon"`` (default) keeps every site a ``surgeon``
function of standard ops (any ONNX runtime); ``"gqa"`` sends plain dense sites through
:func:`gqa_op`, exported as onnxruntime's ``com.microsoft.GroupQueryAttention`` (its own cache
concat and attention kernel: measured faster per decode step on CPU, see
``benchmarks/bench_decode.py``). That op reads the attention mask only as per-row lengths, so a
``gqa`` export takes batches without left padding (verification then uses unpadded rows).

Verification (default on, onnxruntime CPU against the PyTorch decoder): a left-padded batch of
two at two prompt lengths (prefill, past 0), then ``decode_steps`` decode steps each fed the
previous step's ``present`` — logits and every present tensor compared with the tolerance of
:mod:`surgeon.exporters.pipeline` (``atol + rtol·max|ref|``, real tokens only).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from surgeon.errors import BadInput, CheckFailed, UnsupportedModel

log = logging.getLogger(__name__)

KV_LAYOUT = "past_key_values.{i}.key/value [batch_size, kv_heads, past_sequence_length, head_dim]"
DIM_NAMES = ("batch_size", "sequence_length", "past_sequence_length", "total_sequence_length")
DEFAULT_PREFILL_LENGTHS = (7, 19)
DEFAULT_DECODE_STEPS = 3
DECODE_FILE = "decode.onnx"
DECODE_MODES = ("dense", "variant")
_EXAMPLE = {"batch": 2, "seq": 3, "past": 5}  # sizes >= 2: torch.export specialises 0 and 1


ATTENTION_MODES = ("surgeon", "gqa")
_GQA_OP: Any = None


def gqa_op() -> Any:
    """``surgeon_kv::dense_cache_attention(q, k, v, past_k, past_v, key_padding, scale, num_heads,
    kv_heads, head_dim) -> (out, present_k, present_v)``: dense causal attention of the new queries
    over ``concat(past, new)`` (defined on first use). q [B,Hq,S,D], k/v [B,Hkv,S,D], past
    [B,Hkv,P,D], key_padding [B,P+S] bool → out [B,Hq,S,D], present [B,Hkv,P+S,D]. It exports as
    onnxruntime's ``com.microsoft.GroupQueryAttention`` (see :func:`gqa_translation`), which reads
    the key padding only as per-row lengths (``seqlens_k``): rows must not be left-padded."""
    global _GQA_OP
    if _GQA_OP is not None:
        return _GQA_OP
    import torch.nn.functional as F

    @torch.library.custom_op("surgeon_kv::dense_cache_attention", mutates_args=())
    def dense_cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
                              past_v: torch.Tensor, key_padding: torch.Tensor, scale: float, num_heads: int,
                              kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kk, vv = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        nq, nk = q.shape[2], kk.shape[2]
        causal = torch.arange(nk)[None, :] <= torch.arange(nk - nq, nk)[:, None]
        allow = causal[None, None] & key_padding.to(torch.bool)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allow, scale=scale,
                                             enable_gqa=q.shape[1] != kk.shape[1])
        out = torch.where(allow.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype))
        return out.contiguous(), kk.contiguous(), vv.contiguous()

    @dense_cache_attention.register_fake
    def _(q, k, v, past_k, past_v, key_padding, scale, num_heads, kv_heads, head_dim):
        b, h, p, d = past_k.shape
        t = p + k.shape[2]
        return q.new_empty(q.shape), past_k.new_empty((b, h, t, d)), past_v.new_empty((b, h, t, d))

    _GQA_OP = torch.ops.surgeon_kv.dense_cache_attention.default
    return _GQA_OP


def gqa_translation() -> dict[Any, Any]:
    """``custom_translation_table`` entry: :func:`gqa_op` → ``com.microsoft.GroupQueryAttention``
    (``seqlens_k`` = real keys per row − 1, ``total_sequence_length`` = the mask's length)."""
    import onnx
    from onnxscript import opset18 as op
    from onnxscript.values import Op, Opset

    S = onnx.defs.OpSchema
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length"]
    schema = S("GroupQueryAttention", "com.microsoft", 1,
               inputs=[S.FormalParameter(n, "M" if n in ("seqlens_k", "total_sequence_length") else "T")
                       for n in names],
               outputs=[S.FormalParameter(n, "T") for n in ("output", "present_key", "present_value")],
               type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
               attributes=[S.Attribute("num_heads", S.AttrType.INT, "", required=False),
                           S.Attribute("kv_num_heads", S.AttrType.INT, "", required=False),
                           S.Attribute("scale", S.AttrType.FLOAT, "", required=False)])
    gqa = Op(Opset("com.microsoft", 1), "GroupQueryAttention", schema)

    def translate(q, k, v, past_k, past_v, key_padding, scale, num_heads, kv_heads, head_dim):
        flat = op.Constant(value_ints=[0, 0, -1])
        qf = op.Reshape(op.Transpose(q, perm=[0, 2, 1, 3]), flat)
        kf = op.Reshape(op.Transpose(k, perm=[0, 2, 1, 3]), flat)
        vf = op.Reshape(op.Transpose(v, perm=[0, 2, 1, 3]), flat)
        kp = op.Cast(key_padding, to=onnx.TensorProto.INT64)
        real = op.ReduceSum(kp, op.Constant(value_ints=[1]), keepdims=0)
        seqlens = op.Cast(op.Sub(real, op.Constant(value_int=1)), to=onnx.TensorProto.INT32)
        total = op.Cast(op.Squeeze(op.Shape(kp, start=1, end=2)), to=onnx.TensorProto.INT32)
        o, pk, pv = gqa(qf, kf, vf, past_k, past_v, seqlens, total, num_heads=int(num_heads),
                        kv_num_heads=int(kv_heads), scale=float(scale))
        o4 = op.Reshape(o, op.Constant(value_ints=[0, 0, int(num_heads), int(head_dim)]))
        return op.Transpose(o4, perm=[0, 2, 1, 3]), pk, pv

    return {gqa_op(): translate}


def input_names(num_layers: int) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(num_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(num_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(num_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


# --------------------------------------------------------------------------- the decoder

@dataclass(frozen=True)
class LayerAttention:
    """What one layer's attention call is: the op, its config and the static site facts."""

    site: str
    variant: str
    config: str
    causal: bool
    scale: float
    key_padding: bool  # whether the site reads the key-padding mask
    block_mask_from: Optional[int] = None  # layer index of the anchor whose block mask it reads
    produces_block_mask: bool = False


class KVDecoder(nn.Module):
    """forward(input_ids [B,S], attention_mask [B,P+S], position_ids [B,S], past [2L × [B,Hkv,P,D]])
    → (logits [B,S|1,V], present [2L × [B,Hkv,P+S,D]]) for a Llama-style Hugging Face causal LM.

    ``past`` is flat: layer i's key at ``2i``, its value at ``2i+1``. ``attn[i]`` names layer i's op.
    """

    def __init__(self, hf: nn.Module, attn: Sequence[LayerAttention], last_token_logits: bool = False,
                 attention: str = "surgeon") -> None:
        super().__init__()
        from surgeon.attention.ops import op_for

        base = getattr(hf, "model", None)
        layers = getattr(base, "layers", None)
        needed = ("embed_tokens", "norm", "rotary_emb")
        if layers is None or any(not hasattr(base, n) for n in needed) or not hasattr(hf, "lm_head"):
            raise UnsupportedModel(f"{type(hf).__name__} is not a Llama-style decoder (model.layers, embed_tokens, "
                                   "norm, rotary_emb, lm_head)", "the KV-cache export supports Llama, Mistral and "
                                   "Qwen2/3-style causal LMs; use the full-sequence export (without --kv-cache)")
        cfg = hf.config
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and \
                getattr(cfg, "model_type", "") in ("mistral", "qwen2", "qwen3"):
            raise UnsupportedModel(f"{cfg.model_type} with a sliding window is not supported by the KV-cache export",
                                   "use the full-sequence export (without --kv-cache)")
        if len(attn) != len(layers):
            raise BadInput(f"the rewrite lists {len(attn)} sites but the model has {len(layers)} decoder layers",
                           "re-run `surgeon rewrite` for this model")
        for layer in layers:
            sa = getattr(layer, "self_attn", None)
            if sa is None or any(not hasattr(sa, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
                raise UnsupportedModel(f"{type(hf).__name__}: a decoder layer has no q/k/v/o projections",
                                       "use the full-sequence export (without --kv-cache)")
        self.hf = hf
        self.attn = list(attn)
        self.ops = [op_for(a.variant) for a in attn]
        self.last_token_logits = bool(last_token_logits)
        if attention not in ATTENTION_MODES:
            raise BadInput(f"unknown attention lowering '{attention}'", f"use one of: {', '.join(ATTENTION_MODES)}")
        # layers whose plain dense attention goes through com.microsoft.GroupQueryAttention
        self.gqa = [attention == "gqa" and a.variant == "dense" and '"modulators"' not in a.config for a in attn]
        if any(self.gqa):
            gqa_op()
        self.num_layers = len(layers)
        self.q_heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        base = self.hf.model
        b, s = input_ids.shape
        h = base.embed_tokens(input_ids)
        cos, sin = base.rotary_emb(h, position_ids)
        kp = attention_mask != 0
        present: list[torch.Tensor] = []
        produced: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(base.layers):
            sa = layer.self_attn
            spec = self.attn[i]
            resid = h
            x = layer.input_layernorm(h)
            q = sa.q_proj(x).view(b, s, self.q_heads, self.head_dim).transpose(1, 2)
            k = sa.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            v = sa.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            if hasattr(sa, "q_norm"):  # Qwen3: per-head RMSNorm before rope
                q, k = sa.q_norm(q), sa.k_norm(k)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            if self.gqa[i]:
                out, k, v = gqa_op()(q, k, v, past[2 * i], past[2 * i + 1], kp, spec.scale, self.q_heads,
                                     self.kv_heads, self.head_dim)
                present += [k, v]
                out = out.transpose(1, 2).reshape(b, s, self.q_heads * self.head_dim)
                h = resid + sa.o_proj(out)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
                continue
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            present += [k, v]
            bm = produced[spec.block_mask_from] if spec.block_mask_from is not None else None
            out = self.ops[i](q, k, v, kp if spec.key_padding else None, None, spec.causal, spec.scale,
                              spec.config, bm)
            if spec.produces_block_mask:
                out, produced[i] = out
            out = out.transpose(1, 2).reshape(b, s, self.q_heads * self.head_dim)
            h = resid + sa.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = base.norm(h)
        if self.last_token_logits:
            h = h[:, -1:, :]
        return self.hf.lm_head(h), present

    def empty_past(self, batch: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """2L zero-length cache tensors [batch, Hkv, 0, D] (the prefill's past)."""
        return [torch.zeros(batch, self.kv_heads, 0, self.head_dim, dtype=dtype) for _ in range(2 * self.num_layers)]


def layer_attention(rewritten: Any, dense: bool = False) -> list[LayerAttention]:
    """The per-layer attention calls of a loaded rewrite (:class:`surgeon.passes.rewrite.Rewritten`):
    the same op config strings the rewrite put into its program; with ``dense`` every site's
    plain dense attention instead (the decode graph of ``decode="dense"``)."""
    from surgeon.attention.registry import get_variant
    from surgeon.capture import Site
    from surgeon.passes.policy import SiteChoice
    from surgeon.passes.rewrite import site_config

    sites = [Site(**d) for d in rewritten.manifest.sites]
    index = {s.name: i for i, s in enumerate(sites)}
    modes = {n: getattr(getattr(c, "decode", None), "mode", "dense") for n, c in rewritten.policy.sites.items()}
    other = sorted(n for n, m in modes.items() if m not in (None, "dense"))
    if other:
        raise BadInput(f"site(s) {', '.join(other[:3])}{', …' if len(other) > 3 else ''} decode with "
                       f"'{modes[other[0]]}', which the KV-cache export has no ONNX lowering for (its decode steps "
                       "attend densely over the cache)", "rewrite with those sites' decode mode dense to export, or "
                       "generate in PyTorch (surgeon generate without --onnx)")
    out: list[LayerAttention] = []
    for i, site in enumerate(sites):
        if site.kind != "sdpa" or site.mask_kind == "explicit" or not site.causal:
            raise UnsupportedModel(f"site {site.name} ({site.kind}, mask {site.mask_kind}, causal {site.causal}) "
                                   "is not a causal self-attention call the KV-cache export can rebuild",
                                   "use the full-sequence export (without --kv-cache)")
        if site.layer != i:
            raise UnsupportedModel(f"site {site.name} is layer {site.layer} but the {i}-th attention call",
                                   "use the full-sequence export (without --kv-cache)")
        choice = rewritten.policy.sites.get(site.name, SiteChoice(variant="dense", reason="default"))
        if dense:
            choice = SiteChoice(variant="dense", reason="decode")
        var = get_variant(choice.variant)
        anchor = index[choice.block_mask_from] if var.consumes_block_mask else None
        out.append(LayerAttention(site=site.name, variant=choice.variant, config=site_config(site, choice),
                                  causal=True, scale=float(site.scale), key_padding="padding" in site.mask_kind,
                                  block_mask_from=anchor, produces_block_mask=bool(var.produces_block_mask)))
    return out


# --------------------------------------------------------------------------- ONNX post-processing

def _name_io(path: Path, num_layers: int) -> None:
    """Name the graph inputs/outputs (``past_key_values.{i}.key`` …) and their symbolic dims."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    ins, outs = input_names(num_layers), output_names(num_layers)
    if len(g.input) != len(ins) or len(g.output) != len(outs):
        raise CheckFailed(f"the exported graph has {len(g.input)} inputs and {len(g.output)} outputs, expected "
                          f"{len(ins)} and {len(outs)}", "report this with the model")
    renames = {vi.name: want for vi, want in zip(list(g.input) + list(g.output), ins + outs)}

    def dims(vi: Any) -> list[Any]:
        return list(vi.type.tensor_type.shape.dim)

    # Each input/output axis has a role; every symbol seen at a role takes the role's name (the
    # exporter may give equal axes of different inputs different symbols).
    roles: list[list[Optional[str]]] = [["batch_size", "sequence_length"], ["batch_size", "total_sequence_length"],
                                        ["batch_size", "sequence_length"]]
    roles += [["batch_size", None, "past_sequence_length", None]] * (2 * num_layers)
    roles += [["batch_size", "sequence_length", None]]
    roles += [["batch_size", None, "total_sequence_length", None]] * (2 * num_layers)
    symbols: dict[str, str] = {}
    for vi, names in zip(list(g.input) + list(g.output), roles):
        for d, name in zip(dims(vi), names):
            if name is not None and d.HasField("dim_param"):
                symbols.setdefault(d.dim_param, name)
    for vi, names in zip(list(g.input) + list(g.output), roles):
        for d, name in zip(dims(vi), names):
            if name is not None and d.HasField("dim_param"):
                d.dim_param = name
    for vi in g.value_info:
        for d in dims(vi):
            if d.HasField("dim_param") and d.dim_param in symbols:
                d.dim_param = symbols[d.dim_param]
    taken = {init.name for init in g.initializer} | {n.name for n in g.node}
    clash = sorted(set(renames.values()) & (taken - set(renames)))
    if clash:
        raise CheckFailed(f"graph value name(s) {clash[:3]} clash with the I/O names", "report this with the model")
    for n in g.node:
        n.input[:] = [renames.get(x, x) for x in n.input]
        n.output[:] = [renames.get(x, x) for x in n.output]
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        vi.name = renames.get(vi.name, vi.name)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    onnx.checker.check_model(str(path), full_check=True)


def graph_io(path: Union[str, os.PathLike]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) of an ONNX file as ``{name, dtype, shape}`` with symbolic dims as strings."""
    from surgeon.exporters.pipeline import _io_spec

    return _io_spec(Path(path))


# --------------------------------------------------------------------------- verification

def _prefill_inputs(batch: int, length: int, vocab: int, seed: int,
                    padding: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(5, vocab - 1), vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1 and padding:
        mask[1, : max(1, length // 5)] = 0  # left padding in the second row
    pos = torch.arange(length).expand(batch, length).contiguous()
    return ids, mask, pos


def _run_ort(sess: Any, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray],
             num_layers: int) -> list[np.ndarray]:
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for i in range(num_layers):
        feed[f"past_key_values.{i}.key"] = past[2 * i]
        feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
    return sess.run(None, feed)


def verify_kv(path: Union[str, os.PathLike], decoder: KVDecoder, *, vocab: int,
              lengths: Sequence[int] = DEFAULT_PREFILL_LENGTHS, decode_steps: int = DEFAULT_DECODE_STEPS,
              batch: int = 2, rtol: float = 1e-3, atol: float = 1e-4, progress: Any = None,
              decode_path: Optional[Union[str, os.PathLike]] = None,
              decode_decoder: Optional[KVDecoder] = None, padding: bool = True) -> list[dict[str, Any]]:
    """onnxruntime against the PyTorch decoder: per prompt length a prefill (past 0) and
    ``decode_steps`` decode steps fed each step's present (with ``decode_path`` /
    ``decode_decoder``, the decode steps run that graph / module). One row per (step, output) with the
    fields of :func:`surgeon.exporters.pipeline.compare_output` plus ``length`` (prompt),
    ``step`` (0 = prefill), ``past`` and ``output``; rows of the present tensors are summarised
    as ``present.*.key`` / ``present.*.value`` (the worst layer)."""
    import onnxruntime as ort

    from surgeon.exporters.pipeline import compare_output

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dsess = sess if decode_path is None else ort.InferenceSession(str(decode_path), providers=["CPUExecutionProvider"])
    ddec = decoder if decode_decoder is None else decode_decoder
    L = decoder.num_layers
    rows: list[dict[str, Any]] = []
    for case, n in enumerate(lengths):
        if progress is not None:
            progress(f"verifying in onnxruntime: batch {batch}, prompt {n} tokens, {decode_steps} decode steps")
        ids, mask, pos = _prefill_inputs(batch, n, vocab, seed=1000 + case, padding=padding)
        past_t = decoder.empty_past(batch)
        past_o = [t.numpy() for t in past_t]
        g = torch.Generator().manual_seed(2000 + case)
        for step in range(decode_steps + 1):
            with torch.no_grad():
                logits_t, present_t = (decoder if step == 0 else ddec)(ids, mask, pos, past_t)
            got = _run_ort(sess if step == 0 else dsess, ids.numpy(), mask.numpy(), pos.numpy(), past_o, L)
            cur = mask[:, -ids.shape[1]:].numpy() != 0  # real query rows of this step
            want_l = logits_t.numpy()
            valid = cur if want_l.shape[1] == cur.shape[1] else cur[:, -1:]
            base = {"case": case, "length": n, "step": step, "past": int(past_t[0].shape[2]), "batch": batch}
            row = dict(base, output="logits")
            row.update(compare_output(want_l, got[0], valid, rtol, atol))
            rows.append(row)
            kv_valid = mask.numpy() != 0  # [B, P+S]
            for kind, off in (("key", 0), ("value", 1)):
                worst: Optional[dict[str, Any]] = None
                for i in range(L):
                    w = present_t[2 * i + off].numpy()
                    o = got[1 + 2 * i + off]
                    # [B,H,T,D] → [B,T,H,D] so the padding mask [B,T] selects real positions
                    r = compare_output(w.transpose(0, 2, 1, 3), o.transpose(0, 2, 1, 3) if o.ndim == 4 else o,
                                       kv_valid, rtol, atol)
                    r["shape"] = list(w.shape)
                    r["layer"] = i
                    if worst is None or (not r["ok"] and worst["ok"]) or \
                            r["max_abs_err"] / max(r["tol"], 1e-30) > worst["max_abs_err"] / max(worst["tol"], 1e-30):
                        worst = r
                assert worst is not None
                rows.append(dict(base, output=f"present.*.{kind}", **worst))
            # next step: one new token per row, the greedy token of the PyTorch logits
            nxt = logits_t[:, -1].argmax(-1, keepdim=True)
            if step == 0:
                nxt = torch.randint(min(5, vocab - 1), vocab, (batch, 1), generator=g)  # not only argmax tokens
            past_t = present_t
            past_o = got[1:]
            pos = pos[:, -1:] + 1
            ids = nxt
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
    return rows


def kv_error_table(rows: list[dict[str, Any]]) -> str:
    """The verification rows as an aligned table (prompt length, step, past length, output)."""
    head = f"{'prompt':>6} {'step':>4} {'past':>5}  {'output':<18} {'max_abs_err':>11} {'max_rel_err':>11} {'tol':>9}  ok"
    lines = [head]
    for r in rows:
        lines.append(f"{r['length']:>6} {r['step']:>4} {r['past']:>5}  {r['output'][:18]:<18} {r['max_abs_err']:>11.3e} "
                     f"{r['max_rel_err']:>11.3e} {r['tol']:>9.2e}  {'yes' if r['ok'] else 'NO'}")
    return "\n".join(lines)


def source_check(decoder: KVDecoder, rewritten: Any, vocab: int, length: int = 24, rtol: float = 1e-3,
                 atol: float = 1e-4) -> dict[str, Any]:
    """The decoder's prefill logits against the rewritten program's on a left-padded batch of two
    (real tokens): the KV graph must compute what the rewrite computes."""
    from surgeon.exporters.pipeline import compare_output

    lo, hi = (rewritten.manifest.dynamic.get("input_ids", {}).get("1") or ["seq", 16, 1 << 30])[1:]
    length = max(int(lo), min(int(hi), length))
    ids, mask, pos = _prefill_inputs(2, length, vocab, seed=7)
    with torch.no_grad():
        want = rewritten.program.module()(ids, mask)
        got, _ = decoder(ids, mask, pos, decoder.empty_past(2))
    want = want.numpy()
    valid = mask.numpy() != 0
    if got.shape[1] != want.shape[1]:
        want, valid = want[:, -1:], valid[:, -1:]
    row = compare_output(want, got.numpy(), valid, rtol, atol)
    row.update(length=length, batch=2, compared="logits, real tokens")
    return row


# --------------------------------------------------------------------------- the stage

def _export_graph(decoder: KVDecoder, path: Path, vocab: int, opset: int) -> Any:
    """torch.onnx (dynamo) export of ``decoder`` to ``path`` with named I/O and dynamic axes."""
    from surgeon.exporters import onnx_lowering as L

    ex = _EXAMPLE
    ids, _, pos = _prefill_inputs(ex["batch"], ex["seq"], vocab, seed=0)
    mask = torch.ones(ex["batch"], ex["past"] + ex["seq"], dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    past = [torch.randn(ex["batch"], decoder.kv_heads, ex["past"], decoder.head_dim, generator=g)
            for _ in range(2 * decoder.num_layers)]
    D = torch.export.Dim.DYNAMIC
    dyn = {"input_ids": {0: D, 1: D}, "attention_mask": {0: D, 1: D}, "position_ids": {0: D, 1: D},
           "past": [{0: D, 2: D} for _ in past]}
    with torch.no_grad():  # gathered block-sparse bodies where a variant has one
        if not any(decoder.gqa):
            res = L.export_program(decoder, (ids, mask, pos, past), dyn, path, opset=opset, external_data=True,
                                   lowering="gather")
        else:
            res = _export_with_gqa(decoder, (ids, mask, pos, past), dyn, path, opset)
    _name_io(path, decoder.num_layers)
    return res


def _export_with_gqa(decoder: KVDecoder, example: tuple, dyn: Any, path: Path, opset: int) -> Any:
    """:func:`surgeon.exporters.onnx_lowering.export_program` with the GroupQueryAttention
    translation added to the table (surgeon ops still become ``surgeon`` functions)."""
    import warnings

    import onnx
    import onnx_ir as ir

    from surgeon.exporters import onnx_lowering as L

    table = dict(L.translation_table())
    table.update(gqa_translation())
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used")
            prog = torch.onnx.export(decoder, example, dynamic_shapes=dyn, dynamo=True, custom_translation_table=table,
                                     opset_version=opset, optimize=True, verbose=False, report=False, verify=False)
    except torch.onnx.errors.OnnxExporterError as e:  # pragma: no cover - depends on the model
        msg = str(e).strip().splitlines()
        raise BadInput(f"torch.onnx.export failed: {msg[-1] if msg else type(e).__name__}",
                       "export without --attention gqa") from e
    model = prog.model
    counts = L.attach_functions(model, lowering="gather")
    model.opset_imports["com.microsoft"] = 1
    data = f"{path.name}.data"
    ir.save(model, path, external_data=data)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckFailed(f"exported ONNX model fails onnx.checker: {first}", "export without --attention gqa") from e
    return L.ExportResult(path=str(path), external_data=data, surgeon_nodes=counts,
                          functions=L.surgeon_functions(model), opset=int(model.opset_imports.get("", opset)))


def _external_chunks(path: Path) -> tuple[Any, list[tuple[Any, str, int, int]]]:
    """The model proto (no data loaded) and its external initializers as (tensor, file, offset, length)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out = []
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        kv = {e.key: e.value for e in t.external_data}
        out.append((t, kv["location"], int(kv.get("offset", 0)), int(kv.get("length", -1))))
    return model, out


def _read(folder: Path, name: str, offset: int, length: int) -> bytes:
    with open(folder / name, "rb") as f:
        f.seek(offset)
        return f.read(length) if length >= 0 else f.read()


def share_weights(path: Path, with_path: Path) -> int:
    """Point the external initializers of ``path`` at equal tensors in ``with_path``'s data file
    (same folder), inline the few that have no twin, and delete ``path``'s own data file.
    Returns the bytes no longer stored twice."""
    import hashlib

    import onnx

    folder = path.parent
    _, base = _external_chunks(with_path)
    index: dict[tuple[int, tuple[int, ...], str], tuple[str, int, int]] = {}
    for t, loc, off, ln in base:
        digest = hashlib.sha256(_read(folder, loc, off, ln)).hexdigest()
        index[(t.data_type, tuple(t.dims), digest)] = (loc, off, ln)
    model, mine = _external_chunks(path)
    own = {loc for _, loc, _, _ in mine}
    saved = 0
    for t, loc, off, ln in mine:
        data = _read(folder, loc, off, ln)
        twin = index.get((t.data_type, tuple(t.dims), hashlib.sha256(data).hexdigest()))
        del t.external_data[:]
        if twin is None:
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = data
            continue
        saved += len(data)
        for key, val in (("location", twin[0]), ("offset", str(twin[1])), ("length", str(twin[2]))):
            e = t.external_data.add()
            e.key, e.value = key, val
        t.data_location = onnx.TensorProto.EXTERNAL
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    for loc in own - {twin_loc for twin_loc, _, _ in index.values()}:
        (folder / loc).unlink(missing_ok=True)
    onnx.checker.check_model(str(path), full_check=True)
    return saved


def _eos_ids(hf: nn.Module) -> list[int]:
    ids: list[int] = []
    for cfg in (getattr(hf, "generation_config", None), hf.config):
        e = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        if e is None:
            continue
        for x in (e if isinstance(e, (list, tuple)) else [e]):
            if int(x) not in ids:
                ids.append(int(x))
        if ids:
            break
    return ids


def export_kv(
    rewritten: Union[str, os.PathLike],
    out: Optional[Union[str, os.PathLike]] = None,
    *,
    opset: int = 18,
    verify: bool = True,
    force: bool = False,
    lengths: Sequence[int] = DEFAULT_PREFILL_LENGTHS,
    decode_steps: int = DEFAULT_DECODE_STEPS,
    last_token_logits: bool = False,
    decode: str = "dense",
    attention: str = "surgeon",
    rtol: float = 1e-3,
    atol: float = 1e-4,
    progress: Any = None,
    model: Any = None,
) -> Any:
    """Export the rewritten causal LM ``rewritten`` with a KV cache (see the module doc); returns
    the saved :class:`surgeon.exporters.pipeline.ExportManifest` (its ``kv_cache`` field describes
    the cache layout). ``model``: the already loaded :class:`surgeon.models.LoadedModel` the
    rewrite was made from (default: load ``rewrite.json``'s model; its fingerprint must match).

    Raises :class:`BadInput` (exit 2) for unusable arguments, folders or models (encoders,
    non-Llama-style decoders), :class:`CheckFailed` (exit 1) when the decoder disagrees with the
    rewritten program, and :class:`surgeon.exporters.pipeline.VerificationFailed` (exit 1) when
    onnxruntime disagrees with PyTorch. Nothing is written then.
    """
    from surgeon.artifacts import file_sha256
    from surgeon.errors import ArtifactMismatch
    from surgeon.exporters import onnx_lowering as L
    from surgeon.exporters import pipeline as P
    from surgeon.models import load as load_model
    from surgeon.passes.rewrite import load_rewritten

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    lengths = tuple(int(n) for n in lengths)
    P._check_args("onnx", opset, lengths, "fp16")
    if len(set(lengths)) < 2:
        raise BadInput(f"verification needs two or more distinct prompt lengths, got {list(lengths)}", "e.g. (7, 19)")
    if attention not in ATTENTION_MODES:
        raise BadInput(f"unknown attention lowering '{attention}'", f"use one of: {', '.join(ATTENTION_MODES)}")
    if decode not in DECODE_MODES:
        raise BadInput(f"unknown decode attention '{decode}'", f"use one of: {', '.join(DECODE_MODES)}")
    if isinstance(decode_steps, bool) or not isinstance(decode_steps, int) or decode_steps < 1:
        raise BadInput(f"decode_steps {decode_steps} must be a positive integer", "e.g. 3")
    src = Path(rewritten)
    if not src.is_dir():
        raise BadInput(f"{src} is not a folder", "give a folder written by `surgeon rewrite`")
    dest = P._resolve_out(src, out, "onnx", force)

    def say(msg: str) -> None:
        log.info(msg)
        if progress is not None:
            progress(msg)

    say(f"loading {src}")
    t0 = time.perf_counter()
    rw = load_rewritten(src)
    if rw.manifest.model_kind != "causal-lm":
        raise BadInput(f"{src} is a rewrite of a {rw.manifest.model_kind} model; a KV cache exists only for causal "
                       "language models", "export it without --kv-cache")
    lowered = L.lowered_variants()
    missing = sorted(v for v in rw.manifest.counts if v not in lowered)
    if missing:
        raise BadInput(f"variant(s) {', '.join(missing)} of this rewrite have no ONNX lowering",
                       f"rewrite those sites with a variant that has one ({', '.join(lowered)})")
    lm = model if model is not None else load_model(rw.manifest.model)
    if lm.fingerprint() != rw.manifest.model_fingerprint:
        raise ArtifactMismatch(f"{src} was made from a different {rw.manifest.model} than the one loaded",
                               "re-run `surgeon rewrite` for this model")
    hf = lm.module.hf
    attn = layer_attention(rw)
    decoder = KVDecoder(hf, attn, last_token_logits=last_token_logits, attention=attention).eval()
    dense_attn = layer_attention(rw, dense=True)
    pair = decode == "dense" and any(a.config != d.config for a, d in zip(attn, dense_attn))
    dense_decoder = KVDecoder(hf, dense_attn, last_token_logits=last_token_logits,
                              attention=attention).eval() if pair else None
    gqa = attention == "gqa"
    vocab = int(lm.config.get("vocab_size") or hf.config.vocab_size)
    seconds["load"] = time.perf_counter() - t0

    say("checking the cache decoder against the rewritten program")
    t0 = time.perf_counter()
    src_row = source_check(KVDecoder(hf, attn, last_token_logits=last_token_logits).eval() if gqa else decoder,
                           rw, vocab, rtol=rtol, atol=atol)
    if not src_row["ok"]:
        raise CheckFailed(f"the KV-cache decoder's prefill logits differ from the rewritten program's (max abs error "
                          f"{src_row['max_abs_err']:.3g} > tolerance {src_row['tol']:.3g})",
                          "this model's decoder layers are not the Llama-style layers the export rebuilds; use the "
                          "full-sequence export (without --kv-cache)")
    seconds["source_check"] = time.perf_counter() - t0

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        say(f"exporting to ONNX with a KV cache (opset {opset})")
        t0 = time.perf_counter()
        res = _export_graph(decoder, tmp / P.MODEL_FILE, vocab, opset)
        if pair:
            say("exporting the decode graph (dense attention over the cache)")
            _export_graph(dense_decoder, tmp / DECODE_FILE, vocab, opset)
            saved = share_weights(tmp / DECODE_FILE, tmp / P.MODEL_FILE)
            log.info("decode graph shares %.1f MB of weights with the prefill graph", saved / 1e6)
        in_spec, out_spec = graph_io(tmp / P.MODEL_FILE)
        seconds["export"] = time.perf_counter() - t0

        rows: list[dict[str, Any]] = []
        verified: Optional[bool] = None
        providers: list[str] = []
        if verify:
            t0 = time.perf_counter()
            rows = verify_kv(tmp / P.MODEL_FILE, decoder, vocab=vocab, lengths=lengths, decode_steps=decode_steps,
                             rtol=rtol, atol=atol, progress=say, decode_path=tmp / DECODE_FILE if pair else None,
                             decode_decoder=dense_decoder if pair else None, padding=not gqa)
            providers = ["CPUExecutionProvider"]
            verified = all(r["ok"] for r in rows)
            seconds["verify"] = time.perf_counter() - t0
            if not verified:
                bad = [r for r in rows if not r["ok"]]
                worst = max(bad, key=lambda r: r["max_abs_err"] / max(r["tol"], 1e-30))
                raise P.VerificationFailed(
                    f"onnxruntime differs from PyTorch in {len(bad)} of {len(rows)} comparisons (worst: output "
                    f"'{worst['output']}' at prompt {worst['length']}, step {worst['step']}: max abs error "
                    f"{worst['max_abs_err']:.3g} > tolerance {worst['tol']:.3g})",
                    "nothing was written; see the error table, or export with verification off to inspect the model",
                    kv_error_table(rows), rows)
        if (src / "tokenizer").is_dir():
            shutil.copytree(src / "tokenizer", tmp / "tokenizer")
        verification = {
            "enabled": bool(verify), "runtime": "onnxruntime", "providers": providers,
            "lengths": list(lengths) if verify else [], "batches": [2] if verify else [],
            "decode_steps": decode_steps if verify else 0,
            "padding": "none (GroupQueryAttention reads per-row lengths)" if gqa else "left (second row)",
            "rtol": rtol, "atol": atol, "tolerance": "max_abs_err <= atol + rtol * max|pytorch|",
            "source_check": src_row, "results": rows,
        }
        kv = {
            "layout": KV_LAYOUT, "num_layers": decoder.num_layers, "kv_heads": decoder.kv_heads,
            "q_heads": decoder.q_heads, "head_dim": decoder.head_dim, "dtype": "float32",
            "graphs": {"prefill": P.MODEL_FILE, "decode": DECODE_FILE if pair else P.MODEL_FILE},
            "decode_attention": "dense" if pair or decode == "dense" else "variant",
            "inputs": input_names(decoder.num_layers), "outputs": output_names(decoder.num_layers),
            "last_token_logits": bool(last_token_logits), "attention_mask": "past + new tokens, 1 = real, 0 = padding",
            "position_ids": "absolute positions of the new tokens", "max_positions": int(lm.max_positions),
            "eos_token_ids": _eos_ids(hf), "tokenizer": "tokenizer" if (tmp / "tokenizer").is_dir() else None,
            "prefill_variants": {a.site: a.variant for a in attn},
            "attention": attention, "gqa_layers": sum(decoder.gqa) + (sum(dense_decoder.gqa) if pair else 0),
            "batch_padding": "right padding only: com.microsoft.GroupQueryAttention takes per-row lengths, no left "
                             "padding" if gqa else "left or right padding (attention_mask)",
        }
        man = P.ExportManifest(
            model_fingerprint=rw.manifest.model_fingerprint, model=rw.manifest.model,
            model_kind=rw.manifest.model_kind, format="onnx",
            source={"folder": src.resolve().name, "rewrite_json": file_sha256(src / "rewrite.json"),
                    "files": dict(rw.manifest.files)},
            opset=res.opset, onnx=P.MODEL_FILE, external_data=res.external_data, inputs=in_spec, outputs=out_spec,
            dims={"batch_size": [1, 256], "sequence_length": [1, int(lm.max_positions)],
                  "past_sequence_length": [0, int(lm.max_positions) - 1],
                  "total_sequence_length": [1, int(lm.max_positions)]},
            vocab_size=vocab, surgeon_ops=dict(sorted(res.surgeon_nodes.items())),
            functions=[{"domain": d, "name": n, "overload": o} for d, n, o in res.functions],
            lowering="gather", verified=verified, verification=verification, kv_cache=kv, files=P._hash_files(tmp))
        man.save(tmp / P.MANIFEST_FILE, force=True)
        P._default_permissions(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds["total"] = time.perf_counter() - t_start
    man._seconds.update(seconds)
    say(f"wrote {dest}")
    return man
