"""The ONNX lowering kit: the builder of function bodies, shared attention pieces and modulator edits.

A variant's lowering lives in its folder (``surgeon/attention/<variant>/lowering.py``) and is
written with these pieces (and the block pieces of :mod:`surgeon.exporters.onnx_blocks`);
:mod:`surgeon.exporters.onnx_lowering` turns lowerings into ONNX functions.

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
(usually ``attention(..., **edits.kwargs())``).
:func:`surgeon.exporters.onnx_lowering.build_function` refuses (BadInput, naming site, variant
and modulators) a config with modulators whose lowering did not call :func:`modulator_edits`,
so a modulated site is never exported without its modulation.

Modulated variants are expressed as *edits* (see :class:`Edits`): a logit edit, a probability
edit and/or an output edit, built from the variant's parameters by the factory its folder's
``lowering.py`` declares in ``EDITS`` (:meth:`surgeon.attention.base.Variant.onnx_edits`). Each
factory mirrors its variant's hooks
(surgeon/attention/<name>/__init__.py) in two forms, as torch uses them:

* ``definition=False``: the form of ``fused_hooks`` (what :func:`surgeon.attention.ops.compose_modulators`
  puts into AttnContext when the variant is a *modulator* of another site variant, and the
  cheapest lowering of the variant on its own);
* ``definition=True``: the form of ``make_hooks`` (what the variant's reference applies as its
  own hooks, before the context's, when it is the site variant *and* carries modulators).

They differ only for identity_blend (output blend vs probability blend) and local_boost (logit
bias vs probability boost + renormalisation), which are equal on their own but not once other
edits come between them. The variant's own pure-Python helpers give the per-head constants so
both sides agree.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import onnx_ir as ir

from surgeon.attention.ops import parse_config
from surgeon.attention.registry import VARIANTS, get_variant
from surgeon.errors import BadInput

INT64_MAX = 2**63 - 1
LoweringFn = Callable[..., Union[ir.Value, tuple[ir.Value, ir.Value]]]


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


def params_of(config: str) -> Any:
    return parse_config(config)[1]


OwnEdits = Callable[["LoweringBuilder", "EditSite", Any, bool], "Edits"]


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


def edits_of(op: LoweringBuilder, s: EditSite, name: str, params: Any, definition: bool, role: str) -> Edits:
    """Edits of modulated variant ``name``; BadInput names the site, variant and modulator."""
    fn = get_variant(name).onnx_edits() if name in VARIANTS else None
    where = f"site '{op.site}'" if op.site else "a site"
    if fn is None:
        raise BadInput(f"{where} ({op.facts.variant}): {role} '{name}' has no ONNX edit form",
                       f"declare one in EDITS of its folder's lowering.py (see Variant.onnx_edits), "
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
        out = out.then(edits_of(op, s, name, params, False, "modulator"))
    return out


def checked_heads(name: str, heads: Sequence[int], hq: int) -> list[int]:
    """Sorted query-head indices (``()``: all ``hq``), as ``modulation.site_heads``."""
    for h in heads:
        if h >= hq:
            raise BadInput(f"{name}: heads names query head {h}, but the site has {hq} query heads",
                           f"use head indices in [0, {hq - 1}]")
    return sorted(heads) if heads else list(range(hq))


def own_position(op: LoweringBuilder, s: EditSite) -> tuple[ir.Value, ir.Value]:
    """``(start, end)`` 1-D int64 of the last Nq key positions (the queries' own keys)."""
    return op.Sub(op.dims(s.k, 2, 3), op.dims(s.q, 2, 3)), op.ints([INT64_MAX])


def lower_modulated(name: str, op: LoweringBuilder, q: ir.Value, k: ir.Value, v: ir.Value,
                     key_padding: Optional[ir.Value], attn_mask: Optional[ir.Value], causal: bool, scale: float,
                     config: str) -> ir.Value:
    """A modulated site variant: its own edits, then its modulators' (``run_hooks``: own hooks
    before the context's, per kind). Own edits take the definition form when modulators follow
    (the torch reference then runs ``make_hooks``), else the cheaper ``fused_hooks`` form."""
    mods = modulator_edits(op, q, k, v, key_padding, causal, scale, config)
    own = edits_of(op, EditSite(q, k, v, key_padding, bool(causal), float(scale)), name, params_of(config),
                    bool(mods), "variant")
    return attention(op, q, k, v, key_padding, attn_mask, causal, scale, **own.then(mods).kwargs())


def ones_row(op: LoweringBuilder, x: ir.Value, like: ir.Value) -> ir.Value:
    """Ones [1, N] (N = axis 2 of x), element type of ``like``."""
    shape = op.Concat(op.ints([1]), op.dims(x, 2, 3), axis=0)
    return op.CastLike(op.ConstantOfShape(shape, value=ir.tensor(np.array([1.0], dtype=np.float32))), like)


def last_dim(op: LoweringBuilder, x: ir.Value) -> ir.Value:
    """``Shape(x)[-1]`` as a 0-D int64."""
    return op.Squeeze(op.Shape(x, start=-1), op.ints([0]))


def neg_inf_like(op: LoweringBuilder, like: ir.Value) -> ir.Value:
    return op.scalar(-math.inf, like)
