"""The tolerance planner's frontier, shown: speed against quality per family (PNG) and a
self-contained HTML report of a tolerance rewrite (see :mod:`surgeon.profiles.tolerance`)."""
from __future__ import annotations

from typing import Any, Optional

from surgeon.profiles.tolerance import FAMILIES, _grid


def frontier_png(record: dict[str, Any]) -> Optional[bytes]:
    """Speed against quality (PNG bytes): x = measured attention speedup at the frontier length
    (the profile's), y = validation loss at the longest serving length, one curve per family, the
    tolerance and the planner's margin as lines, the chosen point marked. None without timed checks."""
    import io

    from matplotlib.figure import Figure

    checks = [c for c in record.get("checks", []) if c.get("attn_speedup") and c.get("losses")]
    if not checks:
        return None
    top = str(max(int(n) for n in record["lengths"]))
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for fam in FAMILIES:
        grid = list(_grid(fam))
        mine = sorted((c for c in checks if c["family"] == fam),
                      key=lambda c: grid.index(c["knob"]) if c["knob"] in grid else c["knob"])
        if not mine:
            continue  # along the knob, gentle → aggressive; open markers: over margin·T
        xs = [c["attn_speedup"] for c in mine]
        ys = [100 * c["losses"].get(top, max(c["losses"].values())) for c in mine]
        line = ax.plot(xs, ys, linewidth=0.8, alpha=0.6, label=fam)[0]
        for x, y, c in zip(xs, ys, mine):
            ax.plot([x], [y], marker="o", color=line.get_color(), linestyle="none",
                    markerfacecolor=line.get_color() if c["passed"] else "none")
    chosen = record.get("chosen")
    if chosen:
        knob = next((c.get("knob") for c in record.get("candidates", []) if c["family"] == chosen), None)
        best = [c for c in checks if c["family"] == chosen and c["knob"] == knob]
        if best:
            b = best[0]
            ax.plot([b["attn_speedup"]], [100 * b["losses"].get(top, 0.0)], marker="*", markersize=16,
                    color="black", linestyle="none", label=f"chosen ({chosen})")
    t = 100 * float(record["tolerance"])
    ax.axhline(t, color="red", linestyle="--", linewidth=1, label=f"tolerance {t:g}%")
    ax.axhline(t * float(record.get("margin", 1.0)), color="red", linestyle=":", linewidth=1, label="planner margin")
    ax.axvline(1.0, color="gray", linewidth=0.8)
    ax.set_xlabel(f"attention speedup vs dense at {record.get('frontier_length')} tokens (measured)")
    ax.set_ylabel(f"validation loss increase at {top} tokens (%)")
    ax.set_yscale("symlog", linthresh=max(t / 4, 1e-3))
    ax.set_title("speed against quality: each family's checked points")
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def render_rewrite_report(report: dict[str, Any], record: Optional[dict[str, Any]]) -> str:
    """A self-contained HTML view of a tolerance rewrite: the frontier plot, the candidates and the gate."""
    import base64
    import html

    parts = [f"<html><head><meta charset='utf-8'><title>surgeon rewrite: {html.escape(report['model'])}</title>"
             "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
             "</style></head><body>", f"<h1>surgeon rewrite — {html.escape(report['model'])}</h1>"]
    if record:
        parts.append(f"<p>{html.escape(record.get('note', ''))}</p>")
        png = frontier_png(record)
        if png:
            parts.append("<img src='data:image/png;base64," + base64.b64encode(png).decode("ascii") + "'>")
        parts.append("<h2>candidates (each family's most aggressive point within margin·T)</h2><table><tr>"
                     "<th>family</th><th>knob</th><th>validation</th><th>prefill speedup</th><th>attention speedup</th>"
                     "</tr>")
        for c in record.get("candidates", []):
            val = ", ".join(f"{n}: {100 * v:+.2f}%" for n, v in (c.get("validation") or {}).items())
            f = lambda x: "-" if x is None else f"{x:.2f}×"  # noqa: E731
            parts.append(f"<tr><td>{html.escape(c['family'])}</td><td>{c.get('knob')}</td><td>{val}</td>"
                         f"<td>{f(c.get('speedup'))}</td><td>{f(c.get('attn_speedup'))}</td></tr>")
        parts.append("</table>")
    if report.get("gate"):
        parts.append("<h2>held-out gate</h2><table><tr><th>length</th><th>loss</th><th>tolerance</th></tr>")
        for g in report["gate"]:
            parts.append(f"<tr><td>{g['seq_len']}</td><td>{100 * g['loss']:+.3f}%</td>"
                         f"<td>{100 * report['tolerance']:.2f}%</td></tr>")
        parts.append(f"</table><p>ok: {report.get('ok')}</p>")
    parts.append("</body></html>\n")
    return "".join(parts)
