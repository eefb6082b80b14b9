//! Decoding untrusted shared-data bytes must never panic; whatever decodes re-encodes to the
//! same bytes (the encoding is canonical).
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamlb_core::discovery::{decode_snapshot, encode_snapshot};

fuzz_target!(|data: &[u8]| {
    // Also try with a valid header so the fuzzer reaches the body quickly.
    let mut framed = b"SLBD\x01".to_vec();
    framed.extend_from_slice(data);
    for bytes in [data, framed.as_slice()] {
        if let Ok((generation, clusters)) = decode_snapshot(bytes) {
            assert_eq!(encode_snapshot(generation, &clusters), bytes);
        }
    }
});
