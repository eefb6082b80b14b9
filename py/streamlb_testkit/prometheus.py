"""Prometheus text exposition (Envoy's /stats/prometheus), parsed with prometheus_client."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Exposition:
    series: dict[str, dict[str, set[str]]]  # sample name -> label -> values seen
    totals: dict[str, float]  # sample name -> sum of its samples
    family_of: dict[str, str]  # sample name -> family name (a histogram's _bucket/_sum/_count)
    types: dict[str, str]  # family name -> counter/gauge/histogram/...


def parse_exposition(text: str) -> Exposition:
    """Every sample of `text` by name; raises ValueError on text that is not the format."""
    exposed = Exposition(series={}, totals={}, family_of={}, types={})
    for family in text_string_to_metric_families(text):
        exposed.types[family.name] = family.type
        for sample in family.samples:
            exposed.family_of[sample.name] = family.name
            exposed.totals[sample.name] = exposed.totals.get(sample.name, 0.0) + sample.value
            labels = exposed.series.setdefault(sample.name, {})
            for key, value in sample.labels.items():
                labels.setdefault(key, set()).add(value)
    return exposed


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample named `name` (e.g. foo_total, foo_bucket), in order."""
    return [
        (dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]
