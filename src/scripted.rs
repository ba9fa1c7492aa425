//! A built-in participant whose behaviour each step's payload scripts (`txcoord participant`):
//! used by the integration tests, the benchmark's no-op participants, and anyone poking at a
//! running coordinator by hand.
//!
//! Payload fields, all optional: `vote` (`ready`, the default, `read_only` or `abort`),
//! `reason` (the abort text), `delay_ms` (sleep before voting).

use std::time::Duration;

use serde_json::Value;

use crate::participant::{Participant, ServiceError, TxnContext, Vote};

/// The scripted participant.
#[derive(Debug, Clone, Default)]
pub struct Scripted {
    /// Extra delay before every vote, on top of the payload's `delay_ms`.
    pub prepare_delay: Duration,
}

impl Participant for Scripted {
    async fn prepare(&self, txn: &TxnContext, _action: &str, payload: &Value) -> Vote {
        let delay = payload.get("delay_ms").and_then(Value::as_u64).unwrap_or(0);
        let total = self.prepare_delay + Duration::from_millis(delay);
        if !total.is_zero() {
            tokio::time::sleep(total).await;
        }
        let vote = match payload.get("vote").and_then(Value::as_str) {
            Some("read_only") => Vote::ReadOnly,
            Some("abort") => Vote::Abort(
                payload
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("scripted abort")
                    .to_string(),
            ),
            _ => Vote::Ready,
        };
        eprintln!("VOTED {vote:?} txn_id={} step={}", txn.txn_id, txn.step);
        vote
    }

    async fn commit(&self, txn: &TxnContext) -> Result<(), ServiceError> {
        tracing::debug!(txn_id = %txn.txn_id, "commit");
        Ok(())
    }

    async fn abort(&self, txn: &TxnContext) -> Result<(), ServiceError> {
        tracing::debug!(txn_id = %txn.txn_id, "abort");
        Ok(())
    }
}
