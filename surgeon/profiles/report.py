"""``report.html``: a self-contained view of a profile and the policy planned from it.

Figures are rendered with matplotlib's object-oriented API (Agg canvas, no pyplot state) and embedded as base64 PNG, so the file
has no external references: HeSS heatmap (sites × heads), per-site density (fraction of key
blocks covering 90% / 95% of the attention mass, HyLRA hash ratio), the inter-layer overlap
matrix, the sink map (primary-sink mass per head, secondary sinks per layer), layer
sensitivity, and the policy table.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from surgeon.artifacts import atomic_write_text
from surgeon.passes.policy import Policy
from surgeon.profiles.profile_doc import Profile


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _heatmap(mat: np.ndarray, title: str, xlabel: str, ylabel: str, cmap: str = "viridis",
             vmin: Optional[float] = None, vmax: Optional[float] = None) -> str:
    from matplotlib.figure import Figure

    h = max(2.5, min(9.0, 0.22 * mat.shape[0] + 1.5))
    w = max(3.5, min(10.0, 0.45 * mat.shape[1] + 2.0))
    fig = Figure(figsize=(w, h))
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                   interpolation="nearest")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=ax)
    return _png(fig)


def _density_plot(profile: Profile) -> str:
    from matplotlib.figure import Figure

    x = np.arange(len(profile.sites))
    f90 = profile.matrix("mass_fraction_90")
    f95 = profile.matrix("mass_fraction_95")
    fig = Figure(figsize=(8, 3.2))
    ax = fig.subplots()
    ax.plot(x, np.nanmean(f90, axis=1), "o-", label="90% mass (mean over heads)")
    ax.plot(x, np.nanmean(f95, axis=1), "s-", label="95% mass (mean over heads)")
    ax.plot(x, profile.hash_ratios, "^--", label="hash ratio (KV groups, 90%)")
    ax.fill_between(x, np.nanmin(f90, axis=1), np.nanmax(f90, axis=1), alpha=0.15, label="90%: head range")
    ax.set_xlabel("site (layer)")
    ax.set_ylabel("fraction of key blocks")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax.set_title("Attention density: key blocks needed to cover the mass")
    return _png(fig)


def _sens_plot(profile: Profile) -> Optional[str]:
    vals = [np.nan if s is None else s for s in profile.layer_sensitivity]
    if not np.isfinite(vals).any():
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 2.8))
    ax = fig.subplots()
    ax.bar(np.arange(len(vals)), vals)
    ax.set_xlabel("site (layer)")
    ax.set_ylabel(str(profile.settings.get("sensitivity_metric", "")))
    ax.set_title(f"Layer sensitivity (this layer alone block_topk at keep {profile.settings.get('ref_keep')})")
    return _png(fig)


def _sink_plot(profile: Profile) -> str:
    from matplotlib.figure import Figure

    mat = profile.matrix("primary_sink_mass")
    fig = Figure(figsize=(10, max(3.0, 0.18 * len(profile.sites) + 1.5)))
    a1, a2 = fig.subplots(1, 2)
    im = a1.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    a1.set_title("primary sink (key 0) mass per head")
    a1.set_xlabel("head")
    a1.set_ylabel("site (layer)")
    fig.colorbar(im, ax=a1)
    sec = profile.sinks.get("secondary", [])
    for s in sec:
        a2.plot(s["layers"], [s["position"]] * len(s["layers"]), "-", alpha=0.6)
        a2.plot([s["start_layer"]], [s["position"]], "o", ms=3 + 10 * min(1.0, s["max_score"]))
    a2.set_xlim(-0.5, len(profile.sites) - 0.5)
    a2.set_xlabel("site (layer)")
    a2.set_ylabel("token position")
    a2.set_title(f"secondary sinks ({profile.sinks.get('secondary_count', 0)} found; lines = lifetime)")
    return _png(fig)


def _policy_rows(profile: Profile, policy: Optional[Policy]) -> str:
    if policy is None:
        return "<p>No policy given.</p>"
    rows = []
    for s in profile.sites:
        ch = policy.sites.get(s.name)
        if ch is None:
            rows.append(f"<tr><td>{html.escape(s.name)}</td><td colspan=4>(not in policy: dense)</td></tr>")
            continue
        p = dict(ch.params)
        hk = p.pop("head_keep", None)
        hk_s = "" if hk is None else ", ".join(f"{x:.3f}" for x in hk)
        ps = ", ".join(f"{k}={v}" for k, v in sorted(p.items()))
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in (
            s.name, ch.variant, ps, hk_s, ch.block_mask_from or "", ch.reason)) + "</tr>")
    counts: dict[str, int] = {}
    for ch in policy.sites.values():
        counts[ch.variant] = counts.get(ch.variant, 0) + 1
    head = (f"<p>budget {policy.budget}; source {html.escape(policy.source)}; "
            + ", ".join(f"{html.escape(k)}: {v}" for k, v in sorted(counts.items())) + "</p>")
    return head + ("<table><tr><th>site</th><th>variant</th><th>params</th><th>head_keep</th>"
                   "<th>block_mask_from</th><th>reason</th></tr>" + "".join(rows) + "</table>")


def render_report(profile: Profile, policy: Optional[Policy]) -> str:
    """The report as one HTML string (no external references)."""
    hess = profile.matrix("hess")
    figs = [
        ("HeSS per head", _heatmap(hess, f"HeSS ({profile.settings.get('hess_method')})", "head", "site (layer)")),
        ("Density per layer", _density_plot(profile)),
        ("Inter-layer overlap", _heatmap(np.asarray(profile.overlap), "directed top-k block overlap O[i, j] (min over KV heads)",
                                         "j (served layer)", "i (anchor layer)", vmin=0, vmax=1)),
        ("Sinks", _sink_plot(profile)),
    ]
    sens = _sens_plot(profile)
    if sens:
        figs.append(("Layer sensitivity", sens))
    st = profile.settings
    facts = {
        "model": f"{profile.model.get('name')} ({profile.model.get('kind')}, {len(profile.sites)} sites)",
        "model fingerprint": profile.model_fingerprint,
        "data": f"{profile.data.get('source')} [{profile.data.get('split')}], {profile.data.get('samples')} × "
                f"{st.get('seq_len')} tokens",
        "data fingerprint": profile.data_fingerprint,
        "block size / reference keep": f"{st.get('block_size')} / {st.get('ref_keep')}",
        "HeSS": f"{st.get('hess_method')} terms={st.get('hess_terms')} on {st.get('grad_samples')} samples, "
                f"window {st.get('grad_window')}, checkpointing {st.get('grad_checkpointing')}",
        "layer sensitivity": f"{st.get('sensitivity_metric')} on {st.get('sens_samples')} samples × "
                             f"{st.get('sens_seq_len')} tokens",
    }
    facts_html = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    body = "".join(f"<h2>{html.escape(t)}</h2><img alt='{html.escape(t)}' src='{src}'>" for t, src in figs)
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>surgeon profile report</title>"
            "<style>body{font-family:sans-serif;margin:1.5em;max-width:1200px}table{border-collapse:collapse;"
            "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}img{max-width:100%}"
            "</style></head><body><h1>surgeon profile report</h1><table>" + facts_html + "</table>" + body
            + "<h2>Policy</h2>" + _policy_rows(profile, policy) + "</body></html>\n")


def write_report(profile: Profile, policy: Optional[Policy], path: Union[str, Path], *, force: bool = False) -> Path:
    """Write ``report.html`` atomically (an existing file needs ``force``). Returns the path."""
    return atomic_write_text(Path(path), render_report(profile, policy), force=force)


__all__ = ["render_report", "write_report"]
