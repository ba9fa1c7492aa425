//! A built-in participant whose behaviour each step's payload scripts (`txcoord participant`):
//! used by the integration tests, the benchmark's no-op participants, and anyone poking at a
//! running coordinator by hand.
//!
//! Payload fields, all optional:
//! - 2PC: `vote` (`ready`, the default, `read_only` or `abort`), `reason` (the abort text),
//!   `reason_repeat` (the reason that many times over: a huge reason, for tests of bounded
//!   records), `delay_ms` (sleep before voting), `locks` (names to hold exclusively in the
//!   SDK's lock table from prepare to commit or abort), `commit_fail_times` (the first N
//!   commits fail, and are retried).
//! - Sagas: `execute` (`done`, the default; `fail`; `fail_retryable`; `flaky`, which fails
//!   retryably `fail_times` times and then succeeds), `reason`, `delay_ms` (sleep before
//!   executing), `compensate_fail_times` (the first N compensations fail),
//!   `compensate: "never"` (every compensation fails).
//!
//! It prints `VOTED`, `COMMITTED`, `EXECUTED` and `COMPENSATED` lines on standard error, which the
//! integration tests read, unless it is told to be quiet (the benchmark's no-op participants:
//! a line per command is a write system call per command).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

use crate::participant::{Participant, ServiceError, StepResult, TxnContext, Vote};

/// The scripted participant.
#[derive(Debug, Default)]
pub struct Scripted {
    /// Extra delay before every vote or execute, on top of the payload's `delay_ms`.
    pub prepare_delay: Duration,
    /// Print no `VOTED`/`COMMITTED`/`EXECUTED`/`COMPENSATED` lines (see [`Scripted::quiet`]).
    quiet: bool,
    /// Failures so far per branch and kind, for `flaky` and `compensate_fail_times`.
    failures: Mutex<HashMap<String, u64>>,
}

impl Scripted {
    /// A scripted participant that delays every vote or execute by `delay`.
    pub fn new(delay: Duration) -> Self {
        Scripted {
            prepare_delay: delay,
            quiet: false,
            failures: Mutex::default(),
        }
    }

    /// The same participant, printing no lines.
    pub fn quiet(self) -> Self {
        Scripted {
            quiet: true,
            ..self
        }
    }

    async fn delay(&self, payload: &Value) {
        let delay = payload.get("delay_ms").and_then(Value::as_u64).unwrap_or(0);
        let total = self.prepare_delay + Duration::from_millis(delay);
        if !total.is_zero() {
            tokio::time::sleep(total).await;
        }
    }

    /// Counts one more failure of `what` for this branch; true while under `limit`.
    fn fail_again(&self, txn: &TxnContext, what: &str, limit: u64) -> bool {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = f
            .entry(format!("{}.{}.{what}", txn.txn_id, txn.step))
            .or_insert(0);
        if *n < limit {
            *n += 1;
            true
        } else {
            false
        }
    }
}

impl Participant for Scripted {
    fn locks(
        &self,
        _txn: &TxnContext,
        _action: &str,
        payload: &Value,
    ) -> Vec<crate::participant::HeldLock> {
        payload
            .get("locks")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|name| crate::participant::HeldLock {
                resource: name.to_string(),
                mode: crate::participant::LockMode::Exclusive,
            })
            .collect()
    }

    async fn prepare(&self, txn: &TxnContext, _action: &str, payload: &Value) -> Vote {
        self.delay(payload).await;
        let vote = match payload.get("vote").and_then(Value::as_str) {
            Some("read_only") => Vote::ReadOnly,
            Some("abort") => {
                let reason = payload
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("scripted abort");
                let times = payload
                    .get("reason_repeat")
                    .and_then(Value::as_u64)
                    .unwrap_or(1)
                    .clamp(1, 64 << 20) as usize;
                Vote::Abort(reason.repeat(times))
            }
            _ => Vote::Ready,
        };
        if !self.quiet {
            let mut shown = format!("{vote:?}");
            if shown.len() > 200 {
                let mut end = 200;
                while !shown.is_char_boundary(end) {
                    end -= 1;
                }
                shown = format!("{}... ({} bytes)", &shown[..end], shown.len());
            }
            eprintln!("VOTED {shown} txn_id={} step={}", txn.txn_id, txn.step);
        }
        vote
    }

    async fn commit(&self, txn: &TxnContext) -> Result<(), ServiceError> {
        let times = txn
            .payload
            .get("commit_fail_times")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if self.fail_again(txn, "commit", times) {
            eprintln!("COMMIT FAILED txn_id={} step={}", txn.txn_id, txn.step);
            return Err(ServiceError("scripted commit failure".into()));
        }
        if !self.quiet {
            eprintln!("COMMITTED txn_id={} step={}", txn.txn_id, txn.step);
        }
        Ok(())
    }

    async fn abort(&self, txn: &TxnContext) -> Result<(), ServiceError> {
        tracing::debug!(txn_id = %txn.txn_id, "abort");
        Ok(())
    }

    async fn execute(&self, txn: &TxnContext, _action: &str, payload: &Value) -> StepResult {
        self.delay(payload).await;
        let reason = payload
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("scripted failure")
            .to_string();
        let result = match payload.get("execute").and_then(Value::as_str) {
            Some("fail") => StepResult::Failed {
                reason,
                retryable: false,
            },
            Some("fail_retryable") => StepResult::Failed {
                reason,
                retryable: true,
            },
            Some("flaky") => {
                let times = payload
                    .get("fail_times")
                    .and_then(Value::as_u64)
                    .unwrap_or(1);
                if self.fail_again(txn, "execute", times) {
                    StepResult::Failed {
                        reason,
                        retryable: true,
                    }
                } else {
                    StepResult::Done
                }
            }
            _ => StepResult::Done,
        };
        if !self.quiet {
            eprintln!(
                "EXECUTED {result:?} txn_id={} step={}",
                txn.txn_id, txn.step
            );
        }
        result
    }

    async fn compensate(&self, txn: &TxnContext) -> Result<(), ServiceError> {
        let p = &txn.payload;
        let never = p.get("compensate").and_then(Value::as_str) == Some("never");
        let times = p
            .get("compensate_fail_times")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if never || self.fail_again(txn, "compensate", times) {
            eprintln!(
                "COMPENSATION FAILED txn_id={} step={}",
                txn.txn_id, txn.step
            );
            return Err(ServiceError("scripted compensation failure".into()));
        }
        if !self.quiet {
            eprintln!("COMPENSATED txn_id={} step={}", txn.txn_id, txn.step);
        }
        Ok(())
    }
}
