"""The ``surgeon::`` custom ops: one per registered variant, all with one schema family.

    surgeon::<variant>(Tensor q, Tensor k, Tensor v, Tensor? key_padding, Tensor? attn_mask,
                       bool causal, float scale, str config, Tensor? block_mask=None)
        -> Tensor                      (most variants)
        -> (Tensor, Tensor)            (variants that produce a block mask for reuse)

Block masks travel between ops flattened to [B, Hq*nqb*nkb] (a 4-D tensor would make
torch.export guard on a block count being 1, i.e. forbid sequences shorter than two blocks); the
consumer reshapes with its own ``block_mask_shape``, so its block sizes must match the anchor's.
``config`` is the canonical JSON of the variant's parameters plus static site facts
(``kv_heads``, ``site``, ``layer``); see :func:`surgeon.attention.base.encode_config`.
Registration is explicit (:func:`register_all`), idempotent and cheap.
"""
from __future__ import annotations

import functools
import threading
from typing import Any, Optional

import torch

from surgeon.attention.base import (AttnContext, Variant, VariantParams, decode_config, recorder_active,
                                   unrepeat_kv)
from surgeon.attention.registry import VARIANTS, get_variant

_LIB: Optional[torch.library.Library] = None
_LOCK = threading.Lock()
_REGISTERED: set[str] = set()


@functools.lru_cache(maxsize=4096)
def parse_config(config: str) -> tuple[Variant, VariantParams, dict[str, Any]]:
    d = decode_config(config)
    var = get_variant(d["variant"])
    params = var.params_from(d["params"])
    static = {k: v for k, v in d.items() if k not in ("variant", "params")}
    return var, params, static


def _call(q, k, v, key_padding, attn_mask, causal, scale, config, block_mask=None):
    var, params, static = parse_config(config)
    hq = q.shape[1]
    kvh = int(static.get("kv_heads", k.shape[1]))
    k = unrepeat_kv(k, hq, kvh)
    v = unrepeat_kv(v, hq, kvh)
    ctx = AttnContext(causal=bool(causal), scale=float(scale), kv_heads=k.shape[1], key_padding=key_padding,
                      attn_mask=attn_mask, layer=int(static.get("layer", -1)), site=str(static.get("site", "")))
    if block_mask is not None and var.consumes_block_mask:
        block_mask = block_mask.reshape(var.block_mask_shape(q, k, params))
    mods = static.get("modulators") or []
    if mods:
        ctx = compose_modulators(q, k, v, ctx, mods)
    below = static.get("dense_below")
    if below is not None and k.shape[2] < int(below) and var.family == "sparse":
        # below its measured crossover the site runs dense (the variant's degenerate case)
        return _dense_fallback(var, q, k, v, ctx, params)
    if recorder_active():
        out = _measured(var, q, k, v, ctx, params, block_mask)
    else:
        out = var.run(q, k, v, ctx, params, block_mask)
    if var.produces_block_mask:
        o, bm = out
        return o.contiguous(), bm.reshape(bm.shape[0], -1).contiguous()
    return out.contiguous()


def _dense_fallback(var: Variant, q, k, v, ctx: AttnContext, params: VariantParams):
    """Dense attention for a sparse site below its ``dense_below`` length; a block-mask producer
    also returns the all-kept block mask, so its consumers read a mask that drops nothing."""
    from surgeon.attention.base import record_density

    dense = get_variant("dense")  # honours composed modulators like any site
    out = dense.run(q, k, v, ctx, dense.Params()).contiguous()
    if recorder_active():
        record_density(ctx.site, var.name, var.requested_density(params), 1.0)
    if var.produces_block_mask:
        b, h, nqb, nkb = var.block_mask_shape(q, k, params)
        return out, torch.ones((b, h * nqb * nkb), dtype=torch.bool, device=q.device)
    return out


def _measured(var: Variant, q, k, v, ctx: AttnContext, params: VariantParams, block_mask):
    """Run the variant and record, for this site, the requested and achieved density and the
    relative L2 error of its output against dense attention on the same q, k, v (valid rows)."""
    import dataclasses

    from surgeon.attention.base import _RECORDER
    from surgeon.attention.dense import sdpa

    rec = _RECORDER.get()
    tok = _RECORDER.set(None)  # the variant's own reports would duplicate ours
    try:
        out = var.run(q, k, v, ctx, params, block_mask)
        o = out[0] if var.produces_block_mask else out
        plain = dataclasses.replace(ctx, logit_fn=None, prob_fn=None, out_fn=None)
        ref = sdpa(q, k, v, plain)
        if ctx.causal and ctx.key_padding is not None:
            rows = ctx.key_padding[:, -q.shape[2]:].to(torch.bool)[:, None, :, None].expand_as(o)
            diff, base = (o - ref)[rows], ref[rows]
        else:
            diff, base = o - ref, ref
        err = float(diff.double().norm() / base.double().norm().clamp_min(1e-30))
        achieved = var.achieved_density(q, k, v, ctx, params, block_mask) if var.family == "sparse" else 1.0
    finally:
        _RECORDER.reset(tok)
    rec.records.append({"site": ctx.site, "variant": var.name, "requested": var.requested_density(params),
                        "achieved": achieved, "rel_error": err, "tokens": int(q.shape[2])})
    return (o, out[1]) if var.produces_block_mask else o


def _chain(first, second):
    if first is None:
        return second
    if second is None:
        return first
    return lambda *a: second(first(*a), *a[1:])


def compose_modulators(q, k, v, ctx: AttnContext, mods: list[dict[str, Any]]) -> AttnContext:
    """Put the hooks of the listed modulated variants into ``ctx`` (applied in list order).

    The site's own variant then applies them: reference implementations through
    ``attention_from_keep``; fast paths that cannot honour hooks decline (``ctx.modulated``).
    """
    import dataclasses

    fields: dict[str, Any] = {"logit_fn": ctx.logit_fn, "prob_fn": ctx.prob_fn, "out_fn": ctx.out_fn}
    for m in mods:
        mvar = get_variant(m["variant"])
        mp = mvar.params_from(m.get("params"))
        hooks = mvar.fused_hooks(q, k, v, ctx, mp)
        for name in ("logit_fn", "prob_fn", "out_fn"):
            fields[name] = _chain(fields[name], hooks.get(name))
    return dataclasses.replace(ctx, **fields)


def _schema(var: Variant) -> str:
    ret = "(Tensor, Tensor)" if var.produces_block_mask else "Tensor"
    return (f"{var.name}(Tensor q, Tensor k, Tensor v, Tensor? key_padding, Tensor? attn_mask, bool causal, "
            f"float scale, str config, Tensor? block_mask=None) -> {ret}")


def register_all() -> None:
    """Define and implement ``surgeon::<name>`` for every registered variant (idempotent)."""
    global _LIB
    with _LOCK:
        if _LIB is None:
            _LIB = torch.library.Library("surgeon", "FRAGMENT")
        for name in sorted(VARIANTS):
            if name in _REGISTERED:
                continue
            var = get_variant(name)
            _LIB.define(_schema(var))
            _LIB.impl(name, _call, "CompositeExplicitAutograd")

            def fake(q, k, v, key_padding, attn_mask, causal, scale, config, block_mask=None, _var=var):
                _, params, _static = parse_config(config)
                out = q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))
                if _var.produces_block_mask:
                    b, h, nqb, nkb = _var.block_mask_shape(q, k, params)
                    # flat [B, Hq*nqb*nkb]: a 4-D tensor's contiguity check would guard on nqb != 1
                    return out, q.new_empty((b, h * nqb * nkb), dtype=torch.bool)
                return out

            torch.library.register_fake(f"surgeon::{name}", fake, lib=_LIB)
            _REGISTERED.add(name)


def op_for(name: str):
    """The OpOverload ``torch.ops.surgeon.<name>.default`` (registering first)."""
    register_all()
    return getattr(torch.ops.surgeon, name).default
