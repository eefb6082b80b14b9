//! Counting gRPC messages over the DATA chunks Envoy hands the filter.
//!
//! gRPC frames each message as a 5-byte prefix — 1 byte compressed-flag (0 or 1) and a `u32`
//! big-endian payload length — followed by the payload. Envoy delivers the bytes of one stream
//! direction in order, in chunks of any size: a message can span many 16 KB chunks, a chunk can
//! hold many messages, and a prefix can be split across chunks. [`FrameCounter`] is a small state
//! machine (no heap allocation) that keeps the partial prefix between chunks.
//!
//! Rules:
//! - A message completes when its last payload byte has been fed or skipped. A message whose
//!   length is 0 completes as soon as its prefix is read.
//! - A flag byte other than 0/1 marks the stream corrupt: from then on only bytes are counted,
//!   [`FrameCounter::skippable`] is unbounded and [`FrameCounter::at_message_boundary`] is false.
//! - [`FrameCounter::plain`] (non-gRPC HTTP/2) counts bytes only; everything is skippable.
//!
//! The glue counts each DATA frame with [`FrameCounter::count_chunk`]: at most two reads per
//! frame (the prefix at the message boundary, then the rest of the frame only if another
//! message starts in it), none for frames that are pure payload, so a payload is never copied
//! into the VM just to be skipped.

/// Length of the gRPC message prefix: flag byte + `u32` length.
pub const PREFIX_LEN: usize = 5;

/// Message and byte counter for one direction of one stream.
#[derive(Debug, Clone)]
pub struct FrameCounter {
    /// Count messages (gRPC) or bytes only (plain HTTP/2).
    grpc: bool,
    /// A bad flag byte was seen (or bytes were skipped blind): framing is lost.
    corrupt: bool,
    /// Prefix bytes gathered so far for the next message (`0..PREFIX_LEN`).
    prefix: [u8; PREFIX_LEN],
    prefix_len: u8,
    /// Payload bytes still due for the current message; 0 when reading a prefix.
    payload_remaining: u32,
    /// Payload length of the current message (for `message_bytes`).
    payload_len: u32,
    messages: u64,
    bytes: u64,
    message_bytes: u64,
}

impl FrameCounter {
    /// Counts gRPC messages and bytes.
    pub fn grpc() -> Self {
        Self::new(true)
    }

    /// Non-gRPC HTTP/2: counts bytes only, `messages()` stays 0.
    pub fn plain() -> Self {
        Self::new(false)
    }

    fn new(grpc: bool) -> Self {
        FrameCounter {
            grpc,
            corrupt: false,
            prefix: [0; PREFIX_LEN],
            prefix_len: 0,
            payload_remaining: 0,
            payload_len: 0,
            messages: 0,
            bytes: 0,
            message_bytes: 0,
        }
    }

    /// True while message framing is tracked (gRPC mode, not corrupt).
    fn framing(&self) -> bool {
        self.grpc && !self.corrupt
    }

    /// Bytes that can be skipped without looking at them: the rest of the current message's
    /// payload; `u64::MAX` in plain or corrupt mode (nothing there needs reading).
    pub fn skippable(&self) -> u64 {
        if self.framing() {
            u64::from(self.payload_remaining)
        } else {
            u64::MAX
        }
    }

    /// Counts one chunk of `len` bytes, reading through `read(start, len)` (the chunk's bytes
    /// `start..start + len`; `None`: the host has none) only what must be read: payload is
    /// skipped; at a prefix, the missing prefix bytes (≤ 5) are read; if after that message
    /// another one starts in the chunk, the rest of the chunk is read in one call. So at most
    /// two reads. Returns the number of reads, or the first read error (what was counted before
    /// stays counted; bytes not read are not counted).
    pub fn count_chunk<B: AsRef<[u8]>, E>(
        &mut self,
        len: usize,
        mut read: impl FnMut(usize, usize) -> Result<Option<B>, E>,
    ) -> Result<u32, E> {
        let mut at = 0usize;
        let mut reads = 0u32;
        loop {
            let left = len.saturating_sub(at);
            let skip = self.skippable().min(left as u64);
            self.skip(skip);
            // skip ≤ left, which is a usize.
            at = at.saturating_add(skip as usize);
            let left = len.saturating_sub(at);
            if left == 0 || reads >= 2 {
                return Ok(reads);
            }
            // Not all skippable: framing, at a prefix, so prefix_needed() ≥ 1.
            let want = if reads == 0 {
                self.prefix_needed().clamp(1, left)
            } else {
                left
            };
            reads += 1;
            let Some(bytes) = read(at, want)? else {
                return Ok(reads);
            };
            let bytes = bytes.as_ref();
            let bytes = bytes.get(..want).unwrap_or(bytes);
            if bytes.is_empty() {
                return Ok(reads);
            }
            self.feed(bytes);
            at = at.saturating_add(bytes.len());
        }
    }

    /// Bytes still missing of the prefix being read: `PREFIX_LEN` minus those gathered when the
    /// next byte belongs to a prefix, else 0 (inside a payload, or not framing).
    pub fn prefix_needed(&self) -> usize {
        if self.framing() && self.payload_remaining == 0 {
            PREFIX_LEN.saturating_sub(usize::from(self.prefix_len))
        } else {
            0
        }
    }

    /// Accounts `n` bytes the caller chose not to read. `n` should be `<= skippable()`; any
    /// excess is unknown bytes, so the framing is lost and the counter turns corrupt.
    pub fn skip(&mut self, n: u64) {
        self.bytes = self.bytes.saturating_add(n);
        if !self.framing() {
            return;
        }
        let remaining = u64::from(self.payload_remaining);
        if n <= remaining {
            // n fits in u32 because it is at most payload_remaining.
            self.payload_remaining = self.payload_remaining.saturating_sub(n as u32);
            if n > 0 && self.payload_remaining == 0 {
                self.complete_message();
            }
        } else {
            if remaining > 0 {
                self.payload_remaining = 0;
                self.complete_message();
            }
            self.corrupt = true;
        }
    }

    /// Feeds the next bytes of the stream; returns how many messages completed in this call.
    pub fn feed(&mut self, chunk: &[u8]) -> u32 {
        self.bytes = self.bytes.saturating_add(chunk.len() as u64);
        let mut completed: u32 = 0;
        let mut rest = chunk;
        while self.framing() && !rest.is_empty() {
            if self.payload_remaining > 0 {
                let take = rest.len().min(self.payload_remaining as usize);
                rest = rest.get(take..).unwrap_or_default();
                // take <= payload_remaining, so it fits in u32.
                self.payload_remaining = self.payload_remaining.saturating_sub(take as u32);
                if self.payload_remaining == 0 {
                    self.complete_message();
                    completed = completed.saturating_add(1);
                }
                continue;
            }
            // Reading a prefix.
            let Some((&byte, tail)) = rest.split_first() else {
                break;
            };
            rest = tail;
            if self.prefix_len == 0 && byte > 1 {
                self.corrupt = true;
                break;
            }
            if let Some(slot) = self.prefix.get_mut(usize::from(self.prefix_len)) {
                *slot = byte;
            }
            self.prefix_len = self.prefix_len.saturating_add(1);
            if usize::from(self.prefix_len) == PREFIX_LEN {
                self.prefix_len = 0;
                let [_, a, b, c, d] = self.prefix;
                let len = u32::from_be_bytes([a, b, c, d]);
                self.payload_len = len;
                self.payload_remaining = len;
                if len == 0 {
                    self.complete_message();
                    completed = completed.saturating_add(1);
                }
            }
        }
        completed
    }

    fn complete_message(&mut self) {
        self.messages = self.messages.saturating_add(1);
        self.message_bytes = self
            .message_bytes
            .saturating_add(u64::from(self.payload_len));
        self.payload_len = 0;
    }

    /// Complete messages so far (0 in plain mode).
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// All bytes seen: fed + skipped.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Payload bytes of completed messages (prefixes excluded).
    pub fn message_bytes(&self) -> u64 {
        self.message_bytes
    }

    /// True when no partial prefix or payload is pending. False in corrupt mode (framing lost);
    /// always true in plain mode.
    pub fn at_message_boundary(&self) -> bool {
        if !self.grpc {
            return true;
        }
        !self.corrupt && self.prefix_len == 0 && self.payload_remaining == 0
    }

    /// A flag byte other than 0/1 was seen, or more bytes were skipped than `skippable()`:
    /// from then on only bytes are counted.
    pub fn is_corrupt(&self) -> bool {
        self.corrupt
    }

    /// True in gRPC mode (messages are counted), false for [`FrameCounter::plain`].
    pub fn is_grpc(&self) -> bool {
        self.grpc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn frame(payload: &[u8], compressed: bool) -> Vec<u8> {
        let mut out = vec![u8::from(compressed)];
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Counts one chunk the way the glue does ([`FrameCounter::count_chunk`]), checking that it
    /// reads at most twice and never more than the chunk.
    fn glue_feed(c: &mut FrameCounter, chunk: &[u8]) -> u64 {
        let before = c.messages();
        let reads = c
            .count_chunk(chunk.len(), |start, len| {
                assert!(start + len <= chunk.len());
                Ok::<_, ()>(chunk.get(start..start + len))
            })
            .unwrap();
        assert!(reads <= 2, "{reads} reads");
        c.messages() - before
    }

    #[test]
    fn count_chunk_reads_prefixes_not_payload() {
        let mut c = FrameCounter::grpc();
        let one = frame(&[9u8; 64], false);
        let mut asked = Vec::new();
        let mut read = |chunk: &[u8], start: usize, len: usize| {
            asked.push((start, len));
            Ok::<_, ()>(Some(chunk[start..start + len].to_vec()))
        };
        // One message per chunk: only its prefix is read.
        assert_eq!(c.count_chunk(one.len(), |s, l| read(&one, s, l)), Ok(1));
        assert_eq!((c.messages(), c.bytes()), (1, one.len() as u64));
        // Two messages: the prefix, then the rest of the chunk.
        let two = [frame(&[1u8; 100], false), frame(b"ab", false)].concat();
        assert_eq!(c.count_chunk(two.len(), |s, l| read(&two, s, l)), Ok(2));
        assert_eq!(c.messages(), 3);
        assert_eq!(asked, vec![(0, 5), (0, 5), (105, 7)]);
        // A read error: reported, the bytes before it stay counted.
        let mut d = FrameCounter::grpc();
        assert_eq!(
            d.count_chunk(10, |_, _| Err::<Option<Vec<u8>>, _>("x")),
            Err("x")
        );
        assert_eq!(d.bytes(), 0);
        // No body: nothing counted, no error.
        assert_eq!(
            d.count_chunk(10, |_, _| Ok::<Option<Vec<u8>>, ()>(None)),
            Ok(1)
        );
        assert_eq!(d.bytes(), 0);
        // Plain mode never reads.
        let mut p = FrameCounter::plain();
        assert_eq!(
            p.count_chunk(10, |_, _| -> Result<Option<Vec<u8>>, ()> { panic!("read") }),
            Ok(0)
        );
        assert_eq!(p.bytes(), 10);
    }

    #[test]
    fn one_message_in_one_chunk() {
        let mut c = FrameCounter::grpc();
        let bytes = frame(b"hello", false);
        assert_eq!(c.feed(&bytes), 1);
        assert_eq!(c.messages(), 1);
        assert_eq!(c.bytes(), 10);
        assert_eq!(c.message_bytes(), 5);
        assert!(c.at_message_boundary());
        assert!(!c.is_corrupt());
    }

    #[test]
    fn prefix_split_at_every_position() {
        let bytes = frame(&[7u8; 300], true);
        for cut in 0..=bytes.len() {
            let mut c = FrameCounter::grpc();
            let first = c.feed(&bytes[..cut]);
            if cut < bytes.len() {
                assert_eq!(first, 0, "cut {cut}");
                assert!(!c.at_message_boundary() || cut == 0, "cut {cut}");
            }
            let second = c.feed(&bytes[cut..]);
            assert_eq!(first + second, 1, "cut {cut}");
            assert_eq!(c.messages(), 1);
            assert_eq!(c.message_bytes(), 300);
            assert!(c.at_message_boundary());
        }
    }

    #[test]
    fn prefix_fed_byte_by_byte() {
        let bytes = frame(&[1, 2, 3], false);
        let mut c = FrameCounter::grpc();
        let mut total = 0;
        for b in &bytes {
            total += c.feed(std::slice::from_ref(b));
        }
        assert_eq!(total, 1);
        assert_eq!(c.bytes(), 8);
    }

    #[test]
    fn many_messages_per_chunk() {
        let mut buf = Vec::new();
        for i in 0..50u8 {
            buf.extend(frame(&vec![i; usize::from(i)], i % 2 == 0));
        }
        let mut c = FrameCounter::grpc();
        assert_eq!(c.feed(&buf), 50);
        assert_eq!(c.messages(), 50);
        assert_eq!(c.message_bytes(), (0..50u64).sum::<u64>());
        assert_eq!(c.bytes(), buf.len() as u64);
        assert!(c.at_message_boundary());
    }

    #[test]
    fn large_message_over_16k_chunks_with_skip() {
        let payload = vec![0xAB; 100 * 1024];
        let bytes = frame(&payload, false);
        let mut c = FrameCounter::grpc();
        let mut fed = 0usize;
        let mut host_calls = 0;
        for chunk in bytes.chunks(16 * 1024) {
            let s = c.skippable().min(chunk.len() as u64) as usize;
            c.skip(s as u64);
            if s < chunk.len() {
                host_calls += 1;
                fed += chunk.len() - s;
                c.feed(&chunk[s..]);
            }
        }
        assert_eq!(c.messages(), 1);
        assert_eq!(c.message_bytes(), payload.len() as u64);
        assert_eq!(c.bytes(), bytes.len() as u64);
        assert!(c.at_message_boundary());
        // Only the first chunk (holding the prefix) needs reading.
        assert_eq!(host_calls, 1);
        assert_eq!(fed, 16 * 1024);
    }

    #[test]
    fn prefix_needed_counts_the_missing_prefix_bytes() {
        let mut c = FrameCounter::grpc();
        assert_eq!(c.prefix_needed(), PREFIX_LEN);
        c.feed(&[0, 0]);
        assert_eq!(c.prefix_needed(), 3);
        c.feed(&[0, 0, 4]);
        assert_eq!(c.prefix_needed(), 0, "inside the payload");
        c.skip(4);
        assert_eq!(c.prefix_needed(), PREFIX_LEN);
        c.feed(&[9]);
        assert!(c.is_corrupt());
        assert_eq!(c.prefix_needed(), 0);
        assert_eq!(FrameCounter::plain().prefix_needed(), 0);
    }

    #[test]
    fn skip_to_end_of_payload_completes_message() {
        let mut c = FrameCounter::grpc();
        assert_eq!(c.feed(&[0, 0, 0, 0, 10]), 0);
        assert_eq!(c.skippable(), 10);
        c.skip(4);
        assert_eq!(c.messages(), 0);
        assert_eq!(c.skippable(), 6);
        c.skip(6);
        assert_eq!(c.messages(), 1);
        assert_eq!(c.skippable(), 0);
        assert!(c.at_message_boundary());
        c.skip(0);
        assert_eq!(c.messages(), 1);
        assert!(!c.is_corrupt());
    }

    #[test]
    fn zero_length_messages_complete_at_prefix() {
        let mut c = FrameCounter::grpc();
        assert_eq!(c.feed(&[0, 0, 0, 0]), 0);
        assert!(!c.at_message_boundary());
        assert_eq!(c.feed(&[0]), 1);
        assert!(c.at_message_boundary());
        assert_eq!(c.skippable(), 0);
        let three = [frame(&[], false), frame(&[], true), frame(&[], false)].concat();
        assert_eq!(c.feed(&three), 3);
        assert_eq!(c.messages(), 4);
        assert_eq!(c.message_bytes(), 0);
    }

    #[test]
    fn corrupt_flag_stops_message_counting() {
        let mut c = FrameCounter::grpc();
        let mut buf = frame(b"ok", false);
        buf.extend([2, 0, 0, 0, 1, 9]);
        buf.extend(frame(b"later", false));
        assert_eq!(c.feed(&buf), 1);
        assert!(c.is_corrupt());
        assert!(!c.at_message_boundary());
        assert_eq!(c.messages(), 1);
        assert_eq!(c.bytes(), buf.len() as u64);
        assert_eq!(c.skippable(), u64::MAX);
        assert_eq!(c.feed(&frame(b"more", false)), 0);
        c.skip(100);
        assert_eq!(c.messages(), 1);
        assert_eq!(c.bytes(), buf.len() as u64 + 9 + 100);
    }

    #[test]
    fn skipping_too_much_marks_corrupt() {
        let mut c = FrameCounter::grpc();
        c.feed(&[0, 0, 0, 0, 3]);
        c.skip(10);
        assert!(c.is_corrupt());
        assert_eq!(c.messages(), 1, "the pending payload was covered");
        assert_eq!(c.bytes(), 15);

        let mut d = FrameCounter::grpc();
        d.feed(&[0, 0]);
        d.skip(1);
        assert!(d.is_corrupt());
        assert_eq!(d.messages(), 0);
    }

    #[test]
    fn plain_mode_counts_bytes_only() {
        let mut c = FrameCounter::plain();
        assert!(!c.is_grpc());
        let bytes = frame(b"not counted as a message", false);
        assert_eq!(c.skippable(), u64::MAX);
        assert_eq!(c.feed(&bytes), 0);
        c.skip(1000);
        assert_eq!(c.messages(), 0);
        assert_eq!(c.bytes(), bytes.len() as u64 + 1000);
        assert!(c.at_message_boundary());
        assert!(!c.is_corrupt());
        assert_eq!(glue_feed(&mut c, &bytes), 0);
    }

    /// Random message sequences, random chunkings, random mixes of skip/feed.
    #[test]
    fn property_random_streams_count_exactly() {
        let mut rng = Rng::new(0x5EED_F4A3);
        for round in 0..200 {
            let count = rng.below(40);
            let mut stream = Vec::new();
            let mut payload_total = 0u64;
            for _ in 0..count {
                let len = match rng.below(6) {
                    0 => 0,
                    1 => 1 + rng.below(4),
                    2 => 5 + rng.below(60),
                    3 => rng.below(2000),
                    4 => 16 * 1024 - 3 + rng.below(7),
                    _ => rng.below(70_000),
                };
                payload_total += len as u64;
                // Payload bytes are random: they must never be read as prefixes.
                let payload: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
                stream.extend(frame(&payload, rng.below(2) == 1));
            }
            let mut c = FrameCounter::grpc();
            let mut counted = 0u64;
            let mut pos = 0usize;
            while pos < stream.len() {
                let max = match rng.below(3) {
                    0 => 1 + rng.below(8),
                    1 => 1 + rng.below(2000),
                    _ => 16 * 1024,
                };
                let end = (pos + max).min(stream.len());
                let chunk = &stream[pos..end];
                pos = end;
                match rng.below(3) {
                    // The glue pattern.
                    0 => counted += glue_feed(&mut c, chunk),
                    // Feed everything.
                    1 => counted += u64::from(c.feed(chunk)),
                    // A random mix of partial skips and feeds.
                    _ => {
                        let before = c.messages();
                        let mut at = 0usize;
                        while at < chunk.len() {
                            let left = chunk.len() - at;
                            let s = c.skippable().min(left as u64) as usize;
                            let s = if s > 0 { rng.below(s + 1) } else { 0 };
                            c.skip(s as u64);
                            at += s;
                            let f = rng.below(chunk.len() - at + 1);
                            c.feed(&chunk[at..at + f]);
                            at += f;
                        }
                        counted += c.messages() - before;
                    }
                }
                assert!(!c.is_corrupt(), "round {round}");
            }
            assert_eq!(c.messages(), count as u64, "round {round}");
            assert_eq!(counted, count as u64, "round {round}");
            assert_eq!(c.bytes(), stream.len() as u64, "round {round}");
            assert_eq!(c.message_bytes(), payload_total, "round {round}");
            assert!(c.at_message_boundary(), "round {round}");
        }
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut rng = Rng::new(99);
        for _ in 0..300 {
            let mut c = if rng.below(4) == 0 {
                FrameCounter::plain()
            } else {
                FrameCounter::grpc()
            };
            let mut total = 0u64;
            for _ in 0..rng.below(30) {
                if rng.below(3) == 0 {
                    let n = match rng.below(3) {
                        0 => rng.next_u64(),
                        1 => u64::MAX,
                        _ => rng.below(100) as u64,
                    };
                    c.skip(n);
                    total = total.saturating_add(n);
                } else {
                    let len = rng.below(300);
                    let garbage: Vec<u8> = (0..len)
                        .map(|_| {
                            if rng.below(2) == 0 {
                                0
                            } else {
                                rng.next_u64() as u8
                            }
                        })
                        .collect();
                    c.feed(&garbage);
                    total = total.saturating_add(len as u64);
                }
                assert_eq!(c.bytes(), total);
                assert!(c.message_bytes() <= c.bytes());
                let _ = c.skippable();
                let _ = c.at_message_boundary();
            }
        }
    }
}
