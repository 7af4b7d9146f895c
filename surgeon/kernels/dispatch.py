"""The one dispatcher of block-sparse attention: the Triton kernel where it applies, else the
CPU gather kernel.

CUDA tensors go to the Triton kernel (:func:`surgeon.kernels.triton_blocksparse.blocksparse_attention`,
same semantics) when it supports them (:func:`triton_eligible`); everything else runs
:func:`surgeon.kernels.blocksparse_cpu.block_sparse_attention_cpu`. This is how block_topk,
reuse, dhsa and delta_sparse (square blocks) select the GPU kernel automatically. window_sink's
exact token band is not a block pattern: it keeps its own band path.
"""
from __future__ import annotations

from typing import Optional

import torch

from surgeon.kernels.blocksparse_cpu import block_sparse_attention_cpu


def triton_eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_block: int, k_block: int) -> bool:
    """True for CUDA inputs the Triton block-sparse kernel supports (square blocks of 16–128,
    float16/bfloat16/float32, head dim ≤ 256). CPU tensors always use the gather kernel here —
    the Triton interpreter is for the kernels' tests, not for the op."""
    if q.device.type != "cuda" or q_block != k_block:
        return False
    from surgeon.kernels.triton_common import kernel_supports

    return kernel_supports(q, k, v, q_block)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    q_block: int,
    k_block: int,
    causal: bool,
    scale: float,
    key_padding: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention restricted to the key blocks of ``block_mask``.

    q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D|Dv], block_mask bool [B|1,Hq|1,nqb,nkb],
    key_padding bool [B,Nk] (True = real) → out [B,Hq,Nq,Dv]; semantics as
    :func:`surgeon.kernels.blocksparse_cpu.block_sparse_attention_cpu`, which runs unless the
    Triton kernel supports the inputs (:func:`triton_eligible`).
    """
    if triton_eligible(q, k, v, q_block, k_block):
        from surgeon.kernels.triton_blocksparse import blocksparse_attention

        return blocksparse_attention(q, k, v, block_mask, scale, causal, key_padding, block=q_block)
    return block_sparse_attention_cpu(q, k, v, block_mask, q_block=q_block, k_block=k_block, causal=causal,
                                      scale=scale, key_padding=key_padding)
