//! Waiting for outcomes, the one way txcoord does it (the CLI, the demo, the benchmark and
//! the coordinator's `execute` endpoint all wait through [`Outcomes`]): one task owns the
//! `<prefix>.events.*` subscription and hands each transaction's outcome to whoever waits
//! for it. A waiter registers before its request is published, so the outcome cannot slip
//! past; as a safety net (an outcome recorded before anyone waited, as for a resubmission,
//! or an event missed across a reconnect) a waiter that has heard nothing reads the log's
//! last record after a second, then at doubling intervals up to 30 s, at most 32 reads at a
//! time across all waiters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use tokio::sync::{Semaphore, oneshot};

use super::{ClientError, last_record_of};
use crate::proto::{Subjects, TransactionEvent};

/// An event's state, read without the rest of it.
#[derive(serde::Deserialize)]
struct StateOnly {
    state: crate::proto::TxnState,
}

type Waiters = HashMap<String, Vec<(u64, oneshot::Sender<TransactionEvent>)>>;

struct Shared {
    waiters: Mutex<Waiters>,
    next: AtomicU64,
    events: jetstream::stream::Stream,
    subjects: Subjects,
    /// Log reads of the safety net in flight at once.
    reads: Semaphore,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Hands out transactions' outcomes to the tasks waiting for them. Cheap to clone; the
/// subscription ends when the last clone is dropped.
#[derive(Clone)]
pub struct Outcomes {
    shared: Arc<Shared>,
}

impl Outcomes {
    /// Subscribes to every transaction's events under `subjects`' prefix; `events` is the
    /// events stream (the log), read by the safety net.
    pub async fn start(
        nc: &async_nats::Client,
        subjects: Subjects,
        events: jetstream::stream::Stream,
    ) -> Result<Outcomes, ClientError> {
        let all = format!("{}.events.*", subjects.prefix());
        let mut sub = nc
            .subscribe(all.clone())
            .await
            .map_err(|e| ClientError::Subscribe {
                subject: all,
                source: e,
            })?;
        let shared = Arc::new_cyclic(|weak: &std::sync::Weak<Shared>| {
            let weak = weak.clone();
            let task = tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    // Most events are not outcomes: read their state alone first (no
                    // steps, no strings kept), and the whole event only for an outcome.
                    let outcome = serde_json::from_slice::<StateOnly>(&msg.payload)
                        .is_ok_and(|head| head.state.is_outcome());
                    if !outcome {
                        continue;
                    }
                    let Ok(ev) = serde_json::from_slice::<TransactionEvent>(&msg.payload) else {
                        continue;
                    };
                    let Some(shared) = weak.upgrade() else { break };
                    shared.deliver(ev);
                }
            });
            Shared {
                waiters: Mutex::new(HashMap::new()),
                next: AtomicU64::new(0),
                events,
                subjects,
                reads: Semaphore::new(32),
                task,
            }
        });
        Ok(Outcomes { shared })
    }

    /// Starts waiting for `txn_id`'s outcome. Call it before publishing the request.
    pub fn watch(&self, txn_id: &str) -> Watch {
        let (tx, rx) = oneshot::channel();
        let n = self.shared.next.fetch_add(1, Ordering::Relaxed);
        self.shared
            .lock()
            .entry(txn_id.to_string())
            .or_default()
            .push((n, tx));
        Watch {
            shared: self.shared.clone(),
            txn_id: txn_id.to_string(),
            n,
            rx: Some(rx),
        }
    }

    /// How many waits are registered (for tests and metrics).
    pub fn waiting(&self) -> usize {
        self.shared.lock().values().map(Vec::len).sum()
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deliver(&self, ev: TransactionEvent) {
        let waiting = self.lock().remove(&ev.txn_id);
        for (_, tx) in waiting.into_iter().flatten() {
            let _ = tx.send(ev.clone());
        }
    }
}

/// One registered wait for one transaction's outcome.
pub struct Watch {
    shared: Arc<Shared>,
    txn_id: String,
    n: u64,
    rx: Option<oneshot::Receiver<TransactionEvent>>,
}

impl Watch {
    /// The transaction this waits for.
    pub fn txn_id(&self) -> &str {
        &self.txn_id
    }

    /// Waits up to `timeout` for the outcome (a terminal state, or `failed`).
    pub async fn outcome(mut self, timeout: Duration) -> Result<TransactionEvent, ClientError> {
        let Some(mut rx) = self.rx.take() else {
            return Err(self.timed_out(timeout));
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut every = Duration::from_secs(1);
        loop {
            let check = (tokio::time::Instant::now() + every).min(deadline);
            tokio::select! {
                got = &mut rx => {
                    return got.map_err(|_| self.timed_out(timeout));
                }
                _ = tokio::time::sleep_until(check) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(self.timed_out(timeout));
                    }
                    if let Some(ev) = self.look_up().await {
                        return Ok(ev);
                    }
                    every = (every * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// The outcome if the log already has it.
    async fn look_up(&self) -> Option<TransactionEvent> {
        let _permit = self.shared.reads.acquire().await.ok()?;
        last_record_of(&self.shared.events, &self.shared.subjects, &self.txn_id)
            .await
            .filter(|ev| ev.state.is_outcome())
    }

    fn timed_out(&self, waited: Duration) -> ClientError {
        ClientError::TimedOut {
            txn_id: self.txn_id.clone(),
            waited,
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut waiters = self.shared.lock();
        if let Some(list) = waiters.get_mut(&self.txn_id) {
            list.retain(|(n, _)| *n != self.n);
            if list.is_empty() {
                waiters.remove(&self.txn_id);
            }
        }
    }
}
