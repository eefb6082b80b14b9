//! Feeding a stream whole and cut into chunks (with the glue's skip/feed pattern) must give the
//! same counts. Input: byte 0 = mode bits, byte 1 = number of cuts k, then k u16 cut points,
//! then the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamlb_core::grpc_framing::FrameCounter;

fn new_counter(grpc: bool) -> FrameCounter {
    if grpc {
        FrameCounter::grpc()
    } else {
        FrameCounter::plain()
    }
}

fuzz_target!(|data: &[u8]| {
    let (&mode, rest) = match data.split_first() {
        Some(x) => x,
        None => return,
    };
    let (&k, rest) = match rest.split_first() {
        Some(x) => x,
        None => return,
    };
    let k = usize::from(k % 32);
    if rest.len() < 2 * k {
        return;
    }
    let (cut_bytes, stream) = rest.split_at(2 * k);
    let mut cuts: Vec<usize> = cut_bytes
        .chunks(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (stream.len() + 1))
        .collect();
    cuts.push(stream.len());
    cuts.sort_unstable();

    let grpc = mode & 1 == 0;
    let mut whole = new_counter(grpc);
    let n_whole = whole.feed(stream);
    assert_eq!(u64::from(n_whole), whole.messages());
    assert_eq!(whole.bytes(), stream.len() as u64);
    assert!(whole.message_bytes() <= whole.bytes());

    let mut chunked = new_counter(grpc);
    let mut completed = 0u64;
    let mut at = 0usize;
    for (i, &end) in cuts.iter().enumerate() {
        let chunk = &stream[at..end];
        at = end;
        let before = chunked.messages();
        if (mode >> 1) & 1 == 0 || i % 2 == 0 {
            // The glue: skip what is skippable, feed the rest in one call.
            let s = chunked.skippable().min(chunk.len() as u64) as usize;
            chunked.skip(s as u64);
            if s < chunk.len() {
                chunked.feed(&chunk[s..]);
            }
        } else {
            completed += u64::from(chunked.feed(chunk));
            continue;
        }
        completed += chunked.messages() - before;
    }
    assert_eq!(chunked.messages(), whole.messages());
    assert_eq!(completed, whole.messages());
    assert_eq!(chunked.bytes(), whole.bytes());
    assert_eq!(chunked.message_bytes(), whole.message_bytes());
    assert_eq!(chunked.is_corrupt(), whole.is_corrupt());
    assert_eq!(chunked.at_message_boundary(), whole.at_message_boundary());
    assert_eq!(chunked.skippable(), whole.skippable());

    // Over-skipping must never panic.
    chunked.skip(u64::from(mode) << 40);
    chunked.skip(u64::MAX);
});
