"""Attention probes of ``surgeon tune``: per-site statistics of the dense model on the calib
split (span mass for head_boost, VAR's head rows, residual streams for the sink selectors).
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from surgeon.attention.base import repeat_kv
from surgeon.capture import Captured, Site
from surgeon.errors import BadInput
from surgeon.models import LoadedModel
from surgeon.profiles.data import CalibrationData
from surgeon.profiles.tune_options import GEOMETRIC_MASKS


log = logging.getLogger("surgeon.profiles.tune")  # the tune stage's logger


def prob_chunks(site: Site, q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool,
                scale: float, chunk_elems: int = 1 << 23) -> Iterator[tuple[int, torch.Tensor]]:
    """Dense attention probabilities of one site in query chunks: yields (first row, probs
    [B, Hq, c, Nk] float32). q [B, Hq, Nq, D]; k [B, Hq|Hkv, Nk, D]. Masked like the profiler:
    geometric causal mask for causal/padding/none sites (calibration rows are unpadded), the
    graph's own mask for explicit-mask sites. Fully masked rows are all zero."""
    b, hq, nq, _ = q.shape
    kr = repeat_kv(k, hq).float()
    nk = kr.shape[2]
    geometric = site.mask_kind in GEOMETRIC_MASKS
    causal = site.causal if geometric else bool(is_causal)
    rows = max(1, chunk_elems // max(1, b * hq * nk))
    kpos = torch.arange(nk, device=q.device)
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        z = torch.matmul(q[:, :, r0:r1].float(), kr.transpose(-1, -2)) * scale
        if not geometric and attn_mask is not None:
            m = attn_mask[..., r0:r1, :]
            z = z.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else z + m.float()
        if causal:
            qpos = torch.arange(nk - nq + r0, nk - nq + r1, device=q.device)
            z = z.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
        yield r0, torch.nan_to_num(torch.softmax(z, dim=-1), nan=0.0)


class Probe:
    """``instrument()``-compatible receiver: plain SDPA for the forward, and for the sites in
    ``want`` the probability chunks handed to ``want[idx](first_row, probs)``; records each
    site's query-projection input (``hidden``) when ``keep_hidden``. The forward stops after the
    last site of interest (no logits are built)."""

    def __init__(self, cap: Captured, want: dict[int, Callable[[int, torch.Tensor], None]],
                 keep_hidden: Sequence[int] = ()) -> None:
        self.sites = cap.sites
        self.want = want
        self.keep_hidden = set(keep_hidden)
        self.hidden: dict[int, torch.Tensor] = {}
        self.last = max(list(want) + list(self.keep_hidden)) if (want or self.keep_hidden) else None

    def call(self, idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False,
             scale: Optional[float] = None, enable_gqa: bool = False, hidden: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
        from surgeon.profiles.collector import _StopForward

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0,
                                             is_causal=bool(is_causal), scale=scale, enable_gqa=enable_gqa)
        sc = float(scale) if scale is not None else 1.0 / math.sqrt(query.shape[-1])
        with torch.no_grad():
            if idx in self.keep_hidden and hidden is not None:
                self.hidden[idx] = hidden.detach().float().clone()
            cb = self.want.get(idx)
            if cb is not None:
                for r0, p in prob_chunks(self.sites[idx], query.detach(), key.detach(), attn_mask, bool(is_causal), sc):
                    cb(r0, p)
        if self.last is not None and idx == self.last:
            raise _StopForward()
        return out


def run_probe(cap: Captured, data: CalibrationData, probe: Probe, on_row: Optional[Callable[[int], None]] = None
              ) -> None:
    """One probe pass over every calibration row."""
    from surgeon.profiles.collector import _run, instrument

    gm = instrument(cap, probe)  # type: ignore[arg-type]  # duck-typed: instrument only calls .call
    with torch.no_grad():
        for s in range(data.samples):
            _run(gm, data.row(s))
            if on_row is not None:
                on_row(s)


def _row_means(cap: Captured, data: CalibrationData, sites: Sequence[int],
               first_row: Callable[[int, int, int, int], int],
               per_row: Callable[[int, torch.Tensor], torch.Tensor],
               empty: Callable[[int], BadInput], on_row: Optional[Callable[[int], None]]) -> dict[int, torch.Tensor]:
    """Mean over calibration query rows of ``per_row(site, probs[:, :, start:])`` (a per-head sum
    over those rows), where ``start = first_row(site, r0, nq, nk)`` skips the rows that do not
    qualify → {site: [Hq]}. ``empty(site)`` is the error when no row of a site qualifies."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {i: 0 for i in sites}

    def make(i: int) -> Callable[[int, torch.Tensor], None]:
        def cb(r0: int, p: torch.Tensor) -> None:
            start = first_row(i, r0, p.shape[2], p.shape[3])
            if start >= p.shape[2]:
                return
            sub = p[:, :, start:]
            v = per_row(i, sub)
            sums[i] = sums[i] + v if i in sums else v
            counts[i] += sub.shape[0] * sub.shape[2]

        return cb

    run_probe(cap, data, Probe(cap, {i: make(i) for i in sites}), on_row)
    out = {}
    for i in sites:
        if counts[i] == 0:
            raise empty(i)
        out[i] = sums[i] / counts[i]
    return out


def measure_span_mass(cap: Captured, data: CalibrationData, sites: Sequence[int],
                      spans: Sequence[tuple[int, int]], on_row: Optional[Callable[[int], None]] = None
                      ) -> dict[int, torch.Tensor]:
    """Per site, per query head: mean attention mass on the key ``spans`` over the calibration
    rows, counting for causal sites only the query rows from the spans' last token on (the rows
    that see all of them; :func:`surgeon.profiles.selectors.paint_span_mass`) → {site: [Hq] float64}."""
    from surgeon.profiles.selectors import paint_span_mass

    end = max(e for _, e in spans)
    return _row_means(
        cap, data, sites,
        lambda i, r0, nq, nk: max(0, end - 1 - r0 - (nk - nq)) if cap.sites[i].causal else 0,  # rows >= end-1
        lambda i, sub: paint_span_mass(sub, spans, last_row_only=False) * (sub.shape[0] * sub.shape[2]),
        lambda i: BadInput(f"no query row of {cap.sites[i].name} sees the whole span set (ends at {end})",
                           "use spans that end inside the calibration sequence"),
        on_row)


def measure_var_heads(cap: Captured, data: CalibrationData, sinks: dict[int, tuple[int, ...]],
                      target: tuple[int, int], rho: float, summ: float,
                      on_row: Optional[Callable[[int], None]] = None) -> dict[int, torch.Tensor]:
    """Per site, per query head: the fraction of query rows after ``target`` that VAR's
    image-centric rule selects (:func:`surgeon.profiles.selectors.var_head_rows`) → {site: [Hq]}."""
    from surgeon.profiles.selectors import var_head_rows

    return _row_means(
        cap, data, list(sinks),
        lambda i, r0, nq, nk: max(0, target[1] - r0 - (nk - nq)),
        lambda i, sub: var_head_rows(sub, sinks[i], target, rho, summ).to(torch.float64).sum(dim=(0, 2)),
        lambda i: BadInput(f"no query row of {cap.sites[i].name} lies after the target span {list(target)}",
                           "use a target span that ends before the calibration sequence does"),
        on_row)


def residual_streams(lm: LoadedModel, cap: Captured, data: CalibrationData, sites: Sequence[int]
                     ) -> tuple[dict[int, torch.Tensor], str]:
    """Each site's layer-input residual stream over the calibration rows: {site: [S, N, C]}.

    From the Hugging Face model's ``output_hidden_states`` (hidden_states[l] is layer l's input)
    when the loaded model wraps one; otherwise the site's query-projection input (for pre-norm
    models the normalised residual, a per-dimension rescaling of it) as a proxy."""
    hf = getattr(lm.module, "hf", None)
    if hf is not None and lm.kind in ("causal-lm", "encoder", "vision"):
        rows: list[tuple] = []
        try:
            with torch.no_grad():
                for s in range(data.samples):
                    kw = dict(zip(lm.inputs, data.row(s)))
                    if lm.kind == "causal-lm":
                        kw["use_cache"] = False
                    hs = hf(**kw, output_hidden_states=True).hidden_states
                    rows.append(tuple(hs))
        except Exception as e:  # noqa: BLE001 — fall back to the proxy below
            log.info("output_hidden_states failed (%s); using query-projection inputs", e)
            rows = []
        if rows and all(0 <= cap.sites[i].layer < len(rows[0]) - 1 for i in sites):
            return ({i: torch.cat([r[cap.sites[i].layer].float() for r in rows], 0) for i in sites},
                    "hidden_states (layer inputs)")
    per: dict[int, list[torch.Tensor]] = {i: [] for i in sites}
    probe = Probe(cap, {}, keep_hidden=sites)

    def collect(_s: int) -> None:
        for i in sites:
            if i not in probe.hidden:
                raise BadInput(f"no hidden states found for {cap.sites[i].name}",
                               "sink_redistribute needs a model whose query projection input is visible")
            per[i].append(probe.hidden.pop(i))

    run_probe(cap, data, probe, collect)
    return {i: torch.cat(v, 0) for i, v in per.items()}, "query-projection input (proxy)"
