"""Self-contained HTML report (inline SVG, no network) and a markdown table from a bench JSON.

    python3 bench/report.py bench/results/<file>.json   # rewrites <file>.html, prints the table
"""

from __future__ import annotations

import html as _html
import json
import sys
from pathlib import Path

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf", "#393b79", "#637939"]


def esc(x) -> str:
    return _html.escape(str(x))


def f(v, d=3) -> str:
    if v is None:
        return "–"
    if isinstance(v, (int, float)):
        return f"{v:.{d}f}"
    return esc(v)


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, ylabel: str, w=640, h=240,
               hlines: dict[str, float] | None = None, ymin: float | None = 0.0, xlabel: str = "t (s)") -> str:
    pts = [p for s in series.values() for p in s if p[1] is not None]
    if not pts:
        return ""
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts] + list((hlines or {}).values())
    x0, x1 = min(xs), max(xs)
    y0 = ymin if ymin is not None else min(ys)
    y1 = max(ys) * 1.05 or 1.0
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    L, R, T, B = 50, 150, 24, 30
    sx = lambda x: L + (x - x0) / (x1 - x0) * (w - L - R)
    sy = lambda y: h - B - (y - y0) / (y1 - y0) * (h - T - B)
    out = [f'<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg" font-size="11" font-family="sans-serif">',
           f'<text x="{L}" y="14" font-weight="bold">{esc(title)}</text>',
           f'<line x1="{L}" y1="{h - B}" x2="{w - R}" y2="{h - B}" stroke="#888"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{h - B}" stroke="#888"/>']
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        out.append(f'<text x="{L - 4}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.3g}</text>')
        out.append(f'<line x1="{L}" y1="{sy(yv):.1f}" x2="{w - R}" y2="{sy(yv):.1f}" stroke="#eee"/>')
    for k in range(5):
        xv = x0 + (x1 - x0) * k / 4
        out.append(f'<text x="{sx(xv):.1f}" y="{h - B + 14}" text-anchor="middle">{xv:.3g}</text>')
    out.append(f'<text x="{w - R}" y="{h - 4}" text-anchor="end">{esc(xlabel)}</text>')
    out.append(f'<text x="4" y="{T - 6}">{esc(ylabel)}</text>')
    for i, (name, hv) in enumerate((hlines or {}).items()):
        out.append(f'<line x1="{L}" y1="{sy(hv):.1f}" x2="{w - R}" y2="{sy(hv):.1f}" stroke="#000" stroke-dasharray="4 3"/>')
        out.append(f'<text x="{w - R + 4}" y="{sy(hv) + 4:.1f}">{esc(name)} {hv:.3g}</text>')
    for i, (name, s) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s if y is not None)
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{d}"/>')
        ly = T + 12 + i * 13 + len(hlines or {}) * 0
        if len(series) <= 16:
            out.append(f'<rect x="{w - R + 4}" y="{ly + 20 - 8}" width="10" height="3" fill="{c}"/>'
                       f'<text x="{w - R + 18}" y="{ly + 20}">{esc(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def bar_chart(values: dict[str, float | None], title: str, hlines: dict[str, float] | None = None,
              w=640, fmt_="{:.3f}") -> str:
    items = [(k, v) for k, v in values.items() if v is not None]
    if not items:
        return ""
    bh, L, R, T = 18, 190, 80, 24
    h = T + len(items) * (bh + 6) + 20
    vmax = max([v for _, v in items] + list((hlines or {}).values()) + [1e-9]) * 1.08
    sx = lambda v: L + v / vmax * (w - L - R)
    out = [f'<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg" font-size="11" font-family="sans-serif">',
           f'<text x="4" y="14" font-weight="bold">{esc(title)}</text>']
    for i, (k, v) in enumerate(items):
        y = T + i * (bh + 6)
        out.append(f'<text x="{L - 6}" y="{y + 13}" text-anchor="end">{esc(k)}</text>')
        out.append(f'<rect x="{L}" y="{y}" width="{max(0.5, sx(v) - L):.1f}" height="{bh}" fill="{COLORS[i % len(COLORS)]}"/>')
        out.append(f'<text x="{sx(v) + 4:.1f}" y="{y + 13}">{fmt_.format(v)}</text>')
    for j, (name, hv) in enumerate((hlines or {}).items()):
        out.append(f'<line x1="{sx(hv):.1f}" y1="{T - 4}" x2="{sx(hv):.1f}" y2="{h - 16}" stroke="#000" stroke-dasharray="4 3"/>')
        out.append(f'<text x="{sx(hv):.1f}" y="{h - 4 - 10 * j}" text-anchor="middle">{esc(name)} {hv:.3g}</text>')
    out.append("</svg>")
    return "".join(out)


def latency_cdf(policies: dict) -> str:
    """Coarse CDF from the quantiles the devices report (p50, p99, p99.9, max), log-scaled x."""
    import math
    series = {}
    for name, r in policies.items():
        lat = r.get("latency_ms") or {}
        qs = [(lat.get("p50"), 0.5), (lat.get("p99"), 0.99), (lat.get("p999"), 0.999), (lat.get("max"), 1.0)]
        if all(v is not None and v > 0 for v, _ in qs):
            series[name] = [(math.log10(v), q) for v, q in qs]
    if not series:
        return ""
    # y: −log10(1−q) makes the tail visible (0.5→0.3, 0.99→2, 0.999→3, max→4).
    tail = {k: [(x, min(4.0, -math.log10(max(1e-4, 1 - q)))) for x, q in v] for k, v in series.items()}
    return line_chart(tail, "Message latency CDF through p50, p99, p99.9, max (worst client zone)",
                      "nines: 0.3=p50, 2=p99, 3=p99.9, 4=max", ymin=0.0, xlabel="log10(latency ms)")


def markdown_table(out: dict) -> str:
    o = out.get("oracle") or {}
    rounds = out.get("rounds", 1)
    rows = [f"| policy | max/mean (median of 1 s bins{'; median of ' + str(rounds) + ' rounds [min–max]' if rounds > 1 else ''}) | p99/mean | cross-zone share | latency p50 / p99 / p99.9 (ms, worst zone) | errors (failed) | Envoy CPU µs/msg (above idle) | Envoy RSS MB (sum) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in out.get("policies", {}).items():
        if r.get("error"):
            rows.append(f"| {name} | failed: {esc(r['error'].splitlines()[-1] if r['error'] else '')[:80]} | | | | | | |")
            continue
        lat = r.get("latency_ms") or {}
        c = r.get("envoy_cpu") or {}
        cpu = None if c.get("us_per_message") is None else f"{c['us_per_message']:.1f} ({f(c.get('us_per_message_above_idle'), 1)})"
        rss = sum((r.get("envoy_rss_kb") or {}).values()) / 1024 if r.get("envoy_rss_kb") else None
        note = " (latency floor; no proxy, streams split evenly per zone)" if name == "direct" else ""
        rounds = [x["max_over_mean"] for x in r.get("rounds", []) if x.get("max_over_mean") is not None]
        spread = f" [{min(rounds):.2f}–{max(rounds):.2f}]" if len(rounds) > 1 else ""
        rows.append(f"| {name}{note} | {f(r.get('median_max_over_mean'))}{spread} | {f(r.get('median_p99_over_mean'))} | "
                    f"{f(r.get('cross_zone'))} | {f(lat.get('p50'), 2)} / {f(lat.get('p99'), 2)} / {f(lat.get('p999'), 2)} | "
                    f"{r.get('totals', {}).get('failed', '–')} | {cpu or '–'} | {f(rss, 1)} |")
    if o:
        rows.append(f"| oracle (lower bound / LPT; cross-zone minimum) | {f(o.get('lower_bound'))} / {f(o.get('lpt'))} | | "
                    f"{f(o.get('min_cross_zone'))} | | | | |")
    sim = out.get("sim")
    if sim:
        rows.append("")
        rows.append(f"Simulation (`lab sim`, {sim['pods']} pods, {sim['streams']} streams, {sim['proxies']} proxies with "
                    f"independent views, {sim['duration_s']:.0f} s, warm-up {sim['warmup_s']:.0f} s):")
        rows.append("")
        rows.append("| policy | max/mean | p99/mean | cross-zone share |")
        rows.append("|---|---|---|---|")
        for name, r in sim["policies"].items():
            rows.append(f"| {name} | {f(r['median_max_over_mean'])} | {f(r['median_p99_over_mean'])} | {f(r['median_cross_zone'])} |")
        so = sim["oracle"]
        rows.append(f"| oracle (lower bound / LPT; minimum) | {f(so['median_lower_bound'])} / {f(so['median_lpt'])} | | {f(so['median_min_cross_zone'])} |")
    return "\n".join(rows)


def sim_section(sim: dict) -> str:
    parts = [f"<h2>Simulation: {sim['pods']} pods, {sim['streams']} streams, {sim['proxies']} proxies</h2>",
             "<p>Same scenario with its <code>sim</code> section, simulated time, one real routing core per proxy "
             "(independent views); peers re-implemented. Medians over the measured window.</p>"]
    pol = sim["policies"]
    so = sim["oracle"]
    parts.append(bar_chart({k: v["median_max_over_mean"] for k, v in pol.items()}, "max/mean (median)",
                           {"lower bound": so["median_lower_bound"], "LPT": so["median_lpt"]}))
    parts.append(bar_chart({k: v["median_p99_over_mean"] for k, v in pol.items()}, "p99/mean (median)"))
    parts.append(bar_chart({k: v["median_cross_zone"] for k, v in pol.items()}, "cross-zone share (median)",
                           {"minimum": so["median_min_cross_zone"]}))
    parts.append(line_chart({k: [(s["t"], s["max_over_mean"]) for s in v["series"]] for k, v in pol.items()},
                            "max/mean over time", "max/mean"))
    return "".join(parts)


def html(out: dict) -> str:
    sc = out.get("scenario", {})
    pol = {k: v for k, v in out.get("policies", {}).items() if not v.get("error")}
    o = out.get("oracle") or {}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>streamlb bench: {esc(sc.get('name', ''))}</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:1em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
        "svg{display:block;margin:8px 0}code{background:#f4f4f4}</style></head><body>",
        f"<h1>streamlb benchmark: {esc(sc.get('name', ''))}</h1>",
        f"<p>{esc(sc.get('description', ''))}</p>",
        f"<p>Run {esc(out.get('started', ''))} on {esc(out.get('machine', {}).get('cpus'))} CPUs "
        f"({esc(out.get('machine', {}).get('uname', ''))}). Placement: {esc(out.get('machine', {}).get('placement', ''))}. "
        f"Seed {esc(sc.get('seed'))}, {esc(sc.get('duration_s'))} s per policy, warm-up {esc(sc.get('warmup_s'))} s.</p>",
        "<h2>Results (real Envoy)</h2>",
        "<pre>" + esc(markdown_table({k: v for k, v in out.items() if k != "sim"})) + "</pre>",
    ]
    failed = {k: v["error"] for k, v in out.get("policies", {}).items() if v.get("error")}
    if failed:
        parts.append("<h3>Policies that failed to run</h3><ul>" +
                     "".join(f"<li><b>{esc(k)}</b>: <pre>{esc(e[-600:])}</pre></li>" for k, e in failed.items()) + "</ul>")
    parts.append(bar_chart({k: v.get("median_max_over_mean") for k, v in pol.items() if k != "direct"},
                           "per-pod max/mean msgs/s (median of 1 s bins)",
                           {"lower bound": o["lower_bound"], "LPT": o["lpt"]} if o else None))
    parts.append(bar_chart({k: v.get("cross_zone") for k, v in pol.items() if k != "direct"}, "cross-zone message share",
                           {"minimum": o["min_cross_zone"]} if o else None))
    parts.append(bar_chart({k: (v.get("envoy_cpu") or {}).get("us_per_message") for k, v in pol.items()},
                           "Envoy CPU per message (µs; all Envoys, utime+stime over the measured window)", fmt_="{:.1f}"))
    parts.append(bar_chart({k: (v.get("envoy_cpu") or {}).get("us_per_message_above_idle") for k, v in pol.items()},
                           "Envoy CPU per message above the idle Envoys' own CPU (µs)", fmt_="{:.1f}"))
    parts.append(latency_cdf(pol))
    parts.append("<h2>Per-pod msgs/s over time</h2>")
    for name, r in pol.items():
        bins = r.get("bins") or []
        if not bins:
            continue
        pods = list(bins[0]["rates"].keys())
        parts.append(line_chart({p: [(b["t"], b["rates"][p]) for b in bins] for p in pods},
                                f"{name}: msgs/s per pod (warm-up ends at {sc.get('warmup_s')} s)", "msgs/s", h=200))
    if out.get("sim"):
        parts.append(sim_section(out["sim"]))
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def main() -> int:
    path = Path(sys.argv[1])
    out = json.loads(path.read_text())
    if out.get("kind") == "sim":
        out = {"scenario": {"name": out["scenario"]}, "policies": {}, "sim": out}
    path.with_suffix(".html").write_text(html(out))
    print(markdown_table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
