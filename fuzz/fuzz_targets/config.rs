//! The plugin configuration parser must never panic on any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamlb_core::config::Config;

fuzz_target!(|data: &[u8]| {
    let _ = Config::from_json(data);
});
