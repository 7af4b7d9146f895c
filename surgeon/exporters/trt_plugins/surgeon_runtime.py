"""Compute a ``surgeon::`` op for a TensorRT plugin (copied into bundles as plugins/surgeon_runtime.py).

TensorRT plugin tensors cannot be bool, so the bundle's ONNX model feeds key padding and block
masks as int32 and takes produced block masks back as int32; :func:`compute` converts them.
The op itself is the installed ``surgeon`` package's ``torch.ops.surgeon.<variant>`` (its CUDA
paths), except ``block_topk`` and ``reuse`` without explicit masks or modulators, which run the
Triton block-sparse kernel (:func:`surgeon.kernels.triton_blocksparse.blocksparse_attention`)
over the variant's own block selection whenever the kernel supports the inputs.

Requires torch; ``run_plugin`` also needs CUDA and is called from the generated
``surgeon_qdp.py`` plugin implementations.
"""
from typing import Any, Dict, List, Optional, Sequence


def _triton_blocksparse(variant: str, q: Any, k: Any, v: Any, key_padding: Any, attn_mask: Any, causal: bool,
                        scale: float, config: str, block_mask: Any) -> Optional[List[Any]]:
    """The Triton path for block_topk / reuse, or None where it does not apply."""
    if variant not in ("block_topk", "reuse") or attn_mask is not None:
        return None
    from surgeon.kernels.triton_common import kernel_supports
    from surgeon.attention.base import AttnContext, unrepeat_kv
    from surgeon.attention.ops import parse_config

    var, params, static = parse_config(config)
    if static.get("modulators"):
        return None
    hq = q.shape[1]
    kvh = int(static.get("kv_heads", k.shape[1]))
    k, v = unrepeat_kv(k, hq, kvh), unrepeat_kv(v, hq, kvh)
    bs = int(params.block_size)
    if not kernel_supports(q, k, v, bs):
        return None
    from surgeon.kernels.triton_blocksparse import blocksparse_attention

    ctx = AttnContext(causal=bool(causal), scale=float(scale), kv_heads=k.shape[1], key_padding=key_padding,
                      layer=int(static.get("layer", -1)), site=str(static.get("site", "")))
    if variant == "block_topk":
        sel = var.select(q, k, ctx, params)
        out = blocksparse_attention(q, k, v, sel, float(scale), bool(causal), key_padding=key_padding, block=bs)
        return [out, sel]
    if block_mask is None:
        return None
    bm = block_mask.reshape(var.block_mask_shape(q, k, params))
    eff = var.effective_mask(q, k, ctx, params, bm)
    return [blocksparse_attention(q, k, v, eff, float(scale), bool(causal), key_padding=key_padding, block=bs)]


def compute(variant: str, tensors: Dict[str, Any], config: str, causal: bool, scale: float) -> List[Any]:
    """Outputs of ``surgeon::<variant>`` for the plugin's inputs.

    tensors: "q" [B,Hq,Nq,D], "k"/"v" [B,Hk,Nk,D], optional "key_padding" [B,Nk] (int32/bool,
    nonzero = real token), "attn_mask" (float, or int32/bool), "block_mask" [B, Hq·nqb·nkb]
    (int32/bool). Returns [out [B,Hq,Nq,Dv]] or [out, block mask int32 [B, Hq·nqb·nkb]].
    """
    import torch

    from surgeon.attention.ops import op_for

    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    kp = tensors.get("key_padding")
    kp = kp.to(torch.bool) if kp is not None else None
    am = tensors.get("attn_mask")
    if am is not None and not am.is_floating_point():
        am = am.to(torch.bool)
    bm = tensors.get("block_mask")
    bm = bm.to(torch.bool) if bm is not None else None
    res = _triton_blocksparse(variant, q, k, v, kp, am, causal, scale, config, bm)
    if res is None:
        out = op_for(variant)(q, k, v, kp, am, bool(causal), float(scale), config, bm)
        res = list(out) if isinstance(out, (tuple, list)) else [out]
    if len(res) == 2:
        res[1] = res[1].reshape(res[1].shape[0], -1).to(torch.int32)
    return res


def run_plugin(variant: str, trt_tensors: Sequence[Any], inputs: str, config: str, causal: int, scale: float,
               outputs: Sequence[Any], stream: int) -> None:
    """Body of a plugin's ``@tensorrt.plugin.impl``: wrap the TensorRT tensors as torch CUDA
    tensors (``__cuda_array_interface__``), run :func:`compute` on TensorRT's stream, copy the
    results into ``outputs``."""
    import torch

    names = inputs.split(",")
    tensors = {n: torch.as_tensor(t, device="cuda") for n, t in zip(names, trt_tensors)}
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        results = compute(variant, tensors, config, bool(causal), float(scale))
        for dst, res in zip(outputs, results):
            d = torch.as_tensor(dst, device="cuda")
            d.copy_(res.reshape(d.shape).to(d.dtype))
