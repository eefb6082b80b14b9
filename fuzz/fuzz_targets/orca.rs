//! ORCA header parsing must never panic, and accepted reports must respect the documented
//! bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamlb_core::orca::{parse, parse_bin, OrcaReport, MAX_NAMED, MAX_NAME_BYTES};

fn check(r: &OrcaReport) {
    for v in [
        r.cpu_utilization,
        r.application_utilization,
        r.rps_fractional,
    ] {
        assert!(v.is_finite() && v >= 0.0);
    }
    assert!(r.named_metrics.len() <= MAX_NAMED);
    for (name, v) in &r.named_metrics {
        assert!(!name.is_empty() && name.len() <= MAX_NAME_BYTES);
        assert!(v.is_finite() && *v >= 0.0);
    }
    if let Some(u) = r.utilization() {
        assert!(u > 0.0);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = parse(s) {
        check(&r);
    }
    if let Ok(r) = parse_bin(s) {
        check(&r);
    }
    for prefix in ["TEXT ", "JSON "] {
        if let Ok(r) = parse(&format!("{prefix}{s}")) {
            check(&r);
        }
    }
});
