"""dashboards/streamlb.json names only what the filter really emits.

A small PromQL scanner pulls every metric selector, label matcher and grouping label
(by/without/on/ignoring) out of each expression of the dashboard (panel targets and
`label_values(...)` template queries). The e2e test runs pods + Envoy with the filter, pushes
a little traffic (device streams and one single-message gRPC call, so all three latency
histograms get samples), waits for Envoy's stats flush and checks every name against Envoy's
/stats/prometheus: series names exactly as exposed (a histogram only as `_bucket`, `_sum`,
`_count`; `histogram_quantile` only over `_bucket` grouped by `le`), label names present on
that series, literal `=` values seen. The README's "Example PromQL" table is checked the same
way. It also requires every streamlb metric family to appear on the dashboard. The unit tests check the JSON's Grafana structure and that the checker does
report made-up metrics, labels and values.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

import streamlb_testkit as harness
from streamlb_testkit.prometheus import Exposition, parse_exposition

DASHBOARD = harness.REPO / "dashboards" / "streamlb.json"
PREFIX = "streamlb_"
# Rebalancing in shadow mode (nothing is ended) with no minimum age, and allow_reset so that
# bidi streams whose response started are candidates: with Zipf-skewed rates (unknown at
# placement) some pod runs hot, moves get planned within seconds and the move counter exists.
CONFIG = {"clusters": ["pods"], "tick_ms": 500, "discovery": {"poll_ms": 500, "stale_after_ms": 5000},
          "rebalance": {"mode": "shadow", "min_age_ms": 0, "tolerance": 0.3, "hysteresis": 0.2,
                        "allow_reset": True}}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"}
AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio",
}
GROUPING = {"by", "without"}
MATCHING = {"on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"} | GROUPING | MATCHING

# ---------------------------------------------------------------------------------------------
# PromQL scanning

TOKEN = re.compile(
    r"""
     (?P<ws>\s+)
    |(?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    |(?P<range>\[[^\]]*\])
    |(?P<lbrace>\{)|(?P<rbrace>\})|(?P<lparen>\()|(?P<rparen>\))|(?P<comma>,)
    |(?P<var>\$\{[^}]*\}|\$\w+)
    |(?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)(?:ms|[smhdwy])?)
    |(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    |(?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=@])
    """,
    re.X,
)


@dataclass
class Selector:
    name: str
    at: int  # token index
    matchers: list[tuple[str, str, str]] = field(default_factory=list)  # (label, op, value)


@dataclass
class Grouping:
    keyword: str
    labels: list[str]
    span: tuple[int, int] | None  # token range of the aggregated argument; None = whole expression


@dataclass
class Scan:
    selectors: list[Selector]
    groupings: list[Grouping]
    quantile_spans: list[tuple[int, int]]  # token ranges of histogram_quantile's arguments
    variables: set[str]


def tokenize(expr: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"cannot scan {expr[pos:pos + 20]!r} in {expr!r}")
        if m.lastgroup != "ws":
            tokens.append((m.lastgroup, m.group()))
        pos = m.end()
    return tokens


def _close(tokens: list[tuple[str, str]], i: int) -> int:
    """Index of the rparen closing the lparen at i."""
    depth = 0
    for j in range(i, len(tokens)):
        if tokens[j][0] == "lparen":
            depth += 1
        elif tokens[j][0] == "rparen":
            depth -= 1
            if depth == 0:
                return j
    raise ValueError("unbalanced parentheses")


def _label_list(tokens: list[tuple[str, str]], i: int) -> tuple[list[str], int]:
    """Labels of `( a, b )` starting at the lparen at i; returns (labels, index after)."""
    end = _close(tokens, i)
    labels = [v for k, v in tokens[i + 1:end] if k == "ident"]
    return labels, end + 1


def scan(expr: str) -> Scan:
    tokens = tokenize(expr)
    out = Scan([], [], [], {m.group(1) or m.group(2) for m in re.finditer(r"\$\{(\w+)[^}]*\}|\$(\w+)", expr)})
    nxt = lambda j: tokens[j] if j < len(tokens) else ("end", "")  # noqa: E731
    i = 0
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "ident" and value in AGGREGATIONS and nxt(i + 1)[0] in ("lparen", "ident"):
            j, labels, keyword = i + 1, None, ""
            if nxt(j)[0] == "ident" and nxt(j)[1] in GROUPING:
                keyword = nxt(j)[1]
                labels, j = _label_list(tokens, j + 1)
            if nxt(j)[0] != "lparen":
                raise ValueError(f"{value}: expected '(' after the aggregation")
            end = _close(tokens, j)
            span = (j, end)
            if labels is None and nxt(end + 1)[0] == "ident" and nxt(end + 1)[1] in GROUPING:
                keyword = nxt(end + 1)[1]
                labels, _ = _label_list(tokens, end + 2)
            if labels is not None:
                out.groupings.append(Grouping(keyword, labels, span))
            i = j + 1  # into the argument; a trailing `by (...)` is skipped by the branch below
            continue
        if kind == "ident" and value in GROUPING | MATCHING and nxt(i + 1)[0] == "lparen":
            labels, after = _label_list(tokens, i + 1)
            if value in MATCHING:
                out.groupings.append(Grouping(value, labels, None))
            i = after
            continue
        if kind == "ident" and nxt(i + 1)[0] == "lparen":
            if value == "histogram_quantile":
                out.quantile_spans.append((i + 1, _close(tokens, i + 1)))
            i += 1
            continue
        if kind == "ident" and value not in KEYWORDS:
            selector = Selector(value, i)
            i += 1
            if nxt(i)[0] == "lbrace":
                i = _matchers(tokens, i, selector)
            out.selectors.append(selector)
            continue
        if kind == "lbrace":  # {__name__="..."}
            selector = Selector("", i)
            i = _matchers(tokens, i, selector)
            names = [v for label, op, v in selector.matchers if label == "__name__" and op == "="]
            selector.name = names[0] if names else "<selector without a metric name>"
            out.selectors.append(selector)
            continue
        i += 1
    return out


def _matchers(tokens: list[tuple[str, str]], i: int, selector: Selector) -> int:
    """Reads `{ label op "value", ... }` starting at the lbrace at i; returns the index after."""
    i += 1
    while tokens[i][0] != "rbrace":
        if tokens[i][0] == "comma":
            i += 1
            continue
        (k1, label), (k2, op), (k3, raw) = tokens[i:i + 3]
        if k1 != "ident" or k2 != "op" or k3 != "string":
            raise ValueError(f"bad label matcher near {label!r} {op!r} {raw!r}")
        selector.matchers.append((label, op, raw[1:-1]))
        i += 3
    return i + 1


# ---------------------------------------------------------------------------------------------
# The checker


def check_expr(expr: str, exposed: Exposition, variables: set[str]) -> list[str]:
    """Problems with `expr` against what Envoy exposes (empty list = fine)."""
    try:
        s = scan(expr)
    except (ValueError, IndexError) as e:
        return [f"{expr}: does not parse: {e}"]
    problems = []
    for var in sorted(s.variables - variables - GRAFANA_BUILTINS):
        problems.append(f"${var} is not a dashboard variable")
    if not s.selectors:
        problems.append("no metric selector")
    for sel in s.selectors:
        if not sel.name.startswith(PREFIX):
            problems.append(f"{sel.name}: not a streamlb metric")
            continue
        if sel.name not in exposed.series:
            hint = ""
            if sel.name + "_bucket" in exposed.series:
                hint = " (a histogram: use _bucket, _sum or _count)"
            problems.append(f"{sel.name}: not emitted by the filter{hint}")
            continue
        labels = exposed.series[sel.name]
        for label, op, value in sel.matchers:
            if label == "__name__":
                continue
            if label not in labels:
                problems.append(f"{sel.name}: no label {label!r} (has {sorted(labels)})")
            elif op == "=" and "$" not in value and value not in labels[label]:
                problems.append(f"{sel.name}: {label}={value!r} never seen (seen {sorted(labels[label])})")
    for grouping in s.groupings:
        inside = [sel for sel in s.selectors if sel.name in exposed.series
                  and (grouping.span is None or grouping.span[0] <= sel.at <= grouping.span[1])]
        for label in grouping.labels:
            for sel in inside:
                if label not in exposed.series[sel.name]:
                    problems.append(f"{grouping.keyword} ({label}): {sel.name} has no label {label!r}")
    for start, end in s.quantile_spans:
        for sel in s.selectors:
            if start <= sel.at <= end and sel.name in exposed.series:
                family = exposed.family_of.get(sel.name, sel.name)
                if not sel.name.endswith("_bucket") or exposed.types.get(family) != "histogram":
                    problems.append(f"histogram_quantile over {sel.name}: not a histogram's _bucket series")
        inner = [g for g in s.groupings if g.span and start <= g.span[0] <= end]
        if inner and not all("le" in g.labels for g in inner if g.keyword == "by"):
            problems.append("histogram_quantile: an aggregation inside drops the `le` label")
    return problems


def dashboard_expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every label_values(...) template query."""
    out = []

    def panels(items):
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dashboard.get("panels", [])):
        for t in p.get("targets", []):
            out.append((f"panel {p.get('title')!r} target {t.get('refId')}", t["expr"]))
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query)
            assert m, f"variable {v['name']}: only label_values(selector, label) is supported: {query}"
            out.append((f"variable ${v['name']}", m.group(1)))
            out.append((f"variable ${v['name']} label", f"sum by ({m.group(2)}) ({m.group(1)})"))
    return out


def check_dashboard(dashboard: dict, exposed: Exposition) -> list[str]:
    variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    problems = []
    for where, expr in dashboard_expressions(dashboard):
        problems += [f"{where}: {p}   [{expr}]" for p in check_expr(expr, exposed, variables)]
    return problems


def used_families(dashboard: dict, exposed: Exposition) -> set[str]:
    return {exposed.family_of.get(sel.name, sel.name)
            for _, expr in dashboard_expressions(dashboard) for sel in scan(expr).selectors}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def readme_examples() -> list[tuple[str, str]]:
    """(question, PromQL) rows of the README's "Example PromQL" table."""
    text = (harness.REPO / "README.md").read_text()
    table = text.split("Example PromQL:", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`" in line]
    return [(line.split("|")[1].strip(), re.findall(r"`(.*)`", line.replace("\\|", "|"))[-1]) for line in rows]


# ---------------------------------------------------------------------------------------------
# Unit tests: structure and the checker itself

FAKE_EXPOSITION = """\
# TYPE streamlb_route_messages_total counter
streamlb_route_messages_total{route="telemetry",cluster="pods",direction="upstream"} 10
streamlb_route_messages_total{route="telemetry",cluster="pods",direction="downstream"} 10
# TYPE streamlb_route_duration_us histogram
streamlb_route_duration_us_bucket{route="telemetry",cluster="pods",le="100"} 0
streamlb_route_duration_us_bucket{route="telemetry",cluster="pods",le="+Inf"} 3
streamlb_route_duration_us_sum{route="telemetry",cluster="pods"} 9000
streamlb_route_duration_us_count{route="telemetry",cluster="pods"} 3
# TYPE envoy_cluster_upstream_rq_total counter
envoy_cluster_upstream_rq_total{envoy_cluster_name="pods"} 3
"""


def test_checker_reports_what_the_filter_does_not_emit():
    exposed = parse_exposition(FAKE_EXPOSITION)
    variables = {"cluster", "route"}
    good = [
        'sum by (route, direction) (rate(streamlb_route_messages_total{cluster=~"$cluster"}[$__rate_interval]))',
        'histogram_quantile(0.99, sum by (le, route) (rate(streamlb_route_duration_us_bucket[5m])))',
        'sum(rate(streamlb_route_duration_us_sum[5m])) / sum(rate(streamlb_route_duration_us_count[5m]))',
        'sum(rate(streamlb_route_messages_total{direction="upstream", route=~"$route"}[1m])) by (cluster)',
    ]
    for expr in good:
        assert check_expr(expr, exposed, variables) == [], expr
    bad = {
        'sum(rate(streamlb_made_up_total[1m]))': "streamlb_made_up_total: not emitted",
        'sum by (pod) (rate(streamlb_route_messages_total[1m]))': "has no label 'pod'",
        'sum(rate(streamlb_route_messages_total[1m])) without (zone)': "has no label 'zone'",
        'rate(streamlb_route_messages_total{device="d-1"}[1m])': "no label 'device'",
        'rate(streamlb_route_messages_total{direction="sideways"}[1m])': "'sideways' never seen",
        'histogram_quantile(0.9, sum by (le) (rate(streamlb_route_duration_us[1m])))': "use _bucket",
        'histogram_quantile(0.9, sum by (route) (rate(streamlb_route_duration_us_bucket[1m])))': "drops the `le`",
        'histogram_quantile(0.9, rate(streamlb_route_messages_total[1m]))': "not a histogram's _bucket",
        'streamlb_route_messages_total_bucket': "not emitted",
        'sum(rate(envoy_cluster_upstream_rq_total[1m]))': "not a streamlb metric",
        'sum(rate(streamlb_route_messages_total{cluster=~"$zone"}[1m]))': "$zone is not a dashboard variable",
        'sum(rate(streamlb_route_messages_total[1m]) / on (pod) streamlb_route_messages_total)': "no label 'pod'",
    }
    for expr, want in bad.items():
        problems = check_expr(expr, exposed, variables)
        assert any(want in p for p in problems), f"{expr}: expected {want!r}, got {problems}"
    # The same through the whole-dashboard path: a made-up panel is reported.
    dashboard = {"templating": {"list": []}, "panels": [
        {"title": "fake", "targets": [{"refId": "A", "expr": "rate(streamlb_made_up_total[1m])"}]}]}
    assert check_dashboard(dashboard, exposed) != []


def test_dashboard_is_grafana_shaped():
    d = load_dashboard()
    assert isinstance(d.get("schemaVersion"), int) and d["schemaVersion"] >= 36
    assert d.get("uid") and d.get("title")
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("cluster", "route"):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"]["uid"] == "${datasource}"
        assert f", {name})" in v["query"]["query"] and v["query"]["query"].startswith("label_values(")
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [p for p in d["panels"] if p["type"] != "row"]
    assert len(graphs) >= 10
    for p in graphs:
        assert p["title"] and p["type"] in ("timeseries", "stat", "gauge", "table", "bargauge", "heatmap"), p
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        assert p["targets"], f"{p['title']}: no targets"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}"
            scan(t["expr"])  # parses


# ---------------------------------------------------------------------------------------------
# End to end: against a real Envoy running the filter


def test_every_dashboard_expression_names_only_emitted_metrics_and_labels(pods):
    dashboard = load_dashboard()
    with harness.Envoy(pods, filter_config=CONFIG) as envoy:
        assert envoy.wait_for_counter("wasmcustom.streamlb_discovery_polls_ok_total"), envoy.log_text()[-2000:]
        time.sleep(1.0)  # every worker reads the snapshot on its tick
        wanted = {sel.name for _, expr in dashboard_expressions(dashboard) for sel in scan(expr).selectors}
        counts = {name.removesuffix("_bucket") + "_count" for name in wanted if name.endswith("_bucket")}
        with harness.start_devices(envoy.listen_addr, streams=30, mean_rate=10, dist="zipf:1.2",
                                   duration=8) as devices:
            # One message each way: the filter also records it as a unary request latency.
            _, acks = harness.stream_readings(envoy.listen_addr, count=1)
            assert len(acks) == 1
            summary = devices.wait()
        assert summary["totals"]["acked"] > 0, summary["totals"]
        # Counters and gauges land on the filter's next tick; histogram samples on Envoy's stats
        # flush (every 5 s; before it a histogram is listed with count 0). Wait for both.
        deadline = time.monotonic() + 20
        while True:
            exposed = parse_exposition(envoy.prometheus())
            ready = wanted <= set(exposed.series) and all(exposed.totals.get(c, 0) > 0 for c in counts)
            if ready or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    problems = check_dashboard(dashboard, exposed)
    examples = readme_examples()
    assert len(examples) >= 10, examples
    for question, expr in examples:
        problems += [f"README example {question!r}: {p}   [{expr}]" for p in check_expr(expr, exposed, set())]
    families = {exposed.family_of[n] for n in exposed.series if n.startswith(PREFIX)}
    unused = families - used_families(dashboard, exposed)
    checked = len(dashboard_expressions(dashboard))
    print(f"\n{checked} expressions checked against {len(families)} streamlb metric families: "
          f"{len(problems)} problems; families not on the dashboard: {sorted(unused)}")
    for family in sorted(families):
        labels = sorted({k for n, f in exposed.family_of.items() if f == family for k in exposed.series[n]})
        print(f"  {family} ({exposed.types.get(family)}) {labels}")
    assert not problems, "\n".join(problems)
    assert not unused, f"emitted but not on the dashboard: {sorted(unused)}"
    assert len(families) >= 23, sorted(families)
