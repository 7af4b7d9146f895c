"""Shared pieces of surgeon's Triton attention kernels (forward only).

* :func:`kernels_runnable` says whether the Triton kernels can run on a tensor's device
  (a CUDA device, or any device while Triton's CPU interpreter is active);
  :func:`kernel_supports` adds the dtype / block / head-dim limits (for ``fast_available``).
* :func:`check_attention_inputs` validates q/k/v/key_padding for the wrappers and raises
  :class:`surgeon.errors.BadInput` with a one-line fix.
* :func:`block_mask_to_indices` turns a bool block mask into sorted per-row index lists.
* :func:`masked_softmax_ref` is the plain-torch softmax used by the reference functions.
* ``_attend_tile`` (defined only when Triton imports) is the FlashAttention online-softmax
  step over one key tile, shared by the block-sparse and pyramid kernels.

Triton picks interpreter or compiler when a ``@triton.jit`` function is *defined* (at import of
this module), so ``TRITON_INTERPRET=1`` must be set before ``surgeon.kernels.*`` is imported.
Importing this module does no tensor work; importing Triton itself is cheap (~0.2 s).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from surgeon.errors import BadInput

try:  # Triton is optional: references and index helpers work without it.
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_SIZES = (16, 32, 64, 128)
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def interpreter_active() -> bool:
    """True when this module's kernels were defined under ``TRITON_INTERPRET=1``."""
    if not HAS_TRITON:
        return False
    return type(_attend_tile).__name__ != "JITFunction"


def kernels_runnable(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``t``'s device (CUDA, or CPU under the interpreter)."""
    if not HAS_TRITON:
        return False
    if interpreter_active():
        return True
    return t.device.type == "cuda"


def kernel_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int) -> bool:
    """Cheap gate for ``fast_available``: the kernels can run here on these inputs (device,
    dtype float16/bfloat16/float32, block in (16, 32, 64, 128), head dims <= 256)."""
    return (
        kernels_runnable(q)
        and q.dtype in KERNEL_DTYPES
        and q.dtype == k.dtype == v.dtype
        and block in BLOCK_SIZES
        and max(q.shape[-1], v.shape[-1]) <= MAX_HEAD_DIM
    )


def require_runnable(t: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise BadInput("Triton is not installed", "install triton or use the *_reference function")
    if not kernels_runnable(t):
        raise BadInput(
            f"the Triton kernels need a CUDA tensor, got one on {t.device}",
            "move the inputs to CUDA, set TRITON_INTERPRET=1 before importing surgeon.kernels, "
            "or use the *_reference function",
        )


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    key_padding: Optional[torch.Tensor],
    block: int,
    *,
    kernel: bool,
) -> None:
    """Validate q [B,Hq,Nq,D], k [B,Hkv,Nk,D], v [B,Hkv,Nk,Dv], key_padding [B,Nk] and block.

    ``kernel=True`` adds the Triton kernels' limits (dtype, head dim, block size).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise BadInput(
            f"q/k/v must be 4-D [B,H,N,D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}",
            "reshape to [batch, heads, tokens, head_dim]",
        )
    b, hq, nq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise BadInput(
            f"q/k/v shapes disagree: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}",
            "k and v need the same batch, heads and tokens as each other and the batch of q",
        )
    if k.shape[3] != d:
        raise BadInput(f"q head dim {d} != k head dim {k.shape[3]}", "q and k need the same head dim")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv:
        raise BadInput(f"{hq} query heads is not a multiple of {hkv} KV heads", "pass unrepeated K/V (GQA)")
    if causal and nq > k.shape[2]:
        raise BadInput(
            f"causal attention with {nq} queries but only {k.shape[2]} keys",
            "queries are the last Nq of Nk positions: pass Nq <= Nk",
        )
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise BadInput(f"q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})", "cast them to one dtype")
    if q.device != k.device or q.device != v.device:
        raise BadInput("q/k/v are on different devices", "move them to one device")
    if key_padding is not None:
        if key_padding.shape != (b, k.shape[2]):
            raise BadInput(
                f"key_padding has shape {tuple(key_padding.shape)}, expected {(b, k.shape[2])}",
                "pass a [B, Nk] bool mask, True for real tokens",
            )
        if key_padding.device != q.device:
            raise BadInput("key_padding is on another device than q", "move it to q's device")
    if block not in BLOCK_SIZES:
        raise BadInput(f"block={block} is not supported", f"use one of {BLOCK_SIZES}")
    if kernel:
        if q.dtype not in KERNEL_DTYPES:
            raise BadInput(
                f"the Triton kernels do not support {q.dtype}",
                "use float16, bfloat16 or float32 (or the *_reference function)",
            )
        if max(d, v.shape[3]) > MAX_HEAD_DIM:
            raise BadInput(f"head dim {max(d, v.shape[3])} exceeds {MAX_HEAD_DIM}", "use the *_reference function")


def block_mask_to_indices(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool block mask [B,Hq,nqb,nkb] → (idx int32 [B,Hq,nqb,max_k], cnt int32 [B,Hq,nqb]).

    ``idx[..., :cnt]`` lists the selected key blocks of each query block in ascending order;
    the remaining entries are padding (-1). ``max_k = max(1, cnt.max())``.
    """
    if block_mask.dim() != 4:
        raise BadInput(f"block_mask must be 4-D [B,Hq,nqb,nkb], got {tuple(block_mask.shape)}",
                       "pass one bool per (query block, key block)")
    bm = block_mask.to(torch.bool)
    cnt = bm.sum(dim=-1, dtype=torch.int32)
    max_k = max(1, int(cnt.max().item())) if cnt.numel() else 1
    max_k = min(max_k, bm.shape[-1]) if bm.shape[-1] else 1
    if bm.shape[-1] == 0:
        idx = torch.full((*bm.shape[:3], 1), -1, dtype=torch.int32, device=bm.device)
        return idx, cnt
    order = torch.argsort((~bm).to(torch.int8), dim=-1, stable=True)[..., :max_k]
    pos = torch.arange(max_k, device=bm.device)
    idx = torch.where(pos < cnt[..., None], order, torch.full_like(order, -1))
    return idx.to(torch.int32).contiguous(), cnt.contiguous()


def masked_softmax_ref(z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``keep``; rows with nothing kept give 0."""
    z = z.masked_fill(~keep, float("-inf"))
    mx = z.amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(z - mx)
    s = e.sum(dim=-1, keepdim=True)
    return e / torch.where(s > 0, s, torch.ones_like(s))


def padding_bias(key_padding: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """float32 [B,Nk]: 0 for real tokens, -inf for padding (an unused [1,1] zero tensor if None)."""
    if key_padding is None:
        return torch.zeros(1, 1, dtype=torch.float32, device=device)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    return torch.where(key_padding.to(torch.bool), zero, torch.full_like(zero, float("-inf"))).contiguous()


def ref_dtype(x: torch.Tensor) -> torch.dtype:
    """Computation dtype of the references: float64 stays, everything else runs in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def dot_options(dtype: torch.dtype) -> dict[str, object]:
    """Constexpr dot settings: IEEE float32 (no TF32) for float32 inputs; float32 dots on
    bfloat16-rounded operands under the interpreter (its bfloat16 ``tl.dot`` is broken)."""
    return {
        "PREC": "ieee" if dtype == torch.float32 else "tf32",
        "UPCAST": dtype == torch.bfloat16 and interpreter_active(),
    }


def launch_config(block: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(num_warps, num_stages) for a BLOCK×BLOCK tile with the given (padded) head dim.

    float32 tiles use one stage: with two, block 128 × head dim 128 needs ~256 KiB of shared
    memory (more than an H100 has); sizes from compiling for sm_90 with Triton 3.9.
    """
    warps = 8 if block >= 128 or head_dim > 128 else 4
    return warps, 1 if dtype == torch.float32 else 2


def launch(kernel: Any, grid: tuple[int, ...], args: tuple[Any, ...], consts: dict[str, Any],
           block: int, head_dim: int, dtype: torch.dtype) -> None:
    """Launch ``kernel[grid](*args, **consts)``; on a shared-memory shortage retry with one
    pipeline stage, then raise :class:`BadInput` naming a smaller block."""
    warps, stages = launch_config(block, head_dim, dtype)
    tries = [stages] if stages == 1 else [stages, 1]
    for i, st in enumerate(tries):
        try:
            kernel[grid](*args, **consts, num_warps=warps, num_stages=st)
            return
        except OutOfResources as e:
            if i + 1 < len(tries):
                continue
            raise BadInput(
                f"the kernel does not fit this GPU (block={block}, head dim {head_dim}, {dtype}): {e}",
                "use a smaller block (e.g. 64 or 32)",
            ) from e


if HAS_TRITON:

    @triton.jit
    def _attend_tile(
        acc, m_i, l_i, q, qpos,
        k_ptr, v_ptr, bias_ptr,
        start, stop,
        skn, skd, svn, svd,
        D, DV, qk_scale,
        TILE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """One online-softmax step over keys [start, stop) (at most TILE of them).

        Logits are in base 2: ``s = q·k * scale * log2(e) + bias`` with ``bias`` (optional,
        contiguous along keys) holding log2 of the pooled-token count or -inf for keys that
        may not be attended. ``CAUSAL`` masks keys after each query position ``qpos``.
        ``UPCAST`` runs the dots in float32 on operands rounded to the input dtype: Triton
        3.9's CPU interpreter computes bfloat16 ``tl.dot`` on raw bits (garbage), so the
        wrappers set it for bfloat16 under the interpreter only.
        Returns the updated (acc [M,DV] fp32, m [M] fp32, l [M] fp32).
        """
        offs_n = start + tl.arange(0, TILE)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        nmask = (offs_n < stop) & (offs_n >= 0)  # guards against a bad (negative) block index
        kt = tl.load(
            k_ptr + offs_n[None, :] * skn + offs_d[:, None] * skd,
            mask=nmask[None, :] & (offs_d[:, None] < D),
            other=0.0,
        )
        if UPCAST:
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=nmask, other=float("-inf"))
            s = s + bias[None, :]
        keep = nmask[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= qpos[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(
            v_ptr + offs_n[:, None] * svn + offs_dv[None, :] * svd,
            mask=nmask[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
        if UPCAST:
            pv = tl.dot(p.to(vt.dtype).to(tl.float32), vt.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        acc = acc * alpha[:, None] + pv
        return acc, m_new, l_i
