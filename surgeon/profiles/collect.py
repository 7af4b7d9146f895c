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
that site (:class:`surgeon.profiles.replay.Replay`): the same ops on the same values, so the
scores are bit-identical to whole forwards, at about 0.6 of their cost on SmolLM2 (the LM head
runs in every one).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from surgeon.attention.registry import get_variant
from surgeon.capture import Captured
from surgeon.errors import BadInput
from surgeon.evaluate import next_token_ce
from surgeon.models import LoadedModel
from surgeon.profiles.collector import (
    Collector,
    _emit,
    _frozen_params,
    instrument,
    _Mode,
    rel_l2,
    _run,
    _Totals,
    _Unit,
)
from surgeon.profiles.data import CalibrationData, load_calibration
from surgeon.profiles.profile_doc import Profile, SiteProfile
from surgeon.profiles.profile_settings import HESS_TERMS, ProfileSettings, ProgressFn
from surgeon.profiles.solvers import directed_overlap, iqr_clip_mean

log = logging.getLogger(__name__)


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
    from surgeon.profiles.replay import Replay

    rep = Replay.of(gm)
    with torch.no_grad():
        if rep is not None:
            ref, kept = rep.dense(inputs)
        else:
            ref = gm(*inputs)
        base = next_token_ce(ref, inputs[0]) if lm_loss else 0.0
        tick()
        for i in range(len(col.sites)):
            col.mode = _Mode(policy={i: (bt, params, None)})
            col.produced = {}
            out = rep.suffix(i, kept) if rep is not None else gm(*inputs)
            err = rel_l2(out, ref)
            col.acc[i].sens_l2.append(err)
            col.acc[i].sens.append(next_token_ce(out, inputs[0]) - base if lm_loss else err)
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


__all__ = ["profile"]
