"""Fidelity evaluation: perplexity for language models, embedding cosine for encoders/vision.

Works on a loaded model (dense) or on a rewritten folder; text comes from the held-out split of
the calibration corpus (never the rows used for calibration) unless ``data`` is given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from surgeon.errors import BadInput
from surgeon.attention.base import recording


@dataclass
class EvalResult:
    metric: str  # "ppl" | "cosine"
    value: float
    tokens: int
    seq_len: int
    samples: int
    data: str
    dense_value: Optional[float] = None
    sites: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = {self.metric: self.value, "tokens": self.tokens, "seq_len": self.seq_len, "samples": self.samples,
             "data": self.data}
        if self.dense_value is not None:
            d[f"dense_{self.metric}"] = self.dense_value
            if self.metric == "ppl":
                d["ppl_increase"] = self.value / self.dense_value - 1.0
        if self.sites:
            d["sites"] = self.sites
        return d


def lm_nll(module: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and token count; ids/mask [R, N], one row at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for r in range(ids.shape[0]):
            logits = module(ids[r:r + 1], mask[r:r + 1])[0, :-1].float()
            tgt = ids[r, 1:].masked_fill(mask[r, 1:] == 0, -100)  # right padding is not scored
            total += float(F.cross_entropy(logits, tgt, reduction="sum", ignore_index=-100))
            count += int((tgt != -100).sum())
    return total, count


def embeddings(module: torch.nn.Module, inputs: tuple) -> torch.Tensor:
    """Mean-pooled output embeddings [R, C] (masked by attention_mask for text)."""
    outs = []
    with torch.no_grad():
        for r in range(inputs[0].shape[0]):
            row = tuple(x[r:r + 1] for x in inputs)
            h = module(*row).float()
            if len(row) == 2:
                m = row[1].to(h.dtype)[..., None]
                outs.append((h * m).sum(1) / m.sum(1).clamp_min(1))
            else:
                outs.append(h.mean(1))
    return torch.cat(outs)


def summarize_sites(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Average the per-call records of ``recording()`` per site (first-seen order)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by.setdefault(r["site"], []).append(r)
    out = []
    for site, rs in by.items():
        out.append({"site": site, "variant": rs[0]["variant"], "requested_density": rs[0]["requested"],
                    "achieved_density": sum(r["achieved"] for r in rs) / len(rs),
                    "rel_error": sum(r.get("rel_error", 0.0) for r in rs) / len(rs), "calls": len(rs)})
    return out


def evaluate_module(module: torch.nn.Module, lm_kind: str, inputs: tuple, *, seq_len: int, data: str,
                    dense_module: Optional[torch.nn.Module] = None, measure_sites: bool = False) -> EvalResult:
    """Evaluate ``module`` on calibration-style ``inputs`` (from ``load_calibration``)."""
    samples = int(inputs[0].shape[0])
    sites: list[dict[str, Any]] = []
    if lm_kind == "causal-lm":
        ids, mask = inputs
        if measure_sites:
            with recording() as rec:
                nll, n = lm_nll(module, ids, mask)
            sites = summarize_sites(rec.records)
        else:
            nll, n = lm_nll(module, ids, mask)
        dense = None
        if dense_module is not None:
            dn, _ = lm_nll(dense_module, ids, mask)
            dense = math.exp(dn / n)
        return EvalResult("ppl", math.exp(nll / n), n, seq_len, samples, data, dense, sites)
    ref = dense_module
    if ref is None:
        raise BadInput("embedding cosine needs the dense model", "evaluate a rewritten folder, not the model itself")
    if measure_sites:
        with recording() as rec:
            e = embeddings(module, inputs)
        sites = summarize_sites(rec.records)
    else:
        e = embeddings(module, inputs)
    d = embeddings(ref, inputs)
    cos = float(F.cosine_similarity(e, d, dim=-1).mean())
    tokens = int(inputs[1].sum()) if len(inputs) == 2 else int(inputs[0].shape[0])
    return EvalResult("cosine", cos, tokens, seq_len, samples, data, 1.0, sites)
