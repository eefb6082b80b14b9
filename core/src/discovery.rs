//! Endpoint discovery from Envoy's admin `GET /clusters?format=json`, and the compact snapshot
//! the polling VM publishes in shared data for all VMs.
//!
//! Admin JSON (Envoy 1.40), trimmed:
//! `{"cluster_statuses":[{"name":"pods","host_statuses":[{"address":{"socket_address":
//! {"address":"127.0.0.1","port_value":40001}},"stats":[...],"health_status":
//! {"eds_health_status":"HEALTHY"},"weight":1,"locality":{"region":"r","zone":"a"}}]}]}`.
//! Proto3 JSON omits defaults: zero stats have no `value`, an empty locality is `{}`. Unknown
//! fields are ignored everywhere. Hosts without a socket address (pipes, internal addresses)
//! are skipped. Clusters not wanted are kept as unparsed [`RawValue`]s (syntax-checked only).
//!
//! Healthy: `eds_health_status` absent, `HEALTHY` or `UNKNOWN`, no `failed_*` flag true, and
//! none of `pending_dynamic_removal`, `active_hc_timeout`, `excluded_via_immediate_hc_fail`
//! true. `DEGRADED`, `DRAINING`, `TIMEOUT`, `UNHEALTHY` (and any other status) are not healthy.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// One upstream host as the filter needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveredEndpoint {
    /// `ip:port`; IPv6 as `[ip]:port` (the form of Envoy's `upstream.address`).
    pub address: String,
    /// Locality zone; `""` when unknown.
    pub zone: String,
    pub healthy: bool,
    /// Load-balancing weight, `>= 1`.
    pub weight: u32,
}

/// The endpoints of one cluster, in admin order.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSnapshot {
    pub name: String,
    pub endpoints: Vec<DiscoveredEndpoint>,
}

/// Why admin JSON or a snapshot could not be read.
#[derive(Debug, Clone, PartialEq)]
pub enum DiscoveryError {
    /// The admin response is not the expected JSON.
    AdminJson(String),
    /// The shared-data snapshot is malformed.
    Snapshot(&'static str),
}

impl fmt::Display for DiscoveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiscoveryError::AdminJson(e) => write!(f, "admin /clusters JSON: {e}"),
            DiscoveryError::Snapshot(e) => write!(f, "endpoint snapshot: {e}"),
        }
    }
}

impl std::error::Error for DiscoveryError {}

// ---------------------------------------------------------------------------------------------
// Admin JSON

#[derive(Deserialize)]
struct AdminClusters<'a> {
    #[serde(default, borrow)]
    cluster_statuses: Vec<RawCluster<'a>>,
}

#[derive(Deserialize)]
struct RawCluster<'a> {
    #[serde(default, borrow)]
    name: Cow<'a, str>,
    #[serde(default, borrow)]
    host_statuses: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawHost<'a> {
    #[serde(default, borrow)]
    address: Option<RawAddress<'a>>,
    #[serde(default)]
    health_status: Option<HostHealth>,
    #[serde(default)]
    weight: Option<FlexU32>,
    #[serde(default, borrow)]
    locality: Option<RawLocality<'a>>,
}

#[derive(Deserialize)]
struct RawAddress<'a> {
    #[serde(default, borrow)]
    socket_address: Option<RawSocketAddress<'a>>,
}

#[derive(Deserialize)]
struct RawSocketAddress<'a> {
    #[serde(default, borrow)]
    address: Cow<'a, str>,
    #[serde(default)]
    port_value: Option<FlexU32>,
}

#[derive(Deserialize)]
struct RawLocality<'a> {
    #[serde(default, borrow)]
    zone: Cow<'a, str>,
}

/// A `u32` given as a JSON number or a numeric string (proto3 JSON allows both).
struct FlexU32(u32);

impl<'de> Deserialize<'de> for FlexU32 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = FlexU32;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an unsigned 32-bit integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<FlexU32, E> {
                u32::try_from(v)
                    .map(FlexU32)
                    .map_err(|_| E::custom("integer out of range"))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<FlexU32, E> {
                u32::try_from(v)
                    .map(FlexU32)
                    .map_err(|_| E::custom("integer out of range"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<FlexU32, E> {
                v.trim()
                    .parse::<u32>()
                    .map(FlexU32)
                    .map_err(|_| E::custom("not an unsigned integer"))
            }
        }
        d.deserialize_any(V)
    }
}

/// The verdict from a host's `health_status` object.
struct HostHealth {
    healthy: bool,
}

impl<'de> Deserialize<'de> for HostHealth {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = HostHealth;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a health_status object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<HostHealth, A::Error> {
                let mut healthy = true;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "eds_health_status" {
                        let status: Cow<'de, str> = map.next_value()?;
                        if !matches!(status.as_ref(), "HEALTHY" | "UNKNOWN") {
                            healthy = false;
                        }
                    } else if key.starts_with("failed_")
                        || key == "pending_dynamic_removal"
                        || key == "active_hc_timeout"
                        || key == "excluded_via_immediate_hc_fail"
                    {
                        if map.next_value::<FlagValue>()?.0 {
                            healthy = false;
                        }
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(HostHealth { healthy })
            }
        }
        d.deserialize_map(V)
    }
}

/// A flag that counts as set only when it is JSON `true`; any other value is ignored.
struct FlagValue(bool);

impl<'de> Deserialize<'de> for FlagValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FlagValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a flag")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<FlagValue, E> {
                Ok(FlagValue(v))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<FlagValue, E> {
                Ok(FlagValue(false))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<FlagValue, E> {
                Ok(FlagValue(false))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<FlagValue, E> {
                Ok(FlagValue(false))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<FlagValue, E> {
                Ok(FlagValue(false))
            }
            fn visit_unit<E: de::Error>(self) -> Result<FlagValue, E> {
                Ok(FlagValue(false))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<FlagValue, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(FlagValue(false))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FlagValue, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(FlagValue(false))
            }
        }
        d.deserialize_any(V)
    }
}

/// The admin path polled: `path` (validated: `/clusters?…format=json…`) plus a `filter` that
/// matches exactly `clusters`, unless `path` has its own, so that Envoy's answer holds only
/// them (`/clusters?filter=RE2`, which matches anywhere in the name: hence `^(…)$`).
pub fn admin_path(path: &str, clusters: &[String]) -> String {
    let query = path.split_once('?').map_or("", |(_, q)| q);
    if query.split('&').any(|kv| kv.starts_with("filter=")) {
        return path.to_string();
    }
    let names: Vec<String> = clusters.iter().map(|c| re2_literal(c)).collect();
    let regex = format!("^({})$", names.join("|"));
    let separator = if path.contains('?') { '&' } else { '?' };
    format!("{path}{separator}filter={}", percent_encode(&regex))
}

/// `text` as an RE2 pattern that matches exactly it.
fn re2_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || c == '_' || !c.is_ascii() {
            out.push(c);
        } else if c.is_ascii_punctuation() {
            out.push('\\');
            out.push(c);
        } else {
            out.push_str(&format!("\\x{{{:02x}}}", c as u32));
        }
    }
    out
}

/// Percent-encodes every byte but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `ip:port`, IPv6 bracketed: `[ip]:port`.
pub fn format_address(ip: &str, port: u32) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

fn json_err(e: serde_json::Error) -> DiscoveryError {
    DiscoveryError::AdminJson(e.to_string())
}

/// Parses the clusters for which `wanted(name)` is true; the hosts of other clusters are only
/// syntax-checked, never built. Clusters come back in admin order.
pub fn parse_admin_clusters(
    json: &[u8],
    wanted: impl Fn(&str) -> bool,
) -> Result<Vec<ClusterSnapshot>, DiscoveryError> {
    // serde would also read a struct from a JSON array, positionally: refuse that.
    if json.trim_ascii_start().first() != Some(&b'{') {
        return Err(DiscoveryError::AdminJson("expected a JSON object".into()));
    }
    let admin: AdminClusters<'_> = serde_json::from_slice(json).map_err(json_err)?;
    let mut out = Vec::new();
    for cluster in admin.cluster_statuses {
        if !wanted(&cluster.name) {
            continue;
        }
        let hosts: Vec<RawHost<'_>> = match cluster.host_statuses {
            Some(raw) => serde_json::from_str(raw.get()).map_err(json_err)?,
            None => Vec::new(),
        };
        let endpoints = hosts.into_iter().filter_map(endpoint_of).collect();
        out.push(ClusterSnapshot {
            name: cluster.name.into_owned(),
            endpoints,
        });
    }
    Ok(out)
}

fn endpoint_of(host: RawHost<'_>) -> Option<DiscoveredEndpoint> {
    let socket = host.address?.socket_address?;
    let port = socket.port_value?.0;
    if socket.address.is_empty() {
        return None;
    }
    Some(DiscoveredEndpoint {
        address: format_address(&socket.address, port),
        zone: host
            .locality
            .map(|l| l.zone.into_owned())
            .unwrap_or_default(),
        healthy: host.health_status.is_none_or(|h| h.healthy),
        weight: host.weight.map_or(1, |w| w.0.max(1)),
    })
}

// ---------------------------------------------------------------------------------------------
// Snapshot encoding
//
// Layout (integers as LEB128 varints unless noted):
//   magic "SLBD" (4 bytes), version 1 (1 byte), generation (u64 little-endian, 8 bytes),
//   cluster count, then per cluster: name (len + UTF-8), endpoint count, then per endpoint:
//   address (len + UTF-8), zone (len + UTF-8), flags (1 byte: bit 0 = healthy), weight.
// Decoding rejects trailing bytes, unknown flag bits, zero weights, overlong varints and counts
// the remaining input cannot hold (never allocates more than the input justifies), so a decoded
// snapshot re-encodes to exactly the same bytes.

const SNAPSHOT_MAGIC: &[u8; 4] = b"SLBD";
/// Version of the snapshot encoding; bump on any layout change.
pub const SNAPSHOT_VERSION: u8 = 1;
const FLAG_HEALTHY: u8 = 1;
/// Smallest encoded endpoint: two empty strings, flags, one-byte weight.
const MIN_ENDPOINT_BYTES: usize = 4;
/// Smallest encoded cluster: empty name, zero endpoints.
const MIN_CLUSTER_BYTES: usize = 2;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// Encodes `clusters` with `generation` (the poller's counter, so readers can tell a new
/// snapshot from the one they already applied).
pub fn encode_snapshot(generation: u64, clusters: &[ClusterSnapshot]) -> Vec<u8> {
    let approx: usize = clusters
        .iter()
        .map(|c| 8 + c.name.len() + c.endpoints.len() * 40)
        .sum();
    let mut out = Vec::with_capacity(13 + approx);
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.push(SNAPSHOT_VERSION);
    out.extend_from_slice(&generation.to_le_bytes());
    put_varint(&mut out, clusters.len() as u64);
    for c in clusters {
        put_str(&mut out, &c.name);
        put_varint(&mut out, c.endpoints.len() as u64);
        for e in &c.endpoints {
            put_str(&mut out, &e.address);
            put_str(&mut out, &e.zone);
            out.push(if e.healthy { FLAG_HEALTHY } else { 0 });
            put_varint(&mut out, u64::from(e.weight.max(1)));
        }
    }
    out
}

/// A cursor over untrusted bytes; every read is bounds-checked.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DiscoveryError> {
        let (head, tail) = self
            .rest
            .split_at_checked(n)
            .ok_or(DiscoveryError::Snapshot("truncated"))?;
        self.rest = tail;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, DiscoveryError> {
        let (&b, tail) = self
            .rest
            .split_first()
            .ok_or(DiscoveryError::Snapshot("truncated"))?;
        self.rest = tail;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, DiscoveryError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(DiscoveryError::Snapshot("varint overflows u64"));
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                // Canonical only (no trailing zero groups): one encoding per value.
                if b == 0 && shift > 0 {
                    return Err(DiscoveryError::Snapshot("overlong varint"));
                }
                return Ok(v);
            }
        }
        Err(DiscoveryError::Snapshot("varint too long"))
    }

    /// A count of items of at least `min_item_bytes` each, checked against the remaining input.
    fn count(&mut self, min_item_bytes: usize) -> Result<usize, DiscoveryError> {
        let n = self.varint()?;
        let max = (self.rest.len() / min_item_bytes.max(1)) as u64;
        if n > max {
            return Err(DiscoveryError::Snapshot("count exceeds remaining input"));
        }
        usize::try_from(n).map_err(|_| DiscoveryError::Snapshot("count too large"))
    }

    fn string(&mut self) -> Result<String, DiscoveryError> {
        let len = self.varint()?;
        let len = usize::try_from(len).map_err(|_| DiscoveryError::Snapshot("truncated"))?;
        let raw = self.bytes(len)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| DiscoveryError::Snapshot("string is not UTF-8"))
    }
}

/// Decodes a snapshot written by [`encode_snapshot`]: `(generation, clusters)`.
pub fn decode_snapshot(bytes: &[u8]) -> Result<(u64, Vec<ClusterSnapshot>), DiscoveryError> {
    let mut r = Reader { rest: bytes };
    if r.bytes(SNAPSHOT_MAGIC.len())? != SNAPSHOT_MAGIC {
        return Err(DiscoveryError::Snapshot("bad magic"));
    }
    if r.byte()? != SNAPSHOT_VERSION {
        return Err(DiscoveryError::Snapshot("unsupported version"));
    }
    let mut generation = [0u8; 8];
    generation.copy_from_slice(r.bytes(8)?);
    let generation = u64::from_le_bytes(generation);
    let n_clusters = r.count(MIN_CLUSTER_BYTES)?;
    let mut clusters = Vec::with_capacity(n_clusters);
    for _ in 0..n_clusters {
        let name = r.string()?;
        let n_endpoints = r.count(MIN_ENDPOINT_BYTES)?;
        let mut endpoints = Vec::with_capacity(n_endpoints);
        for _ in 0..n_endpoints {
            let address = r.string()?;
            let zone = r.string()?;
            let flags = r.byte()?;
            if flags & !FLAG_HEALTHY != 0 {
                return Err(DiscoveryError::Snapshot("unknown endpoint flags"));
            }
            let weight = u32::try_from(r.varint()?)
                .map_err(|_| DiscoveryError::Snapshot("weight out of range"))?;
            if weight == 0 {
                return Err(DiscoveryError::Snapshot("zero weight"));
            }
            endpoints.push(DiscoveredEndpoint {
                address,
                zone,
                healthy: flags & FLAG_HEALTHY != 0,
                weight,
            });
        }
        clusters.push(ClusterSnapshot { name, endpoints });
    }
    if !r.rest.is_empty() {
        return Err(DiscoveryError::Snapshot("trailing bytes"));
    }
    Ok((generation, clusters))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// Captured from Envoy 1.40.0 (`capture_admin_clusters.sh`): cluster `pods` with 4 hosts in
    /// zones a/b (one failing its TCP health check, one DEGRADED over IPv6, one DRAINING) and
    /// cluster `other` with one host without locality that served 2 requests.
    const FIXTURE: &str = include_str!("testdata/admin_clusters.json");

    fn ep(address: &str, zone: &str, healthy: bool, weight: u32) -> DiscoveredEndpoint {
        DiscoveredEndpoint {
            address: address.into(),
            zone: zone.into(),
            healthy,
            weight,
        }
    }

    #[test]
    fn the_admin_path_filters_exactly_the_configured_clusters() {
        let clusters = ["pods".to_string(), "outbound|50051||t.iot.svc".to_string()];
        assert_eq!(
            admin_path("/clusters?format=json", &clusters),
            "/clusters?format=json&filter=%5E%28pods%7Coutbound%5C%7C50051%5C%7C%5C%7Ct%5C.iot%5C.svc%29%24"
        );
        assert_eq!(
            admin_path("/clusters?format=json", &["a b_c".to_string()]),
            "/clusters?format=json&filter=%5E%28a%5Cx%7B20%7Db_c%29%24"
        );
        // A path with its own filter is polled as it is.
        let own = "/clusters?format=json&filter=%5Epods";
        assert_eq!(admin_path(own, &clusters), own);
    }

    /// The ports in the fixture are chosen at capture time: read them with serde_json::Value.
    fn fixture_ports(cluster: &str) -> Vec<u64> {
        let v: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
        v["cluster_statuses"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["name"] == cluster)
            .flat_map(|c| c["host_statuses"].as_array().unwrap().iter())
            .map(|h| {
                h["address"]["socket_address"]["port_value"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn real_envoy_fixture() {
        let got = parse_admin_clusters(FIXTURE.as_bytes(), |n| n == "pods").unwrap();
        let p = fixture_ports("pods");
        assert_eq!(p.len(), 4);
        assert_eq!(
            got,
            vec![ClusterSnapshot {
                name: "pods".into(),
                endpoints: vec![
                    ep(&format!("127.0.0.1:{}", p[0]), "a", true, 3),
                    ep(&format!("127.0.0.1:{}", p[1]), "a", false, 1),
                    ep(&format!("[::1]:{}", p[2]), "b", false, 1),
                    ep(&format!("127.0.0.2:{}", p[3]), "b", false, 1),
                ],
            }]
        );
        let all = parse_admin_clusters(FIXTURE.as_bytes(), |_| true).unwrap();
        let names: Vec<&str> = all.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["other", "pods"]);
        let other = &all[0].endpoints;
        let po = fixture_ports("other");
        assert_eq!(other, &[ep(&format!("127.0.0.1:{}", po[0]), "", true, 1)]);
    }

    #[test]
    fn missing_fields_take_defaults() {
        let json = br#"{"cluster_statuses":[{"name":"c","host_statuses":[
            {"address":{"socket_address":{"address":"10.0.0.1","port_value":80}}},
            {"address":{"socket_address":{"address":"10.0.0.2","port_value":"81"}},"weight":0,
             "locality":{}},
            {"address":{"pipe":{"path":"/tmp/sock"}}},
            {"address":{"socket_address":{"address":"10.0.0.3"}}},
            {"stats":[]}
        ]},{"name":"empty"}]}"#;
        let got = parse_admin_clusters(json, |_| true).unwrap();
        assert_eq!(
            got,
            vec![
                ClusterSnapshot {
                    name: "c".into(),
                    endpoints: vec![
                        ep("10.0.0.1:80", "", true, 1),
                        ep("10.0.0.2:81", "", true, 1)
                    ],
                },
                ClusterSnapshot {
                    name: "empty".into(),
                    endpoints: vec![],
                },
            ]
        );
        assert_eq!(parse_admin_clusters(b"{}", |_| true).unwrap(), vec![]);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let json = br#"{"future":{"x":[1,2,{"y":null}]},"cluster_statuses":[{"name":"c",
            "new_cluster_field":[{"deep":true}],"host_statuses":[{"hostname":"pod-1",
            "address":{"socket_address":{"address":"10.0.0.1","port_value":80,"protocol":"TCP",
            "ipv4_compat":false},"extra":1},"stats":[{"name":"rq_active","type":"GAUGE",
            "value":"7"}],"health_status":{"eds_health_status":"HEALTHY","new_flag":true,
            "failed_active_health_check":false},"weight":5,"priority":1,
            "locality":{"region":"r","zone":"z1","sub_zone":"s"},"local_origin_success_rate":{}}]}]}"#;
        let got = parse_admin_clusters(json, |_| true).unwrap();
        assert_eq!(got[0].endpoints, vec![ep("10.0.0.1:80", "z1", true, 5)]);
    }

    #[test]
    fn health_rules() {
        let cases: &[(&str, bool)] = &[
            (r#"{}"#, true),
            (r#"{"eds_health_status":"HEALTHY"}"#, true),
            (r#"{"eds_health_status":"UNKNOWN"}"#, true),
            (r#"{"eds_health_status":"DEGRADED"}"#, false),
            (r#"{"eds_health_status":"DRAINING"}"#, false),
            (r#"{"eds_health_status":"TIMEOUT"}"#, false),
            (r#"{"eds_health_status":"UNHEALTHY"}"#, false),
            (r#"{"failed_outlier_check":true}"#, false),
            (r#"{"failed_active_degraded_check":true}"#, false),
            (
                r#"{"failed_eds_health":true,"eds_health_status":"HEALTHY"}"#,
                false,
            ),
            (r#"{"failed_active_health_check":false}"#, true),
            (r#"{"pending_dynamic_removal":true}"#, false),
            (r#"{"pending_active_hc":true}"#, true),
            (r#"{"failed_new_thing":{"a":1}}"#, true),
        ];
        for (health, want) in cases {
            let json = format!(
                r#"{{"cluster_statuses":[{{"name":"c","host_statuses":[{{"address":
                {{"socket_address":{{"address":"1.2.3.4","port_value":1}}}},"health_status":{health}}}]}}]}}"#
            );
            let got = parse_admin_clusters(json.as_bytes(), |_| true).unwrap();
            assert_eq!(got[0].endpoints[0].healthy, *want, "{health}");
        }
    }

    #[test]
    fn unwanted_clusters_are_not_parsed() {
        // The unwanted cluster's hosts are syntactically valid JSON but not host objects:
        // building them would fail, skipping them must not.
        let json = br#"{"cluster_statuses":[
            {"name":"skip","host_statuses":[1,"two",{"address":"not an object"}]},
            {"name":"keep","host_statuses":[{"address":{"socket_address":
              {"address":"10.1.1.1","port_value":9}}}]}]}"#;
        let got = parse_admin_clusters(json, |n| n == "keep").unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].endpoints, vec![ep("10.1.1.1:9", "", true, 1)]);
        assert!(parse_admin_clusters(json, |_| true).is_err());
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        let json = br#"{"cluster_statuses":[{"name":"c","host_statuses":[
            {"address":{"socket_address":{"address":"fd00::1:2","port_value":443}}}]}]}"#;
        let got = parse_admin_clusters(json, |_| true).unwrap();
        assert_eq!(got[0].endpoints[0].address, "[fd00::1:2]:443");
        assert_eq!(format_address("10.0.0.1", 80), "10.0.0.1:80");
    }

    #[test]
    fn escaped_names_and_bad_json() {
        let json = br#"{"cluster_statuses":[{"name":"a\"b","host_statuses":[]}]}"#;
        let got = parse_admin_clusters(json, |n| n == "a\"b").unwrap();
        assert_eq!(got.len(), 1);
        for bad in [
            &b""[..],
            b"[]",
            b"{\"cluster_statuses\":{}}",
            b"{\"cluster_statuses\":[{\"name\":\"c\",\"host_statuses\":[}]}",
            b"{\"cluster_statuses\":[{\"name\":\"c\",\"host_statuses\":[{\"weight\":-1}]}]}",
            b"\xff\xfe",
        ] {
            let e = parse_admin_clusters(bad, |_| true);
            assert!(
                matches!(e, Err(DiscoveryError::AdminJson(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn sample_clusters() -> Vec<ClusterSnapshot> {
        vec![
            ClusterSnapshot {
                name: "pods".into(),
                endpoints: vec![
                    ep("10.0.0.1:8080", "eu-west-1a", true, 1),
                    ep("[fd00::5]:8080", "", false, 300),
                    ep("10.0.0.3:8080", "zone-ü", true, u32::MAX),
                ],
            },
            ClusterSnapshot {
                name: String::new(),
                endpoints: vec![],
            },
        ]
    }

    #[test]
    fn snapshot_round_trip() {
        for generation in [0, 1, 300, u64::MAX] {
            let clusters = sample_clusters();
            let bytes = encode_snapshot(generation, &clusters);
            assert_eq!(&bytes[..4], b"SLBD");
            assert_eq!(bytes[4], SNAPSHOT_VERSION);
            assert_eq!(decode_snapshot(&bytes).unwrap(), (generation, clusters));
        }
        let empty = encode_snapshot(7, &[]);
        assert_eq!(decode_snapshot(&empty).unwrap(), (7, vec![]));
    }

    #[test]
    fn snapshot_truncated_or_garbage_is_an_error() {
        let bytes = encode_snapshot(42, &sample_clusters());
        for cut in 0..bytes.len() {
            assert!(decode_snapshot(&bytes[..cut]).is_err(), "cut {cut}");
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(
            decode_snapshot(&trailing),
            Err(DiscoveryError::Snapshot("trailing bytes"))
        );
        let mut version = bytes.clone();
        version[4] = 99;
        assert!(decode_snapshot(&version).is_err());
        // A huge count must be refused before allocating.
        let mut huge = b"SLBD\x01".to_vec();
        huge.extend_from_slice(&0u64.to_le_bytes());
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert_eq!(
            decode_snapshot(&huge),
            Err(DiscoveryError::Snapshot("count exceeds remaining input"))
        );
        let mut overflow = b"SLBD\x01".to_vec();
        overflow.extend_from_slice(&0u64.to_le_bytes());
        overflow.extend_from_slice(&[0xff; 11]);
        assert!(decode_snapshot(&overflow).is_err());
        let mut overlong = b"SLBD\x01".to_vec();
        overlong.extend_from_slice(&0u64.to_le_bytes());
        overlong.extend_from_slice(&[0x80, 0x00]);
        assert_eq!(
            decode_snapshot(&overlong),
            Err(DiscoveryError::Snapshot("overlong varint"))
        );
    }

    #[test]
    fn snapshot_random_bytes_and_mutations_never_panic() {
        let mut rng = Rng::new(2024);
        let good = encode_snapshot(9, &sample_clusters());
        for _ in 0..3000 {
            let mut b = if rng.below(2) == 0 {
                good.clone()
            } else {
                let len = rng.below(64);
                let mut v = b"SLBD\x01".to_vec();
                v.extend((0..len).map(|_| rng.next_u64() as u8));
                v
            };
            for _ in 0..1 + rng.below(4) {
                if b.is_empty() {
                    break;
                }
                let i = rng.below(b.len());
                b[i] = rng.next_u64() as u8;
            }
            if let Ok((_, clusters)) = decode_snapshot(&b) {
                // Whatever decodes must re-encode to the same bytes.
                let g = u64::from_le_bytes(b[5..13].try_into().unwrap());
                assert_eq!(encode_snapshot(g, &clusters), b);
            }
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    #[test]
    fn thousand_hosts_over_fifty_clusters() {
        let mut rng = Rng::new(77);
        let mut json = String::from(r#"{"cluster_statuses":["#);
        let mut truth: Vec<ClusterSnapshot> = Vec::new();
        for c in 0..50 {
            let name = format!("cluster-{c}");
            if c > 0 {
                json.push(',');
            }
            json.push_str(&format!(
                r#"{{"name":"{name}","observability_name":"{name}","added_via_api":true,"host_statuses":["#
            ));
            let mut endpoints = Vec::new();
            for h in 0..20 {
                let zone = ["a", "b", "c"][rng.below(3)];
                let weight = 1 + rng.below(5) as u32;
                let status = ["HEALTHY", "HEALTHY", "HEALTHY", "DRAINING", "UNKNOWN"][rng.below(5)];
                let failed = rng.below(10) == 0;
                let ip = format!("10.{}.{}.{}", c, h / 250, h % 250);
                if h > 0 {
                    json.push(',');
                }
                json.push_str(&format!(
                    r#"{{"address":{{"socket_address":{{"address":"{ip}","port_value":8080}}}},
                    "stats":[{{"name":"cx_active","type":"GAUGE","value":"{a}"}},{{"name":"rq_active","type":"GAUGE"}},{{"name":"rq_total","value":"{t}"}}],
                    "health_status":{{"eds_health_status":"{status}","failed_outlier_check":{failed}}},
                    "weight":{weight},"locality":{{"region":"r","zone":"{zone}","sub_zone":""}},"hostname":"","priority":0}}"#,
                    a = rng.below(9),
                    t = rng.next_u64() % 100_000,
                ));
                endpoints.push(ep(
                    &format!("{ip}:8080"),
                    zone,
                    !failed && matches!(status, "HEALTHY" | "UNKNOWN"),
                    weight,
                ));
            }
            json.push_str("]}");
            truth.push(ClusterSnapshot { name, endpoints });
        }
        json.push_str("]}");
        assert!(json.len() > 300_000);

        let all = parse_admin_clusters(json.as_bytes(), |_| true).unwrap();
        assert_eq!(all, truth);
        assert_eq!(all.iter().map(|c| c.endpoints.len()).sum::<usize>(), 1000);
        let some = parse_admin_clusters(json.as_bytes(), |n| n == "cluster-7" || n == "cluster-49")
            .unwrap();
        assert_eq!(some, vec![truth[7].clone(), truth[49].clone()]);
        let bytes = encode_snapshot(3, &all);
        assert!(bytes.len() < json.len() / 10);
        assert_eq!(decode_snapshot(&bytes).unwrap(), (3, truth));
    }
}
