//! Per-stream loss accounting for the device simulator.
//!
//! A reading is *generated* on the open-loop schedule, then *sent* (handed to the gRPC
//! stream) on some attempt. On that attempt it ends exactly one way: *acked*, *failed* (the
//! attempt ended in an error before its ack) or *unacked* (the stream ended cleanly, or the
//! drain timed out, without its ack). Failed readings are queued for a resend on the next
//! attempt; a resend is counted in both `sent` and `resent`. Invariants:
//!
//! - `sent == acked + failed + unacked + in_flight`
//! - `failed == resent + lost` (lost = failed and never resent)
//! - `generated == (sent - resent) + unsent` (unsent = generated, never sent)

use std::collections::VecDeque;

/// One reading as the ledger tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    /// Intended send time, nanoseconds since the run's start.
    pub due_nanos: u64,
}

/// Counters of one stream (see the module doc for their relations).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub generated: u64,
    pub sent: u64,
    pub acked: u64,
    pub failed: u64,
    pub resent: u64,
    pub unacked: u64,
    pub lost: u64,
    pub unsent: u64,
}

#[derive(Debug, Default)]
pub struct Ledger {
    next_seq: u64,
    /// Generated, never sent.
    pending: VecDeque<Entry>,
    /// Failed on an earlier attempt, waiting for a resend.
    retry: VecDeque<Entry>,
    /// Sent on the current attempt, not yet acked.
    in_flight: VecDeque<Entry>,
    counts: Counts,
}

/// What a `take_to_send` entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outgoing {
    pub entry: Entry,
    pub resend: bool,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn counts(&self) -> Counts {
        self.counts
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// A new reading is due; it waits in `pending` until sent.
    pub fn generate(&mut self, due_nanos: u64) -> Entry {
        let entry = Entry {
            seq: self.next_seq,
            due_nanos,
        };
        self.next_seq += 1;
        self.counts.generated += 1;
        self.pending.push_back(entry);
        entry
    }

    /// Everything that should go out now, resends first (oldest first), all marked sent.
    pub fn take_to_send(&mut self) -> Vec<Outgoing> {
        let mut out = Vec::with_capacity(self.retry.len() + self.pending.len());
        for entry in self.retry.drain(..) {
            self.counts.sent += 1;
            self.counts.resent += 1;
            self.in_flight.push_back(entry);
            out.push(Outgoing {
                entry,
                resend: true,
            });
        }
        for entry in self.pending.drain(..) {
            self.counts.sent += 1;
            self.in_flight.push_back(entry);
            out.push(Outgoing {
                entry,
                resend: false,
            });
        }
        out
    }

    /// An ack for `seq` on the current attempt; returns its entry, or None for an ack of
    /// nothing in flight (duplicate or unknown: not counted).
    pub fn ack(&mut self, seq: u64) -> Option<Entry> {
        // Acks come in order, so the match is almost always at the front.
        let position = self.in_flight.iter().position(|e| e.seq == seq)?;
        let entry = self.in_flight.remove(position)?;
        self.counts.acked += 1;
        Some(entry)
    }

    /// A client-streaming attempt ended cleanly and the server says it got `received`:
    /// the oldest `received` in-flight readings count as acked, the rest as unacked.
    pub fn ack_upload(&mut self, received: u64) {
        let acked = (received as usize).min(self.in_flight.len());
        self.in_flight.drain(..acked);
        self.counts.acked += acked as u64;
        self.end_clean();
    }

    /// The attempt ended in an error: every in-flight reading failed and waits for a resend.
    pub fn attempt_failed(&mut self) -> u64 {
        let failed = self.in_flight.len() as u64;
        self.counts.failed += failed;
        self.retry.extend(self.in_flight.drain(..));
        // Keep resends in seq order when an earlier failure's resends failed again.
        self.retry.make_contiguous().sort_by_key(|e| e.seq);
        failed
    }

    /// The attempt ended without error (or the drain timed out): in-flight ones are unacked.
    pub fn end_clean(&mut self) {
        self.counts.unacked += self.in_flight.len() as u64;
        self.in_flight.clear();
    }

    /// Final counts: queued resends become `lost`, never-sent readings `unsent`.
    pub fn finish(mut self) -> Counts {
        self.end_clean();
        self.counts.lost = self.retry.len() as u64;
        self.counts.unsent = self.pending.len() as u64;
        self.counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn check_invariants(c: &Counts, in_flight: u64) {
        assert_eq!(c.sent, c.acked + c.failed + c.unacked + in_flight, "{c:?}");
    }

    #[test]
    fn failed_readings_are_resent_first_and_accounted_once_each() {
        let mut ledger = Ledger::new();
        for t in 0..5 {
            ledger.generate(t);
        }
        let first: Vec<u64> = ledger.take_to_send().iter().map(|o| o.entry.seq).collect();
        assert_eq!(first, vec![0, 1, 2, 3, 4]);
        assert!(ledger.ack(0).is_some());
        assert!(ledger.ack(1).is_some());
        assert!(ledger.ack(1).is_none(), "duplicate ack counted");
        assert_eq!(ledger.attempt_failed(), 3);
        ledger.generate(5);
        let second = ledger.take_to_send();
        let order: Vec<(u64, bool)> = second.iter().map(|o| (o.entry.seq, o.resend)).collect();
        assert_eq!(order, vec![(2, true), (3, true), (4, true), (5, false)]);
        for seq in 2..=5 {
            assert!(ledger.ack(seq).is_some());
        }
        let c = ledger.finish();
        assert_eq!(
            (c.generated, c.sent, c.acked, c.failed, c.resent),
            (6, 9, 6, 3, 3)
        );
        assert_eq!((c.unacked, c.lost, c.unsent), (0, 0, 0));
        check_invariants(&c, 0);
    }

    #[test]
    fn upload_summary_acks_the_oldest_and_leaves_the_rest_unacked() {
        let mut ledger = Ledger::new();
        for t in 0..4 {
            ledger.generate(t);
        }
        ledger.take_to_send();
        ledger.ack_upload(3);
        ledger.generate(9);
        let c = ledger.finish();
        assert_eq!((c.sent, c.acked, c.unacked, c.unsent), (4, 3, 1, 1));
    }

    /// Random interleavings of generate/send/ack/fail keep every invariant of the module doc.
    #[test]
    fn random_histories_keep_the_invariants() {
        let mut rng = SplitMix64::new(42);
        for _ in 0..200 {
            let mut ledger = Ledger::new();
            for step in 0..200 {
                match rng.below(10) {
                    0..=3 => {
                        ledger.generate(step);
                    }
                    4..=5 => {
                        ledger.take_to_send();
                    }
                    6..=8 => {
                        if let Some(front) = ledger.in_flight.front().copied() {
                            assert_eq!(ledger.ack(front.seq), Some(front));
                        }
                    }
                    _ => {
                        ledger.attempt_failed();
                    }
                }
                check_invariants(&ledger.counts(), ledger.in_flight() as u64);
            }
            let c = ledger.finish();
            check_invariants(&c, 0);
            assert_eq!(c.failed, c.resent + c.lost, "{c:?}");
            assert_eq!(c.generated, c.sent - c.resent + c.unsent, "{c:?}");
        }
    }
}
