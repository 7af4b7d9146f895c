"""Compute a ``surgeon::`` op for a TensorRT plugin (copied into bundles as plugins/surgeon_runtime.py).

TensorRT plugin tensors cannot be bool, so the bundle's ONNX model feeds key padding and block
masks as int32 and takes produced block masks back as int32; :func:`compute` converts them.
The op itself is the installed ``surgeon`` package's ``torch.ops.surgeon.<variant>`` (its CUDA
paths): the op's own dispatch (:mod:`surgeon.kernels.dispatch`) runs the Triton block-sparse
kernel for block_topk, reuse, dhsa and delta_sparse whenever the kernel supports the inputs, so
this module never dispatches again.

Requires torch; ``run_plugin`` also needs CUDA and is called from the generated
``surgeon_qdp.py`` plugin implementations.
"""
from typing import Any, Dict, List, Sequence


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
