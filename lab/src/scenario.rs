//! Benchmark scenario files (JSON), shared by `lab sim` and the real-Envoy driver
//! (`bench/run.py`). Schema: bench/README.md.

use crate::rates::{stream_rates, RateDist};
use crate::rng::SplitMix64;
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "one")]
    pub seed: u64,
    pub duration_s: f64,
    #[serde(default)]
    pub warmup_s: f64,
    /// ε of the cross-zone minimum: pods may run at most (1 + ε) × the mean.
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    pub zones: Vec<ZoneSpec>,
    /// Proxies (Envoys) per zone name.
    pub proxies: BTreeMap<String, usize>,
    pub streams: StreamSpec,
    #[serde(default)]
    pub bursts: Vec<Burst>,
    #[serde(default)]
    pub faults: Vec<Fault>,
    /// Filter configuration overrides merged over `{"clusters":["pods"]}`.
    #[serde(default)]
    pub streamlb: serde_json::Value,
    /// Deep-merged over the rest when run by `lab sim` (objects merge, lists replace).
    #[serde(default)]
    pub sim: serde_json::Value,
}

fn one() -> u64 {
    1
}
fn default_epsilon() -> f64 {
    0.1
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneSpec {
    pub name: String,
    pub pods: usize,
    /// msgs/s per pod; 0 = unlimited.
    #[serde(default)]
    pub capacity: f64,
    #[serde(default)]
    pub orca: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSpec {
    pub count: usize,
    pub mean_rate: f64,
    #[serde(default = "default_dist")]
    pub rate_dist: String,
    #[serde(default = "default_payload")]
    pub payload: usize,
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Share of clients per zone (normalised).
    pub client_zones: BTreeMap<String, f64>,
    #[serde(default)]
    pub ramp_s: f64,
    /// 0 = streams live for the whole run; else exponential lifetimes, then the device reconnects.
    #[serde(default)]
    pub mean_lifetime_s: f64,
}

fn default_dist() -> String {
    "constant".into()
}
fn default_payload() -> usize {
    64
}
fn default_kind() -> String {
    "bidi".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Burst {
    pub at_s: f64,
    /// Share of the streams whose rate is multiplied.
    pub share: f64,
    pub factor: f64,
    pub length_s: f64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub at_s: f64,
    pub pod: String,
    /// stop | start | slow (capacity × `factor`)
    pub action: String,
    #[serde(default = "default_factor")]
    pub factor: f64,
}

fn default_factor() -> f64 {
    1.0
}

/// Deep merge: objects merge key by key, everything else is replaced.
pub fn merge(base: &mut serde_json::Value, over: &serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

impl Scenario {
    pub fn load(path: &std::path::Path, for_sim: bool) -> anyhow::Result<Scenario> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if for_sim {
            if let Some(over) = value.get("sim").cloned() {
                merge(&mut value, &over);
            }
        }
        let s: Scenario = serde_json::from_value(value)
            .with_context(|| format!("scenario {}", path.display()))?;
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.zones.is_empty() || self.zones.iter().all(|z| z.pods == 0) {
            bail!("zones: at least one pod is needed");
        }
        if !(self.duration_s > 0.0 && self.warmup_s >= 0.0 && self.warmup_s < self.duration_s) {
            bail!("need duration_s > warmup_s >= 0");
        }
        if self.proxies.values().sum::<usize>() == 0 {
            bail!("proxies: at least one proxy is needed");
        }
        for z in self.proxies.keys().chain(self.streams.client_zones.keys()) {
            if !self.zones.iter().any(|s| &s.name == z) {
                bail!("zone {z:?} is not in zones");
            }
        }
        if self.streams.client_zones.values().sum::<f64>() <= 0.0 {
            bail!("streams.client_zones: shares must sum above 0");
        }
        self.rate_dist()?;
        Ok(())
    }

    pub fn rate_dist(&self) -> anyhow::Result<RateDist> {
        self.streams.rate_dist.parse()
    }

    pub fn pod_names(&self) -> Vec<(String, usize)> {
        self.zones
            .iter()
            .enumerate()
            .flat_map(|(zi, z)| (0..z.pods).map(move |i| (format!("{}-{i}", z.name), zi)))
            .collect()
    }

    /// Streams per client zone, in `client_zones` order; the last zone takes the rounding rest.
    pub fn streams_per_zone(&self) -> Vec<(String, usize)> {
        let total: f64 = self.streams.client_zones.values().sum();
        let mut left = self.streams.count;
        let n = self.streams.client_zones.len();
        self.streams
            .client_zones
            .iter()
            .enumerate()
            .map(|(i, (z, share))| {
                let k = if i + 1 == n {
                    left
                } else {
                    ((self.streams.count as f64) * share / total).round() as usize
                };
                let k = k.min(left);
                left -= k;
                (z.clone(), k)
            })
            .collect()
    }

    /// Per client zone `i` (in `client_zones` order): the rates `lab devices --seed seed+i`
    /// draws, so the simulator and the real bench see the same streams at the same size.
    pub fn device_rates(&self) -> anyhow::Result<Vec<(String, Vec<f64>)>> {
        let dist = self.rate_dist()?;
        Ok(self
            .streams_per_zone()
            .into_iter()
            .enumerate()
            .map(|(i, (z, n))| {
                let mut rng = SplitMix64::new(self.seed + i as u64);
                (z, stream_rates(dist, n, self.streams.mean_rate, &mut rng))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_section_overrides_by_deep_merge() {
        let mut base = serde_json::json!({"a": {"x": 1, "y": 2}, "l": [1, 2]});
        merge(&mut base, &serde_json::json!({"a": {"y": 3}, "l": [9]}));
        assert_eq!(base, serde_json::json!({"a": {"x": 1, "y": 3}, "l": [9]}));
    }

    #[test]
    fn shipped_scenarios_parse_and_split_streams() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/scenarios");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            for sim in [false, true] {
                let s = Scenario::load(&path, sim).unwrap();
                let per_zone = s.streams_per_zone();
                assert_eq!(
                    per_zone.iter().map(|(_, n)| n).sum::<usize>(),
                    s.streams.count
                );
            }
        }
    }
}
