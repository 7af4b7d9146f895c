"""The ``surgeon::`` custom ops: one per registered variant, all with one schema family.

    surgeon::<variant>(Tensor q, Tensor k, Tensor v, Tensor? key_padding, Tensor? attn_mask,
                       bool causal, float scale, str config, Tensor? block_mask=None)
        -> Tensor                      (most variants)
        -> (Tensor, Tensor)            (variants that produce a block mask for reuse)

``config`` is the canonical JSON of the variant's parameters plus static site facts
(``kv_heads``, ``site``, ``layer``); see :func:`surgeon.variants.base.encode_config`.
Registration is explicit (:func:`register_all`), idempotent and cheap.
"""
from __future__ import annotations

import functools
import threading
from typing import Any, Optional

import torch

from surgeon.variants.base import AttnContext, Variant, VariantParams, decode_config, unrepeat_kv
from surgeon.variants.registry import VARIANTS, get_variant

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
    out = var.run(q, k, v, ctx, params, block_mask)
    if var.produces_block_mask:
        o, bm = out
        return o.contiguous(), bm.contiguous()
    return out.contiguous()


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
                    return out, q.new_empty(_var.block_mask_shape(q, k, params), dtype=torch.bool)
                return out

            torch.library.register_fake(f"surgeon::{name}", fake, lib=_LIB)
            _REGISTERED.add(name)


def op_for(name: str):
    """The OpOverload ``torch.ops.surgeon.<name>.default`` (registering first)."""
    register_all()
    return getattr(torch.ops.surgeon, name).default
