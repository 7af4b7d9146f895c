"""The calibration profiler: one instrumented pass over the data computes every statistic.

How it works
------------
``cap.program.module()`` is copied into a fresh ``GraphModule`` and every
``aten.scaled_dot_product_attention`` node's target is replaced by a plain Python function
(torch.fx accepts any callable) that

1. returns the model's own dense SDPA output (so the forward is unchanged), and
2. under ``no_grad``, recomputes the attention of that site in query chunks and feeds the
   site's statistics into a :class:`Collector`;
3. optionally runs a ``surgeon`` variant instead of SDPA (layer sensitivity, policy evaluation),
   wiring block masks from anchor to reusing sites the way the rewrite pass does.

The node also receives the input of the site's query projection (found by walking back from
the query to the nearest ``linear``): the sink-alignment test of methods.md §13f needs the
layer's hidden states. For pre-norm models this is the normalised residual stream
``w ⊙ x / rms(x)`` — a per-dimension rescaling of the residual — which we use as the proxy for
``h^l`` in ``cos(h_j, h_0)``. For post-norm models (BERT) it is the residual stream itself.

Chunk math (memory)
-------------------
Samples are processed one at a time (batch 1). Per site a chunk of ``c`` query rows (a multiple
of ``block_size``) holds the logits of all query heads for the keys it can see,
``Hq · c · Nk`` float32 values at most, with ``c = max(block, ⌊chunk_elems / (Hq·Nk)⌋ rounded
down to a block multiple)``; causal sites stop each chunk's keys at the end of its last query
block (the upper triangle is never computed). Two such buffers are reused for every chunk of
every site (logits, then the block-sparse probabilities; and the probabilities), plus a few
[Hq, c, Nk/B] block sums and [Hq, c, D] outputs. The default ``chunk_elems = 2**23`` gives, for
SmolLM2 at 8192 tokens (Hq = 9), c = 64 rows (one block: 9·64·8192·4 B = 18.9 MiB per buffer),
and at 2048 tokens c = 448 rows (31.5 MiB per buffer): the statistics add well under 0.2 GiB on
top of the model — never an N×N matrix for all heads. In statistics-only passes the forward is
stopped after the last site, so the [N, vocab] logits (1.6 GB at 8192 for SmolLM2) are never
built. Gradients (HeSS) need the whole autograd graph and are taken on windows of
``grad_seq_len`` tokens (default ≤ 1024, recorded in the profile's settings); measured peak RSS
of a whole profile of SmolLM2 (1 × 8192 tokens, gradients on 1024, sensitivity on 1024) is
4.0 GiB including the model and its capture (1.3 GiB).

HeSS (methods.md §1, [PROPOSED] there; our choices)
---------------------------------------------------
δ_h = O_h(block_topk at the reference keep) − O_h(dense), computed from the same chunked
probabilities: the block_topk output is dense attention restricted to the selected blocks and
renormalised, so ``δ = (P⊙M/ΣP⊙M − P)·V``. The two error terms are (e1) the next-token
cross-entropy on the calibration text itself and (e2) the cross-entropy against the dense
model's own argmax predictions (label-free pseudo-targets, methods.md §1) [PROPOSED choice].
A KL or hidden-state error *to the dense model* would have zero gradient at the dense point, so
it cannot serve as a first-order (Fisher) term. Gradients dL_e/dO_h
come from a zero tensor ``z`` added to each site's output (``O + z``, ``dL/dz = dL/dO``), with the
model's parameters temporarily set to ``requires_grad=False``. ``S_h^e = E_x[(Σ dL_e/dO_h ⊙ δ_h)²]``
and ``HeSS_h = Σ_e S_h^e / Σ_h' S_h'^e`` over all heads of all sites (so Σ_h HeSS_h = 2). By
default the gradients use the first ``min(seq_len, 1024)`` tokens of every calibration sample
(no checkpointing; both recorded in the settings). Models without an LM loss
(encoders, vision) use the label-free proxy ``E‖δ_h‖² / E‖O_h‖²``, normalised to sum 1.

Layer sensitivity: one forward per site with that site alone running ``block_topk`` at the
reference keep (the variant's own fast path), the others dense, on ``sens_samples`` rows of
``sens_seq_len`` tokens; the score is the CE increase over the dense forward (causal LMs) or
the relative L2 error of the output (other models). The dense forward keeps the values that
some site's dependents read, and each site's forward re-executes only the nodes downstream of
that site (:class:`_Replay`): the same ops on the same values, so the scores are bit-identical
to whole forwards, at about 0.6 of their cost on SmolLM2 (the LM head runs in every one).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from surgeon.capture import Captured, Site, _sdpa_args, sdpa_nodes
from surgeon.errors import BadInput
from surgeon.kernels.blocksparse_cpu import block_geometry, keep_counts, select_top, sink_local_blocks
from surgeon.models import LoadedModel
from surgeon.passes.policy import Policy
from surgeon.profiles.data import CalibrationData, load_calibration
from surgeon.profiles.profile_doc import Profile, SiteProfile
from surgeon.profiles.solvers import directed_overlap, iqr_clip_mean
from surgeon.attention.base import AttnContext, VariantParams, unrepeat_kv
from surgeon.attention.registry import get_variant

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
DEFAULT_KEEP_GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)
COVERAGES = (0.9, 0.95)
HESS_TERMS = ("ce", "pseudo_ce")
_LINEAR_TARGETS = (torch.ops.aten.linear.default, torch.ops.aten.addmm.default, torch.ops.aten.mm.default,
                   torch.ops.aten.matmul.default)


# --------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class ProfileSettings:
    """Every knob that shapes the profile (all recorded in ``profile.settings``).

    ref_keep: the reference block_topk keep used for δ (HeSS), the overlap top-k and layer
    sensitivity; sink_blocks/local_blocks: block_topk's forced blocks; keep_grid: κ values of
    the coverage curves; local_window: tokens counted as "local"; sink_*: methods.md §13f
    thresholds [PROPOSED there]; grad_*: HeSS gradient passes (None → defaults below);
    sens_*: layer-sensitivity forwards; chunk_elems: elements per [Hq, c, Nk] chunk tensor.
    """

    samples: int = 8
    seq_len: int = 2048
    block_size: int = 64
    seed: int = 0
    ref_keep: float = 0.15
    sink_blocks: int = 1
    local_blocks: int = 1
    keep_grid: tuple[float, ...] = DEFAULT_KEEP_GRID
    local_window: int = 128
    sink_ratio: float = 5.0
    sink_min_score: float = 0.02
    sink_cos: float = 0.8
    sink_min_queries: int = 32
    gradients: bool = True
    grad_samples: Optional[int] = None
    grad_seq_len: Optional[int] = None
    sensitivity: bool = True
    sens_samples: Optional[int] = None
    sens_seq_len: Optional[int] = None
    chunk_elems: int = 1 << 23

    def __post_init__(self) -> None:
        def pos_int(name: str, v: Any, lo: int = 1) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise BadInput(f"{name}={v!r} is invalid", f"use an integer >= {lo}")

        pos_int("samples", self.samples)
        pos_int("seq_len", self.seq_len)
        pos_int("block_size", self.block_size)
        pos_int("seed", self.seed, 0)
        pos_int("sink_blocks", self.sink_blocks, 0)
        pos_int("local_blocks", self.local_blocks, 0)
        pos_int("local_window", self.local_window)
        pos_int("sink_min_queries", self.sink_min_queries)
        pos_int("chunk_elems", self.chunk_elems)
        for nm in ("grad_samples", "grad_seq_len", "sens_samples", "sens_seq_len"):
            v = getattr(self, nm)
            if v is not None:
                pos_int(nm, v, 0 if nm.endswith("samples") else 16)
        if not (0.0 < float(self.ref_keep) <= 1.0):
            raise BadInput(f"ref_keep={self.ref_keep} is out of range", "use a keep fraction in (0, 1]")
        if not self.keep_grid or any(not (0.0 < float(k) <= 1.0) for k in self.keep_grid) or \
                list(self.keep_grid) != sorted(self.keep_grid):
            raise BadInput(f"keep_grid={self.keep_grid} is invalid", "give increasing fractions in (0, 1]")

    # -- resolved values ------------------------------------------------------------
    def resolved(self, lm: LoadedModel, seq_len: int) -> dict[str, Any]:
        """The settings with defaults filled in for ``lm`` (what the profile records)."""
        lm_loss = lm.kind == "causal-lm"
        grad = bool(self.gradients and lm_loss and self.grad_samples != 0)
        sens = bool(self.sensitivity and self.sens_samples != 0)
        gs = min(seq_len, self.grad_seq_len or 1024) if lm.is_text else seq_len
        ss = min(seq_len, self.sens_seq_len or 1024) if lm.is_text else seq_len
        d = asdict(self)
        d["keep_grid"] = list(self.keep_grid)
        d.update({
            "seq_len": seq_len,
            "gradients": grad,
            "grad_samples": (min(self.samples, self.grad_samples) if self.grad_samples is not None
                             else self.samples) if grad else 0,
            "grad_seq_len": gs if grad else 0,
            "grad_checkpointing": False,
            "grad_window": ("full" if gs >= seq_len else f"first {gs} tokens of each sample") if grad else "none",
            "hess_method": "gradient" if grad else "label-free",
            "hess_terms": list(HESS_TERMS) if grad else [],
            "sensitivity": sens,
            "sens_samples": (min(self.samples, self.sens_samples) if self.sens_samples is not None
                             else min(self.samples, 2)) if sens else 0,
            "sens_seq_len": ss if sens else 0,
            "sensitivity_metric": "ce_increase" if lm_loss else "rel_l2",
            "coverages": list(COVERAGES),
            "sink_alignment": "q_proj_input",
        })
        return d


# --------------------------------------------------------------------------- accumulators

class _SiteAcc:
    """Running sums of one site (float64, CPU)."""

    def __init__(self, site: Site, heads: int, groups: int, grid: int) -> None:
        self.site = site
        self.heads, self.groups = heads, groups
        z = lambda *s: np.zeros(s, dtype=np.float64)  # noqa: E731
        self.f90: list[np.ndarray] = []  # [T, H] per chunk
        self.f95: list[np.ndarray] = []
        self.g90: list[np.ndarray] = []  # [T, G]
        self.cov_sum = z(heads, grid)
        self.cov_n = 0
        self.ent_sum = z(heads)
        self.ent_norm_sum = z(heads)
        self.ent_norm_rows = 0
        self.entmax_sum = 0.0
        self.rows = 0
        self.local_sum = z(heads)
        self.sink0_sum = z(heads)
        self.sink0_rows = 0
        self.sink_score_sum = 0.0
        self.sink_samples = 0
        self.secondary = 0
        self.d2 = z(heads)
        self.o2 = z(heads)
        self.hess_sq = {t: z(heads) for t in HESS_TERMS}
        self.hess_n = 0
        self.masks: list[np.ndarray] = []  # this sample's [T, G, nkb] top-k masks
        self.colsum: Optional[torch.Tensor] = None  # this sample's Σ_{h, i≠j} A[i, j]
        self.sens: list[float] = []
        self.sens_l2: list[float] = []

    _SUMS = ("cov_sum", "cov_n", "ent_sum", "ent_norm_sum", "ent_norm_rows", "entmax_sum", "rows", "local_sum",
             "sink0_sum", "sink0_rows", "sink_score_sum", "sink_samples", "secondary", "d2", "o2", "hess_n")
    _LISTS = ("f90", "f95", "g90", "sens", "sens_l2")

    def merge(self, o: "_SiteAcc") -> None:
        """Add the contributions of ``o`` (one unit of work) to these totals."""
        for name in self._SUMS:
            setattr(self, name, getattr(self, name) + getattr(o, name))
        for t in HESS_TERMS:
            self.hess_sq[t] = self.hess_sq[t] + o.hess_sq[t]
        for name in self._LISTS:
            getattr(self, name).extend(getattr(o, name))

    def __getstate__(self) -> dict[str, Any]:  # what travels between ranks: no tensors, no site
        d = dict(self.__dict__)
        d["site"], d["colsum"], d["masks"] = None, None, []
        return d


@dataclass
class _Mode:
    stats: bool = False
    delta: bool = False
    keep_delta: bool = False
    grad: bool = False
    stop_after: Optional[int] = None
    policy: dict[int, tuple[Any, VariantParams, Optional[int]]] = field(default_factory=dict)


# finite "masked" logit: exp(_MASKED − max) is exactly 0 and 0 · _MASKED is 0 (−inf would give NaN)
_MASKED = -1e30


@dataclass
class _Unit:
    """What one (pass, sample) contributed: pass 0 statistics, 1 gradients, 2 sensitivity."""
    key: tuple[int, int]
    acc: list[_SiteAcc]
    overlap_masks: list[np.ndarray]
    overlap_ok: bool
    secondary: list[dict[str, Any]]
    sink_primary: list[list[float]]


class _Totals:
    """The merged units (the fields :func:`_build` reads, named as on :class:`Collector`)."""

    def __init__(self, cap: Captured, st: "ProfileSettings") -> None:
        self.acc = []
        for s in cap.sites:
            g = s.kv_heads if s.kv_heads > 0 and s.heads % s.kv_heads == 0 else s.heads
            self.acc.append(_SiteAcc(s, s.heads, g, len(st.keep_grid)))
        self.overlap_masks: list[np.ndarray] = []
        self.overlap_ok = True
        self.secondary: list[dict[str, Any]] = []
        self.sink_primary: list[list[float]] = [[] for _ in cap.sites]
        self.keys: list[tuple[int, int]] = []

    def merge(self, u: _Unit) -> None:
        if self.keys and tuple(u.key) <= self.keys[-1]:
            raise RuntimeError(f"profile units merged out of order: {u.key} after {self.keys[-1]}")
        self.keys.append(tuple(u.key))
        for a, b in zip(self.acc, u.acc):
            a.merge(b)
        self.overlap_masks.extend(u.overlap_masks)
        self.overlap_ok = self.overlap_ok and u.overlap_ok
        self.secondary.extend(u.secondary)
        for a, b in zip(self.sink_primary, u.sink_primary):
            a.extend(b)


class _StopForward(Exception):
    """Raised after the last site in statistics-only passes (the rest of the model is unused)."""


class Collector:
    """Receives every instrumented SDPA call (see the module docstring)."""

    def __init__(self, cap: Captured, st: ProfileSettings) -> None:
        self.cap = cap
        self.sites = cap.sites
        self.st = st
        self.mode = _Mode()
        self.deltas: dict[int, torch.Tensor] = {}
        self.zs: dict[int, torch.Tensor] = {}
        self.produced: dict[int, torch.Tensor] = {}
        self.sample_sinks: dict[int, list[tuple[int, float, float]]] = {}
        self._buf: dict[str, torch.Tensor] = {}
        self.on_site_stats: Optional[Callable[[], None]] = None  # progress: called after each site's statistics
        self.new_unit()

    # -- units of work ------------------------------------------------------------------
    # Every (pass, sample) accumulates into fresh sums (a "unit"); the totals are the units merged
    # in (pass, sample) order. A single process merges each unit as it finishes; distributed
    # ranks compute disjoint units and rank 0 merges all of them in the same order — so the
    # profile does not depend on how the samples were split (see surgeon.profiles.distributed).
    def new_unit(self) -> None:
        self.acc: list[_SiteAcc] = []
        for s in self.sites:
            g = s.kv_heads if s.kv_heads > 0 and s.heads % s.kv_heads == 0 else s.heads
            self.acc.append(_SiteAcc(s, s.heads, g, len(self.st.keep_grid)))
        self.overlap_masks: list[np.ndarray] = []  # per sample [T, L, G, nkb]
        self.overlap_ok = True
        self.secondary: list[dict[str, Any]] = []
        self.sink_primary: list[list[float]] = [[] for _ in self.sites]

    def take_unit(self, key: tuple[int, int]) -> "_Unit":
        u = _Unit(key, self.acc, self.overlap_masks, self.overlap_ok, self.secondary, self.sink_primary)
        self.new_unit()
        return u

    def _scratch(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A reusable buffer of ``shape`` (grown on demand): big chunk tensors are not re-allocated
        (and page-faulted) for every chunk of every site."""
        n = math.prod(shape)
        buf = self._buf.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(n, dtype=like.dtype, device=like.device)
            self._buf[name] = buf
        return buf[:n].view(shape)

    # -- the instrumented call ---------------------------------------------------------
    def call(self, idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False,
             scale: Optional[float] = None, enable_gqa: bool = False, hidden: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
        site = self.sites[idx]
        sc = float(scale) if scale is not None else 1.0 / math.sqrt(query.shape[-1])
        m = self.mode
        if idx in m.policy:
            out = self._run_variant(idx, query, key, value, attn_mask, sc)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0,
                                                 is_causal=bool(is_causal), scale=scale, enable_gqa=enable_gqa)
        if m.stats or m.delta:
            with torch.no_grad():
                self._site_stats(idx, site, query.detach(), key.detach(), value.detach(), attn_mask,
                                 bool(is_causal), sc, None if hidden is None else hidden.detach())
            if m.stats and self.on_site_stats is not None:
                self.on_site_stats()
        if m.grad:
            z = torch.zeros_like(out, requires_grad=True)
            self.zs[idx] = z
            out = out + z
        if m.stop_after is not None and idx == m.stop_after:
            raise _StopForward()
        return out

    def _ctx(self, site: Site, g: int, attn_mask: Optional[torch.Tensor], scale: float) -> AttnContext:
        explicit = attn_mask if site.mask_kind == "explicit" else None
        return AttnContext(causal=site.causal, scale=scale, kv_heads=g, key_padding=None, attn_mask=explicit,
                           layer=site.layer, site=site.name)

    def _run_variant(self, idx: int, q, k, v, attn_mask, scale: float) -> torch.Tensor:
        var, params, anchor = self.mode.policy[idx]
        site = self.sites[idx]
        g = self.acc[idx].groups
        ku, vu = unrepeat_kv(k, q.shape[1], g), unrepeat_kv(v, q.shape[1], g)
        bm = self.produced.get(anchor) if anchor is not None else None
        if var.consumes_block_mask and bm is None:
            raise BadInput(f"site {site.name} reuses a block mask that no earlier site produced",
                           "give its anchor a block_topk variant")
        out = var.run(q, ku, vu, self._ctx(site, g, attn_mask, scale), params, bm)
        if var.produces_block_mask:
            out, mask = out
            self.produced[idx] = mask
        return out

    # -- statistics of one site ---------------------------------------------------------
    def _site_stats(self, idx: int, site: Site, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    attn_mask: Optional[torch.Tensor], is_causal: bool, scale: float,
                    hidden: Optional[torch.Tensor]) -> None:
        """q [1,Hq,Nq,D], k/v [1,Hq|Hkv,Nk,D] (repeated K/V are un-repeated here).

        Sites whose mask is causal/padding/none are masked geometrically (calibration rows have
        no padding), and for causal sites each query chunk only computes the keys up to the end
        of its last query block (the causal upper triangle is skipped: half the work). Sites
        with an explicit mask apply the graph's mask as SDPA would.
        """
        st, acc, m = self.st, self.acc[idx], self.mode
        b, hq, nq, _ = q.shape
        if b != 1:
            raise BadInput("the profiler processes one sample at a time", "call it with batch 1")
        g = acc.groups
        gs = hq // g
        ku, vu = unrepeat_kv(k, hq, g), unrepeat_kv(v, hq, g)
        nk = ku.shape[2]
        dv = vu.shape[-1]
        dev = q.device
        bs = st.block_size
        geo = block_geometry(nq, nk, bs, bs, site.causal, dev)
        nkb = geo.nkb
        nkp = nkb * bs
        n_allowed = geo.allowed.sum(dim=-1)  # [nqb]
        forced = sink_local_blocks(geo, st.sink_blocks, st.local_blocks) | geo.partial
        step = n_allowed > forced.sum(dim=-1)
        if not bool(step.any()):
            step = torch.ones_like(step)
        grid = torch.tensor(st.keep_grid, dtype=torch.float64, device=dev)
        kgrid = keep_counts(grid, n_allowed)  # [K, nqb]
        kref = keep_counts(torch.tensor([st.ref_keep], dtype=torch.float64, device=dev), n_allowed)[0]  # [nqb]
        geometric = site.mask_kind in ("none", "causal", "padding", "causal+padding")
        causal = site.causal if geometric else bool(is_causal)
        sel = None
        delta = None
        if m.delta:
            bt = get_variant("block_topk")
            p = bt.params_from({"keep": st.ref_keep, "block_size": bs, "sink_blocks": st.sink_blocks,
                                "local_blocks": st.local_blocks})
            sel = bt.select(q, ku, self._ctx(site, g, attn_mask, scale), p)  # [1,Hq,nqb,nkb]
            if m.keep_delta:
                delta = q.new_empty(b, hq, nq, dv)
        vpad = F.pad(vu, (0, 0, 0, nkp - nk)) if nkp != nk else vu  # [1,G,nkp,Dv]
        off = nk - nq
        rows = max(bs, (st.chunk_elems // max(1, hq * nk)) // bs * bs)
        colsum = torch.zeros(nkp, dtype=torch.float64, device=dev) if m.stats else None
        for r0 in range(0, nq, rows):
            r1 = min(nq, r0 + rows)
            c = r1 - r0
            d0 = off + r0  # position of the chunk's first query
            ke = min(nkp, -(-(off + r1) // bs) * bs) if (geometric and causal) else nkp  # keys computed
            kv_e = min(ke, nk)
            qg = q[:, :, r0:r1].reshape(b, g, gs * c, -1)
            zb = self._scratch("z", (b, g, gs * c, ke), q)
            torch.matmul(qg, ku[:, :, :kv_e].transpose(-1, -2), out=zb[..., :kv_e])
            z = zb.view(b, hq, c, ke)
            z[..., :kv_e].mul_(scale)
            if ke > kv_e:
                z[..., kv_e:] = _MASKED
            allow = None
            if geometric:
                if causal and d0 + 1 < ke:
                    w = ke - d0 - 1
                    tri = torch.ones(c, w, dtype=torch.bool, device=dev).triu_(0)  # key d0+1+t > query d0+i ⇔ t ≥ i
                    z[..., d0 + 1:].masked_fill_(tri, _MASKED)
            else:
                if isinstance(attn_mask, torch.Tensor):
                    mk = attn_mask if attn_mask.shape[-2] == 1 else attn_mask[..., r0:r1, :]
                    mk = mk[..., :kv_e]
                    if mk.dtype == torch.bool:
                        allow = mk
                    else:
                        z[..., :kv_e] += mk
                        allow = mk > -1e30
                if causal:
                    cm = torch.arange(kv_e, device=dev)[None, :] <= (d0 + torch.arange(c, device=dev))[:, None]
                    allow = cm if allow is None else allow & cm
                if allow is not None:
                    if ke > kv_e:
                        allow = F.pad(allow.expand(*allow.shape[:-2], c, kv_e), (0, ke - kv_e), value=False)
                    z.masked_fill_(~allow, _MASKED)
                z.clamp_(min=_MASKED)  # -inf from a float mask → the finite sentinel
            # masked logits hold the finite sentinel _MASKED, so exp gives exactly 0 and e·y stays 0
            # (no NaN); a row with nothing allowed (none in calibration rows) gets probability 0.
            mx = z.amax(dim=-1, keepdim=True)
            dead = mx <= _MASKED / 2
            y = z.sub_(mx)  # [1,Hq,c,ke] logits − row max (≤ 0)
            pr = torch.exp(y, out=self._scratch("p", tuple(y.shape), y))
            ssum = pr.sum(dim=-1, keepdim=True)
            ent_rows = None
            if m.stats:
                # entropy −Σ p log p = log s − Σ e·y / s (p = e / s), without a log per element
                # (y ⊙ e in place of a fresh e ⊙ y: the same products, without a chunk-sized allocation)
                ent_rows = (torch.log(ssum) - y.mul_(pr).sum(dim=-1, keepdim=True) / ssum).masked_fill_(dead, 0.0)
            del z, y
            pr = pr.div_(ssum)  # [1,Hq,c,ke] probabilities
            if bool(dead.any()):
                pr.masked_fill_(dead, 0.0)
            rb = pr.view(b, hq, c, ke // bs, bs).sum(dim=-1)  # [1,Hq,c,nkb_e] per-row block mass
            if m.stats:
                if geometric:
                    qp = d0 + torch.arange(c, device=dev)
                    nkeys = (torch.minimum(qp + 1, torch.tensor(nk, device=dev)) if causal
                             else torch.full((c,), nk, device=dev)).view(1, 1, c)
                else:
                    nkeys = allow.sum(dim=-1) if allow is not None else torch.full((1, 1, c), nk, device=dev)
                self._chunk_stats(acc, pr, rb, ent_rows[..., 0], nkeys, r0, r1, d0, geo, step, n_allowed, forced,
                                  kgrid, kref, colsum, causal)
            if m.delta:
                qb0, qb1 = r0 // bs, (r1 + bs - 1) // bs
                kb = sel[:, :, qb0:qb1, : ke // bs].repeat_interleave(bs, dim=2)[:, :, :c].to(pr.dtype)  # [1,Hq,c,nkb_e]
                ps = self._scratch("z", (b, hq, c, ke // bs, bs), pr)  # the logits buffer is free now
                torch.mul(pr.view(b, hq, c, ke // bs, bs), kb[..., None], out=ps)
                ps = ps.view(b, g, gs * c, ke)
                den = (rb * kb).sum(dim=-1, keepdim=True).clamp_min(torch.finfo(pr.dtype).tiny)
                ve = vpad[:, :, :ke]
                od = torch.matmul(pr.view(b, g, gs * c, ke), ve).view(b, hq, c, dv)
                os_ = torch.matmul(ps, ve).view(b, hq, c, dv).div_(den)
                dl = os_.sub_(od)
                acc.d2 += dl.pow(2).sum(dim=(0, 2, 3), dtype=torch.float64).cpu().numpy()
                acc.o2 += od.pow(2).sum(dim=(0, 2, 3), dtype=torch.float64).cpu().numpy()
                if delta is not None:
                    delta[:, :, r0:r1] = dl
                del ps, od, os_, dl
            del pr, rb
        if delta is not None:
            self.deltas[idx] = delta
        if m.stats:
            self._sinks(idx, acc, colsum[:nk], nq, nk, off, site.causal, hq, hidden)

    def _chunk_stats(self, acc: _SiteAcc, pr: torch.Tensor, rb: torch.Tensor, ent_rows: torch.Tensor,
                     nkeys: torch.Tensor, r0: int, r1: int, d0: int, geo: Any, step: torch.Tensor,
                     n_allowed: torch.Tensor, forced: torch.Tensor, kgrid: torch.Tensor, kref: torch.Tensor,
                     colsum: torch.Tensor, causal: bool) -> None:
        """pr [1,Hq,c,ke] probabilities of query rows r0..r1 over keys 0..ke; rb [1,Hq,c,ke/B] their
        per-block sums; ent_rows [1,Hq,c] row entropies; nkeys [1|..,1|Hq,c] keys each row may see;
        d0 the first row's position."""
        st = self.st
        b, hq, c, ke = pr.shape
        bs = st.block_size
        g = acc.groups
        dev = pr.device
        # entropy and its bound
        ent = ent_rows[0].double().clamp_min(0.0)  # [Hq, c]
        nk_rows = nkeys.expand(b, hq, c)[0].double()
        logn = torch.log(nk_rows.clamp_min(1.0))
        acc.ent_sum += ent.sum(dim=1).cpu().numpy()
        acc.entmax_sum += float(logn.mean(dim=0).sum())
        multi = nk_rows > 1
        acc.ent_norm_sum += torch.where(multi, ent / logn.clamp_min(1e-30), torch.zeros_like(ent)).sum(dim=1).cpu().numpy()
        acc.ent_norm_rows += int(multi[0].sum())
        acc.rows += c
        # local-window mass: only the keys within the window of some row of the chunk
        w = st.local_window
        lo = max(0, d0 - w + 1)
        hi = min(ke, d0 + c) if causal else min(ke, d0 + c + w - 1)
        if hi > lo:
            qp = d0 + torch.arange(c, device=dev)[:, None]
            kp = torch.arange(lo, hi, device=dev)[None, :]
            band = ((kp <= qp) & (kp > qp - w)) if causal else ((kp - qp).abs() < w)
            acc.local_sum += (pr[..., lo:hi] * band).sum(dim=-1)[0].double().sum(dim=1).cpu().numpy()
        # sinks: column sums over later (causal) / other (non-causal) queries
        colsum[:ke] += pr.sum(dim=(0, 1, 2)).double()
        diag = torch.diagonal(pr, offset=d0, dim1=-2, dim2=-1) if d0 < ke else pr.new_zeros(b, hq, 0)
        if diag.shape[-1]:
            colsum[d0: d0 + diag.shape[-1]] -= diag.sum(dim=(0, 1)).double()
        first = pr[0, :, :, 0].double()  # [Hq, c]
        if d0 <= 0 < d0 + c:
            first = torch.cat([first[:, : -d0], first[:, -d0 + 1:]], dim=1)
        acc.sink0_sum += first.sum(dim=1).cpu().numpy()
        acc.sink0_rows += first.shape[1]
        # key-block mass per query block
        qb0, qb1 = r0 // bs, (r1 + bs - 1) // bs
        cqb = qb1 - qb0
        if cqb * bs != c:
            rb = torch.cat([rb, rb.new_zeros(b, hq, cqb * bs - c, rb.shape[-1])], dim=2)
        bm = rb.view(b, hq, cqb, bs, rb.shape[-1]).sum(dim=3)[0].double()  # [Hq, cqb, nkb_e]
        if bm.shape[-1] < geo.nkb:
            bm = F.pad(bm, (0, geo.nkb - bm.shape[-1]))
        stp = step[qb0:qb1]
        if not bool(stp.any()):
            return
        bm = bm[:, stp]  # [Hq, T, nkb]
        na = n_allowed[qb0:qb1][stp]
        cum = _sorted_cum(bm)
        f = [_needed(cum, na, cov) for cov in COVERAGES]
        acc.f90.append(f[0].T.cpu().numpy())
        acc.f95.append(f[1].T.cpu().numpy())
        # coverage of a block_topk-like selection: forced blocks first, then the heaviest others
        fo = forced[qb0:qb1][stp]  # [T, nkb]
        bmn = bm / bm.sum(dim=-1, keepdim=True).clamp_min(1e-300)
        order = torch.sort(bmn + 2.0 * fo.to(bmn.dtype), dim=-1, descending=True, stable=True).indices
        cumf = torch.cumsum(torch.gather(bmn, -1, order), dim=-1)
        kg = torch.maximum(kgrid[:, qb0:qb1][:, stp], fo.sum(dim=-1)[None])  # [K, T]
        idx = (kg.T[None] - 1).clamp(0, geo.nkb - 1).expand(hq, -1, -1)  # [Hq, T, K]
        cov = torch.gather(cumf, -1, idx)
        acc.cov_sum += cov.sum(dim=1).cpu().numpy()
        acc.cov_n += cov.shape[1]
        gm = bm.view(g, hq // g, bm.shape[1], geo.nkb).sum(dim=1)  # [G, T, nkb]
        acc.g90.append(_needed(_sorted_cum(gm), na, COVERAGES[0]).T.cpu().numpy())
        sel = select_top(gm[None], geo.allowed[qb0:qb1][stp], forced[qb0:qb1][stp],
                         torch.ones(1, 1, 1, geo.nkb, dtype=torch.bool, device=gm.device),
                         kref[qb0:qb1][stp][None, None])  # [1, G, T, nkb]
        acc.masks.append(sel[0].permute(1, 0, 2).cpu().numpy())

    def _sinks(self, idx: int, acc: _SiteAcc, colsum: torch.Tensor, nq: int, nk: int, off: int, causal: bool,
               hq: int, hidden: Optional[torch.Tensor]) -> None:
        """methods.md §13f: σ_l(j) = mean_{h, i>j} A_h[i, j] (non-causal: i ≠ j); flag j ≠ 0 with
        σ ≥ max(ratio·median σ, min_score) and cos(h_j, h_0) ≥ sink_cos."""
        st = self.st
        j = torch.arange(nk, device=colsum.device)
        if causal:
            cnt = nq - torch.clamp(j - off + 1, 0, nq)
        else:
            cnt = nq - ((j >= off) & (j < off + nq)).long()
        cnt = cnt.double() * hq
        sigma = colsum / cnt.clamp_min(1.0)
        acc.colsum = None
        acc.sink_score_sum += float(sigma[0]) if cnt[0] > 0 else 0.0
        acc.sink_samples += 1
        self.sink_primary[idx].append(float(sigma[0]) if cnt[0] > 0 else 0.0)
        ok = cnt >= st.sink_min_queries * hq
        if int(ok.sum()) < 2:
            self.sample_sinks[idx] = []
            return
        med = float(sigma[ok].median())
        thr = max(st.sink_ratio * med, st.sink_min_score)
        cand = ok & (sigma >= thr) & (j > 0)
        pos = torch.nonzero(cand).flatten()
        found: list[tuple[int, float, float]] = []
        h = None
        if hidden is not None:
            hh = hidden
            if hh.dim() == 2 and hh.shape[0] % nq == 0:
                hh = hh.view(-1, nq, hh.shape[-1])
            if hh.dim() == 3 and hh.shape[1] == nk:
                h = hh[0].double()
        for p in pos.tolist():
            cosv = float("nan")
            if h is not None:
                cosv = float(F.cosine_similarity(h[p], h[0], dim=0))
                if not cosv >= st.sink_cos:
                    continue
            found.append((int(p), float(sigma[p]), cosv))
        self.sample_sinks[idx] = found
        acc.secondary += len(found)

    # -- per-sample bookkeeping ---------------------------------------------------------
    def end_stats_sample(self, sample: int, ids: Optional[torch.Tensor], tokenizer: Any) -> None:
        masks = [np.concatenate(a.masks, axis=0) if a.masks else None for a in self.acc]
        for a in self.acc:
            a.masks = []
        if any(x is None for x in masks) or len({x.shape for x in masks}) != 1:
            self.overlap_ok = False
        if self.overlap_ok:
            self.overlap_masks.append(np.stack(masks, axis=1))  # [T, L, G, nkb]
        by_pos: dict[int, list[tuple[int, float, float]]] = {}
        for li in range(len(self.sites)):
            for p, s, cv in self.sample_sinks.get(li, []):
                by_pos.setdefault(p, []).append((li, s, cv))
        self.sample_sinks = {}
        for p in sorted(by_pos):
            ent = by_pos[p]
            layers = [e[0] for e in ent]
            life = 1
            while life < len(layers) and layers[life] == layers[0] + life:
                life += 1
            tok = None
            if ids is not None and tokenizer is not None and p < ids.shape[-1]:
                tok = str(tokenizer.convert_ids_to_tokens(int(ids[0, p])))
            best = max(ent, key=lambda e: (e[1], -e[0]))
            self.secondary.append({"sample": sample, "position": p, "token": tok, "start_layer": layers[0],
                                   "lifetime": life, "layers": layers, "max_score": best[1],
                                   "cos_to_first": None if math.isnan(best[2]) else best[2]})

    def add_hess(self, grads: dict[str, Sequence[torch.Tensor]]) -> None:
        """Accumulate (Σ dL_e/dO_h ⊙ δ_h)^2 for each error term e."""
        for term, gl in grads.items():
            for i, gr in enumerate(gl):
                d = self.deltas.get(i)
                if d is None or gr is None:
                    continue
                s = (gr.double() * d.double()).sum(dim=(0, 2, 3)).cpu().numpy()
                self.acc[i].hess_sq[term] += s * s
        for i in self.deltas:
            self.acc[i].hess_n += 1
        self.deltas = {}
        self.zs = {}


# --------------------------------------------------------------------------- helpers

def _sorted_cum(bm: torch.Tensor) -> torch.Tensor:
    """Block masses [..., nkb] → cumulative fraction of the descending-sorted masses."""
    tot = bm.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    srt = torch.sort(bm / tot, dim=-1, descending=True).values
    return torch.cumsum(srt, dim=-1)


def _needed(cum: torch.Tensor, n_allowed: torch.Tensor, coverage: float) -> torch.Tensor:
    """Fraction of the allowed blocks needed to reach ``coverage`` (cum [..., T, nkb], n_allowed [T])."""
    need = (cum < coverage - 1e-12).sum(dim=-1) + 1
    na = n_allowed.to(need.dtype)
    return torch.minimum(need, na).double() / na.double()


def find_hidden_input(q_node: torch.fx.Node, max_depth: int = 16) -> Optional[torch.fx.Node]:
    """The input of the projection that produced ``q_node`` (breadth-first search backwards to the
    nearest linear/addmm/mm/matmul), or None."""
    seen = {q_node}
    frontier = [q_node]
    for _ in range(max_depth):
        nxt = []
        for n in frontier:
            if n.op == "call_function" and n.target in _LINEAR_TARGETS:
                arg = n.args[1] if n.target == torch.ops.aten.addmm.default else n.args[0]
                return arg if isinstance(arg, torch.fx.Node) else None
            for a in n.all_input_nodes:
                if a not in seen and a.op == "call_function":
                    seen.add(a)
                    nxt.append(a)
        frontier = nxt
        if not frontier:
            break
    return None


def instrument(cap: Captured, collector: Collector) -> torch.fx.GraphModule:
    """A fresh GraphModule of ``cap.program`` whose SDPA nodes call ``collector.call``."""
    gm = cap.program.module()
    nodes = sdpa_nodes(gm.graph)
    if len(nodes) != len(cap.sites):
        raise BadInput(f"graph has {len(nodes)} attention nodes but the capture lists {len(cap.sites)} sites",
                       "capture the model again")
    for i, n in enumerate(nodes):
        a = _sdpa_args(n)
        hid = find_hidden_input(a["query"]) if isinstance(a["query"], torch.fx.Node) else None

        def fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
               hidden=None, _i=i):
            return collector.call(_i, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, hidden)

        fn.__name__ = f"surgeon_profile_site_{i}"
        n.target = fn
        n.args = (a["query"], a["key"], a["value"], a["attn_mask"])
        n.kwargs = {"dropout_p": a["dropout_p"], "is_causal": a["is_causal"], "scale": a["scale"],
                    "enable_gqa": a["enable_gqa"], "hidden": hid}
    gm.recompile()
    gm.meta["surgeon_site_nodes"] = list(nodes)
    return gm


class _Replay:
    """Exact partial re-execution of an instrumented graph (layer sensitivity).

    A sensitivity forward changes one site only; every node that does not depend on that site's
    output computes exactly what the dense forward computed. :meth:`dense` runs the whole graph
    node by node (the same ops, in the same order, on the same values as the generated forward:
    the results are bit-identical) and keeps the values that some site's dependents read;
    :meth:`suffix` then re-executes only the nodes downstream of site ``i`` on those values —
    on average half a forward instead of a whole one, with bit-identical outputs. Graphs with
    mutating ops (in-place, buffer updates) or other node kinds are not replayed (:meth:`of` returns None).
    """

    def __init__(self, gm: torch.fx.GraphModule, site_nodes: Sequence[torch.fx.Node]) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        pos = {n: k for k, n in enumerate(self.nodes)}
        self.out_node = next(n for n in self.nodes if n.op == "output")
        self.steps: list[list[torch.fx.Node]] = []
        self.step_free: list[list[list[torch.fx.Node]]] = []  # per site: values dead after each step
        keep: set[torch.fx.Node] = set()
        for sn in site_nodes:
            desc = {sn}
            steps = [sn]
            for n in self.nodes[pos[sn] + 1:]:
                if n.op != "output" and any(a in desc for a in n.all_input_nodes):
                    desc.add(n)
                    steps.append(n)
            for n in steps + [self.out_node]:
                keep.update(a for a in n.all_input_nodes if a not in desc)
            self.steps.append(steps)
            # free each value after its last reader, as the generated forward does (holding every
            # intermediate makes each allocation fresh, page-faulted memory: slower than a full forward)
            last_in: dict[torch.fx.Node, int] = {}
            for k, n in enumerate(steps):
                for a in n.all_input_nodes:
                    last_in[a] = k
            out_inputs = set(self.out_node.all_input_nodes)
            free: list[list[torch.fx.Node]] = [[] for _ in steps]
            for a, k in last_in.items():
                if a not in out_inputs:
                    free[k].append(a)
            self.step_free.append(free)
        self.keep = keep
        last: dict[torch.fx.Node, int] = {}
        for k, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last[a] = k
        self.free_after: list[list[torch.fx.Node]] = [[] for _ in self.nodes]
        for n, k in last.items():
            if n not in keep:
                self.free_after[k].append(n)

    @classmethod
    def of(cls, gm: torch.fx.GraphModule) -> Optional["_Replay"]:
        rep = gm.meta.get("surgeon_replay")
        if rep is None:
            sites = gm.meta.get("surgeon_site_nodes")
            if not sites or any(n.op not in ("placeholder", "get_attr", "call_function", "call_module", "output") or
                                (n.op == "call_function" and _mutates(n.target)) for n in gm.graph.nodes):
                return None
            rep = cls(gm, sites)
            gm.meta["surgeon_replay"] = rep
        return rep

    def _exec(self, n: torch.fx.Node, env: dict[torch.fx.Node, Any]) -> Any:
        if n.op == "get_attr":
            obj: Any = self.gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            return obj
        args = torch.fx.node.map_arg(n.args, env.__getitem__)
        kwargs = torch.fx.node.map_arg(n.kwargs, env.__getitem__)
        if n.op == "call_module":  # e.g. torch.export's input guards (``_guards_fn``)
            return self.gm.get_submodule(str(n.target))(*args, **kwargs)
        return n.target(*args, **kwargs)

    def _output(self, env: dict[torch.fx.Node, Any]) -> Any:
        out = torch.fx.node.map_arg(self.out_node.args[0], env.__getitem__)
        return self.gm.graph.process_outputs(out)

    def dense(self, inputs: tuple) -> tuple[Any, dict[torch.fx.Node, Any]]:
        """The forward's output and the kept values (what :meth:`suffix` reads)."""
        args = iter(self.gm.graph.process_inputs(*inputs))
        env: dict[torch.fx.Node, Any] = {}
        for k, n in enumerate(self.nodes):
            if n.op == "output":
                out = self._output(env)
                break
            env[n] = next(args) if n.op == "placeholder" else self._exec(n, env)
            for d in self.free_after[k]:
                env.pop(d, None)
        return out, {n: v for n, v in env.items() if n in self.keep}

    def suffix(self, i: int, kept: dict[torch.fx.Node, Any]) -> Any:
        """The forward's output when only the nodes downstream of site ``i`` are re-executed."""
        env = dict(kept)
        for n, dead in zip(self.steps[i], self.step_free[i]):
            env[n] = self._exec(n, env)
            for d in dead:
                del env[d]
        return self._output(env)


def _mutates(target: Any) -> bool:
    schema = getattr(target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


@contextlib.contextmanager
def _frozen_params(module: torch.nn.Module) -> Iterator[None]:
    """Temporarily set requires_grad=False on every parameter (restored afterwards)."""
    params = list(module.parameters())
    old = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, r in zip(params, old):
            p.requires_grad_(r)


def _run(gm: torch.fx.GraphModule, inputs: tuple) -> Optional[torch.Tensor]:
    try:
        return gm(*inputs)
    except _StopForward:
        return None


def causal_lm_ce(logits: torch.Tensor, ids: torch.Tensor, chunk: int = 512) -> float:
    """Mean next-token cross-entropy of logits [1, N, V] on ids [1, N] (no grad, chunked rows)."""
    n = logits.shape[1] - 1
    tot = 0.0
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        tot += float(F.cross_entropy(logits[0, a:b].float(), ids[0, a + 1:b + 1], reduction="sum"))
    return tot / max(n, 1)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ (float32 tensors, the ratio in float64)."""
    d = float(torch.linalg.vector_norm(out.float() - ref.float()))
    return d / max(float(torch.linalg.vector_norm(ref.float())), 1e-30)


def _emit(progress: Optional[ProgressFn], stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


# --------------------------------------------------------------------------- the profiler

def profile(
    lm: LoadedModel,
    cap: Captured,
    *,
    texts: Optional[Sequence[str]] = None,
    data_path: Optional[str] = None,
    samples: int = 8,
    seq_len: int = 2048,
    block_size: int = 64,
    seed: int = 0,
    progress: Optional[ProgressFn] = None,
    **options: Any,
) -> Profile:
    """Profile ``lm`` (captured as ``cap``) on calibration data; returns the :class:`Profile`.

    Data: ``texts`` (documents), ``data_path`` (file/folder, see :mod:`surgeon.profiles.data`) or
    neither (the built-in corpus); the ``calib`` split is used. ``options`` are the other
    :class:`ProfileSettings` fields (ref_keep, grad_seq_len, sens_samples, ...). ``progress`` is
    called as ``progress(stage, done, total)`` with stages "statistics" (one step per site of
    each sample), "gradients" (per sample) and "sensitivity" (per forward). Deterministic: same inputs and seed → byte-identical ``to_json()``.

    Distributed (torchrun, see :mod:`surgeon.profiles.distributed`): when this process has joined
    a process group of N > 1 ranks, it computes its share of the units and rank 0 returns the
    merged profile; other ranks return None. A failure on any rank raises on every rank.
    """
    if texts is not None and data_path is not None:
        raise BadInput("both texts and data_path were given", "pass one calibration source")
    st = ProfileSettings(samples=samples, seq_len=seq_len, block_size=block_size, seed=seed, **options)
    data = load_calibration(data_path, lm, samples, seq_len, "calib", seed=seed, texts=texts)
    n_tok = int(data.inputs[0].shape[1]) if data.is_text else int(lm.max_positions or 0)
    rs = st.resolved(lm, n_tok if data.is_text else seq_len)
    if not data.is_text:
        rs["seq_len"] = n_tok
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    col = Collector(cap, st)
    gm = instrument(cap, col)
    L = len(cap.sites)
    lm_loss = lm.kind == "causal-lm"
    grad_n, grad_len = int(rs["grad_samples"]), int(rs["grad_seq_len"])
    combined = bool(rs["gradients"]) and grad_len >= n_tok and data.is_text
    ids_all = data.inputs[0] if data.is_text else None
    # units of work: (pass, sample); pass 0 statistics (a)-(e) (+ HeSS when the gradient window
    # is the whole row), 1 HeSS gradients on shorter windows, 2 per-layer sensitivity
    units = [(0, s_) for s_ in range(data.samples)]
    if rs["gradients"] and not combined:
        units += [(1, s_) for s_ in range(grad_n)]
    if rs["sensitivity"]:
        units += [(2, s_) for s_ in range(int(rs["sens_samples"]))]
    from surgeon.profiles import distributed as dist

    world = dist.current()
    mine = units if world is None else world.split(units)
    totals = _Totals(cap, st)
    done_units: list[_Unit] = []
    stage_names = ("statistics", "gradients", "sensitivity")
    stage_total = {k: sum(1 for u in mine if u[0] == k) for k in range(3)}
    stage_total[0] *= L  # statistics: one step per site of each sample (a long row's sites take minutes)
    stage_total[2] *= L + 1
    stage_done = {0: 0, 1: 0, 2: 0}

    def tick(stage: int, n: int = 1) -> None:
        stage_done[stage] += n
        _emit(progress, stage_names[stage], stage_done[stage], stage_total[stage])

    err: Optional[BaseException] = None
    try:
        if world is not None:
            world.maybe_fail("profile")
        with _frozen_params(gm):
            for key in mine:
                stage, s_ = key
                if stage == 0:
                    inputs = data.row(s_)
                    with_grad = combined and s_ < grad_n
                    col.mode = _Mode(stats=True, delta=True, keep_delta=with_grad, grad=with_grad,
                                     stop_after=None if with_grad else L - 1)
                    col.on_site_stats = lambda: tick(0)
                    if with_grad:
                        _grad_step(gm, col, inputs)
                    else:
                        with torch.no_grad():
                            _run(gm, inputs)
                    col.end_stats_sample(s_, ids_all[s_:s_ + 1] if ids_all is not None else None, lm.tokenizer)
                    col.deltas, col.zs = {}, {}
                    col.on_site_stats = None
                elif stage == 1:
                    col.mode = _Mode(delta=True, keep_delta=True, grad=True)
                    _grad_step(gm, col, data.row(s_, grad_len))
                    tick(1)
                else:
                    _sensitivity_sample(gm, col, data.row(s_, int(rs["sens_seq_len"]) if data.is_text else None),
                                        st, lm_loss, lambda: tick(2))
                unit = col.take_unit(key)
                if world is None:
                    totals.merge(unit)
                else:
                    done_units.append(unit)
    except BaseException as e:  # noqa: BLE001 — re-raised below (distributed: on every rank)
        if world is None:
            raise
        err = e
    if world is not None:
        gathered = world.gather_units(done_units, err)  # raises on every rank if any rank failed
        if gathered is None:
            return None  # not rank 0: rank 0 alone builds (and writes) the profile
        for unit in sorted(gathered, key=lambda u: u.key):
            totals.merge(unit)
        if [u.key for u in sorted(gathered, key=lambda u: u.key)] != sorted(units):
            raise RuntimeError("distributed profile: the ranks' units do not cover the calibration samples")
    log.info("profiled %s: %d sites, %d samples in %.1f s", lm.name, L, data.samples, time.perf_counter() - t0)
    return _build(lm, cap, totals, data, rs)


def _grad_step(gm: torch.fx.GraphModule, col: Collector, inputs: tuple) -> None:
    """Forward with z-leaves, then one backward per HeSS error term (CE on the text, CE on the
    dense argmax predictions)."""
    ids = inputs[0]
    with torch.enable_grad():
        logits = gm(*inputs)
        lg = logits[0, :-1]
        l_ce = F.cross_entropy(lg, ids[0, 1:])
        l_ps = F.cross_entropy(lg, lg.detach().argmax(dim=-1))
        order = sorted(col.zs)
        zs = [col.zs[i] for i in order]
        g1 = torch.autograd.grad(l_ce, zs, retain_graph=True, allow_unused=True)
        g2 = torch.autograd.grad(l_ps, zs, allow_unused=True)
    full = lambda gl: [dict(zip(order, gl)).get(i) for i in range(len(col.sites))]  # noqa: E731
    col.add_hess({"ce": full(g1), "pseudo_ce": full(g2)})
    del logits, l_ce, l_ps


def _sensitivity_sample(gm: torch.fx.GraphModule, col: Collector, inputs: tuple, st: ProfileSettings,
                        lm_loss: bool, tick: Callable[[], None]) -> None:
    """One calibration row: the dense output, then each site alone running block_topk at the
    reference keep; appends the loss increase (LM) or relative L2 error to each site's unit."""
    bt = get_variant("block_topk")
    params = bt.params_from({"keep": st.ref_keep, "block_size": st.block_size, "sink_blocks": st.sink_blocks,
                             "local_blocks": st.local_blocks})
    col.mode = _Mode()
    rep = _Replay.of(gm)
    with torch.no_grad():
        if rep is not None:
            ref, kept = rep.dense(inputs)
        else:
            ref = gm(*inputs)
        base = causal_lm_ce(ref, inputs[0]) if lm_loss else 0.0
        tick()
        for i in range(len(col.sites)):
            col.mode = _Mode(policy={i: (bt, params, None)})
            col.produced = {}
            out = rep.suffix(i, kept) if rep is not None else gm(*inputs)
            err = rel_l2(out, ref)
            col.acc[i].sens_l2.append(err)
            col.acc[i].sens.append(causal_lm_ce(out, inputs[0]) - base if lm_loss else err)
            tick()
            del out
        kept = {}
    col.produced = {}
    col.mode = _Mode()


def _mean_or_none(x: list[float]) -> Optional[float]:
    return float(np.mean(x)) if x else None


def _build(lm: LoadedModel, cap: Captured, col: Any, data: CalibrationData, rs: dict[str, Any]) -> Profile:
    L = len(cap.sites)
    grad = bool(rs["gradients"])
    # HeSS: normalise each term over all heads of all sites
    hess_terms: list[dict[str, np.ndarray]] = [{} for _ in range(L)]
    hess = [np.zeros(a.heads) for a in col.acc]
    if grad:
        for term in HESS_TERMS:
            raw = [a.hess_sq[term] / max(a.hess_n, 1) for a in col.acc]
            tot = float(sum(r.sum() for r in raw))
            for i, r in enumerate(raw):
                hess_terms[i][term] = r
                hess[i] = hess[i] + (r / tot if tot > 0 else np.full_like(r, 1.0 / sum(a.heads for a in col.acc)))
    proxy = [a.d2 / np.maximum(a.o2, 1e-300) for a in col.acc]
    if not grad:
        tot = float(sum(p.sum() for p in proxy))
        nh = sum(a.heads for a in col.acc)
        hess = [p / tot if tot > 0 else np.full_like(p, 1.0 / nh) for p in proxy]
    sites: list[SiteProfile] = []
    hr: list[float] = []
    for i, (a, s) in enumerate(zip(col.acc, cap.sites)):
        f90 = np.concatenate(a.f90, axis=0) if a.f90 else np.ones((1, a.heads))
        f95 = np.concatenate(a.f95, axis=0) if a.f95 else np.ones((1, a.heads))
        g90 = np.concatenate(a.g90, axis=0) if a.g90 else np.ones((1, a.groups))
        g90m = np.asarray(iqr_clip_mean(g90, axis=0))
        hr.append(float(g90m.mean()))
        rows = max(a.rows, 1)
        sites.append(SiteProfile(
            name=s.name, layer=s.layer, heads=s.heads, kv_heads=a.groups, head_dim=s.head_dim, causal=s.causal,
            steps=int(f90.shape[0]),
            mass_fraction_90=np.asarray(iqr_clip_mean(f90, axis=0)).tolist(),
            mass_fraction_95=np.asarray(iqr_clip_mean(f95, axis=0)).tolist(),
            mass_fraction_90_kv=g90m.tolist(), hash_ratio=hr[-1],
            coverage=(a.cov_sum / max(a.cov_n, 1)).tolist(),
            entropy=(a.ent_sum / rows).tolist(), entropy_max=a.entmax_sum / rows,
            entropy_normalized=(a.ent_norm_sum / max(a.ent_norm_rows, 1)).tolist(),
            local_mass=(a.local_sum / rows).tolist(),
            primary_sink_mass=(a.sink0_sum / max(a.sink0_rows, 1)).tolist(),
            sink_score=a.sink_score_sum / max(a.sink_samples, 1),
            secondary_sinks=a.secondary / max(a.sink_samples, 1),
            hess=np.asarray(hess[i]).tolist(),
            hess_terms={k: v.tolist() for k, v in hess_terms[i].items()},
            hess_proxy=proxy[i].tolist(),
            sensitivity=_mean_or_none(a.sens), sensitivity_rel_l2=_mean_or_none(a.sens_l2)))
    if col.overlap_ok and col.overlap_masks:
        masks = np.concatenate(col.overlap_masks, axis=0)  # [T, L, G, nkb]
        og = directed_overlap(masks)  # [G, L, L]
        om = og.min(axis=0)
        om[np.arange(L), np.arange(L)] = 1.0
    else:
        G = max(1, min(a.groups for a in col.acc))
        og = np.stack([np.eye(L)] * G)
        om = np.eye(L)
    secondary = sorted(col.secondary, key=lambda d: (-d["max_score"], d["sample"], d["position"]))
    sinks = {
        "primary_position": 0,
        "primary_score": [float(np.mean(x)) if x else 0.0 for x in col.sink_primary],
        "secondary_count": len(secondary),
        "secondary": secondary[:64],
        "thresholds": {"ratio_to_median": rs["sink_ratio"], "min_score": rs["sink_min_score"],
                       "cos_to_first": rs["sink_cos"], "min_queries": rs["sink_min_queries"]},
        "alignment_proxy": "input of the site's query projection (normalised residual stream for pre-norm models)",
    }
    return Profile(
        model_fingerprint=lm.fingerprint(), data_fingerprint=data.fingerprint,
        model={"name": lm.name, "kind": lm.kind, "sites": L, "source": lm.source},
        data=data.describe(), settings=rs, sites=sites,
        overlap=om.tolist(), overlap_per_kv_head=og.tolist(), hash_ratios=hr,
        layer_sensitivity=[s.sensitivity for s in sites], sinks=sinks)


# --------------------------------------------------------------------------- policy evaluation

def policy_modes(cap: Captured, policy: Optional[Policy]) -> dict[int, tuple[Any, VariantParams, Optional[int]]]:
    """site index → (variant, params, anchor index) for every non-dense site of ``policy``."""
    if policy is None:
        return {}
    order = {s.name: i for i, s in enumerate(cap.sites)}
    out: dict[int, tuple[Any, VariantParams, Optional[int]]] = {}
    for name, ch in policy.sites.items():
        if name not in order:
            raise BadInput(f"the policy names site {name} which this model does not have", "plan for this model")
        if ch.variant == "dense" and not ch.modulators:
            continue
        if ch.modulators:
            raise BadInput(f"site {name} composes modulators, which the profiler's evaluator does not run",
                           "evaluate modulated policies with `surgeon verify`")
        var = get_variant(ch.variant)
        anchor = order.get(ch.block_mask_from) if ch.block_mask_from else None
        out[order[name]] = (var, var.params_from(ch.params), anchor)
    return out


def evaluate_policies(lm: LoadedModel, cap: Captured, policies: dict[str, Optional[Policy]],
                      data: CalibrationData) -> dict[str, dict[str, float]]:
    """Run each policy (None = dense) on every row of ``data``; returns per policy the mean
    CE (causal LMs; else NaN), its increase over dense and the mean relative L2 error of the
    output (logits / hidden states) versus dense."""
    col = Collector(cap, ProfileSettings(samples=1, seq_len=max(16, data.seq_len or 16)))
    gm = instrument(cap, col)
    lm_loss = lm.kind == "causal-lm"
    modes = {k: policy_modes(cap, p) for k, p in policies.items()}
    res: dict[str, dict[str, list[float]]] = {k: {"ce": [], "rel_l2": []} for k in policies}
    base_ce: list[float] = []
    with torch.no_grad():
        for s in range(data.samples):
            inputs = data.row(s)
            col.mode = _Mode()
            ref = gm(*inputs)
            base_ce.append(causal_lm_ce(ref, inputs[0]) if lm_loss else float("nan"))
            for k in policies:
                col.mode = _Mode(policy=modes[k])
                col.produced = {}
                out = gm(*inputs)
                res[k]["ce"].append(causal_lm_ce(out, inputs[0]) if lm_loss else float("nan"))
                res[k]["rel_l2"].append(rel_l2(out, ref))
            col.produced = {}
    dense_ce = float(np.mean(base_ce))
    return {k: {"ce": float(np.mean(v["ce"])), "ce_increase": float(np.mean(v["ce"])) - dense_ce,
                "rel_l2": float(np.mean(v["rel_l2"])), "dense_ce": dense_ce} for k, v in res.items()}


def heldout_data(lm: LoadedModel, texts_heldout: Optional[Sequence[str]], samples: int, seq_len: int,
                 seed: int = 0) -> CalibrationData:
    """Held-out rows: from ``texts_heldout`` (all of it is held-out text: no alternation) or, when
    None, the built-in corpus's ``heldout`` split."""
    if texts_heldout is None:
        return load_calibration(None, lm, samples, seq_len, "heldout", seed=seed)
    from surgeon.profiles.data import _fingerprint, _pick_rows, _quiet_tokenizer

    if lm.tokenizer is None:
        raise BadInput(f"{lm.name} has no tokenizer", "held-out texts need a text model")
    if isinstance(texts_heldout, str):
        texts_heldout = [texts_heldout]
    with _quiet_tokenizer():
        ids = lm.encode_texts([str(t) for t in texts_heldout], seq_len)
    if ids.shape[0] < samples:
        raise BadInput(f"the held-out texts give {ids.shape[0]} rows of {seq_len} tokens but {samples} are needed",
                       "give more held-out text or fewer samples")
    pick = _pick_rows(int(ids.shape[0]), samples, seed)
    x = ids[pick].contiguous()
    return CalibrationData(inputs=(x, torch.ones_like(x)), source="texts", split="heldout",
                           fingerprint=_fingerprint("heldout", x), seq_len=seq_len,
                           tokens_available=int(ids.numel()), documents=len(texts_heldout),
                           rows_available=int(ids.shape[0]), row_indices=pick)


# --------------------------------------------------------------------------- evidence helpers

def compare_head_budgets(lm: LoadedModel, cap: Captured, profile: Profile, budget: float,
                         texts_heldout: Optional[Sequence[str]] = None, *, samples: int = 2,
                         seq_len: Optional[int] = None, seed: int = 0) -> dict[str, Any]:
    """HeSS-guided vs uniform per-head budgets at equal total compute, on held-out text.

    Every site runs ``block_topk``: "uniform" keeps ``budget`` of the key blocks in every head;
    "hess_layer" water-fills the same per-site total over the site's heads by HeSS;
    "hess_model" water-fills the same model-wide total over all heads (methods.md §1's H_tot =
    all heads). Held-out data: ``texts_heldout`` or the built-in corpus's heldout split
    (``samples`` rows of ``seq_len`` tokens, default the profile's). Returns, per policy, the CE
    on the held-out rows, its increase over dense and the relative L2 error of the final logits
    (hidden states for non-LM models), the modelled attention density of each policy at the
    evaluation length (equal nominal totals are not exactly equal densities: heads at the
    forced-block floor keep more than their nominal share), plus the settings used.
    """
    from surgeon.profiles.plan import uniform_head_policy

    profile.check_sites([s.name for s in cap.sites])
    n = int(seq_len or profile.settings["seq_len"])
    data = heldout_data(lm, texts_heldout, samples, n, seed) if lm.is_text else \
        load_calibration(None, lm, samples, n, "heldout", seed=seed)
    pols = {"uniform": uniform_head_policy(profile, budget, head_budget="uniform"),
            "hess_layer": uniform_head_policy(profile, budget, head_budget="hess", scope="layer"),
            "hess_model": uniform_head_policy(profile, budget, head_budget="hess", scope="model")}
    res = evaluate_policies(lm, cap, pols, data)
    for k, pol in pols.items():
        res[k]["density"] = policy_density(profile, pol, n)
    return {"budget": float(budget), "samples": samples, "seq_len": n, "data": data.describe(), "results": res}


def policy_density(profile: Profile, policy: Policy, n: Optional[int] = None) -> float:
    """Modelled attention density of ``policy`` at ``n`` tokens (default: the profile's length):
    mean over sites; dense = 1; block_topk/reuse at the geometric density of their (anchor's)
    per-head keeps (see :func:`surgeon.profiles.plan.block_topk_density`)."""
    from surgeon.profiles.plan import block_topk_density

    n = int(n or profile.settings["seq_len"])
    bs = int(profile.settings["block_size"])
    out = []
    for s in profile.sites:
        ch = policy.sites.get(s.name)
        if ch is None or ch.variant not in ("block_topk", "reuse"):
            out.append(1.0)
            continue
        src = policy.sites[ch.block_mask_from] if ch.variant == "reuse" and ch.block_mask_from else ch
        ks = src.params.get("head_keep") or [src.params.get("keep", 1.0)]
        out.append(float(np.mean(block_topk_density(n, bs, np.asarray(ks, dtype=np.float64), s.causal,
                                                    int(src.params.get("sink_blocks", 1)),
                                                    int(src.params.get("local_blocks", 1))))))
    return float(np.mean(out))


def compare_layer_policies(lm: LoadedModel, cap: Captured, profile: Profile, budget: float,
                           texts_heldout: Optional[Sequence[str]] = None, *, options: Any = None,
                           samples: int = 2, seq_len: Optional[int] = None, seed: int = 0) -> dict[str, Any]:
    """The planned (HyLRA DP + HeSS) policy vs "first k layers full, the rest block_topk" at equal
    modelled cost, on held-out text. k is the number of FULL layers the plan chose; the
    baseline's keep is the largest whose block_topk density d (forced blocks included, at the
    profile's length) satisfies ``(k + (L − k)(d + select_cost)) / L ≤ cost(plan)`` — or the
    forced-block floor when none does (then ``baseline_cost`` exceeds the plan's; both are
    returned). Returns CE, CE increase and relative L2 of the final logits for both (see
    :func:`compare_head_budgets`).
    """
    from surgeon.profiles.plan import first_k_policy, keep_for_density, plan_details
    from surgeon.profiles.solvers import select_overhead

    profile.check_sites([s.name for s in cap.sites])
    det = plan_details(profile, budget, options=options)
    L = len(cap.sites)
    k = sum(1 for r in det.roles if r == "full")
    bs = int(profile.settings["block_size"])
    sc = select_overhead(bs, "prefill")
    dens_b = (det.cost * L - k) / max(L - k, 1) - sc  # the baseline's sparse layers' density
    if not (0 < dens_b <= 1):
        raise BadInput(f"no first-{k}-full baseline matches the plan's cost {det.cost:.4g}", "use another budget")
    from surgeon.profiles.plan import block_topk_density

    n_ref, causal = int(profile.settings["seq_len"]), bool(cap.sites[-1].causal)
    sb, lb = int(profile.settings.get("sink_blocks", 1)), int(profile.settings.get("local_blocks", 1))
    try:
        keep_b = keep_for_density(n_ref, bs, dens_b, causal, sb, lb)
    except BadInput:  # the plan's sparse layers sit below block_topk's floor: the baseline pays the floor
        keep_b = 1e-6
    dens_real = float(block_topk_density(n_ref, bs, keep_b, causal, sb, lb))
    cost_b = (k + (L - k) * (dens_real + sc)) / L
    n = int(seq_len or profile.settings["seq_len"])
    data = heldout_data(lm, texts_heldout, samples, n, seed) if lm.is_text else \
        load_calibration(None, lm, samples, n, "heldout", seed=seed)
    pols = {"planned": det.policy, f"first_{k}_full": first_k_policy(profile, k, keep_b)}
    res = evaluate_policies(lm, cap, pols, data)
    for name, pol in pols.items():
        res[name]["density"] = policy_density(profile, pol, n)
    return {"budget": float(budget), "cost": det.cost, "full_layers": k, "plan_keep": det.keep,
            "baseline_keep": keep_b, "baseline_density": dens_real, "baseline_cost": cost_b, "roles": det.roles, "samples": samples, "seq_len": n,
            "data": data.describe(), "results": res}


__all__ = ["CalibrationData", "Collector", "ProfileSettings", "compare_head_budgets", "compare_layer_policies",
           "evaluate_policies", "heldout_data", "instrument", "policy_density", "policy_modes", "profile"]
