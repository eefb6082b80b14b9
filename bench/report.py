"""Self-contained HTML report (matplotlib charts as inline SVG, no network) and a markdown
table from a bench JSON.

    .venv/bin/python bench/report.py bench/results/<file>.json   # rewrites <file>.html, prints the table
"""

from __future__ import annotations

import html as _html
import json
import statistics
import sys
import textwrap
from pathlib import Path

from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from streamlb_testkit import plots


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
    """One line per series (w, h: size in px at 100 dpi), dashed reference lines `hlines`."""
    series = {k: [(x, y) for x, y in v if y is not None] for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return ""
    fig = plots.figure(w / 100, h / 100)
    ax = fig.add_subplot()
    for i, (name, points) in enumerate(series.items()):
        ax.plot([x for x, _ in points], [y for _, y in points], color=plots.color(i), linewidth=1.5, label=name)
    for name, value in (hlines or {}).items():
        ax.axhline(value, color="black", linestyle="--", linewidth=1, label=f"{name} {value:.3g}")
    if ymin is not None:
        ax.set_ylim(bottom=ymin)
    ax.set_title(textwrap.fill(title, 60), fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, color="#eeeeee")
    if len(series) + len(hlines or {}) <= 16:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return plots.svg(fig)


def bar_chart(values: dict[str, float | None], title: str, hlines: dict[str, float] | None = None,
              w=640, fmt_="{:.3f}") -> str:
    """Horizontal bars, one per key, with their values; dashed reference lines `hlines`."""
    items = [(k, v) for k, v in values.items() if v is not None]
    if not items:
        return ""
    fig = plots.figure(w / 100, 0.6 + 0.3 * len(items))
    ax = fig.add_subplot()
    names = [k for k, _ in items]
    bars = ax.barh(names, [v for _, v in items], color=[plots.color(i) for i in range(len(items))])
    ax.bar_label(bars, labels=[fmt_.format(v) for _, v in items], padding=3, fontsize=8)
    ax.invert_yaxis()
    for j, (name, value) in enumerate((hlines or {}).items()):
        ax.axvline(value, color="black", linestyle=("--", ":", "-.")[j % 3], linewidth=1, label=f"{name} {value:.3g}")
    if hlines:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    vmax = max([v for _, v in items] + list((hlines or {}).values()) + [1e-9])
    ax.set_xlim(0, vmax * 1.15)
    ax.set_title(textwrap.fill(title, 60), fontsize=10)
    ax.tick_params(labelsize=8)
    return plots.svg(fig)


def latency_cdf(policies: dict) -> str:
    """Tail of the latency distribution from the quantiles the devices report (p50, p99,
    p99.9, max): x latency (log), y the quantile on a nines scale."""
    import math
    series = {}
    for name, r in policies.items():
        lat = r.get("latency_ms") or {}
        qs = [(lat.get("p50"), 0.5), (lat.get("p99"), 0.99), (lat.get("p999"), 0.999), (lat.get("max"), 1.0)]
        if all(v is not None and v > 0 for v, _ in qs):
            series[name] = [(v, min(4.0, -math.log10(max(1e-4, 1 - q)))) for v, q in qs]
    if not series:
        return ""
    fig = plots.figure(6.4, 3.0)
    ax = fig.add_subplot()
    for i, (name, points) in enumerate(series.items()):
        ax.plot([x for x, _ in points], [y for _, y in points], color=plots.color(i), marker="o", markersize=4,
                linewidth=1.5, label=name)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks([-math.log10(0.5), 2, 3, 4], ["p50", "p99", "p99.9", "max"])
    ax.set_xlabel("message latency (ms, log scale)")
    ax.set_title("Message latency: p50, p99, p99.9, max (worst client zone)", fontsize=10)
    ax.grid(True, color="#eeeeee")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return plots.svg(fig)


def against_online(out: dict) -> list[str]:
    """Each policy's pod max/mean minus the online reference (any pod) of the same round: what
    placement lost to a placer that knows every earlier stream's rate (rounds matched by seed;
    files without seeds in `oracle_rounds` by order)."""
    oracles = out.get("oracle_rounds") or []
    by_seed = {o["seed"]: o for o in oracles if "seed" in o}
    parts = []
    for name, r in out.get("policies", {}).items():
        diffs = []
        for k, x in enumerate(r.get("rounds") or []):
            o = by_seed.get(x.get("seed")) if by_seed else (oracles[k] if k < len(oracles) else None)
            if o and o.get("online_any_pod") is not None and x.get("max_over_mean") is not None:
                diffs.append(x["max_over_mean"] - o["online_any_pod"])
        if diffs:
            parts.append(f"{name} {' / '.join(f'{d:+.3f}' for d in diffs)} (median {statistics.median(diffs):+.3f})")
    if not parts:
        return []
    return ["", "Pod max/mean minus the online reference (any pod) of the same round: " + "; ".join(parts) + "."]


def markdown_table(out: dict) -> str:
    o = out.get("oracle") or {}
    rounds = out.get("rounds", 1)
    rows = [f"| policy | max/mean (median of 1 s bins{'; median of ' + str(rounds) + ' rounds [min–max]' if rounds > 1 else ''}) | p99/mean | cross-zone share | latency p50 / p99 / p99.9 (ms, worst zone) | errors (failed) | Envoy CPU µs/msg (above idle) | Envoy RSS MB (sum) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in out.get("policies", {}).items():
        if r.get("error"):
            last_line = r["error"].splitlines()[-1] if r["error"] else ""
            rows.append(f"| {name} | failed: {last_line[:80].replace('|', '/')} | | | | | | |")
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
        if o.get("online_any_pod") is not None:
            rows.append(f"| online, blind to each new stream's rate (any pod / local zone first) | "
                        f"{f(o.get('online_any_pod'))} / {f(o.get('online_local_first'))} | | "
                        f"– / {f(o.get('online_local_first_cross_zone'))} | | | | |")
    rows += against_online(out)
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
        f"<style>{plots.STYLE}</style></head><body>",
        f"<h1>streamlb benchmark: {esc(sc.get('name', ''))}</h1>",
        f"<p>{esc(sc.get('description', ''))}</p>",
        f"<p>Run {esc(out.get('started', ''))} on {esc(out.get('machine', {}).get('cpus'))} CPUs "
        f"({esc(out.get('machine', {}).get('uname', ''))}). Placement: {esc(out.get('machine', {}).get('placement', ''))}. "
        f"Seed {esc(sc.get('seed'))}, {esc(sc.get('duration_s'))} s per policy, warm-up {esc(sc.get('warmup_s'))} s.</p>",
        "<h2>Results (real Envoy)</h2>",
        plots.markdown_to_html(markdown_table({k: v for k, v in out.items() if k != "sim"})),
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
