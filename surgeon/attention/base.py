"""Variant anatomy: parameters, call context, the custom-op bridge and shared helpers.

Every attention variant is a :class:`Variant` subclass living in its own folder under
``surgeon/attention/``. It declares

* ``Params``: a frozen dataclass of its parameters, validated at construction and serialised
  into the policy (and into the op's ``config`` string);
* ``reference``: the definition of its semantics in plain torch;
* ``fast_paths``: optional faster implementations, each tested equal to the reference;
* ``lowering_module``: the module in its folder (``lowering.py``) holding its lowering to standard
  ONNX ops (see :meth:`Variant.lowerings` and :mod:`surgeon.exporters.onnx_kit`).

Tensor conventions (all variants):
    q: [B, Hq, Nq, D]   k: [B, Hkv, Nk, D]   v: [B, Hkv, Nk, Dv]
    output: [B, Hq, Nq, Dv]
A site whose graph already repeats K/V to Hq heads (Hugging Face's ``repeat_kv``) passes them
unrepeated: the op slices ``k[:, ::Hq // Hkv]`` (see :func:`unrepeat_kv`).
Query head h reads KV head ``h // (Hq // Hkv)`` (GQA).
``key_padding``: [B, Nk] bool, True for real tokens. ``attn_mask``: an SDPA-style mask
broadcastable to [B, Hq, Nq, Nk] (bool: True attends; float: added to logits) used only where a
site's mask is not causal/padding. For causal sites the queries are the last Nq positions of
the Nk keys (prefill: Nq == Nk).
"""
from __future__ import annotations

import abc
import contextlib
import contextvars
import dataclasses
import importlib
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Optional

import torch

from surgeon.errors import BadInput

NEG_INF = float("-inf")


@dataclass(frozen=True)
class VariantParams:
    """Base for parameter dataclasses. Subclasses validate in ``__post_init__``."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VariantParams":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise BadInput(
                f"unknown parameter(s) {unknown} for {cls.__qualname__}",
                f"valid parameters: {sorted(names)}",
            )
        conv = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                val = d[f.name]
                if isinstance(val, list):
                    val = tuple(tuple(x) if isinstance(x, list) else x for x in val)
                conv[f.name] = val
        return cls(**conv)

    def describe(self) -> dict[str, Any]:
        return self.to_dict()


def _jsonable(x: Any) -> Any:
    if isinstance(x, tuple):
        return [_jsonable(i) for i in x]
    return x


def check_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    """Raise :class:`BadInput` unless ``lo (<|<=) value <= hi``."""
    ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok or (isinstance(value, float) and math.isnan(value)):
        br = "(" if lo_open else "["
        raise BadInput(f"{name}={value} is out of range", f"use a value in {br}{lo}, {hi}]")


def check_head_list(name: str, values: Optional[tuple[float, ...]], what: str) -> None:
    """A per-query-head parameter list: non-empty, every entry in (0, 1]."""
    if values is None:
        return
    if len(values) == 0:
        raise BadInput(f"{name} is empty", f"give one {what} per query head, or omit {name}")
    for i, x in enumerate(values):
        check_range(f"{name}[{i}]", x, 0.0, 1.0, lo_open=True)


def per_head_values(name: str, values: Optional[tuple[float, ...]], default: float, hq: int,
                    device: torch.device, what: str) -> torch.Tensor:
    """[Hq] float64: ``values`` (one per query head) or ``default`` repeated."""
    if values is None:
        return torch.full((hq,), float(default), dtype=torch.float64, device=device)
    if len(values) != hq:
        raise BadInput(f"{name} has {len(values)} entries but the site has {hq} query heads",
                       f"give one {what} per query head")
    return torch.tensor(values, dtype=torch.float64, device=device)


@dataclass(frozen=True)
class AttnContext:
    """Per-call facts every variant needs (not tunable parameters)."""

    causal: bool
    scale: float
    kv_heads: int
    key_padding: Optional[torch.Tensor] = None  # [B, Nk] bool
    attn_mask: Optional[torch.Tensor] = None  # broadcastable to [B, Hq, Nq, Nk]
    layer: int = -1
    site: str = ""
    # Modulation hooks (set when a modulated variant is composed with this one; see
    # surgeon.attention.compose). Reference implementations apply them through
    # attention_from_keep; fast paths must decline (fast_available → False) when
    # ``modulated`` is true unless they implement the hooks themselves.
    logit_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    prob_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    out_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None

    @property
    def modulated(self) -> bool:
        return self.logit_fn is not None or self.prob_fn is not None or self.out_fn is not None


# --------------------------------------------------------------------------- helpers

def unrepeat_kv(k: torch.Tensor, q_heads: int, kv_heads: int) -> torch.Tensor:
    """[B, Hq, N, D] repeated K/V → [B, Hkv, N, D]; no-op when already unrepeated."""
    if k.shape[1] == kv_heads or kv_heads <= 0:
        return k
    if k.shape[1] != q_heads or q_heads % kv_heads:
        raise BadInput(f"K/V have {k.shape[1]} heads, expected {kv_heads} or {q_heads}")
    return k[:, :: q_heads // kv_heads]


def repeat_kv(k: torch.Tensor, q_heads: int) -> torch.Tensor:
    """[B, Hkv, N, D] → [B, Hq, N, D] with query head h reading KV head h // (Hq/Hkv)."""
    hkv = k.shape[1]
    if hkv == q_heads:
        return k
    return k.repeat_interleave(q_heads // hkv, dim=1)


def allowed_mask(ctx: AttnContext, b: int, nq: int, nk: int, device: torch.device) -> torch.Tensor:
    """Boolean [B, 1|H, Nq, Nk]: which (query, key) pairs dense attention may use."""
    m = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=device)
    if ctx.causal:
        qpos = torch.arange(nk - nq, nk, device=device)[:, None]
        kpos = torch.arange(nk, device=device)[None, :]
        m = m & (kpos <= qpos)[None, None]
    if ctx.key_padding is not None:
        m = m & ctx.key_padding.to(torch.bool)[:, None, None, :]
    if ctx.attn_mask is not None and ctx.attn_mask.dtype == torch.bool:
        m = m & ctx.attn_mask
    return m.expand(b, m.shape[1], nq, nk)


def additive_mask(ctx: AttnContext) -> Optional[torch.Tensor]:
    """A float attn_mask (added to logits), or None."""
    if ctx.attn_mask is not None and ctx.attn_mask.dtype != torch.bool:
        return ctx.attn_mask
    return None


def masked_softmax(z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``keep``; rows with nothing kept give 0."""
    z = z.masked_fill(~keep, NEG_INF)
    mx = z.amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(z - mx)
    s = e.sum(dim=-1, keepdim=True)
    return e / torch.where(s > 0, s, torch.ones_like(s))


def attention_from_keep(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ctx: AttnContext,
    keep: Optional[torch.Tensor] = None,
    *,
    logit_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    prob_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Plain-torch masked attention: the shared core of reference implementations.

    q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D]; ``keep`` bool broadcastable to [B,Hq,Nq,Nk] is ANDed with
    the dense-allowed mask; ``logit_fn`` edits logits (after scaling, before masking);
    ``prob_fn`` edits probabilities. Materialises Nq×Nk per head: reference use only.
    """
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    kk, vv = repeat_kv(k, hq), repeat_kv(v, hq)
    z = torch.matmul(q, kk.transpose(-1, -2)) * ctx.scale
    add = additive_mask(ctx)
    if add is not None:
        z = z + add
    if logit_fn is not None:
        z = logit_fn(z)
    if ctx.logit_fn is not None:
        z = ctx.logit_fn(z)
    allow = allowed_mask(ctx, b, nq, nk, q.device)
    if keep is not None:
        allow = allow & keep
    p = masked_softmax(z, allow)
    if prob_fn is not None:
        p = prob_fn(p)
    if ctx.prob_fn is not None:
        p = ctx.prob_fn(p)
    out = torch.matmul(p, vv)
    if ctx.out_fn is not None:
        out = ctx.out_fn(out, vv)
    return out


def dense_density_denominator(ctx: AttnContext, b: int, nq: int, nk: int, device: torch.device) -> torch.Tensor:
    """Number of (query,key) pairs dense attention uses, per [B]."""
    return allowed_mask(ctx, b, nq, nk, device).sum(dim=(-1, -2)).flatten(1)[:, 0].to(torch.float64)


# --------------------------------------------------------------------------- execution mode

_IMPL: contextvars.ContextVar[str] = contextvars.ContextVar("surgeon_impl", default="auto")


@contextlib.contextmanager
def use_impl(mode: str) -> Iterator[None]:
    """Force every surgeon op to run ``"reference"``, a named fast path, or ``"auto"``."""
    tok = _IMPL.set(mode)
    try:
        yield
    finally:
        _IMPL.reset(tok)


def current_impl() -> str:
    return _IMPL.get()


class DensityRecorder:
    """Collects achieved densities reported by ops while active (see :func:`record_density`)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []


_RECORDER: contextvars.ContextVar[Optional[DensityRecorder]] = contextvars.ContextVar("surgeon_rec", default=None)


@contextlib.contextmanager
def recording() -> Iterator[DensityRecorder]:
    rec = DensityRecorder()
    tok = _RECORDER.set(rec)
    try:
        yield rec
    finally:
        _RECORDER.reset(tok)


def recorder_active() -> bool:
    return _RECORDER.get() is not None


def record_density(site: str, variant: str, requested: float, achieved: float) -> None:
    rec = _RECORDER.get()
    if rec is not None:
        rec.records.append({"site": site, "variant": variant, "requested": requested, "achieved": achieved})


# --------------------------------------------------------------------------- variant class

FastPath = Callable[..., Any]


class Variant(abc.ABC):
    """One attention variant. Subclasses set the class attributes and implement ``reference``."""

    name: ClassVar[str]
    Params: ClassVar[type[VariantParams]]
    family: ClassVar[str] = "sparse"  # "dense" | "sparse" | "modulated"
    description: ClassVar[str] = ""
    produces_block_mask: ClassVar[bool] = False
    consumes_block_mask: ClassVar[bool] = False
    causal_only: ClassVar[bool] = False
    exports: ClassVar[tuple[str, ...]] = ("onnx",)
    # The module of the variant's ONNX lowering, in its own folder (e.g.
    # "surgeon.attention.block_topk.lowering"); None: no lowering. Named, not imported, so the
    # variant never imports its lowering (the lowering imports the variant's helpers).
    lowering_module: ClassVar[Optional[str]] = None

    # -- semantics ------------------------------------------------------------------
    @abc.abstractmethod
    def reference(self, q, k, v, ctx: AttnContext, p: VariantParams, block_mask=None):
        """The variant's semantics in plain torch. Returns out [B,Hq,Nq,Dv] (and the block
        mask [B,Hq,nqb,nkb] for variants with ``produces_block_mask``)."""

    def fast_paths(self) -> dict[str, FastPath]:
        """Name → callable with the signature of ``reference``; ``available`` guards use."""
        return {}

    def fast_available(self, name: str, q, ctx: AttnContext, p: VariantParams) -> bool:
        return True

    def keep_mask(self, q, k, v, ctx: AttnContext, p: VariantParams, block_mask=None) -> torch.Tensor:
        """Bool [B,Hq,Nq,Nk] of the pairs the variant attends to (before dense masking)."""
        b, hq, nq, _ = q.shape
        return torch.ones(b, hq, nq, k.shape[2], dtype=torch.bool, device=q.device)

    def requested_density(self, p: VariantParams) -> float:
        return 1.0

    def selection_overhead(self, p: VariantParams) -> float:
        """Work spent choosing what to attend to, as a fraction of dense QKᵀ work at the same
        length (0 for fixed patterns and cheap pooled scores). A planner costs a site as
        achieved (or kernel) density + this overhead."""
        return 0.0

    def achieved_density(self, q, k, v, ctx: AttnContext, p: VariantParams, block_mask=None) -> float:
        """Kept pairs / pairs dense attention would use (computed with ``keep_mask``)."""
        b, hq, nq, _ = q.shape
        nk = k.shape[2]
        allow = allowed_mask(ctx, b, nq, nk, q.device)
        keep = self.keep_mask(q, k, v, ctx, p, block_mask) & allow
        denom = allow.expand(b, hq, nq, nk).sum().item()
        return float(keep.sum().item()) / max(float(denom), 1.0)

    # -- test-matrix hooks ------------------------------------------------------------
    def degenerate_params(self, n: int) -> VariantParams:
        """Parameters under which the variant must equal dense attention at length ``n``."""
        return self.Params()

    def example_params(self, n: int, hq: int) -> VariantParams:
        """Non-trivial parameters for tests at length ``n`` with ``hq`` heads."""
        return self.Params()

    def small_example_params(self, hq: int) -> VariantParams:
        """Non-trivial parameters at 24–32 tokens with ``hq`` (≥ 6) query heads: small blocks so
        selections matter, edits large enough to move the output (the ONNX modulated × sparse
        matrix reads them). Defaults to ``example_params(32, hq)``."""
        return self.example_params(32, hq)

    def block_mask_shape(self, q, k, p: VariantParams) -> tuple:
        """Shape of the produced block mask (symbolic sizes allowed): [B, Hq, nqb, nkb]."""
        bs = getattr(p, "block_size")
        return (q.shape[0], q.shape[1], (q.shape[2] + bs - 1) // bs, (k.shape[2] + bs - 1) // bs)

    def make_block_mask(self, q, k, v, ctx: AttnContext, p: VariantParams) -> Optional[torch.Tensor]:
        """For consumers in tests: a plausible incoming block mask (anchor's selection)."""
        return None

    # -- dispatch ------------------------------------------------------------------
    def run(self, q, k, v, ctx: AttnContext, p: VariantParams, block_mask=None):
        mode = current_impl()
        if mode != "reference":
            for name, fn in self.fast_paths().items():
                if mode not in ("auto", name):
                    continue
                if self.fast_available(name, q, ctx, p):
                    return fn(q, k, v, ctx, p, block_mask)
        return self.reference(q, k, v, ctx, p, block_mask)

    # -- ONNX ------------------------------------------------------------------
    def lowerings(self) -> dict[str, Callable[..., Any]]:
        """The variant's ONNX lowerings by body: ``"mask"`` (the token-mask body every lowered
        variant has) and optionally ``"gather"`` (attends only to kept blocks). Read from
        ``LOWERINGS[name]`` of :attr:`lowering_module`, imported on first use; ``{}`` without
        one. Contract: :mod:`surgeon.exporters.onnx_kit`."""
        if self.lowering_module is None:
            return {}
        return dict(importlib.import_module(self.lowering_module).LOWERINGS.get(self.name, {}))

    def onnx_edits(self) -> Optional[Callable[..., Any]]:
        """Modulated variants: their edit form ``fn(op, site, params, definition) -> Edits``
        (``EDITS[name]`` of :attr:`lowering_module`); None otherwise."""
        if self.lowering_module is None:
            return None
        return getattr(importlib.import_module(self.lowering_module), "EDITS", {}).get(self.name)

    # -- params ------------------------------------------------------------------
    def params_from(self, d: Optional[dict[str, Any]]) -> VariantParams:
        return self.Params.from_dict(d or {})

    def info(self) -> dict[str, Any]:
        fields = []
        for f in dataclasses.fields(self.Params):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
            fields.append({"name": f.name, "type": str(f.type), "default": _jsonable(default)})
        return {
            "name": self.name,
            "family": self.family,
            "description": self.description,
            "parameters": fields,
            "fast_paths": sorted(self.fast_paths()),
            "exports": list(self.exports),
            "produces_block_mask": self.produces_block_mask,
            "consumes_block_mask": self.consumes_block_mask,
        }


def encode_config(variant: str, params: VariantParams, ctx_static: dict[str, Any]) -> str:
    """Canonical JSON carried by the op as its ``config`` string attribute."""
    return json.dumps({"variant": variant, "params": params.to_dict(), **ctx_static}, sort_keys=True, separators=(",", ":"))


def decode_config(config: str) -> dict[str, Any]:
    return json.loads(config)
