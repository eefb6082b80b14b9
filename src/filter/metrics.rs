//! Envoy stats for the filter, named `streamlb_<what>` with labels encoded the way Istio's
//! `extraStatTags` expects — `name.label=.=value;.;` — and extracted by the `stats_tags` regex
//! `(label=\.=(.*?);\.;)`, so Prometheus sees `streamlb_<what>{label="value"}`.
//!
//! Metric ids are defined lazily and cached; values are accumulated in the VM and written on the
//! tick, never per message.

use hashbrown::HashMap;

use super::host::{Host, HostResult, MetricKind};

/// `base.k1=.=v1;.;k2=.=v2;.;` with `;`, `=` and whitespace in values replaced by `_`.
pub fn tagged(base: &str, tags: &[(&str, &str)]) -> String {
    let mut name = String::with_capacity(base.len() + tags.len() * 24);
    name.push_str(base);
    if !tags.is_empty() {
        name.push('.');
    }
    for (k, v) in tags {
        name.push_str(k);
        name.push_str("=.=");
        if v.is_empty() {
            name.push_str("unknown");
        }
        name.extend(v.chars().map(|c| {
            if c == ';' || c == '=' || c.is_whitespace() {
                '_'
            } else {
                c
            }
        }));
        name.push_str(";.;");
    }
    name
}

#[derive(Debug, Default)]
pub struct Metrics {
    /// name → id, per kind (looked up by `&str`, no allocation).
    counters: HashMap<String, u32>,
    gauges: HashMap<String, u32>,
    histograms: HashMap<String, u32>,
}

impl Metrics {
    pub fn id(&mut self, host: &dyn Host, kind: MetricKind, name: &str) -> HostResult<u32> {
        let ids = match kind {
            MetricKind::Counter => &mut self.counters,
            MetricKind::Gauge => &mut self.gauges,
            MetricKind::Histogram => &mut self.histograms,
        };
        if let Some(&id) = ids.get(name) {
            return Ok(id);
        }
        let id = host.define_metric(kind, name)?;
        ids.insert(name.to_string(), id);
        Ok(id)
    }

    /// Add to a counter (no host call when `delta` is 0, except to define it).
    pub fn count(&mut self, host: &dyn Host, name: &str, delta: u64) -> HostResult<()> {
        let id = self.id(host, MetricKind::Counter, name)?;
        if delta > 0 {
            host.increment_metric(id, i64::try_from(delta).unwrap_or(i64::MAX))?;
        }
        Ok(())
    }

    /// Set a gauge. All VMs share one Envoy stat of a name: the last writer wins, so only
    /// values every VM computes alike (from the merged view) are set; sums use `gauge_add`.
    pub fn gauge(&mut self, host: &dyn Host, name: &str, value: u64) -> HostResult<()> {
        let id = self.id(host, MetricKind::Gauge, name)?;
        host.record_metric(id, value)
    }

    /// Add `delta` (may be negative) to a gauge shared by all VMs.
    pub fn gauge_add(&mut self, host: &dyn Host, name: &str, delta: i64) -> HostResult<()> {
        let id = self.id(host, MetricKind::Gauge, name)?;
        host.increment_metric(id, delta)
    }

    /// Record one histogram sample.
    pub fn sample(&mut self, host: &dyn Host, name: &str, value: u64) -> HostResult<()> {
        let id = self.id(host, MetricKind::Histogram, name)?;
        host.record_metric(id, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn istio_tag_encoding() {
        assert_eq!(
            tagged(
                "streamlb_decisions_total",
                &[("cluster", "pods"), ("reason", "local")]
            ),
            "streamlb_decisions_total.cluster=.=pods;.;reason=.=local;.;"
        );
        assert_eq!(tagged("x", &[("zone", "")]), "x.zone=.=unknown;.;");
        assert_eq!(tagged("x", &[("route", "a;b=c d")]), "x.route=.=a_b_c_d;.;");
        assert_eq!(tagged("x", &[]), "x");
    }
}
