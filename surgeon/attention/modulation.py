"""Shared machinery of the modulated variants (methods.md §7–§11), family ``"modulated"``.

A modulated variant does the full work of dense attention (requested and achieved density are
1.0) but edits it. Its *definition* is a set of hooks (see :meth:`ModulatedVariant.hooks`):

* ``logit_fn(z)``: z [B, Hq, Nq, Nk] scaled logits (after any float ``attn_mask``, before the
  causal/padding masking) → edited logits of the same shape;
* ``prob_fn(a)``: a [B, Hq, Nq, Nk] post-softmax probabilities → edited probabilities;
* ``out_fn(o, v)``: o [B, Hq, Nq, Dv] attention output, v [B, Hq, Nk, Dv] values repeated to the
  query heads → edited output.

Hooks are shape-generic: they accept any batch size and any Nq ≤ Nk and take the queries to be
the last Nq of the Nk key positions (prefill: Nq == Nk, decode: Nq == 1), deriving positions from
the shape. The reference is ``attention_from_keep`` with the hooks; each variant also has one
fused fast path (``"fused"``) that computes the same thing without an N×N matrix for all heads:
SDPA on pre-scaled queries (temperature), SDPA plus an elementwise blend (identity_blend), or
plain SDPA for the untouched heads plus, for the edited heads/rows only, query-chunked SDPA with
an additive float bias (:func:`biased_sdpa_rows`: local_boost, head_boost) or a few SDPA calls
whose values are key-group indicators (sink_redistribute: the per-row masses its rule needs).

The lead composes a modulator onto another variant by putting ``hooks`` (or the equivalent,
cheaper :meth:`ModulatedVariant.fused_hooks`) into :class:`AttnContext`.
"""
from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Callable, ClassVar, Optional, Sequence, TypeVar

import torch
import torch.nn.functional as F

from surgeon.errors import BadInput
from surgeon.attention.base import (
    AttnContext,
    Variant,
    VariantParams,
    additive_mask,
    attention_from_keep,
    record_density,
    recorder_active,
    repeat_kv,
)
from surgeon.attention.dense import sdpa

HOOK_NAMES = ("logit_fn", "prob_fn", "out_fn")
Hooks = dict[str, Callable[..., torch.Tensor]]
# Largest number of score elements one query chunk of the fused paths materialises
# (B × heads × rows × keys); 2**24 float32 elements = 64 MiB.
CHUNK_ELEMS = 1 << 24


# --------------------------------------------------------------------------- parameter checks

def check_number(variant: str, name: str, value: Any) -> float:
    """``value`` as a finite float, or :class:`BadInput` naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise BadInput(f"{variant}: parameter {name}={value!r} is not a finite number", f"give {name} as a number")
    return float(value)


def check_strength(variant: str, name: str, value: Any, lo: float, hi: float) -> None:
    """A finite number in [lo, hi]; the message names the variant and parameter."""
    x = check_number(variant, name, value)
    if not lo <= x <= hi:
        raise BadInput(f"{variant}: parameter {name}={value} is out of range", f"use a value in [{lo}, {hi}]")


def check_int(variant: str, name: str, value: Any, lo: int = 0) -> int:
    """An integer (not a bool) >= ``lo``; the message names the variant and parameter."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(f"{variant}: parameter {name}={value!r} is not an integer", f"give {name} as an integer >= {lo}")
    if value < lo:
        raise BadInput(f"{variant}: parameter {name}={value} is out of range", f"use an integer >= {lo}")
    return value


def as_tuple(value: Any) -> Any:
    """Lists (from JSON or callers) → tuples, recursively, so params stay hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(as_tuple(x) for x in value)
    return value


def normalise_fields(params: VariantParams, names: Sequence[str]) -> None:
    """Turn list-valued fields of a frozen params object into tuples (in ``__post_init__``)."""
    for n in names:
        object.__setattr__(params, n, as_tuple(getattr(params, n)))


def check_index_tuple(variant: str, name: str, values: Any) -> None:
    """A tuple of distinct non-negative integers (head or token indices)."""
    if not isinstance(values, tuple):
        raise BadInput(f"{variant}: parameter {name}={values!r} is not a list of indices",
                       f"give {name} as a list of integers")
    for x in values:
        check_int(variant, f"{name} entry", x, 0)
    if len(set(values)) != len(values):
        raise BadInput(f"{variant}: parameter {name}={list(values)} repeats an index", "list each index once")


def check_span(variant: str, name: str, span: Any) -> None:
    """``(start, end)`` with 0 <= start < end (end exclusive)."""
    if not isinstance(span, tuple) or len(span) != 2:
        raise BadInput(f"{variant}: parameter {name}={span!r} is not a (start, end) pair",
                       "give spans as [start, end] with end exclusive")
    s, e = span
    check_int(variant, f"{name} start", s, 0)
    check_int(variant, f"{name} end", e, 0)
    if e <= s:
        raise BadInput(f"{variant}: parameter {name}={list(span)} is empty", "use start < end (end exclusive)")


# --------------------------------------------------------------------------- run-time site checks

P = TypeVar("P", bound=VariantParams)


def expect_params(variant: str, p: VariantParams, cls: type[P]) -> P:
    """``p`` if it is a ``cls`` instance, else :class:`BadInput` (the wrong variant's params)."""
    if not isinstance(p, cls):
        raise BadInput(f"{variant}: got {type(p).__name__}, expected {cls.__name__}",
                       f"build parameters with {cls.__name__}")
    return p


def site_heads(variant: str, name: str, heads: tuple[int, ...], hq: int, ctx: AttnContext) -> list[int]:
    """Validated, sorted query-head indices (``()`` means all ``hq`` heads)."""
    for h in heads:
        if h >= hq:
            where = f" '{ctx.site}'" if ctx.site else ""
            raise BadInput(
                f"{variant}: {name} names query head {h}, but site{where} (layer {ctx.layer}) has {hq} query heads",
                f"use head indices in [0, {hq - 1}]",
            )
    return sorted(heads) if heads else list(range(hq))


def site_span(variant: str, name: str, span: tuple[int, int], nk: int) -> None:
    """:class:`BadInput` unless the (start, end) span fits an ``nk``-token key axis."""
    if span[1] > nk:
        raise BadInput(f"{variant}: {name}={list(span)} lies outside the {nk}-token sequence",
                       f"use 0 <= start < end <= {nk}")


def site_index(variant: str, name: str, idx: int, nk: int) -> None:
    """:class:`BadInput` unless token ``idx`` exists on an ``nk``-token key axis."""
    if idx >= nk:
        raise BadInput(f"{variant}: {name} token {idx} lies outside the {nk}-token sequence",
                       f"use token indices in [0, {nk - 1}]")


# --------------------------------------------------------------------------- shared tensor helpers

def query_positions(nq: int, nk: int, device: torch.device) -> torch.Tensor:
    """Absolute positions [Nq] (long) of the queries: the last Nq of Nk key positions."""
    return torch.arange(nk - nq, nk, device=device)


def run_hooks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext, hooks: Hooks) -> torch.Tensor:
    """Reference attention with a variant's own ``hooks`` applied before the context's hooks.

    q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D] → [B,Hq,Nq,Dv]. Materialises Nq×Nk per head.
    """
    unknown = set(hooks) - set(HOOK_NAMES)
    if unknown:
        raise BadInput(f"unknown modulation hook(s) {sorted(unknown)}", f"use {', '.join(HOOK_NAMES)}")
    inner = dataclasses.replace(ctx, out_fn=None) if ctx.out_fn is not None else ctx
    out = attention_from_keep(q, k, v, inner, logit_fn=hooks.get("logit_fn"), prob_fn=hooks.get("prob_fn"))
    own, outer = hooks.get("out_fn"), ctx.out_fn
    if own is not None or outer is not None:
        vv = repeat_kv(v, q.shape[1])
        if own is not None:
            out = own(out, vv)
        if outer is not None:
            out = outer(out, vv)
    return out


def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """Dense attention through the dense variant's SDPA path: [B,Hq,Nq,Dv]."""
    return sdpa(q, k, v, ctx)


def _mask4(m: torch.Tensor) -> torch.Tensor:
    return m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))


def slice_mask(m: torch.Tensor, heads: Optional[torch.Tensor], q0: int, q1: int, kend: int) -> torch.Tensor:
    """Rows [q0, q1), keys [0, kend) and the given heads of a mask broadcastable to [B,Hq,Nq,Nk]."""
    m = _mask4(m)
    if heads is not None and m.shape[1] > 1:
        m = m.index_select(1, heads)
    if m.shape[2] > 1:
        m = m[:, :, q0:q1]
    if m.shape[3] > 1:
        m = m[..., :kend]
    return m


def chunk_allowed(ctx: AttnContext, nq: int, nk: int, q0: int, q1: int, kend: int,
                  heads: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Bool [B|1, 1|Hs, q1-q0, kend]: dense-allowed pairs for query rows [q0, q1)."""
    qpos = torch.arange(nk - nq + q0, nk - nq + q1, device=device)
    kpos = torch.arange(kend, device=device)
    if ctx.causal:
        m = (kpos[None, :] <= qpos[:, None])[None, None]
    else:
        m = torch.ones(1, 1, q1 - q0, kend, dtype=torch.bool, device=device)
    if ctx.key_padding is not None:
        m = m & ctx.key_padding.to(torch.bool)[:, None, None, :kend]
    if ctx.attn_mask is not None and ctx.attn_mask.dtype == torch.bool:
        m = m & slice_mask(ctx.attn_mask, heads, q0, q1, kend)
    return m


def _chunks(b: int, hs: int, nq: int, nk: int, row_start: int, causal: bool, max_elems: int):
    """Yield (q0, q1, kend) covering rows [row_start, nq), each holding ≤ max_elems scores."""
    rows = max(1, max_elems // max(1, b * hs * nk))
    q0 = row_start
    while q0 < nq:
        q1 = min(nq, q0 + rows)
        kend = nk - nq + q1 if causal else nk
        yield q0, q1, kend
        q0 = q1


def gather_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: torch.Tensor):
    """Query ``heads`` [Hs] (long) and the KV heads they read, repeated: three [B,Hs,*,*] tensors."""
    g = q.shape[1] // k.shape[1]
    kv_idx = torch.div(heads, g, rounding_mode="floor")
    return q.index_select(1, heads), k.index_select(1, kv_idx), v.index_select(1, kv_idx)


def ctx_for_heads(ctx: AttnContext, heads: torch.Tensor) -> AttnContext:
    """``ctx`` for a call on the query ``heads`` only (KV gathered per head; per-head masks sliced)."""
    mask = ctx.attn_mask
    if mask is not None and _mask4(mask).shape[1] > 1:
        mask = _mask4(mask).index_select(1, heads)
    return dataclasses.replace(ctx, attn_mask=mask, kv_heads=int(heads.shape[0]))


BiasFn = Callable[["BiasChunk", torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class BiasChunk:
    """What a bias function sees for one query chunk: absolute positions qpos [C] and kpos [Kc],
    the chunk's queries q [B,Hs,C,D] and keys k [B,Hs,Kc,D] (selected heads, KV repeated), the
    selected head indices heads [Hs], and the float ``attn_mask`` slice (or None) [B|1,Hs|1,C,Kc]."""

    qpos: torch.Tensor
    kpos: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    heads: torch.Tensor
    add: Optional[torch.Tensor]


def _base_mask(ctx: AttnContext, nq: int, nk: int, q0: int, q1: int, kend: int, heads: torch.Tensor,
               add_c: Optional[torch.Tensor], device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """A fresh float mask [B|1,Hs|1,C,Kc] of one chunk: the float ``attn_mask`` plus −inf on the
    dense-disallowed pairs; and whether some row may have no allowed key (padding or a boolean
    mask present). One full pass over C×Kc, plus one per padding/boolean mask."""
    c = q1 - q0
    inf = torch.full((), float("-inf"), dtype=dtype, device=device)
    mask = torch.zeros(1, 1, c, kend, dtype=dtype, device=device)
    if add_c is not None:
        mask = mask + add_c
    if ctx.causal and c > 1:
        # only the chunk's last c keys are hidden from some of its rows: key kend-c+t from rows < t
        mask[..., kend - c:] += torch.full((c, c), float("-inf"), dtype=dtype, device=device).triu(1)
    may_empty = False
    kp = ctx.key_padding
    if kp is not None and not bool(kp[:, :kend].all()):
        mask = torch.where(kp[:, None, None, :kend].to(torch.bool), mask, inf)
        may_empty = True
    if ctx.attn_mask is not None and ctx.attn_mask.dtype == torch.bool:
        mask = torch.where(slice_mask(ctx.attn_mask, heads, q0, q1, kend), mask, inf)
        may_empty = True
    return mask, may_empty


def biased_sdpa_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext, heads: torch.Tensor,
                     bias_fn: BiasFn, row_start: int = 0, *, max_elems: Optional[int] = None) -> torch.Tensor:
    """SDPA with an extra finite additive logit bias for query ``heads``, chunked over queries.

    q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D], heads [Hs] long → [B,Hs,Nq-row_start,Dv]. For each chunk of
    query rows, ``bias_fn(chunk, mask)`` (see :class:`BiasChunk`) adds its finite bias to
    ``mask`` — a fresh float tensor [B|1,Hs|1,C,Kc] holding the float ``attn_mask`` and −inf on
    the dense-disallowed pairs, which it may edit in place — and returns the result
    (broadcastable to [B,Hs,C,Kc]), used as SDPA's float mask. A chunk holds at most
    ``max_elems`` (default :data:`CHUNK_ELEMS`) mask entries; causal chunks skip keys past their
    last query. Rows with no allowed key give 0.
    """
    b, _, nq, _ = q.shape
    nk = k.shape[2]
    qs, ks, vs = gather_heads(q, k, v, heads)
    add = additive_mask(ctx)
    out = torch.empty(b, qs.shape[1], nq - row_start, v.shape[-1], dtype=q.dtype, device=q.device)
    for q0, q1, kend in _chunks(b, qs.shape[1], nq, nk, row_start, ctx.causal, max_elems or CHUNK_ELEMS):
        add_c = slice_mask(add, heads, q0, q1, kend).to(q.dtype) if add is not None else None
        chunk = BiasChunk(qpos=torch.arange(nk - nq + q0, nk - nq + q1, device=q.device),
                          kpos=torch.arange(kend, device=q.device), q=qs[:, :, q0:q1], k=ks[:, :, :kend],
                          heads=heads, add=add_c)
        mask, may_empty = _base_mask(ctx, nq, nk, q0, q1, kend, heads, add_c, q.device, q.dtype)
        mask = bias_fn(chunk, mask)
        o = F.scaled_dot_product_attention(chunk.q, chunk.k, vs[:, :, :kend], attn_mask=mask, scale=ctx.scale)
        if may_empty or add_c is not None:
            o = torch.nan_to_num(o, nan=0.0)
            if may_empty:
                row_ok = chunk_allowed(ctx, nq, nk, q0, q1, kend, heads, q.device).any(dim=-1, keepdim=True)
                o = torch.where(row_ok, o, torch.zeros((), dtype=o.dtype, device=o.device))
        out[:, :, q0 - row_start:q1 - row_start] = o
    return out


def patch_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext, heads: list[int],
                row_start: int, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Dense SDPA with rows [row_start, Nq) of query ``heads`` replaced by ``compute``.

    ``compute(heads_idx [Hs])`` returns [B,Hs,Nq-row_start,Dv]. Dense attention runs only where
    needed: on the other heads when every row is replaced (on all heads otherwise). Returns
    [B,Hq,Nq,Dv].
    """
    hq, nq = q.shape[1], q.shape[2]
    if not heads or row_start >= nq:
        return dense_sdpa(q, k, v, ctx)
    idx = torch.tensor(sorted(heads), dtype=torch.long, device=q.device)
    sub = compute(idx)
    if len(heads) == hq and row_start == 0:
        return sub
    if row_start > 0:
        out = dense_sdpa(q, k, v, ctx).clone()
        out[:, idx, row_start:] = sub.to(out.dtype)
        return out
    rest = torch.tensor([h for h in range(hq) if h not in set(heads)], dtype=torch.long, device=q.device)
    qr, kr, vr = gather_heads(q, k, v, rest)
    dense = dense_sdpa(qr, kr, vr, ctx_for_heads(ctx, rest))
    out = torch.empty(q.shape[0], hq, nq, v.shape[-1], dtype=dense.dtype, device=q.device)
    out[:, rest] = dense
    out[:, idx] = sub.to(out.dtype)
    return out


# --------------------------------------------------------------------------- the base class

class ModulatedVariant(Variant):
    """Base of the modulated variants: dense work with edited logits, probabilities or output.

    Subclasses implement :meth:`check_site` (run-time validation against the site: heads exist,
    spans inside the sequence), :meth:`make_hooks` (the definition) and :meth:`fused` (the fast
    path, equal to the definition). :meth:`reference` runs the hooks through
    ``attention_from_keep``; ``fused`` is offered as the fast path ``"fused"`` and declines when
    the context already carries hooks (composition goes through the reference).
    """

    family: ClassVar[str] = "modulated"
    FAST: ClassVar[str] = "fused"

    # -- definition -----------------------------------------------------------------
    @abc.abstractmethod
    def check_site(self, q: torch.Tensor, k: torch.Tensor, ctx: AttnContext, p: VariantParams) -> None:
        """Raise :class:`BadInput` if ``p`` does not fit this call (q [B,Hq,Nq,D], k [B,Hkv,Nk,D])."""

    @abc.abstractmethod
    def make_hooks(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext,
                   p: VariantParams) -> Hooks:
        """The definition as hooks (``logit_fn``/``prob_fn``/``out_fn``); called after ``check_site``."""

    @abc.abstractmethod
    def fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext,
              p: VariantParams) -> torch.Tensor:
        """Fast path equal to the definition, [B,Hq,Nq,Dv]; called after ``check_site``."""

    def hooks(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext, p: VariantParams) -> Hooks:
        """Validated definition hooks for this call (shapes as in the module docstring)."""
        self.check_site(q, k, ctx, p)
        return self.make_hooks(q, k, v, ctx, p)

    def fused_hooks(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext,
                    p: VariantParams) -> Hooks:
        """Hooks equal to :meth:`hooks` in effect but cheapest to compose (a logit bias instead of
        a probability edit, an output blend instead of a probability edit). Default: ``hooks``."""
        return self.hooks(q, k, v, ctx, p)

    # -- Variant API -----------------------------------------------------------------
    def reference(self, q, k, v, ctx: AttnContext, p: VariantParams, block_mask=None):
        return run_hooks(q, k, v, ctx, self.hooks(q, k, v, ctx, p))

    def fast_paths(self):
        return {self.FAST: self._run_fused}

    def fast_available(self, name: str, q, ctx: AttnContext, p: VariantParams) -> bool:
        return not ctx.modulated

    def _run_fused(self, q, k, v, ctx: AttnContext, p: VariantParams, block_mask=None):
        self.check_site(q, k, ctx, p)
        out = self.fused(q, k, v, ctx, p)
        if recorder_active():
            record_density(ctx.site, self.name, 1.0, 1.0)
        return out
