//! ORCA in-band load reports: the `endpoint-load-metrics` response header/trailer.
//!
//! Forms (the prefix picks the format, as in Envoy's `orca_parser`):
//! - `TEXT cpu_utilization=0.3, rps_fractional=120, named_metrics.queue_depth=5` — comma
//!   separated `key=value` pairs; `key:value` (Envoy's own spelling) is accepted too.
//!   `named_metrics.NAME` fills that map; other keys are ignored (forward compatible). A key
//!   given twice is an error.
//! - `JSON {"cpu_utilization":0.3,"named_metrics":{"queue_depth":5}}` — the proto3 JSON mapping
//!   of xds `OrcaLoadReport`: snake_case or lowerCamelCase names, numbers or numeric strings;
//!   unknown keys are ignored.
//! - `BIN <base64 protobuf>`, and the gRPC trailer `endpoint-load-metrics-bin` (what gRPC
//!   servers send) through [`parse_bin`], decoded with `base64` and `prost`.
//!
//! Only the fields streamlb reads are kept: `cpu_utilization`, `application_utilization`,
//! `rps_fractional` and `named_metrics`.
//!
//! Every number must be finite and `>= 0` (else the whole report is rejected). Reports come
//! from backends, so the map is bounded: at most [`MAX_NAMED`] entries each, and entries whose
//! name is longer than [`MAX_NAME_BYTES`] (or empty) are dropped.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// Most `named_metrics` entries kept; later ones are dropped.
pub const MAX_NAMED: usize = 16;
/// Longest metric name kept, in bytes; longer names are dropped.
pub const MAX_NAME_BYTES: usize = 64;
/// Longest key or prefix quoted back in an error message.
const MAX_QUOTE_BYTES: usize = 64;

/// One parsed load report. Missing fields are 0 (proto3 semantics).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OrcaReport {
    /// CPU use as a fraction of the available CPU; may exceed 1.
    pub cpu_utilization: f64,
    pub application_utilization: f64,
    /// Queries per second served by the endpoint.
    pub rps_fractional: f64,
    /// Application-defined metrics, in report order (bounded, see module doc).
    pub named_metrics: Vec<(String, f64)>,
}

impl OrcaReport {
    /// `application_utilization` when > 0, else `cpu_utilization` when > 0 (the rule gRPC's
    /// weighted round robin uses); `None` when neither is > 0.
    pub fn utilization(&self) -> Option<f64> {
        if self.application_utilization > 0.0 {
            Some(self.application_utilization)
        } else if self.cpu_utilization > 0.0 {
            Some(self.cpu_utilization)
        } else {
            None
        }
    }

    /// A named metric by name.
    pub fn named_metric(&self, name: &str) -> Option<f64> {
        self.named_metrics
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, v)| v)
    }
}

/// Why a report was rejected.
#[derive(Debug, Clone, PartialEq)]
pub enum OrcaError {
    /// The value does not start with `TEXT `, `JSON ` or `BIN `.
    UnknownFormat(String),
    /// A TEXT item is not `key=value`, or a key is empty.
    MalformedPair(String),
    /// A number is unparsable, not finite or negative.
    BadNumber { key: String, reason: &'static str },
    /// A key appears twice.
    Duplicate(String),
    /// The JSON form is not valid JSON of the expected shape.
    Json(String),
    /// The binary form is not valid base64 or protobuf.
    Binary(&'static str),
}

impl fmt::Display for OrcaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OrcaError::UnknownFormat(p) => {
                write!(f, "unsupported ORCA format {p:?} (want TEXT, JSON or BIN)")
            }
            OrcaError::MalformedPair(p) => write!(f, "malformed ORCA pair {p:?} (want key=value)"),
            OrcaError::BadNumber { key, reason } => write!(f, "ORCA metric {key:?}: {reason}"),
            OrcaError::Duplicate(k) => write!(f, "ORCA metric {k:?} given twice"),
            OrcaError::Json(e) => write!(f, "ORCA JSON: {e}"),
            OrcaError::Binary(e) => write!(f, "ORCA binary: {e}"),
        }
    }
}

impl std::error::Error for OrcaError {}

/// At most `MAX_QUOTE_BYTES` of untrusted text, cut at a char boundary.
fn quote(s: &str) -> String {
    let mut end = s.len().min(MAX_QUOTE_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default().to_owned()
}

/// Checks a metric value: finite and `>= 0`.
fn check(key: &str, v: f64) -> Result<f64, OrcaError> {
    let reason = if v.is_nan() {
        "NaN"
    } else if v.is_infinite() {
        "not finite"
    } else if v < 0.0 {
        "negative"
    } else {
        return Ok(if v == 0.0 { 0.0 } else { v }); // folds -0.0
    };
    Err(OrcaError::BadNumber {
        key: quote(key),
        reason,
    })
}

fn number(key: &str, text: &str) -> Result<f64, OrcaError> {
    let v: f64 = text.parse().map_err(|_| OrcaError::BadNumber {
        key: quote(key),
        reason: "not a number",
    })?;
    check(key, v)
}

/// Adds `(name, v)` to a bounded map: error on a duplicate kept name, silently drops empty or
/// too-long names and entries beyond [`MAX_NAMED`].
fn insert_bounded(
    map: &mut Vec<(String, f64)>,
    name: &str,
    v: f64,
    full_key: &str,
) -> Result<(), OrcaError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Ok(());
    }
    if map.iter().any(|(n, _)| n == name) {
        return Err(OrcaError::Duplicate(quote(full_key)));
    }
    if map.len() < MAX_NAMED {
        map.push((name.to_owned(), v));
    }
    Ok(())
}

/// Parses an `endpoint-load-metrics` value (`TEXT …`, `JSON …` or `BIN …`).
pub fn parse(value: &str) -> Result<OrcaReport, OrcaError> {
    let value = value.trim_start();
    if let Some(body) = value.strip_prefix("TEXT ") {
        parse_text(body)
    } else if let Some(body) = value.strip_prefix("JSON ") {
        parse_json(body)
    } else if let Some(body) = value.strip_prefix("BIN ") {
        parse_bin(body)
    } else {
        let prefix = value.split(' ').next().unwrap_or_default();
        let mut end = prefix.len().min(8);
        while !prefix.is_char_boundary(end) {
            end -= 1;
        }
        Err(OrcaError::UnknownFormat(
            prefix.get(..end).unwrap_or_default().to_owned(),
        ))
    }
}

/// Bits of the fixed fields already set, for duplicate detection.
const SEEN_CPU: u8 = 1;
const SEEN_APP: u8 = 2;
const SEEN_RPS: u8 = 4;

fn parse_text(body: &str) -> Result<OrcaReport, OrcaError> {
    let mut r = OrcaReport::default();
    let mut seen: u8 = 0;
    for item in body.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let sep = item
            .find(['=', ':'])
            .ok_or_else(|| OrcaError::MalformedPair(quote(item)))?;
        let key = item.get(..sep).unwrap_or_default().trim();
        let val = item.get(sep + 1..).unwrap_or_default().trim();
        if key.is_empty() || val.is_empty() {
            return Err(OrcaError::MalformedPair(quote(item)));
        }
        let (slot, bit) = match key {
            "cpu_utilization" => (&mut r.cpu_utilization, SEEN_CPU),
            "application_utilization" => (&mut r.application_utilization, SEEN_APP),
            "rps_fractional" => (&mut r.rps_fractional, SEEN_RPS),
            _ => {
                if let Some(name) = key.strip_prefix("named_metrics.") {
                    if name.is_empty() {
                        return Err(OrcaError::MalformedPair(quote(item)));
                    }
                    insert_bounded(&mut r.named_metrics, name, number(key, val)?, key)?;
                }
                // Other keys: ignored.
                continue;
            }
        };
        if seen & bit != 0 {
            return Err(OrcaError::Duplicate(quote(key)));
        }
        seen |= bit;
        *slot = number(key, val)?;
    }
    Ok(r)
}

/// A proto3-JSON double: a number, or a string holding one (`"NaN"`, `"Infinity"` included,
/// which [`check`] then rejects).
struct JsonNumber(f64);

impl<'de> Deserialize<'de> for JsonNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = JsonNumber;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<JsonNumber, E> {
                Ok(JsonNumber(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<JsonNumber, E> {
                Ok(JsonNumber(v as f64))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<JsonNumber, E> {
                Ok(JsonNumber(v as f64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<JsonNumber, E> {
                let v = v.trim();
                let parsed = match v {
                    "NaN" => Some(f64::NAN),
                    "Infinity" => Some(f64::INFINITY),
                    "-Infinity" => Some(f64::NEG_INFINITY),
                    _ => v.parse().ok(),
                };
                parsed
                    .map(JsonNumber)
                    .ok_or_else(|| E::custom("string is not a number"))
            }
        }
        d.deserialize_any(V)
    }
}

/// A bounded `string → double` JSON map (see [`insert_bounded`]); values are checked.
struct BoundedMap(Vec<(String, f64)>);

impl<'de> Deserialize<'de> for BoundedMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BoundedMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of metric name to number")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<BoundedMap, A::Error> {
                let mut out = Vec::new();
                while let Some(name) = map.next_key::<Cow<'de, str>>()? {
                    let JsonNumber(v) = map.next_value()?;
                    let v = check(&name, v).map_err(de::Error::custom)?;
                    insert_bounded(&mut out, &name, v, &name).map_err(de::Error::custom)?;
                }
                Ok(BoundedMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
struct JsonReport {
    #[serde(default, alias = "cpuUtilization")]
    cpu_utilization: Option<JsonNumber>,
    #[serde(default, alias = "applicationUtilization")]
    application_utilization: Option<JsonNumber>,
    #[serde(default, alias = "rpsFractional")]
    rps_fractional: Option<JsonNumber>,
    #[serde(default, alias = "namedMetrics")]
    named_metrics: Option<BoundedMap>,
}

fn parse_json(body: &str) -> Result<OrcaReport, OrcaError> {
    // serde would also read a struct from a JSON array, positionally: refuse that.
    if !body.trim_start().starts_with('{') {
        return Err(OrcaError::Json("expected a JSON object".into()));
    }
    let j: JsonReport = serde_json::from_str(body).map_err(|e| OrcaError::Json(e.to_string()))?;
    let field = |key: &str, v: Option<JsonNumber>| v.map_or(Ok(0.0), |n| check(key, n.0));
    Ok(OrcaReport {
        cpu_utilization: field("cpu_utilization", j.cpu_utilization)?,
        application_utilization: field("application_utilization", j.application_utilization)?,
        rps_fractional: field("rps_fractional", j.rps_fractional)?,
        named_metrics: j.named_metrics.map(|m| m.0).unwrap_or_default(),
    })
}

// Binary form: the protobuf `xds.data.orca.v3.OrcaLoadReport`, base64-encoded (as gRPC sends
// every `-bin` metadata value). Only the fields this filter reads are declared; prost skips the
// others (rps, request_cost, utilization, eps, mem_utilization).

/// The fields of `xds.data.orca.v3.OrcaLoadReport` that streamlb uses (same tags).
#[derive(Clone, PartialEq, prost::Message)]
pub struct OrcaLoadReportProto {
    #[prost(double, tag = "1")]
    pub cpu_utilization: f64,
    #[prost(double, tag = "6")]
    pub rps_fractional: f64,
    #[prost(btree_map = "string, double", tag = "8")]
    pub named_metrics: std::collections::BTreeMap<String, f64>,
    #[prost(double, tag = "9")]
    pub application_utilization: f64,
}

/// Parses the value of the `endpoint-load-metrics-bin` trailer (or the body after `BIN `):
/// base64, standard or URL-safe alphabet, padding optional.
pub fn parse_bin(value: &str) -> Result<OrcaReport, OrcaError> {
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
    use base64::engine::DecodePaddingMode;
    use base64::Engine;
    const CONFIG: GeneralPurposeConfig =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    const STANDARD: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, CONFIG);
    const URL_SAFE: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, CONFIG);
    let value = value.trim();
    let bytes = STANDARD
        .decode(value)
        .or_else(|_| URL_SAFE.decode(value))
        .map_err(|_| OrcaError::Binary("invalid base64"))?;
    parse_proto(&bytes)
}

fn parse_proto(bytes: &[u8]) -> Result<OrcaReport, OrcaError> {
    let p = <OrcaLoadReportProto as prost::Message>::decode(bytes)
        .map_err(|_| OrcaError::Binary("invalid protobuf"))?;
    let mut named_metrics = Vec::new();
    for (name, v) in &p.named_metrics {
        insert_bounded(&mut named_metrics, name, check(name, *v)?, name)?;
    }
    Ok(OrcaReport {
        cpu_utilization: check("cpu_utilization", p.cpu_utilization)?,
        application_utilization: check("application_utilization", p.application_utilization)?,
        rps_fractional: check("rps_fractional", p.rps_fractional)?,
        named_metrics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn named(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
        pairs.iter().map(|(n, v)| ((*n).to_owned(), *v)).collect()
    }

    #[test]
    fn text_form() {
        let r = parse("TEXT cpu_utilization=0.3, rps_fractional=120, named_metrics.queue_depth=5")
            .unwrap();
        assert_eq!(
            r,
            OrcaReport {
                cpu_utilization: 0.3,
                rps_fractional: 120.0,
                named_metrics: named(&[("queue_depth", 5.0)]),
                ..OrcaReport::default()
            }
        );
        assert_eq!(r.utilization(), Some(0.3));
        assert_eq!(r.named_metric("queue_depth"), Some(5.0));
        assert_eq!(r.named_metric("nope"), None);
    }

    #[test]
    fn text_form_envoy_colon_spelling_and_all_fields() {
        let r = parse(
            "TEXT cpu_utilization:0.5,mem_utilization: 0.25 ,application_utilization=0.7,\
             eps=2,rps_fractional=1e3,utilization.gpu=0.9,request_cost.db=12,future_key=x,,",
        )
        .unwrap();
        assert_eq!(
            r,
            OrcaReport {
                cpu_utilization: 0.5,
                application_utilization: 0.7,
                rps_fractional: 1000.0,
                named_metrics: vec![],
            },
            "fields streamlb does not use are ignored"
        );
        assert_eq!(r.utilization(), Some(0.7), "application wins over cpu");
    }

    #[test]
    fn json_form() {
        let r = parse(
            r#"JSON {"cpu_utilization":0.3,"rps_fractional":120,"named_metrics":{"queue_depth":5}}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            OrcaReport {
                cpu_utilization: 0.3,
                rps_fractional: 120.0,
                named_metrics: named(&[("queue_depth", 5.0)]),
                ..OrcaReport::default()
            }
        );
        let camel = parse(
            r#"JSON {"cpuUtilization":"0.4","memUtilization":0.1,"applicationUtilization":0.2,
            "rpsFractional":3,"eps":"1","namedMetrics":{"a":1,"b":"2"},"utilization":{"gpu":0.5},
            "rps":"77","requestCost":{"x":1},"somethingNew":[1,{"y":null}],"eps_extra":null}"#,
        )
        .unwrap();
        assert_eq!(camel.cpu_utilization, 0.4);
        assert_eq!(camel.application_utilization, 0.2);
        assert_eq!(camel.rps_fractional, 3.0);
        assert_eq!(camel.named_metrics, named(&[("a", 1.0), ("b", 2.0)]));
        assert_eq!(
            parse("JSON {}").unwrap(),
            OrcaReport::default(),
            "empty report"
        );
        assert_eq!(
            parse(r#"JSON {"cpu_utilization":null}"#)
                .unwrap()
                .utilization(),
            None
        );
    }

    #[test]
    fn utilization_rule() {
        let mut r = OrcaReport::default();
        assert_eq!(r.utilization(), None);
        r.cpu_utilization = 0.6;
        assert_eq!(r.utilization(), Some(0.6));
        r.application_utilization = 0.2;
        assert_eq!(r.utilization(), Some(0.2));
    }

    #[test]
    fn errors() {
        type Expect = fn(&OrcaError) -> bool;
        let cases: &[(&str, Expect)] = &[
            ("cpu_utilization=0.3", |e| {
                matches!(e, OrcaError::UnknownFormat(_))
            }),
            (
                "XML <a/>",
                |e| matches!(e, OrcaError::UnknownFormat(p) if p == "XML"),
            ),
            ("", |e| matches!(e, OrcaError::UnknownFormat(_))),
            ("TEXT cpu_utilization", |e| {
                matches!(e, OrcaError::MalformedPair(_))
            }),
            ("TEXT =1", |e| matches!(e, OrcaError::MalformedPair(_))),
            ("TEXT cpu_utilization=", |e| {
                matches!(e, OrcaError::MalformedPair(_))
            }),
            ("TEXT named_metrics.=1", |e| {
                matches!(e, OrcaError::MalformedPair(_))
            }),
            ("TEXT cpu_utilization=abc", |e| {
                matches!(
                    e,
                    OrcaError::BadNumber {
                        reason: "not a number",
                        ..
                    }
                )
            }),
            ("TEXT cpu_utilization=NaN", |e| {
                matches!(e, OrcaError::BadNumber { reason: "NaN", .. })
            }),
            ("TEXT rps_fractional=inf", |e| {
                matches!(
                    e,
                    OrcaError::BadNumber {
                        reason: "not finite",
                        ..
                    }
                )
            }),
            ("TEXT rps_fractional=-1", |e| {
                matches!(
                    e,
                    OrcaError::BadNumber {
                        reason: "negative",
                        ..
                    }
                )
            }),
            (
                "TEXT named_metrics.q=-0.5",
                |e| matches!(e, OrcaError::BadNumber { key, .. } if key == "named_metrics.q"),
            ),
            ("TEXT cpu_utilization=1e400", |e| {
                matches!(e, OrcaError::BadNumber { .. })
            }),
            ("TEXT cpu_utilization=0.1, cpu_utilization=0.2", |e| {
                matches!(e, OrcaError::Duplicate(_))
            }),
            ("TEXT named_metrics.q=1, named_metrics.q=2", |e| {
                matches!(e, OrcaError::Duplicate(_))
            }),
            ("JSON {", |e| matches!(e, OrcaError::Json(_))),
            ("JSON []", |e| matches!(e, OrcaError::Json(_))),
            ("JSON [0.3]", |e| matches!(e, OrcaError::Json(_))),
            (r#"JSON {"cpu_utilization":"high"}"#, |e| {
                matches!(e, OrcaError::Json(_))
            }),
            (r#"JSON {"cpu_utilization":-0.1}"#, |e| {
                matches!(
                    e,
                    OrcaError::BadNumber {
                        reason: "negative",
                        ..
                    }
                )
            }),
            (r#"JSON {"rps_fractional":"Infinity"}"#, |e| {
                matches!(
                    e,
                    OrcaError::BadNumber {
                        reason: "not finite",
                        ..
                    }
                )
            }),
            (
                r#"JSON {"named_metrics":{"q":"NaN"}}"#,
                |e| matches!(e, OrcaError::Json(m) if m.contains("NaN")),
            ),
            (r#"JSON {"cpu_utilization":1,"cpuUtilization":2}"#, |e| {
                matches!(e, OrcaError::Json(_))
            }),
            (r#"JSON {"cpu_utilization":0.1} trailing"#, |e| {
                matches!(e, OrcaError::Json(_))
            }),
            ("BIN !!!", |e| matches!(e, OrcaError::Binary(_))),
        ];
        for (input, ok) in cases {
            let e = parse(input).unwrap_err();
            assert!(ok(&e), "{input:?} gave {e:?}");
            assert!(!e.to_string().is_empty());
        }
        let e = parse("TEXT cpu_utilization=-1").unwrap_err();
        assert_eq!(e.to_string(), "ORCA metric \"cpu_utilization\": negative");
    }

    #[test]
    fn named_metrics_are_bounded() {
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        let exact = "y".repeat(MAX_NAME_BYTES);
        let mut text = format!("TEXT named_metrics.{long}=1, named_metrics.{exact}=2");
        let mut json = format!(r#"JSON {{"named_metrics":{{"{long}":1,"{exact}":2"#);
        for i in 0..40 {
            text.push_str(&format!(", named_metrics.m{i}={i}"));
            json.push_str(&format!(r#","m{i}":{i}"#));
        }
        json.push_str("}}");
        for input in [text, json] {
            let r = parse(&input).unwrap();
            assert_eq!(r.named_metrics.len(), MAX_NAMED, "{input}");
            assert_eq!(r.named_metrics[0], (exact.clone(), 2.0));
            assert_eq!(r.named_metrics[1], ("m0".to_owned(), 0.0));
            assert_eq!(r.named_metric(&long), None);
            assert_eq!(r.named_metrics.last().unwrap().0, "m14");
        }
    }

    fn encode(report: &OrcaLoadReportProto) -> Vec<u8> {
        prost::Message::encode_to_vec(report)
    }

    fn base64(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn binary_form() {
        let proto = OrcaLoadReportProto {
            cpu_utilization: 0.3,
            rps_fractional: 120.0,
            named_metrics: [("queue_depth".to_owned(), 5.0)].into_iter().collect(),
            application_utilization: 0.45,
        };
        let mut p = encode(&proto);
        p.extend([3 << 3, 0x96, 0x01]); // rps = 150: a field streamlb skips
        p.extend([7 << 3 | 1, 0, 0, 0, 0, 0, 0, 0xf8, 0x3f]); // eps = 1.5: skipped
        p.extend([15 << 3 | 5, 1, 2, 3, 4]); // unknown fixed32
        let want = OrcaReport {
            cpu_utilization: 0.3,
            application_utilization: 0.45,
            rps_fractional: 120.0,
            named_metrics: named(&[("queue_depth", 5.0)]),
        };
        let b64 = base64(&p);
        assert_eq!(parse_bin(&b64).unwrap(), want);
        assert_eq!(parse(&format!("BIN {b64}")).unwrap(), want);
        assert_eq!(
            parse_bin(b64.trim_end_matches('=')).unwrap(),
            want,
            "unpadded"
        );
        let url_safe = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE, &p);
        assert_eq!(parse_bin(&url_safe).unwrap(), want, "URL-safe alphabet");
        assert_eq!(parse_bin("").unwrap(), OrcaReport::default());

        let negative = OrcaLoadReportProto {
            cpu_utilization: -1.0,
            ..OrcaLoadReportProto::default()
        };
        assert!(matches!(
            parse_bin(&base64(&encode(&negative))),
            Err(OrcaError::BadNumber { .. })
        ));
        let nan = OrcaLoadReportProto {
            named_metrics: [("q".to_owned(), f64::NAN)].into_iter().collect(),
            ..OrcaLoadReportProto::default()
        };
        assert!(matches!(
            parse_bin(&base64(&encode(&nan))),
            Err(OrcaError::BadNumber { .. })
        ));
        assert!(parse_bin(&base64(&p[..p.len() - 2])).is_err(), "truncated");
        assert!(parse_bin("A").is_err(), "6 dangling bits");
        assert!(parse_bin("!!!").is_err());
    }

    #[test]
    fn binary_named_metrics_are_bounded() {
        let proto = OrcaLoadReportProto {
            named_metrics: (0..40)
                .map(|i| (format!("m{i:02}"), f64::from(i)))
                .collect(),
            ..OrcaLoadReportProto::default()
        };
        let r = parse_bin(&base64(&encode(&proto))).unwrap();
        assert_eq!(r.named_metrics.len(), MAX_NAMED);
    }

    #[test]
    fn random_input_never_panics() {
        let mut rng = Rng::new(31337);
        let alphabet: Vec<char> =
            "TEXTJSONBIN =:,.{}\"[]-+eE0123456789named_metrics.cpu_utilizationü\u{1F600}\\"
                .chars()
                .collect();
        let seeds = [
            "TEXT cpu_utilization=0.3, rps_fractional=120, named_metrics.queue_depth=5",
            r#"JSON {"cpu_utilization":0.3,"named_metrics":{"q":5}}"#,
            "BIN CQAAAAAAAPA/",
        ];
        for i in 0..5000 {
            let mut s: Vec<char> = seeds[i % seeds.len()].chars().collect();
            for _ in 0..1 + rng.below(6) {
                let pos = rng.below(s.len() + 1);
                let c = alphabet[rng.below(alphabet.len())];
                match rng.below(3) {
                    0 if pos < s.len() => s[pos] = c,
                    1 if pos < s.len() => {
                        s.remove(pos);
                    }
                    _ => s.insert(pos, c),
                }
            }
            let s: String = s.into_iter().collect();
            if let Ok(r) = parse(&s) {
                for v in [
                    r.cpu_utilization,
                    r.application_utilization,
                    r.rps_fractional,
                ] {
                    assert!(v.is_finite() && v >= 0.0, "{s:?}");
                }
                assert!(r.named_metrics.len() <= MAX_NAMED);
            }
            let bytes: Vec<u8> = (0..rng.below(40)).map(|_| rng.next_u64() as u8).collect();
            let _ = parse_proto(&bytes);
        }
    }
}
