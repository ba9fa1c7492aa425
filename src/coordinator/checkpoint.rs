//! The recovery checkpoint: a stream sequence of the events log below which every
//! transaction is finished, so that a restart reads the log from there instead of from the
//! beginning of time.
//!
//! The coordinator tracks the sequence of the `accepted` record of every transaction it
//! runs, and counts `accepted` writes still waiting for their acknowledgement. Every
//! `checkpoint_interval_ms` it computes the low watermark: the smallest tracked sequence,
//! or, with nothing in flight and no write pending, the log's next sequence. All records of
//! a transaction come after its `accepted` record, and a finished transaction gets no new
//! records, so every record of every unfinished transaction is at or above the watermark.
//! It is stored in the KV bucket `txcoord_state_<prefix>` (one write per interval, only
//! when it moved).
//!
//! The watermark is computed only while the lease is held: then no other coordinator can
//! have written records this one does not track, so the value is right at that moment, and
//! stays right (sequences only grow), even if the write lands late.
//!
//! A transaction whose task stopped without finishing (its log write failed for good) stays
//! tracked, and so does the start of a recovery that could not resume something: the
//! watermark never passes what a later restart must still see.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;

/// The key, in the prefix's state bucket.
const KEY: &str = "recovery_from";

/// The state bucket's name for a subject prefix.
pub fn bucket_name(prefix: &str) -> String {
    format!("txcoord_state_{}", prefix.replace('.', "_"))
}

#[derive(Debug, Default)]
struct Inner {
    /// `accepted` sequences of running (or stopped but unfinished) transactions, counted.
    seqs: BTreeMap<u64, usize>,
    /// `accepted` writes sent and not yet acknowledged.
    accepting: usize,
}

/// What the coordinator has in flight, as sequences of the events log.
#[derive(Debug, Default)]
pub struct InFlight {
    inner: Mutex<Inner>,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means a task panicked mid-update of two integers.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An `accepted` write is about to be sent.
    pub fn accepting(&self) {
        self.lock().accepting += 1;
    }

    /// The `accepted` write is answered: `Some(seq)` if it started a transaction of ours.
    pub fn accepted(&self, seq: Option<u64>) {
        let mut g = self.lock();
        g.accepting = g.accepting.saturating_sub(1);
        if let Some(seq) = seq {
            *g.seqs.entry(seq).or_insert(0) += 1;
        }
    }

    /// Tracks a transaction resumed from the log, or pins the watermark at `seq` for good.
    pub fn track(&self, seq: u64) {
        *self.lock().seqs.entry(seq).or_insert(0) += 1;
    }

    /// The transaction whose `accepted` record is at `seq` has finished.
    pub fn finished(&self, seq: u64) {
        let mut g = self.lock();
        if let Some(n) = g.seqs.get_mut(&seq) {
            *n -= 1;
            if *n == 0 {
                g.seqs.remove(&seq);
            }
        }
    }

    /// The low watermark given the log's next sequence `next`, read *before* this call.
    /// `None` while an `accepted` write is unanswered: its sequence is not known yet.
    pub fn watermark(&self, next: u64) -> Option<u64> {
        let g = self.lock();
        if g.accepting > 0 {
            return None;
        }
        Some(g.seqs.keys().next().copied().unwrap_or(next))
    }
}

/// The state bucket (created if missing).
pub async fn open(js: &jetstream::Context, prefix: &str, replicas: usize) -> Option<kv::Store> {
    let bucket = bucket_name(prefix);
    match crate::nats::key_value(js, &bucket, replicas, Duration::ZERO).await {
        Ok(store) => Some(store),
        Err(e) => {
            tracing::warn!(%bucket, error = %e, "no recovery checkpoint bucket; restarts read the whole log");
            None
        }
    }
}

/// The stored checkpoint, if any.
pub async fn read(store: &kv::Store) -> Option<u64> {
    let value = store.get(KEY).await.ok()??;
    std::str::from_utf8(&value).ok()?.parse().ok()
}

/// Writes the watermark every `interval` when it has moved, forever.
pub async fn run(
    store: kv::Store,
    events: jetstream::stream::Stream,
    inflight: std::sync::Arc<InFlight>,
    lease: super::lease::LeaseHandle,
    interval: Duration,
    mut last: u64,
) {
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        if !lease.is_held() {
            continue;
        }
        // Read the log's end first: anything accepted after this read has a larger sequence.
        let next = match events.get_info().await {
            Ok(info) => info.state.last_sequence + 1,
            Err(e) => {
                tracing::debug!(error = %e, "checkpoint skipped: cannot read the log's state");
                continue;
            }
        };
        let Some(w) = inflight.watermark(next) else {
            continue;
        };
        if !lease.is_held() {
            continue;
        }
        if w <= last {
            continue;
        }
        match store.put(KEY, Bytes::from(w.to_string())).await {
            Ok(_) => {
                tracing::debug!(from = w, "recovery checkpoint moved");
                last = w;
            }
            Err(e) => tracing::debug!(error = %e, "checkpoint not written; next time"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::InFlight;

    #[test]
    fn the_watermark_is_the_oldest_unfinished_transaction() {
        let f = InFlight::default();
        assert_eq!(
            f.watermark(10),
            Some(10),
            "nothing in flight: the log's end"
        );
        f.accepting();
        assert_eq!(
            f.watermark(10),
            None,
            "an unanswered accepted write blocks it"
        );
        f.accepted(Some(12));
        f.accepting();
        f.accepted(Some(15));
        f.accepting();
        f.accepted(None); // a duplicate submission: nothing tracked
        assert_eq!(f.watermark(20), Some(12));
        f.finished(12);
        assert_eq!(f.watermark(20), Some(15));
        f.track(3); // a pin
        assert_eq!(f.watermark(20), Some(3));
        f.finished(15);
        assert_eq!(f.watermark(20), Some(3), "a pin holds for good");
    }

    #[test]
    fn two_transactions_at_one_sequence_are_counted() {
        let f = InFlight::default();
        f.track(5);
        f.track(5);
        f.finished(5);
        assert_eq!(f.watermark(9), Some(5));
        f.finished(5);
        assert_eq!(f.watermark(9), Some(9));
    }
}
