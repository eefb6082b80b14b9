//! Admin `/clusters?format=json` parsing must never panic; what parses must survive a snapshot
//! round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamlb_core::discovery::{decode_snapshot, encode_snapshot, parse_admin_clusters};

fuzz_target!(|data: &[u8]| {
    let some = parse_admin_clusters(data, |name| name.len() % 2 == 0);
    let all = parse_admin_clusters(data, |_| true);
    if let Ok(clusters) = all {
        for c in &clusters {
            for e in &c.endpoints {
                assert!(e.weight >= 1);
                assert!(!e.address.is_empty());
            }
        }
        let bytes = encode_snapshot(1, &clusters);
        assert_eq!(decode_snapshot(&bytes), Ok((1, clusters.clone())));
        // Filtering cannot turn a valid document invalid.
        let want: Vec<_> = clusters
            .into_iter()
            .filter(|c| c.name.len() % 2 == 0)
            .collect();
        assert_eq!(some, Ok(want));
    }
});
