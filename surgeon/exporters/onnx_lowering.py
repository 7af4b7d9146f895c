"""ONNX lowering of ``surgeon::`` ops: one ONNX *function* per op, standard ops in the body.

Every ``surgeon::<variant>`` call in the graph exports as ONE node of domain ``surgeon`` and
op_type ``<variant>``, calling a local ``FunctionProto`` (domain ``surgeon``, name ``<variant>``)
whose body is standard ONNX ops. Stock onnxruntime runs the body; a runtime that knows the op
(e.g. a TensorRT plugin named ``<variant>``) may replace the node instead of inlining it.

How it works (three steps):

1. :func:`translation_table` maps each registered variant's OpOverload to a translator. The
   dynamo exporter calls it once per op; it emits one *placeholder* node ``surgeon::<variant>``
   whose inputs are the present tensors among (q, k, v, key_padding, attn_mask, block_mask)
   and whose attributes are ``config`` (the op's JSON), ``causal`` (int), ``scale`` (float) and
   ``inputs`` (comma-separated names of the present inputs, so a plugin can bind them).
2. :func:`attach_functions` builds, for every placeholder, the function body from the
   variant's lowering (looked up in :data:`_LOWERINGS`, see :func:`register_lowering`; a
   variant class may instead carry a callable ``onnx_lowering`` attribute) and points the node
   at it. The body depends on static facts (parameters, causal, scale, head counts, which
   optional inputs are present), so each distinct body is an *overload* of the function
   (ONNX IR >= 10, ``FunctionProto.overload``); sites with equal facts share one.
3. :func:`export_program` runs the exporter with that table, attaches the functions, saves
   (weights as external data) and runs ``onnx.checker.check_model(full_check=True)``.

Why functions are attached after export: the dynamo exporter records a (non-traceable)
onnxscript function called from a translator as a function node, but its ``optimize`` step
(``onnxscript.optimizer.optimize_ir``, ``inline=True``) then inlines every model-local
function. Placeholders are opaque to the optimizer, so exporting with ``optimize=True`` and
adding the functions afterwards keeps both the optimised graph and the function boundary.

Lowering contract: ``lower(op, q, k, v, key_padding, attn_mask, causal, scale, config,
block_mask)`` where ``op`` is a :class:`LoweringBuilder` (``op.MatMul(a, b)`` records a node;
``op.facts`` gives head counts), the tensors are function-body :class:`onnx_ir.Value` (or
None when absent), k/v already have ``op.facts.kv_heads`` heads (repeated K/V are sliced
``k[:, ::Hq/Hkv]`` before the lowering runs, exactly as the torch op does), ``config`` is the
op's JSON string (parse with :func:`surgeon.attention.ops.parse_config`). It returns out
``[B,Hq,Nq,Dv]`` (and the block mask ``[B,Hq,nqb,nkb]`` bool for producers).

Modulators: a config may list ``modulators`` (modulated variants composed onto the site's
variant; the torch op puts their hooks into AttnContext with ``compose_modulators``). A
lowering composes them by calling :func:`modulator_edits` and applying the returned
:class:`Edits` where its variant's reference applies ``ctx.logit_fn``/``prob_fn``/``out_fn``
(usually ``attention(..., **edits.kwargs())``). :func:`build_function` refuses (BadInput,
naming site, variant and modulators) a config with modulators whose lowering did not call
:func:`modulator_edits`, so a modulated site is never exported without its modulation.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import onnx
import onnx_ir as ir
import torch

from surgeon.errors import BadInput, CheckFailed
from surgeon.attention.ops import op_for, parse_config
from surgeon.attention.registry import VARIANTS, get_variant

DOMAIN = "surgeon"
DOMAIN_VERSION = 1
INPUT_NAMES = ("q", "k", "v", "key_padding", "attn_mask", "block_mask")
_SITE_KEYS = ("site", "layer")  # static facts that never change a function body
_INT64_MAX = 2**63 - 1
_MAX_PROTO_BYTES = 2**31 - 1

LoweringFn = Callable[..., Union[ir.Value, tuple[ir.Value, ir.Value]]]
_LOWERINGS: dict[str, LoweringFn] = {}


# --------------------------------------------------------------------------- registry

def register_lowering(name: str) -> Callable[[LoweringFn], LoweringFn]:
    """Decorator: register ``fn`` as the ONNX lowering of variant ``name`` (see module doc)."""

    def deco(fn: LoweringFn) -> LoweringFn:
        _LOWERINGS[name] = fn
        return fn

    return deco


def get_lowering(name: str) -> LoweringFn:
    """The lowering for variant ``name``: the registry here, else the class's ``onnx_lowering``."""
    if name in _LOWERINGS:
        return _LOWERINGS[name]
    if name in VARIANTS:
        fn = getattr(get_variant(name), "onnx_lowering", None)
        if callable(fn):
            return fn
    raise BadInput(
        f"variant '{name}' has no ONNX lowering",
        f"register one with @register_lowering('{name}') in surgeon/exporters/onnx_lowering.py "
        f"(lowerings exist for: {', '.join(sorted(_LOWERINGS))})",
    )


def lowered_variants() -> list[str]:
    """Names of the registered variants that have an ONNX lowering."""
    out = []
    for name in sorted(VARIANTS):
        try:
            get_lowering(name)
        except BadInput:
            continue
        out.append(name)
    return out


# --------------------------------------------------------------------------- builder

@dataclasses.dataclass(frozen=True)
class LoweringFacts:
    """Static facts a lowering may use (all part of the function overload's identity)."""

    variant: str
    q_heads: int
    k_heads: int  # heads of the k/v given to the op (Hq when the graph repeated K/V)
    kv_heads: int  # heads after un-repeating (what the lowering sees)
    inputs: tuple[str, ...]  # present inputs, in INPUT_NAMES order
    attn_mask_bool: Optional[bool]  # None: no attn_mask
    self_attention: bool  # q and k share the sequence axis (same symbolic or static length)
    num_outputs: int
    opset: int


class LoweringBuilder(ir.tape.Tape):
    """Records standard-ONNX nodes of one function body: ``op.Add(a, b)``, ``op.Shape(x, start=2)``.

    ``op.<OpType>(*inputs, **attributes)`` records a node of the default domain and returns
    its output value (a tuple when called with ``_outputs=n``, n > 1). Helpers below build
    constants. ``site`` names the (first) site the body is built for, for error messages only;
    ``modulators_applied`` is set by :func:`modulator_edits` (see :func:`build_function`).
    """

    def __init__(self, facts: LoweringFacts, site: str = "") -> None:
        super().__init__()
        self.facts = facts
        self.site = site
        self.modulators_applied = False
        self._consts: dict[tuple, ir.Value] = {}
        self._memo: dict[tuple, Any] = {}

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        if op_type.startswith("_") or not op_type[:1].isupper():
            raise AttributeError(op_type)

        def make(*inputs: Optional[ir.Value], _outputs: int = 1, **attributes: Any) -> Any:
            if _outputs == 1:
                return self.op(op_type, list(inputs), attributes=attributes or None)
            return tuple(self.op_multi_out(op_type, list(inputs), attributes=attributes or None,
                                           num_outputs=_outputs))

        return make

    def ints(self, values: Sequence[int]) -> ir.Value:
        """1-D int64 constant (shared within the body)."""
        key = ("ints", tuple(int(x) for x in values))
        if key not in self._consts:
            self._consts[key] = self.Constant(value_ints=list(key[1]))
        return self._consts[key]

    def int_scalar(self, value: int) -> ir.Value:
        """0-D int64 constant (shared within the body)."""
        key = ("int", int(value))
        if key not in self._consts:
            self._consts[key] = self.Constant(value_int=int(value))
        return self._consts[key]

    def scalar(self, value: float, like: ir.Value) -> ir.Value:
        """0-D constant with the element type of ``like`` (via CastLike)."""
        return self.CastLike(self.Constant(value_float=float(value)), like)

    def memo(self, key: tuple, make: Callable[[], Any]) -> Any:
        """``make()`` once per ``key`` within this body (for shared sub-expressions)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def dims(self, x: ir.Value, start: int, end: Optional[int] = None) -> ir.Value:
        """``Shape(x)[start:end]`` as 1-D int64."""
        if end is None:
            return self.Shape(x, start=start)
        return self.Shape(x, start=start, end=end)

    def dim(self, x: ir.Value, axis: int) -> ir.Value:
        """``Shape(x)[axis]`` as a 0-D int64."""
        return self.Squeeze(self.Shape(x, start=axis, end=axis + 1), self.ints([0]))


# --------------------------------------------------------------------------- shared pieces

def gqa_scores(op: LoweringBuilder, q: ir.Value, k: ir.Value) -> ir.Value:
    """``q @ k^T`` with GQA broadcasting: q [B,Hq,Nq,D], k [B,Hkv,Nk,D] → [B,Hq,Nq,Nk].

    Query head h reads KV head h // (Hq/Hkv): q is viewed as [B,Hkv,rep,Nq,D] and k as
    [B,Hkv,1,D,Nk] so K is never materialised per query head.
    """
    hq, hkv = op.facts.q_heads, op.facts.kv_heads
    kt = op.Transpose(k, perm=[0, 1, 3, 2])
    if hq == hkv:
        return op.MatMul(q, kt)
    rep = hq // hkv
    q5 = op.Reshape(q, op.Concat(op.dims(q, 0, 1), op.ints([hkv, rep]), op.dims(q, 2), axis=0), allowzero=1)
    z5 = op.MatMul(q5, op.Unsqueeze(kt, op.ints([2])))
    return op.Reshape(z5, op.Concat(op.dims(q, 0, 2), op.dims(z5, 3), axis=0), allowzero=1)


def gqa_apply(op: LoweringBuilder, p: ir.Value, v: ir.Value) -> ir.Value:
    """``p @ v`` with GQA broadcasting: p [B,Hq,Nq,Nk], v [B,Hkv,Nk,Dv] → [B,Hq,Nq,Dv]."""
    hq, hkv = op.facts.q_heads, op.facts.kv_heads
    if hq == hkv:
        return op.MatMul(p, v)
    rep = hq // hkv
    p5 = op.Reshape(p, op.Concat(op.dims(p, 0, 1), op.ints([hkv, rep]), op.dims(p, 2), axis=0), allowzero=1)
    o5 = op.MatMul(p5, op.Unsqueeze(v, op.ints([2])))
    return op.Reshape(o5, op.Concat(op.dims(p, 0, 2), op.dims(o5, 3), axis=0), allowzero=1)


def positions(op: LoweringBuilder, q: ir.Value, k: ir.Value) -> tuple[ir.Value, ir.Value]:
    """Absolute positions, int64: queries [Nq] = Nk-Nq … Nk-1 (the last Nq), keys [Nk] = 0 … Nk-1.

    Built from Shape/Range so both sequence axes stay dynamic.
    """

    def make() -> tuple[ir.Value, ir.Value]:
        nq, nk = op.dim(q, 2), op.dim(k, 2)
        one = op.int_scalar(1)
        return op.Range(op.Sub(nk, nq), nk, one), op.Range(op.int_scalar(0), nk, one)

    return op.memo(("positions", id(q), id(k)), make)


def causal_mask(op: LoweringBuilder, q: ir.Value, k: ir.Value) -> ir.Value:
    """Bool [Nq, Nk]: key j allowed for query i iff j <= (Nk - Nq) + i (queries are the last Nq)."""
    qpos, kpos = positions(op, q, k)
    return op.LessOrEqual(op.Unsqueeze(kpos, op.ints([0])), op.Unsqueeze(qpos, op.ints([1])))


def is_finite(op: LoweringBuilder, x: ir.Value) -> ir.Value:
    """Bool, same shape: neither inf nor NaN (``torch.isfinite``).

    ``x − x`` is 0 for finite x and NaN for ±inf or NaN, so one IsNaN decides. (``IsInf``
    takes float16/bfloat16 only from opset 20; Sub and IsNaN(13) take every float type at
    opset 18, and onnxruntime's CPU provider runs them in float16.)
    """
    return op.Not(op.IsNaN(op.Sub(x, x)))


def repeat_heads(op: LoweringBuilder, x: ir.Value) -> ir.Value:
    """[B,Hkv,N,D] → [B,Hq,N,D], query head h reading KV head h // (Hq/Hkv) (``repeat_kv``)."""
    hq, hkv = op.facts.q_heads, op.facts.kv_heads
    if hq == hkv:
        return x
    x5 = op.Expand(op.Unsqueeze(x, op.ints([2])), op.ints([1, 1, hq // hkv, 1, 1]))
    return op.Reshape(x5, op.Concat(op.dims(x, 0, 1), op.ints([hq]), op.dims(x, 2), axis=0), allowzero=1)


def head_vector(op: LoweringBuilder, values: Sequence[float], like: ir.Value) -> ir.Value:
    """Per-query-head constant [1, Hq, 1, 1] with the element type of ``like``."""
    arr = np.asarray(values, dtype=np.float32).reshape(1, len(values), 1, 1)
    return op.CastLike(op.Constant(value=ir.tensor(arr)), like)


def key_span_mask(op: LoweringBuilder, kpos: ir.Value, spans: Sequence[tuple[int, int]]) -> ir.Value:
    """Bool [Nk]: key position inside any ``(start, end)`` span (end exclusive)."""
    m: Optional[ir.Value] = None
    for start, end in spans:
        inside = op.And(op.GreaterOrEqual(kpos, op.int_scalar(start)), op.Less(kpos, op.int_scalar(end)))
        m = inside if m is None else op.Or(m, inside)
    if m is None:
        return op.Less(kpos, op.int_scalar(0))  # all False
    return m


def allowed_mask(
    op: LoweringBuilder,
    q: ir.Value,
    k: ir.Value,
    key_padding: Optional[ir.Value],
    attn_mask: Optional[ir.Value],
    causal: bool,
) -> Optional[ir.Value]:
    """Bool broadcastable to [B,Hq,Nq,Nk] (causal ∧ key_padding ∧ bool attn_mask), or None."""
    m: Optional[ir.Value] = causal_mask(op, q, k) if causal else None
    if key_padding is not None:
        kp = op.Unsqueeze(op.Cast(key_padding, to=ir.DataType.BOOL), op.ints([1, 2]))  # [B,1,1,Nk]
        m = kp if m is None else op.And(m, kp)
    if attn_mask is not None and op.facts.attn_mask_bool:
        m = attn_mask if m is None else op.And(m, attn_mask)
    return m


def masked_softmax(op: LoweringBuilder, z: ir.Value, keep: Optional[ir.Value]) -> ir.Value:
    """Softmax over the last axis restricted to ``keep``; rows with nothing kept give 0.

    Same formula as :func:`surgeon.attention.base.masked_softmax`.
    """
    if keep is not None:
        z = op.Where(keep, z, op.scalar(-math.inf, z))
    mx = op.ReduceMax(z, op.ints([-1]), keepdims=1)
    mx = op.Where(is_finite(op, mx), mx, op.scalar(0.0, z))
    e = op.Exp(op.Sub(z, mx))
    s = op.ReduceSum(e, op.ints([-1]), keepdims=1)
    s = op.Where(op.Greater(s, op.scalar(0.0, s)), s, op.scalar(1.0, s))
    return op.Div(e, s)


def scaled_logits(
    op: LoweringBuilder, q: ir.Value, k: ir.Value, attn_mask: Optional[ir.Value], scale: float
) -> ir.Value:
    """``q k^T * scale`` (+ a float attn_mask): [B,Hq,Nq,Nk]."""
    z = op.Mul(gqa_scores(op, q, k), op.scalar(scale, q))
    if attn_mask is not None and not op.facts.attn_mask_bool:
        z = op.Add(z, op.CastLike(attn_mask, z))
    return z


Edit = Callable[[ir.Value], ir.Value]


def attention_probs(
    op: LoweringBuilder,
    q: ir.Value,
    k: ir.Value,
    key_padding: Optional[ir.Value],
    attn_mask: Optional[ir.Value],
    causal: bool,
    scale: float,
    keep: Optional[ir.Value] = None,
    *,
    logit_edit: Optional[Edit] = None,
    prob_edit: Optional[Edit] = None,
) -> ir.Value:
    """Attention probabilities [B,Hq,Nq,Nk] of :func:`attention` (rows with nothing allowed are 0)."""
    z = scaled_logits(op, q, k, attn_mask, scale)
    if logit_edit is not None:
        z = logit_edit(z)
    allow = allowed_mask(op, q, k, key_padding, attn_mask, causal)
    if keep is not None:
        allow = keep if allow is None else op.And(allow, keep)
    a = masked_softmax(op, z, allow)
    if prob_edit is not None:
        a = prob_edit(a)
    return a


def attention(
    op: LoweringBuilder,
    q: ir.Value,
    k: ir.Value,
    v: ir.Value,
    key_padding: Optional[ir.Value],
    attn_mask: Optional[ir.Value],
    causal: bool,
    scale: float,
    keep: Optional[ir.Value] = None,
    *,
    logit_edit: Optional[Edit] = None,
    prob_edit: Optional[Edit] = None,
    out_edit: Optional[Edit] = None,
) -> ir.Value:
    """Masked attention (the ONNX twin of :func:`surgeon.attention.base.attention_from_keep`).

    q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D]; ``keep`` bool broadcastable to [B,Hq,Nq,Nk] is ANDed
    with the dense-allowed mask. Modulation edits, as in ``surgeon.attention.modulation``:
    ``logit_edit(z)`` on the scaled logits [B,Hq,Nq,Nk] (after a float attn_mask, before
    masking), ``prob_edit(a)`` on the probabilities [B,Hq,Nq,Nk], ``out_edit(o)`` on the output
    [B,Hq,Nq,Dv] (the values it needs are captured by the edit; see :class:`Edits`). A site's
    composed modulators come from :func:`modulator_edits` (``**edits.kwargs()``); they are
    never applied implicitly. Returns [B,Hq,Nq,Dv].
    """
    a = attention_probs(op, q, k, key_padding, attn_mask, causal, scale, keep, logit_edit=logit_edit,
                        prob_edit=prob_edit)
    out = gqa_apply(op, a, v)
    return out if out_edit is None else out_edit(out)


# --------------------------------------------------------------------------- lowerings

@register_lowering("dense")
def lower_dense(
    op: LoweringBuilder,
    q: ir.Value,
    k: ir.Value,
    v: ir.Value,
    key_padding: Optional[ir.Value],
    attn_mask: Optional[ir.Value],
    causal: bool,
    scale: float,
    config: str,
    block_mask: Optional[ir.Value],
) -> ir.Value:
    """Dense attention: [B,Hq,Nq,D] x [B,Hkv,Nk,D] → [B,Hq,Nq,Dv]; fully-masked rows give 0.
    Composes the site's modulators (:func:`modulator_edits`)."""
    mods = modulator_edits(op, q, k, v, key_padding, causal, scale, config)
    return attention(op, q, k, v, key_padding, attn_mask, causal, scale, **mods.kwargs())


# --------------------------------------------------------------------------- translation

_TYPES_FLOAT = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
_TYPES_ANY = _TYPES_FLOAT + ["tensor(bool)", "tensor(int64)", "tensor(int32)", "tensor(int8)", "tensor(uint8)"]


def _placeholder_schema(name: str, inputs: tuple[str, ...], num_outputs: int) -> onnx.defs.OpSchema:
    S = onnx.defs.OpSchema
    type_of = {"q": "T", "k": "T", "v": "T", "key_padding": "TP", "attn_mask": "TM", "block_mask": "TB"}
    formal = [S.FormalParameter(n, type_of[n]) for n in inputs]
    outs = [S.FormalParameter("out", "T")]
    if num_outputs == 2:
        outs.append(S.FormalParameter("block_mask_out", "TB"))
    used = {type_of[n] for n in inputs} | ({"TB"} if num_outputs == 2 else set())
    constraints = [(t, _TYPES_FLOAT if t == "T" else _TYPES_ANY, "") for t in ("T", "TP", "TM", "TB") if t in used]
    attrs = [
        S.Attribute("config", S.AttrType.STRING, "variant JSON", required=False),
        S.Attribute("causal", S.AttrType.INT, "1 when causal", required=False),
        S.Attribute("scale", S.AttrType.FLOAT, "logit scale", required=False),
        S.Attribute("inputs", S.AttrType.STRING, "present inputs", required=False),
    ]
    return S(name, DOMAIN, DOMAIN_VERSION, inputs=formal, outputs=outs, type_constraints=constraints,
             attributes=attrs)


def _translator(name: str, num_outputs: int) -> Callable[..., Any]:
    from onnxscript.values import Op, Opset  # lazy: only needed while exporting

    opset = Opset(DOMAIN, DOMAIN_VERSION)

    # Parameter names mirror the op schema (the exporter binds by them); no annotations so
    # the exporter's dispatcher does not type-filter this callable.
    def translate(q, k, v, key_padding=None, attn_mask=None, causal=False, scale=1.0, config="", block_mask=None):
        given = dict(q=q, k=k, v=v, key_padding=key_padding, attn_mask=attn_mask, block_mask=block_mask)
        names = tuple(n for n in INPUT_NAMES if given[n] is not None)
        node = Op(opset, name, _placeholder_schema(name, names, num_outputs))
        return node(*[given[n] for n in names], config=str(config), causal=int(bool(causal)),
                    scale=float(scale), inputs=",".join(names))

    translate.__name__ = f"surgeon_{name}"
    return translate


def translation_table() -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: every registered
    variant's OpOverload → a translator emitting one placeholder ``surgeon::<variant>`` node.

    Call :func:`attach_functions` on the exported model afterwards (``export_program`` does).
    """
    table = {}
    for name in sorted(VARIANTS):
        var = get_variant(name)
        table[op_for(name)] = _translator(name, 2 if var.produces_block_mask else 1)
    return table


# --------------------------------------------------------------------------- functions

def _static_int(v: ir.Value, axis: int, what: str, node: ir.Node) -> int:
    shape = v.shape
    if shape is None or len(shape) <= axis or not isinstance(shape[axis], int):
        raise BadInput(
            f"{what} of surgeon::{node.op_type} node '{node.name}' is not static (shape {shape})",
            "export with static head counts; only batch and sequence axes may be dynamic",
        )
    return int(shape[axis])


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _same_dim(a: ir.Value, b: ir.Value, axis: int) -> bool:
    """Whether axis ``axis`` of a and b is provably the same length (equal ints or one named symbol)."""
    if a.shape is None or b.shape is None or len(a.shape) <= axis or len(b.shape) <= axis:
        return False
    da, db = a.shape[axis], b.shape[axis]
    if isinstance(da, int) or isinstance(db, int):
        return da == db
    return da.value is not None and da.value == db.value


def _facts_for(node: ir.Node, opset: int) -> tuple[LoweringFacts, str, bool, float, str]:
    name = node.op_type
    inputs = tuple(str(_attr(node, "inputs", "q,k,v")).split(","))
    config = str(_attr(node, "config", ""))
    causal = bool(_attr(node, "causal", 0))
    scale = float(_attr(node, "scale", 1.0))
    if len(inputs) != len(node.inputs) or inputs[:3] != ("q", "k", "v"):
        raise BadInput(f"surgeon::{name} node '{node.name}' has inputs {inputs} for {len(node.inputs)} values",
                       "export through surgeon.exporters.onnx_lowering.translation_table()")
    if not config:
        raise BadInput(f"surgeon::{name} node '{node.name}' has no config attribute",
                       "export through surgeon.exporters.onnx_lowering.translation_table()")
    var, _params, static = parse_config(config)
    if var.name != name:
        raise BadInput(f"surgeon::{name} node carries config of variant '{var.name}'", "re-run the rewrite")
    hq = _static_int(node.inputs[0], 1, "query head count", node)
    hk = _static_int(node.inputs[1], 1, "key head count", node)
    kvh = int(static.get("kv_heads", hk))
    # Same rule as surgeon.attention.base.unrepeat_kv.
    if hk == kvh or kvh <= 0:
        hkv = hk
    elif hk == hq and hq % kvh == 0:
        hkv = kvh
    else:
        raise BadInput(f"surgeon::{name} node '{node.name}': K/V have {hk} heads, expected {kvh} or {hq}",
                       "fix kv_heads in the op's config")
    if hq % hkv:
        raise BadInput(f"surgeon::{name} node '{node.name}': {hq} query heads not a multiple of {hkv} KV heads",
                       "fix kv_heads in the op's config")
    mask_bool = None
    if "attn_mask" in inputs:
        mv = node.inputs[inputs.index("attn_mask")]
        mask_bool = mv.dtype == ir.DataType.BOOL
    self_attn = _same_dim(node.inputs[0], node.inputs[1], 2)
    facts = LoweringFacts(variant=name, q_heads=hq, k_heads=hk, kv_heads=hkv, inputs=inputs,
                          attn_mask_bool=mask_bool, self_attention=self_attn, num_outputs=len(node.outputs),
                          opset=opset)
    return facts, config, causal, scale, _body_config(config)


def _body_config(config: str) -> str:
    d = json.loads(config)
    for key in _SITE_KEYS:
        d.pop(key, None)
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


def _overload_key(facts: LoweringFacts, body_config: str, causal: bool, scale: float) -> str:
    blob = json.dumps({"facts": dataclasses.asdict(facts), "config": body_config, "causal": causal,
                       "scale": float(scale).hex()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_function(
    facts: LoweringFacts, config: str, causal: bool, scale: float, overload: str = "", *, site: str = ""
) -> ir.Function:
    """The ``surgeon::<variant>`` FunctionProto body for one set of static facts.

    Formal inputs: ``facts.inputs`` (q [B,Hq,Nq,D], k/v [B,Hk,Nk,D], key_padding [B,Nk] bool,
    attn_mask broadcastable to [B,Hq,Nq,Nk], block_mask [B,Hq,nqb,nkb] bool); outputs: out
    [B,Hq,Nq,Dv] (+ block mask). Attributes ``config``/``causal``/``scale``/``inputs`` are
    declared (with this overload's values as defaults) so the calling node may carry them.
    ``site`` only names the site in error messages.

    A config with ``modulators`` needs a lowering that composes them (calls
    :func:`modulator_edits` and applies the edits); any other lowering is refused with
    :class:`BadInput` rather than exported without the modulation.
    """
    lower = get_lowering(facts.variant)
    op = LoweringBuilder(facts, site)
    formal = {n: ir.Value(name=n) for n in facts.inputs}
    k, v = formal["k"], formal["v"]
    if facts.k_heads != facts.kv_heads:  # graph repeated K/V: take k[:, ::rep] like the torch op
        rep = facts.q_heads // facts.kv_heads
        sl = (op.ints([0]), op.ints([_INT64_MAX]), op.ints([1]), op.ints([rep]))
        k, v = op.Slice(k, *sl), op.Slice(v, *sl)
    bm_in = formal.get("block_mask")
    if bm_in is not None:  # ops pass block masks flat [B, Hq*nqb*nkb]; the consumer restores 4-D
        _v, _p, _s = parse_config(config)
        qb = int(getattr(_p, "q_block", None) or getattr(_p, "block_size"))
        nq = op.Shape(formal["q"], start=2, end=3)
        nqb = op.Div(op.Add(nq, op.ints([qb - 1])), op.ints([qb]))
        shape = op.Concat(op.ints([0]), op.ints([facts.q_heads]), nqb, op.ints([-1]), axis=0)
        bm_in = op.Reshape(bm_in, shape)
    res = lower(op, formal["q"], k, v, formal.get("key_padding"), formal.get("attn_mask"), causal, scale,
                config, bm_in)
    mods = [str(m.get("variant")) for m in (parse_config(config)[2].get("modulators") or [])]
    if mods and not op.modulators_applied:
        where = f"site '{site}'" if site else "a site"
        raise BadInput(
            f"{where} uses variant '{facts.variant}' with modulator(s) {', '.join(mods)}, but the ONNX lowering of "
            f"'{facts.variant}' does not compose modulators (the export would differ from PyTorch)",
            f"remove the modulators from this site's policy entry, or pick a variant whose lowering applies "
            f"modulator_edits() (e.g. dense, window_sink, block_topk, reuse, delta, delta_sparse)",
        )
    outs = list(res) if isinstance(res, (tuple, list)) else [res]
    if len(outs) == 2:
        outs[1] = op.Reshape(outs[1], op.ints([0, -1]))
    if len(outs) != facts.num_outputs:
        raise BadInput(f"lowering of '{facts.variant}' returned {len(outs)} outputs, the op has {facts.num_outputs}",
                       "fix the lowering's return value")
    formal_ids = {id(x) for x in formal.values()}
    outs = [op.Identity(o) if id(o) in formal_ids else o for o in outs]
    for i, o in enumerate(outs):
        o.name = "out" if i == 0 else "block_mask_out"
    graph = ir.Graph(inputs=list(formal.values()), outputs=outs, nodes=op.nodes,
                     opset_imports={"": facts.opset}, name=facts.variant)
    attrs = [ir.AttrString("config", config), ir.AttrInt64("causal", int(causal)),
             ir.AttrFloat32("scale", float(scale)), ir.AttrString("inputs", ",".join(facts.inputs))]
    return ir.Function(DOMAIN, facts.variant, overload, graph=graph, attributes=attrs)


def attach_functions(model: ir.Model) -> dict[str, int]:
    """Give every ``surgeon::`` node of ``model`` its function (in place); returns variant → nodes.

    Nodes with equal static facts share one overload. Raises :class:`BadInput` when a
    variant has no lowering or a node lacks static head counts.
    """
    opset = model.opset_imports.get("", 18)
    if opset < 18:
        raise BadInput(f"model uses ONNX opset {opset}; surgeon function bodies need opset 18 or newer",
                       "export with opset 18 or newer")
    counts: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain != DOMAIN:
            continue
        facts, config, causal, scale, body_config = _facts_for(node, opset)
        key = _overload_key(facts, body_config, causal, scale)
        ident = (DOMAIN, facts.variant, key)
        if ident not in model.functions:
            site = str(parse_config(config)[2].get("site") or node.name or "")
            model.functions[ident] = build_function(facts, body_config, causal, scale, key, site=site)
        node.overload = key
        node.version = DOMAIN_VERSION
        counts[facts.variant] = counts.get(facts.variant, 0) + 1
    if counts:
        model.opset_imports[DOMAIN] = DOMAIN_VERSION
        model.ir_version = max(model.ir_version or 0, 10)  # function overloads need IR v10
    return counts


def surgeon_functions(model: Union[onnx.ModelProto, ir.Model]) -> list[tuple[str, str, str]]:
    """``(domain, name, overload)`` of the model's ``surgeon`` functions."""
    if isinstance(model, ir.Model):
        return sorted(f for f in model.functions if f[0] == DOMAIN)
    return sorted((f.domain, f.name, f.overload) for f in model.functions if f.domain == DOMAIN)


_ONNX_DTYPE = {
    torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16, torch.bfloat16: ir.DataType.BFLOAT16,
    torch.float64: ir.DataType.DOUBLE, torch.bool: ir.DataType.BOOL, torch.int64: ir.DataType.INT64,
    torch.int32: ir.DataType.INT32,
}


def single_op_model(
    name: str,
    config: str,
    causal: bool,
    scale: float,
    inputs: dict[str, Optional[torch.Tensor]],
    opset: int = 18,
) -> onnx.ModelProto:
    """A model holding one ``surgeon::<name>`` node (with its function), for testing lowerings.

    ``inputs`` maps names from :data:`INPUT_NAMES` to example tensors (None/absent: not
    given); they fix dtypes, ranks and head counts. Every other axis is symbolic, so the model
    runs at any batch and sequence length. Graph inputs/outputs are named like the op's.
    """
    var = get_variant(name)
    given = {n: t for n, t in inputs.items() if t is not None}
    present = [n for n in INPUT_NAMES if n in given]
    if present[:3] != ["q", "k", "v"]:
        raise BadInput("single_op_model needs q, k and v", "pass example tensors for q, k and v")
    q, k, v = given["q"], given["k"], given["v"]
    values = []
    for n in present:
        t = given[n]
        if t.dtype not in _ONNX_DTYPE:
            raise BadInput(f"input {n} has unsupported dtype {t.dtype}", f"use one of {sorted(map(str, _ONNX_DTYPE))}")
        if n in ("q", "k", "v"):
            # Equal example lengths: one shared symbol (self-attention); else Nq and Nk.
            same = q.shape[2] == k.shape[2]
            seq = "N" if same else ("Nq" if n == "q" else "Nk")
            dims: list[Any] = ["B", t.shape[1], seq, t.shape[3]]
        else:
            dims = [f"{n}_{i}" for i in range(t.dim())]
        values.append(ir.Value(name=n, type=ir.TensorType(_ONNX_DTYPE[t.dtype]), shape=ir.Shape(dims)))
    out = ir.Value(name="out", type=ir.TensorType(_ONNX_DTYPE[q.dtype]),
                   shape=ir.Shape(["B", q.shape[1], values[0].shape[2], v.shape[3]]))
    outs = [out]
    if var.produces_block_mask:
        outs.append(ir.Value(name="block_mask_out", type=ir.TensorType(ir.DataType.BOOL),
                             shape=ir.Shape(["B", "heads_x_blocks"])))  # flat, as the torch op
    attrs = [ir.AttrString("config", config), ir.AttrInt64("causal", int(causal)),
             ir.AttrFloat32("scale", float(scale)), ir.AttrString("inputs", ",".join(present))]
    node = ir.Node(DOMAIN, name, values, attributes=attrs, outputs=outs, version=DOMAIN_VERSION, name=f"node_{name}")
    graph = ir.Graph(values, outs, nodes=[node], opset_imports={"": opset, DOMAIN: DOMAIN_VERSION}, name="single_op")
    model = ir.Model(graph, ir_version=10, producer_name="surgeon")
    attach_functions(model)
    return ir.serde.serialize_model(model)


# --------------------------------------------------------------------------- export

@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What :func:`export_program` wrote."""

    path: str
    external_data: Optional[str]  # file name next to ``path``, or None
    surgeon_nodes: dict[str, int]  # variant → number of nodes
    functions: list[tuple[str, str, str]]  # (domain, name, overload)
    opset: int


def batch_seq_dynamic_shapes(example_inputs: Sequence[Any]) -> tuple[Any, ...]:
    """``dynamic_shapes`` marking axis 0 (batch) and axis 1 (sequence) of every tensor input.

    Tensors of rank 1 get only the batch axis; non-tensors get None. All inputs share the two
    dims (the usual ``input_ids``/``attention_mask`` case). Use examples with batch and sequence
    length of at least 2: ``torch.export`` specialises axes of size 0 or 1.
    """
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    out: list[Any] = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            out.append({0: batch, 1: seq})
        elif isinstance(x, torch.Tensor) and x.dim() == 1:
            out.append({0: batch})
        else:
            out.append(None)
    return tuple(out)


def _initializer_bytes(model: ir.Model) -> int:
    total = 0
    for v in model.graph.initializers.values():
        if v.const_value is not None:
            total += v.const_value.nbytes
    return total


def export_program(
    program_or_module: Union[torch.nn.Module, torch.export.ExportedProgram],
    example_inputs: Sequence[Any],
    dynamic_shapes: Any,
    path: Union[str, os.PathLike],
    opset: int = 18,
    external_data: bool = True,
) -> ExportResult:
    """Export to ONNX with every ``surgeon::`` op as one node calling a ``surgeon`` function.

    ``dynamic_shapes`` follows ``torch.export`` (e.g. :func:`batch_seq_dynamic_shapes`); it is
    ignored for an ExportedProgram, whose dims are already fixed or symbolic. Weights go to
    ``<name>.data`` next to ``path`` when ``external_data`` (or when over 2 GB). The file is
    written atomically after ``onnx.checker.check_model(full_check=True)`` passed on it.
    Raises :class:`CheckFailed` when the checker rejects the model.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise BadInput(f"ONNX output path '{path}' does not end in .onnx", "name the file <something>.onnx")
    if not path.parent.is_dir():
        raise BadInput(f"output directory '{path.parent}' does not exist", "create it first")
    if opset < 18:
        raise BadInput(f"opset {opset} is too old for surgeon function bodies", "export with opset 18 or newer")
    is_program = isinstance(program_or_module, torch.export.ExportedProgram)
    try:
        with warnings.catch_warnings():
            # Inputs sharing a named Dim make the exporter warn once per extra use of the name.
            warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used")
            prog = torch.onnx.export(
                program_or_module,
                tuple(example_inputs),
                dynamic_shapes=None if is_program else dynamic_shapes,
                dynamo=True,
                custom_translation_table=translation_table(),
                opset_version=opset,
                optimize=True,  # safe: surgeon functions are attached after the optimizer
                verbose=False,
                report=False,
                verify=False,
            )
    except torch.onnx.errors.OnnxExporterError as e:  # pragma: no cover - depends on the model
        msg = str(e).strip().splitlines()
        raise BadInput(f"torch.onnx.export failed: {msg[-1] if msg else type(e).__name__}",
                       "check that the model runs under torch.export with these dynamic shapes") from e
    model = prog.model
    counts = attach_functions(model)
    use_external = external_data or _initializer_bytes(model) > _MAX_PROTO_BYTES
    data_name = f"{path.name}.data" if use_external else None
    tmpdir = Path(tempfile.mkdtemp(prefix=".surgeon-export-", dir=path.parent))
    try:
        tmp = tmpdir / path.name
        if data_name is not None:
            ir.save(model, tmp, external_data=data_name)
        else:
            ir.save(model, tmp)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckFailed(f"exported ONNX model fails onnx.checker: {first}",
                              "report this with the model; the export was not written") from e
        if data_name is not None:
            os.replace(tmpdir / data_name, path.parent / data_name)
        elif (path.parent / f"{path.name}.data").exists():
            (path.parent / f"{path.name}.data").unlink()  # stale weights of an earlier export
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return ExportResult(path=str(path), external_data=data_name, surgeon_nodes=counts,
                        functions=surgeon_functions(model), opset=int(model.opset_imports.get("", opset)))


# --------------------------------------------------------------------------- verification

def _tensor_leaves(x: Any) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(x)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def verify_onnx(
    path: Union[str, os.PathLike],
    module: Union[torch.nn.Module, torch.export.ExportedProgram],
    inputs_list: Sequence[Sequence[Any]],
    rtol: float = 1e-4,
    atol: float = 1e-4,
    min_shapes: int = 2,
) -> list[dict[str, Any]]:
    """Run the ONNX file in onnxruntime (CPU) and PyTorch on each input set; compare outputs.

    ``inputs_list`` must hold at least ``min_shapes`` input sets with distinct shapes (e.g.
    two sequence lengths) so dynamic axes are exercised. Returns one dict per (input set,
    output): ``case``, ``output``, ``name``, ``shape``, ``max_abs_err``, ``max_rel_err``,
    ``mismatched`` (elements outside ``atol + rtol*|torch|``, or unequal for bool/int) and ``ok``.
    """
    import onnxruntime as ort  # lazy: heavy import

    shapes = {tuple(tuple(t.shape) for t in _tensor_leaves(inp)) for inp in inputs_list}
    if len(shapes) < min_shapes:
        raise BadInput(f"verify_onnx got {len(shapes)} distinct input shape(s), needs {min_shapes}",
                       "pass inputs at two or more sequence lengths")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    in_names = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in sess.get_outputs()]
    fn = module.module() if isinstance(module, torch.export.ExportedProgram) else module
    results: list[dict[str, Any]] = []
    for case, inp in enumerate(inputs_list):
        tensors = _tensor_leaves(inp)
        if len(tensors) != len(in_names):
            raise BadInput(f"input set {case} has {len(tensors)} tensors, the ONNX model takes {len(in_names)} "
                           f"({', '.join(in_names)})", "pass the same inputs as at export")
        feed = {n: t.detach().cpu().numpy() for n, t in zip(in_names, tensors)}
        got = sess.run(None, feed)
        with torch.no_grad():
            want = _tensor_leaves(fn(*inp))
        if len(want) != len(got):
            raise CheckFailed(f"ONNX model returns {len(got)} outputs, PyTorch {len(want)}",
                              "re-export the model")
        for j, (w, g) in enumerate(zip(want, got)):
            results.append(_compare(case, j, out_names[j], w.detach().cpu().numpy(), g, rtol, atol))
    return results


def _compare(case: int, j: int, name: str, want: np.ndarray, got: np.ndarray, rtol: float, atol: float) -> dict:
    res: dict[str, Any] = {"case": case, "output": j, "name": name, "shape": list(want.shape)}
    if want.shape != got.shape:
        res.update(max_abs_err=math.inf, max_rel_err=math.inf, mismatched=int(want.size), ok=False,
                   got_shape=list(got.shape))
        return res
    if want.dtype.kind in "biu" or got.dtype.kind in "biu":
        bad = int(np.count_nonzero(want.astype(np.int64) != got.astype(np.int64)))
        res.update(max_abs_err=float(bad > 0), max_rel_err=float(bad > 0), mismatched=bad, ok=bad == 0)
        return res
    w, g = want.astype(np.float64), got.astype(np.float64)
    both_nan = np.isnan(w) & np.isnan(g)
    diff = np.where(both_nan, 0.0, np.abs(w - g))
    diff = np.where(np.isnan(diff), np.inf, diff)
    rel = diff / np.maximum(np.abs(w), 1e-12)
    bad = int(np.count_nonzero(diff > atol + rtol * np.abs(w)))
    res.update(max_abs_err=float(diff.max()) if diff.size else 0.0,
               max_rel_err=float(rel.max()) if rel.size else 0.0, mismatched=bad, ok=bad == 0)
    return res


# --------------------------------------------------------------------------- modulated variants
# A modulated variant is expressed as *edits* (see :class:`Edits`): a logit edit, a probability
# edit and/or an output edit, built from its parameters by a factory registered with
# :func:`register_modulator_edits`. Each factory mirrors its variant's hooks
# (surgeon/attention/<name>/__init__.py) in two forms, as torch uses them:
#
# * ``definition=False``: the form of ``fused_hooks`` (what :func:`surgeon.attention.ops.compose_modulators`
#   puts into AttnContext when the variant is a *modulator* of another site variant, and the
#   cheapest lowering of the variant on its own);
# * ``definition=True``: the form of ``make_hooks`` (what the variant's reference applies as its
#   own hooks, before the context's, when it is the site variant *and* carries modulators).
#
# They differ only for identity_blend (output blend vs probability blend) and local_boost (logit
# bias vs probability boost + renormalisation), which are equal on their own but not once other
# edits come between them. The variant's own pure-Python helpers give the per-head constants so
# both sides agree.

def _params(config: str) -> Any:
    return parse_config(config)[1]


OwnEdits = Callable[["LoweringBuilder", "EditSite", Any, bool], "Edits"]
_MODULATOR_EDITS: dict[str, OwnEdits] = {}


def _compose(fns: tuple[Edit, ...]) -> Optional[Edit]:
    if not fns:
        return None

    def run(x: ir.Value) -> ir.Value:
        for f in fns:
            x = f(x)
        return x

    return run


@dataclasses.dataclass(frozen=True)
class Edits:
    """Modulation edits, each list applied in order (torch: the hook chains of AttnContext).

    ``logit``: z [B,Hq,Nq,Nk] scaled logits → edited (after a float attn_mask, before masking);
    ``prob``: a [B,Hq,Nq,Nk] probabilities → edited; ``out``: o [B,Hq,Nq,Dv] → edited (an
    output edit captures the values it needs, e.g. identity_blend's V at the query positions).
    """

    logit: tuple[Edit, ...] = ()
    prob: tuple[Edit, ...] = ()
    out: tuple[Edit, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.logit or self.prob or self.out)

    def then(self, other: "Edits") -> "Edits":
        """These edits followed by ``other``'s (per kind), like chaining hooks."""
        return Edits(self.logit + other.logit, self.prob + other.prob, self.out + other.out)

    @property
    def logit_edit(self) -> Optional[Edit]:
        return _compose(self.logit)

    @property
    def prob_edit(self) -> Optional[Edit]:
        return _compose(self.prob)

    @property
    def out_edit(self) -> Optional[Edit]:
        return _compose(self.out)

    def kwargs(self) -> dict[str, Optional[Edit]]:
        """``logit_edit``/``prob_edit``/``out_edit`` for :func:`attention`."""
        return {"logit_edit": self.logit_edit, "prob_edit": self.prob_edit, "out_edit": self.out_edit}


@dataclasses.dataclass(frozen=True)
class EditSite:
    """The function-body values an edit may read: q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D|Dv] (already
    un-repeated), key_padding [B,Nk] or None, and the static causal flag and scale."""

    q: ir.Value
    k: ir.Value
    v: ir.Value
    key_padding: Optional[ir.Value]
    causal: bool
    scale: float


def register_modulator_edits(name: str) -> Callable[[OwnEdits], OwnEdits]:
    """Decorator: ``fn(op, site: EditSite, params, definition: bool) -> Edits`` is the edit form
    of modulated variant ``name`` (see the section comment above)."""

    def deco(fn: OwnEdits) -> OwnEdits:
        _MODULATOR_EDITS[name] = fn
        return fn

    return deco


def _edits_of(op: LoweringBuilder, s: EditSite, name: str, params: Any, definition: bool, role: str) -> Edits:
    """Edits of modulated variant ``name``; BadInput names the site, variant and modulator."""
    fn = _MODULATOR_EDITS.get(name)
    where = f"site '{op.site}'" if op.site else "a site"
    if fn is None:
        raise BadInput(f"{where} ({op.facts.variant}): {role} '{name}' has no ONNX edit form",
                       f"register one with @register_modulator_edits('{name}') in surgeon/exporters/onnx_lowering.py, "
                       f"or remove '{name}' from the site's modulators")
    try:
        return fn(op, s, params, definition)
    except BadInput as e:
        raise BadInput(f"{where} ({op.facts.variant}): {role} '{name}': {e.problem}", e.fix) from e


def modulator_edits(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                    causal: bool, scale: float, config: str) -> Edits:
    """The composed edits of the ``modulators`` listed in ``config`` (empty when none), in list
    order and in ``fused_hooks`` form, exactly what
    :func:`surgeon.attention.ops.compose_modulators` puts into AttnContext for the torch op.

    A lowering composes a site's modulators by calling this and applying the edits where the
    variant's reference applies ``ctx.logit_fn``/``prob_fn``/``out_fn`` (for references built on
    ``attention_from_keep``: ``attention(..., **edits.kwargs())``). Calling it marks the body as
    modulator-aware; :func:`build_function` refuses configs with modulators otherwise.
    """
    op.modulators_applied = True
    mods = parse_config(config)[2].get("modulators") or []
    s = EditSite(q, k, v, key_padding, bool(causal), float(scale))
    out = Edits()
    where = f"site '{op.site}'" if op.site else "a site"
    for m in mods:
        name = str(m.get("variant"))
        if name not in VARIANTS or get_variant(name).family != "modulated":
            raise BadInput(f"{where} ({op.facts.variant}): modulator '{name}' is not a modulated variant",
                           "list only modulated variants under modulators")
        try:
            params = get_variant(name).params_from(m.get("params"))
        except BadInput as e:
            raise BadInput(f"{where} ({op.facts.variant}): modulator '{name}': {e.problem}", e.fix) from e
        out = out.then(_edits_of(op, s, name, params, False, "modulator"))
    return out


def _checked_heads(name: str, heads: Sequence[int], hq: int) -> list[int]:
    """Sorted query-head indices (``()``: all ``hq``), as ``modulation.site_heads``."""
    for h in heads:
        if h >= hq:
            raise BadInput(f"{name}: heads names query head {h}, but the site has {hq} query heads",
                           f"use head indices in [0, {hq - 1}]")
    return sorted(heads) if heads else list(range(hq))


def _own_position(op: LoweringBuilder, s: EditSite) -> tuple[ir.Value, ir.Value]:
    """``(start, end)`` 1-D int64 of the last Nq key positions (the queries' own keys)."""
    return op.Sub(op.dims(s.k, 2, 3), op.dims(s.q, 2, 3)), op.ints([_INT64_MAX])


@register_modulator_edits("temperature")
def temperature_edits(op: LoweringBuilder, s: EditSite, p: Any, definition: bool) -> Edits:
    """SSA: logits of query row r times ``1 + σ ln i``; i = real tokens up to and including the
    query (``cumsum(key_padding)``, clamped ≥ 1), else position + 1 (both forms)."""
    sigma = p.effective_sigma
    if sigma == 0.0:
        return Edits()

    def logit_edit(z: ir.Value) -> ir.Value:
        qpos, _ = positions(op, s.q, s.k)
        if s.key_padding is None:
            i = op.Reshape(op.Add(qpos, op.int_scalar(1)), op.ints([1, 1, -1, 1]))  # [1,1,Nq,1]
        else:
            cs = op.CumSum(op.Cast(s.key_padding, to=ir.DataType.INT64), op.int_scalar(-1))  # [B,Nk]
            start, end = _own_position(op, s)
            cs = op.Slice(cs, start, end, op.ints([1]))  # [B,Nq]
            i = op.Unsqueeze(op.Max(cs, op.int_scalar(1)), op.ints([1, 3]))  # [B,1,Nq,1]
        f = op.Add(op.scalar(1.0, z), op.Mul(op.scalar(sigma, z), op.Log(op.CastLike(i, z))))
        return op.Mul(z, f)

    return Edits(logit=(logit_edit,))


@register_modulator_edits("head_boost")
def head_boost_edits(op: LoweringBuilder, s: EditSite, p: Any, definition: bool) -> Edits:
    """PAINT: ``z + α_h · w_j · |z|`` on finite logits of the boosted heads' span keys (only the
    last query row with ``last_row_only``); both forms."""
    from surgeon.attention.head_boost import NAME, head_strengths

    hq = op.facts.q_heads
    _checked_heads(NAME, p.heads, hq)
    if not p.heads and p.head_alpha and len(p.head_alpha) != hq:
        raise BadInput(f"{NAME}: head_alpha has {len(p.head_alpha)} entries but the site has {hq} query heads",
                       f"give {hq} head_alpha entries, or list the heads they belong to in heads")
    alphas = head_strengths(p, hq)
    if not p.spans and any(alphas):
        raise BadInput(f"{NAME}: no key spans to boost", "give spans=[[start, end], ...] (end exclusive)")
    if not p.spans or not any(alphas):
        return Edits()

    def logit_edit(z: ir.Value) -> ir.Value:
        _, kpos = positions(op, s.q, s.k)
        w: Optional[ir.Value] = None  # [Nk] span scale, 0 outside the spans
        for i, span in enumerate(p.spans):
            val = float(p.span_scale[i]) if p.span_scale else 1.0
            inside = key_span_mask(op, kpos, [span])
            w = op.Where(inside, op.scalar(val, z), op.scalar(0.0, z) if w is None else w)
        a = op.Mul(head_vector(op, alphas, z), w)  # [1,Hq,1,Nk]
        edit = is_finite(op, z)
        if p.last_row_only:
            nq = op.dim(s.q, 2)
            last = op.Equal(op.Range(op.int_scalar(0), nq, op.int_scalar(1)), op.Sub(nq, op.int_scalar(1)))
            edit = op.And(edit, op.Unsqueeze(last, op.ints([1])))  # rows [Nq,1]
        return op.Where(edit, op.Add(z, op.Mul(a, op.Abs(z))), z)

    return Edits(logit=(logit_edit,))


@register_modulator_edits("sink_redistribute")
def sink_redistribute_edits(op: LoweringBuilder, s: EditSite, p: Any, definition: bool) -> Edits:
    """VAR: in selected rows of the chosen heads, keep p of the sink mass and give the rest to
    the non-sink target keys in proportion (``sink_redistribute.redistribute``); both forms."""
    from surgeon.attention.sink_redistribute import NAME

    hq = op.facts.q_heads
    heads = _checked_heads(NAME, p.heads, hq)
    if p.active and (not p.sinks or p.target is None):
        raise BadInput(f"{NAME}: p={p.p} needs sink tokens and a target span",
                       "give sinks=[...] (see find_sink_tokens) and target=[start, end]")
    if not p.active:
        return Edits()

    def prob_edit(a: ir.Value) -> ir.Value:
        qpos, kpos = positions(op, s.q, s.k)
        sink = key_span_mask(op, kpos, [(t, t + 1) for t in p.sinks])
        target = key_span_mask(op, kpos, [p.target])
        vis = op.And(sink, target)
        rest = op.And(target, op.Not(vis))

        def mass(m: ir.Value) -> ir.Value:
            return op.ReduceSum(op.Mul(a, op.CastLike(m, a)), op.ints([-1]), keepdims=1)

        m, m_vis, m_sink, m_rest = mass(target), mass(vis), mass(sink), mass(rest)
        zero = op.scalar(0.0, a)
        sel = op.And(op.GreaterOrEqual(m, op.scalar(p.summ, a)), op.LessOrEqual(m_vis, op.Mul(op.scalar(p.rho, a), m)))
        sel = op.And(sel, op.And(op.Greater(m, zero), op.Greater(m_rest, zero)))
        head_on = np.zeros((1, hq, 1, 1), dtype=bool)
        head_on[0, heads] = True
        sel = op.And(sel, op.Constant(value=ir.tensor(head_on)))
        if p.after_target_only:  # VAR edits only queries at or after the target's end
            sel = op.And(sel, op.Unsqueeze(op.GreaterOrEqual(qpos, op.int_scalar(p.target[1])), op.ints([1])))
        omega = op.Mul(op.scalar(1.0 - p.p, a), m_sink)
        denom = op.Where(op.Greater(m_rest, zero), m_rest, op.scalar(1.0, a))
        kept = op.Where(sink, op.Mul(op.scalar(p.p, a), a), a)
        gain = op.Where(rest, op.Div(op.Mul(omega, a), denom), zero)
        return op.Where(sel, op.Add(kept, gain), a)

    return Edits(prob=(prob_edit,))


def _blend_weights(op: LoweringBuilder, s: EditSite, p: Any, heads: list[int], like: ir.Value) -> ir.Value:
    """``identity_blend.blend_weights``: u per (batch, head, row), [1|B, Hq, 1|Nq, 1]; 0 for
    unselected heads and rows whose own key is padding."""
    uh = [float(p.u) if h in set(heads) else 0.0 for h in range(op.facts.q_heads)]
    u = head_vector(op, uh, like)  # [1,Hq,1,1]
    if s.key_padding is not None:
        start, end = _own_position(op, s)
        real = op.Slice(op.Cast(s.key_padding, to=ir.DataType.BOOL), start, end, op.ints([1]))  # [B,Nq]
        u = op.Mul(u, op.Unsqueeze(op.CastLike(real, like), op.ints([1, 3])))  # [B,Hq,Nq,1]
    return u


@register_modulator_edits("identity_blend")
def identity_blend_edits(op: LoweringBuilder, s: EditSite, p: Any, definition: bool) -> Edits:
    """SoftPAG. Output form (``fused_hooks``): ``(1 − u)·O + u·V_self`` with V_self the value at
    the query's own position; probability form (``make_hooks``): ``(1 − u)·A + u·I``."""
    from surgeon.attention.identity_blend import NAME

    heads = _checked_heads(NAME, p.heads, op.facts.q_heads)
    if p.u == 0.0:
        return Edits()
    if definition:
        def prob_edit(a: ir.Value) -> ir.Value:
            qpos, kpos = positions(op, s.q, s.k)
            eye = op.CastLike(op.Equal(op.Unsqueeze(qpos, op.ints([1])), op.Unsqueeze(kpos, op.ints([0]))), a)
            u = _blend_weights(op, s, p, heads, a)
            return op.Add(op.Mul(op.Sub(op.scalar(1.0, a), u), a), op.Mul(u, eye))

        return Edits(prob=(prob_edit,))

    def out_edit(o: ir.Value) -> ir.Value:
        u = _blend_weights(op, s, p, heads, o)
        start, end = _own_position(op, s)
        v_self = repeat_heads(op, op.Slice(s.v, start, end, op.ints([2])))  # [B,Hq,Nq,Dv]
        return op.Add(op.Mul(op.Sub(op.scalar(1.0, o), u), o), op.Mul(u, op.CastLike(v_self, o)))

    return Edits(out=(out_edit,))


@register_modulator_edits("local_boost")
def local_boost_edits(op: LoweringBuilder, s: EditSite, p: Any, definition: bool) -> Edits:
    """LocoRE: gains ``γ_h λ^(t−1−j)`` on the ``window`` keys before the query (j ≥ first_key).
    Logit form (``fused_hooks``): ``z + ln(1 + gain)``; probability form (``make_hooks``):
    ``a·(1 + gain)`` renormalised (rows summing to 0 stay 0)."""
    from surgeon.attention.local_boost import NAME, head_gammas

    hq = op.facts.q_heads
    _checked_heads(NAME, p.heads, hq)
    gammas = head_gammas(p, hq)
    if not any(gammas):
        return Edits()

    def gain(like: ir.Value) -> ir.Value:  # [1,Hq,Nq,Nk]
        qpos, kpos = positions(op, s.q, s.k)
        d = op.Sub(op.Unsqueeze(qpos, op.ints([1])), op.Unsqueeze(kpos, op.ints([0])))  # [Nq,Nk]
        inside = op.And(op.GreaterOrEqual(d, op.int_scalar(1)), op.LessOrEqual(d, op.int_scalar(p.window)))
        inside = op.And(inside, op.Unsqueeze(op.GreaterOrEqual(kpos, op.int_scalar(p.first_key)), op.ints([0])))
        expo = op.CastLike(op.Max(op.Sub(d, op.int_scalar(1)), op.int_scalar(0)), like)
        g = op.Where(inside, op.Pow(op.scalar(p.decay, like), expo), op.scalar(0.0, like))  # [Nq,Nk]
        return op.Mul(head_vector(op, gammas, like), g)

    if definition:
        def prob_edit(a: ir.Value) -> ir.Value:
            b = op.Mul(a, op.Add(op.scalar(1.0, a), gain(a)))
            tot = op.ReduceSum(b, op.ints([-1]), keepdims=1)
            return op.Div(b, op.Where(op.Greater(tot, op.scalar(0.0, tot)), tot, op.scalar(1.0, tot)))

        return Edits(prob=(prob_edit,))

    def logit_edit(z: ir.Value) -> ir.Value:
        return op.Add(z, op.Log(op.Add(op.scalar(1.0, z), gain(z))))

    return Edits(logit=(logit_edit,))


def _lower_modulated(name: str, op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value,
                     key_padding: Optional[ir.Value], attn_mask: Optional[ir.Value], causal: bool, scale: float,
                     config: str) -> ir.Value:
    """A modulated site variant: its own edits, then its modulators' (``run_hooks``: own hooks
    before the context's, per kind). Own edits take the definition form when modulators follow
    (the torch reference then runs ``make_hooks``), else the cheaper ``fused_hooks`` form."""
    mods = modulator_edits(op, q, k, v, key_padding, causal, scale, config)
    own = _edits_of(op, EditSite(q, k, v, key_padding, bool(causal), float(scale)), name, _params(config),
                    bool(mods), "variant")
    return attention(op, q, k, v, key_padding, attn_mask, causal, scale, **own.then(mods).kwargs())


@register_lowering("temperature")
def lower_temperature(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                      attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                      block_mask: Optional[ir.Value]) -> ir.Value:
    """SSA temperature (:func:`temperature_edits`), then any modulators. → [B,Hq,Nq,Dv]."""
    return _lower_modulated("temperature", op, q, k, v, key_padding, attn_mask, causal, scale, config)


@register_lowering("head_boost")
def lower_head_boost(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                     attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                     block_mask: Optional[ir.Value]) -> ir.Value:
    """PAINT (:func:`head_boost_edits`), then any modulators. → [B,Hq,Nq,Dv]."""
    return _lower_modulated("head_boost", op, q, k, v, key_padding, attn_mask, causal, scale, config)


@register_lowering("sink_redistribute")
def lower_sink_redistribute(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value,
                            key_padding: Optional[ir.Value], attn_mask: Optional[ir.Value], causal: bool,
                            scale: float, config: str, block_mask: Optional[ir.Value]) -> ir.Value:
    """VAR (:func:`sink_redistribute_edits`), then any modulators. → [B,Hq,Nq,Dv]."""
    return _lower_modulated("sink_redistribute", op, q, k, v, key_padding, attn_mask, causal, scale, config)


@register_lowering("identity_blend")
def lower_identity_blend(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value,
                         key_padding: Optional[ir.Value], attn_mask: Optional[ir.Value], causal: bool,
                         scale: float, config: str, block_mask: Optional[ir.Value]) -> ir.Value:
    """SoftPAG (:func:`identity_blend_edits`; output form on its own), then any modulators.
    → [B,Hq,Nq,Dv]."""
    return _lower_modulated("identity_blend", op, q, k, v, key_padding, attn_mask, causal, scale, config)


@register_lowering("local_boost")
def lower_local_boost(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                      attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                      block_mask: Optional[ir.Value]) -> ir.Value:
    """LocoRE (:func:`local_boost_edits`; logit form on its own), then any modulators. → [B,Hq,Nq,Dv]."""
    return _lower_modulated("local_boost", op, q, k, v, key_padding, attn_mask, causal, scale, config)


# --------------------------------------------------------------------------- sparse variants
# Correctness first: these build the variant's token-level keep mask in standard ops and run
# masked dense attention (the ONNX twin of each variant's ``reference``); they do not skip
# work. A runtime plugin of the same name is where the sparse speedup belongs.

def window_keep(op: LoweringBuilder, q: ir.Value, k: ir.Value, causal: bool, sink_tokens: int,
                window: int) -> ir.Value:
    """Bool [Nq, Nk] of ``window_sink``: key j kept when j < sink_tokens or inside the window
    (causal: p − window < j ≤ p; else |p − j| < window), p the query position."""
    qpos, kpos = positions(op, q, k)
    p = op.Unsqueeze(qpos, op.ints([1]))
    j = op.Unsqueeze(kpos, op.ints([0]))
    lo = op.Greater(j, op.Sub(p, op.int_scalar(window)))
    hi = op.LessOrEqual(j, p) if causal else op.Less(j, op.Add(p, op.int_scalar(window)))
    return op.Or(op.And(lo, hi), op.Less(j, op.int_scalar(sink_tokens)))


@register_lowering("window_sink")
def lower_window_sink(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                      attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                      block_mask: Optional[ir.Value]) -> ir.Value:
    """Sliding window plus sink tokens (token-level keep mask, masked attention), modulators
    composed as in the reference (``attention_from_keep`` with the context's hooks). → [B,Hq,Nq,Dv]."""
    p = _params(config)
    keep = window_keep(op, q, k, causal, int(p.sink_tokens), int(p.window))
    mods = modulator_edits(op, q, k, v, key_padding, causal, scale, config)
    return attention(op, q, k, v, key_padding, attn_mask, causal, scale, keep, **mods.kwargs())


@dataclasses.dataclass(frozen=True)
class BlockGrid:
    """ONNX values of :class:`surgeon.kernels.geometry.BlockGeometry` (dynamic lengths).

    nqb/nkb: 0-D int64 block counts; qb/kb: [nqb]/[nkb] block indices; q_first/q_last: [nqb]
    query positions; k_start/k_end: [nkb] first/last key position of each key block;
    allowed/partial: bool [nqb, nkb] (partial None when not causal);
    diag: [nqb] key block holding the block's last query, clamped to [0, nkb−1].
    """

    q_block: int
    k_block: int
    nqb: ir.Value
    nkb: ir.Value
    qb: ir.Value
    kb: ir.Value
    q_first: ir.Value
    q_last: ir.Value
    k_start: ir.Value
    k_end: ir.Value
    allowed: ir.Value
    partial: Optional[ir.Value]
    diag: ir.Value


def block_grid(op: LoweringBuilder, q: ir.Value, k: ir.Value, q_block: int, k_block: int, causal: bool) -> BlockGrid:
    """Block geometry for Nq = len(q), Nk = len(k) (queries are the last Nq positions; Nq ≤ Nk)."""

    def make() -> BlockGrid:
        nq, nk = op.dim(q, 2), op.dim(k, 2)
        zero, one = op.int_scalar(0), op.int_scalar(1)
        qbs, kbs = op.int_scalar(q_block), op.int_scalar(k_block)
        nqb = op.Div(op.Add(nq, op.int_scalar(q_block - 1)), qbs)
        nkb = op.Div(op.Add(nk, op.int_scalar(k_block - 1)), kbs)
        off = op.Sub(nk, nq)
        qb, kb = op.Range(zero, nqb, one), op.Range(zero, nkb, one)
        q_first = op.Add(off, op.Mul(qb, qbs))
        q_last = op.Sub(op.Add(off, op.Min(op.Mul(op.Add(qb, one), qbs), nq)), one)
        k_start = op.Mul(kb, kbs)
        k_end = op.Sub(op.Min(op.Add(k_start, kbs), nk), one)
        row = op.ints([1])
        col = op.ints([0])
        if causal:
            allowed = op.LessOrEqual(op.Unsqueeze(k_start, col), op.Unsqueeze(q_last, row))
            partial = op.And(allowed, op.Greater(op.Unsqueeze(k_end, col), op.Unsqueeze(q_first, row)))
        else:
            shape = op.Concat(op.Unsqueeze(nqb, col), op.Unsqueeze(nkb, col), axis=0)
            allowed = op.Expand(op.Constant(value=ir.tensor(np.array(True))), shape)
            partial = None
        diag = op.Max(op.Min(op.Div(q_last, kbs), op.Sub(nkb, one)), zero)
        return BlockGrid(q_block, k_block, nqb, nkb, qb, kb, q_first, q_last, k_start, k_end, allowed, partial, diag)

    return op.memo(("grid", id(q), id(k), q_block, k_block, causal), make)


def sink_local_blocks(op: LoweringBuilder, g: BlockGrid, sink_blocks: int, local_blocks: int) -> ir.Value:
    """Bool [nqb, nkb]: the first ``sink_blocks`` key blocks and the ``local_blocks`` blocks
    ending at each query block's diagonal block, among allowed blocks."""
    kb = op.Unsqueeze(g.kb, op.ints([0]))
    d = op.Unsqueeze(g.diag, op.ints([1]))
    local = op.And(op.LessOrEqual(kb, d), op.Greater(kb, op.Sub(d, op.int_scalar(local_blocks))))
    return op.And(op.Or(op.Less(kb, op.int_scalar(sink_blocks)), local), g.allowed)


def upsample_block_mask(op: LoweringBuilder, bm: ir.Value, q: ir.Value, k: ir.Value, q_block: int,
                        k_block: int) -> ir.Value:
    """Block mask [B,H,nqb,nkb] → token mask [B,H,Nq,Nk] (query row i → block i // q_block)."""
    zero, one = op.int_scalar(0), op.int_scalar(1)
    qi = op.Div(op.Range(zero, op.dim(q, 2), one), op.int_scalar(q_block))
    ki = op.Div(op.Range(zero, op.dim(k, 2), one), op.int_scalar(k_block))
    return op.Gather(op.Gather(bm, qi, axis=2), ki, axis=3)


def _ones_row(op: LoweringBuilder, x: ir.Value, like: ir.Value) -> ir.Value:
    """Ones [1, N] (N = axis 2 of x), element type of ``like``."""
    shape = op.Concat(op.ints([1]), op.dims(x, 2, 3), axis=0)
    return op.CastLike(op.ConstantOfShape(shape, value=ir.tensor(np.array([1.0], dtype=np.float32))), like)


def pooled_rows(op: LoweringBuilder, x: ir.Value, w: ir.Value, nblocks: ir.Value, block: int,
                shifted: bool) -> tuple[ir.Value, ir.Value]:
    """Weighted mean per block of rows: x [B,H,N,D], w [B|1,N] → ([B,H,nb,D], count [B|1,1,nb,1]).

    ``shifted`` (the causal query pooling of ``pooled_queries``): block b averages rows
    [b·block − block + 1, b·block]; otherwise rows [b·block, (b+1)·block). Missing rows weigh 0.
    """
    total = op.Unsqueeze(op.Mul(nblocks, op.int_scalar(block)), op.ints([0]))  # [1]
    if shifted:
        front = op.ints([block - 1])
        xs = op.Pad(x, op.Concat(op.ints([0, 0]), front, op.ints([0, 0, 0, 0, 0]), axis=0))
        ws = op.Pad(w, op.Concat(op.ints([0]), front, op.ints([0, 0]), axis=0))
        xs = op.Slice(xs, op.ints([0]), total, op.ints([2]))
        ws = op.Slice(ws, op.ints([0]), total, op.ints([1]))
    else:
        tail = op.Sub(total, op.dims(x, 2, 3))
        xs = op.Pad(x, op.Concat(op.ints([0, 0, 0, 0, 0, 0]), tail, op.ints([0]), axis=0))
        ws = op.Pad(w, op.Concat(op.ints([0, 0, 0]), tail, axis=0))
    nb = op.Unsqueeze(nblocks, op.ints([0]))
    x5 = op.Reshape(xs, op.Concat(op.dims(x, 0, 2), nb, op.ints([block]), op.dims(x, 3), axis=0), allowzero=1)
    w5 = op.Reshape(ws, op.Concat(op.dims(w, 0, 1), op.ints([1]), nb, op.ints([block, 1]), axis=0), allowzero=1)
    s = op.ReduceSum(op.Mul(x5, w5), op.ints([3]), keepdims=0)
    cnt = op.ReduceSum(w5, op.ints([3]), keepdims=0)
    return op.Div(s, op.Max(cnt, op.scalar(1.0, cnt))), cnt


def query_weights(op: LoweringBuilder, q: ir.Value, k: ir.Value, key_padding: Optional[ir.Value],
                  causal: bool) -> ir.Value:
    """Real-query weights [B|1, Nq] (``query_validity``): key_padding's last Nq entries for
    self-attention (causal, or the same sequence axis), else ones."""
    if key_padding is None or not (causal or op.facts.self_attention):
        return _ones_row(op, q, q)
    start = op.Sub(op.dims(k, 2, 3), op.dims(q, 2, 3))
    return op.CastLike(op.Slice(key_padding, start, op.ints([_INT64_MAX]), op.ints([1])), q)


def select_top(op: LoweringBuilder, scores: ir.Value, allowed: ir.Value, forced: ir.Value, candidate: ir.Value,
               counts: ir.Value) -> ir.Value:
    """``geometry.select_top``: forced allowed blocks (+inf) plus the best-scoring
    eligible allowed blocks up to ``counts`` per row; ties toward the lower block index (ONNX
    TopK's documented tie-break). scores [B,H,R,C]; allowed/forced [R,C]; candidate
    broadcastable; counts [H,R] int64. Returns bool [B,H,R,C]."""
    forced = op.And(forced, allowed)
    s = op.Where(op.And(allowed, candidate), scores, op.scalar(-math.inf, scores))
    s = op.Where(forced, op.scalar(math.inf, scores), s)
    n_forced = op.ReduceSum(op.Cast(forced, to=ir.DataType.INT64), op.ints([-1]), keepdims=0)  # [R]
    k_eff = op.Unsqueeze(op.Max(counts, n_forced), op.ints([-1]))  # [H,R,1]
    order = op.TopK(s, op.dims(s, 3, 4), axis=-1, largest=1, sorted=1, _outputs=2)[1]
    ar = op.Expand(op.Range(op.int_scalar(0), op.dim(s, 3), op.int_scalar(1)), op.Shape(order))
    ranks = op.ScatterElements(ar, order, ar, axis=-1)  # rank of each block in the order
    return op.And(op.Less(ranks, k_eff), op.Greater(s, op.scalar(-math.inf, scores)))


def keep_counts(op: LoweringBuilder, fractions: Sequence[float], allowed: ir.Value) -> ir.Value:
    """⌈fraction_h · n_allowed_r − 1e−9⌉ in float64: [H, R] int64 (``geometry.keep_counts``)."""
    n_allowed = op.Cast(op.ReduceSum(op.Cast(allowed, to=ir.DataType.INT64), op.ints([-1]), keepdims=0),
                        to=ir.DataType.DOUBLE)
    frac = op.Constant(value=ir.tensor(np.asarray(fractions, dtype=np.float64).reshape(-1, 1)))
    x = op.Sub(op.Mul(frac, op.Unsqueeze(n_allowed, op.ints([0]))), op.Constant(value=ir.tensor(np.array(1e-9))))
    return op.Cast(op.Ceil(x), to=ir.DataType.INT64)


@register_lowering("block_topk")
def lower_block_topk(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                     attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                     block_mask: Optional[ir.Value]) -> tuple[ir.Value, ir.Value]:
    """Pooled-QK block scores, top key blocks per query block (forced sink/local/causal-
    boundary blocks), token keep mask from the block mask, masked attention with the site's
    modulators (the selection itself is never modulated, as in the reference).
    → (out [B,Hq,Nq,Dv], block mask bool [B,Hq,nqb,nkb])."""
    from surgeon.attention.block_topk import head_fractions

    p = _params(config)
    bs = int(p.block_size)
    fractions = head_fractions(p, op.facts.q_heads, torch.device("cpu")).tolist()
    g = block_grid(op, q, k, bs, bs, causal)
    qbar, _ = pooled_rows(op, q, query_weights(op, q, k, key_padding, causal), g.nqb, bs, causal)
    kw = _ones_row(op, k, k) if key_padding is None else op.CastLike(key_padding, k)
    kbar, kcnt = pooled_rows(op, k, kw, g.nkb, bs, False)  # [B,Hkv,nkb,D], [B|1,1,nkb,1]
    has_real = op.Transpose(op.Greater(kcnt, op.scalar(0.0, kcnt)), perm=[0, 1, 3, 2])  # [B|1,1,1,nkb]
    logits = op.Mul(gqa_scores(op, qbar, kbar), op.scalar(scale, q))  # [B,Hq,nqb,nkb]
    forced = sink_local_blocks(op, g, int(p.sink_blocks), int(p.local_blocks))
    if g.partial is not None:
        forced = op.Or(forced, g.partial)
    sel = select_top(op, logits, g.allowed, forced, has_real, keep_counts(op, fractions, g.allowed))
    keep = upsample_block_mask(op, sel, q, k, bs, bs)
    mods = modulator_edits(op, q, k, v, key_padding, causal, scale, config)
    return attention(op, q, k, v, key_padding, attn_mask, causal, scale, keep, **mods.kwargs()), sel


@register_lowering("reuse")
def lower_reuse(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                block_mask: Optional[ir.Value]) -> ir.Value:
    """Attention over the anchor's block mask [B|1,Hq|1,nqb,nkb] ∪ sink/local blocks, with the
    site's modulators. → [B,Hq,Nq,Dv]."""
    if block_mask is None:
        raise BadInput("reuse needs the block mask of its anchor layer",
                       "rewrite with an anchor variant that produces block masks before this layer")
    p = _params(config)
    bs = int(p.block_size)
    g = block_grid(op, q, k, bs, bs, causal)
    bm = op.Or(op.Cast(block_mask, to=ir.DataType.BOOL), sink_local_blocks(op, g, int(p.sink_blocks),
                                                                             int(p.local_blocks)))
    keep = upsample_block_mask(op, bm, q, k, bs, bs)
    mods = modulator_edits(op, q, k, v, key_padding, causal, scale, config)
    return attention(op, q, k, v, key_padding, attn_mask, causal, scale, keep, **mods.kwargs())


def recent_blocks(op: LoweringBuilder, g: BlockGrid, sink_blocks: int, recent_tokens: int) -> ir.Value:
    """Bool [nqb, nkb] (``geometry.recent_blocks``): the first ``sink_blocks`` key blocks
    plus every key block overlapping [q_first − recent + 1, q_last + recent − 1], among allowed."""
    lo = op.Unsqueeze(op.Sub(g.q_first, op.int_scalar(recent_tokens - 1)), op.ints([1]))
    hi = op.Unsqueeze(op.Add(g.q_last, op.int_scalar(recent_tokens - 1)), op.ints([1]))
    col = op.ints([0])
    near = op.And(op.GreaterOrEqual(op.Unsqueeze(g.k_end, col), lo), op.LessOrEqual(op.Unsqueeze(g.k_start, col), hi))
    sink = op.Less(op.Unsqueeze(g.kb, col), op.int_scalar(sink_blocks))
    return op.And(op.Or(near, sink), g.allowed)


def real_blocks(op: LoweringBuilder, key_padding: ir.Value, g: BlockGrid, k: ir.Value) -> ir.Value:
    """Bool [B, nkb]: key blocks holding at least one real key."""
    kpf = op.Cast(key_padding, to=ir.DataType.FLOAT)
    total = op.Unsqueeze(op.Mul(g.nkb, op.int_scalar(g.k_block)), op.ints([0]))
    kpf = op.Pad(kpf, op.Concat(op.ints([0, 0, 0]), op.Sub(total, op.dims(k, 2, 3)), axis=0))
    shape = op.Concat(op.dims(key_padding, 0, 1), op.Unsqueeze(g.nkb, op.ints([0])), op.ints([g.k_block]), axis=0)
    return op.Greater(op.ReduceMax(op.Reshape(kpf, shape, allowzero=1), op.ints([-1]), keepdims=0),
                      op.Constant(value_float=0.0))


def delta_page_scores(op: LoweringBuilder, a: ir.Value, q: ir.Value, k: ir.Value, key_padding: Optional[ir.Value],
                      causal: bool, g: BlockGrid, score_queries: int) -> ir.Value:
    """DELTA page scores [B, nqb, npages] (``delta.page_scores``) from the dense probabilities
    a [B,Hq,Nq,Nk]: Σ over the block's scoring rows and the page's keys of max over heads."""
    sq = score_queries
    nq = op.dim(q, 2)
    ar = op.Unsqueeze(op.Constant(value=ir.tensor(np.arange(sq, dtype=np.int64))), op.ints([0]))  # [1,sq]
    first = op.Unsqueeze(op.Mul(g.qb, op.int_scalar(g.q_block)), op.ints([1]))  # [nqb,1] row index
    if causal:
        rows = op.Add(op.Sub(first, op.int_scalar(sq - 1)), ar)
        in_range = op.GreaterOrEqual(rows, op.int_scalar(0))
    else:
        rows = op.Add(first, ar)
        in_range = op.And(op.Less(rows, nq), op.Less(rows, op.Add(first, op.int_scalar(g.q_block))))
    rows = op.Max(op.Min(rows, op.Sub(nq, op.int_scalar(1))), op.int_scalar(0))  # [nqb,sq]
    weight = op.Unsqueeze(op.CastLike(in_range, a), op.ints([0]))  # [1,nqb,sq]
    if key_padding is not None and (causal or op.facts.self_attention):
        qv = query_weights(op, q, k, key_padding, causal)  # [B,Nq]
        weight = op.Mul(weight, op.Gather(qv, rows, axis=1))  # [B,nqb,sq]
    pr = op.ReduceMax(a, op.ints([1]), keepdims=0)  # [B,Nq,Nk]
    pr = op.Gather(pr, rows, axis=1)  # [B,nqb,sq,Nk]
    pr = op.Mul(pr, op.Unsqueeze(weight, op.ints([3])))
    total = op.Unsqueeze(op.Mul(g.nkb, op.int_scalar(g.k_block)), op.ints([0]))
    pr = op.Pad(pr, op.Concat(op.ints([0, 0, 0, 0, 0, 0, 0]), op.Sub(total, op.dims(k, 2, 3)), axis=0))
    shape = op.Concat(op.dims(pr, 0, 3), op.Unsqueeze(g.nkb, op.ints([0])), op.ints([g.k_block]), axis=0)
    return op.ReduceSum(op.Reshape(pr, shape, allowzero=1), op.ints([2, 4]), keepdims=0)


@register_lowering("delta")
def lower_delta(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                block_mask: Optional[ir.Value]) -> tuple[ir.Value, ir.Value]:
    """DELTA Δ-layer: dense attention plus one page set per query block (top pages by the
    dense probabilities, sink/recent pages forced), repeated over heads. The output composes
    the site's modulators; the page scores use the unmodulated probabilities (``page_scores``
    never sees the hooks). → (out [B,Hq,Nq,Dv], page mask bool [B,Hq,nqb,npages])."""
    p = _params(config)
    z = scaled_logits(op, q, k, attn_mask, scale)
    allow = allowed_mask(op, q, k, key_padding, attn_mask, causal)
    a = masked_softmax(op, z, allow)
    mods = modulator_edits(op, q, k, v, key_padding, causal, scale, config)
    am = a if not mods.logit else masked_softmax(op, mods.logit_edit(z), allow)
    if mods.prob:
        am = mods.prob_edit(am)
    out = gqa_apply(op, am, v)
    if mods.out:
        out = mods.out_edit(out)
    g = block_grid(op, q, k, int(p.q_block), int(p.page_size), causal)
    scores = op.Unsqueeze(delta_page_scores(op, a, q, k, key_padding, causal, g, int(p.score_queries)),
                          op.ints([1]))  # [B,1,nqb,npg]
    if key_padding is None:
        candidate = op.Constant(value=ir.tensor(np.array(True)))
    else:
        candidate = op.Unsqueeze(real_blocks(op, key_padding, g, k), op.ints([1, 2]))  # [B,1,1,npg]
    forced = recent_blocks(op, g, int(p.sink_pages), int(p.recent_pages) * int(p.page_size))
    sel = select_top(op, scores, g.allowed, forced, candidate, keep_counts(op, [float(p.keep)], g.allowed))
    shape = op.Concat(op.dims(sel, 0, 1), op.ints([op.facts.q_heads]), op.dims(sel, 2), axis=0)
    return out, op.Expand(sel, shape)


@register_lowering("delta_sparse")
def lower_delta_sparse(op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value, key_padding: Optional[ir.Value],
                       attn_mask: Optional[ir.Value], causal: bool, scale: float, config: str,
                       block_mask: Optional[ir.Value]) -> ir.Value:
    """DELTA sparse layer: attention over the incoming page mask ∪ sink/recent pages, with the
    site's modulators. → [B,Hq,Nq,Dv]."""
    if block_mask is None:
        raise BadInput("delta_sparse needs the page mask of its Δ-layer",
                       "rewrite with a delta layer before this layer")
    p = _params(config)
    g = block_grid(op, q, k, int(p.q_block), int(p.page_size), causal)
    bm = op.Or(op.Cast(block_mask, to=ir.DataType.BOOL),
               recent_blocks(op, g, int(p.sink_pages), int(p.recent_pages) * int(p.page_size)))
    keep = upsample_block_mask(op, bm, q, k, int(p.q_block), int(p.page_size))
    mods = modulator_edits(op, q, k, v, key_padding, causal, scale, config)
    return attention(op, q, k, v, key_padding, attn_mask, causal, scale, keep, **mods.kwargs())


from surgeon.exporters import onnx_lowering_select as _select  # noqa: E402,F401  (registers lowerings)
from surgeon.exporters import onnx_lowering_pooled as _pooled  # noqa: E402,F401  (registers lowerings)
