//! Waiting for outcomes, the one way a client of txcoord does it (the CLI, the demo and the
//! benchmark all wait through [`Outcomes`]): one task owns this client's inbox for notices
//! and hands each transaction's outcome (or decision) to whoever waits for it.
//!
//! A client's own submissions name that inbox ([`Outcomes::header_for`]): the coordinator
//! publishes the durable outcome there ([`crate::proto::OUTCOME_TO_HEADER`]), or the durable
//! decision for a wait that ends there ([`Until::Decided`],
//! [`crate::proto::DECIDED_TO_HEADER`]). So a client hears about its own transactions only,
//! not every transaction's every event: with many clients, the server would otherwise send
//! each record to each of them.
//!
//! Notices are core NATS, at most once, and only the coordinator that wrote the record sends
//! one (a successor that resumes the transaction from the log does not). So a wait that has
//! heard nothing after a second subscribes to the transaction's own events
//! (`<prefix>.events.<txn_id>`), then reads the log's last record, and reads it again at
//! doubling intervals up to 30 s, at most 32 reads at a time across all waiters. A wait for
//! a transaction this client did not submit with the header ([`Outcomes::watch`]) does the
//! same at once. An event seen on `<prefix>.events.<txn_id>` ends only a wait for an
//! outcome, never a wait for a decision short of one: a promise to commit is taken from the
//! coordinator's notice or from the log, not from a subject that anyone the server lets
//! publish there can write to.
//!
//! The registry of waits ([`WaitList`]) is shared with the coordinator, which answers
//! `<prefix>.api.execute` and the front door's waits from one, fed by its own durable
//! records instead of a subscription.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use tokio::sync::{Semaphore, oneshot};

use super::{ClientError, last_record_of};
use crate::proto::{Subjects, TransactionEvent, Until};

/// An event's state, read without the rest of it.
#[derive(serde::Deserialize)]
struct StateOnly {
    state: crate::proto::TxnState,
}

type Waiting = HashMap<String, Vec<(u64, Until, oneshot::Sender<TransactionEvent>)>>;

/// Tasks waiting for transactions' events, each until the kind of state it names: the
/// registry behind [`Outcomes`], and behind the coordinator's own waits for a decision it
/// wrote. A wait is a [`Registered`], which leaves the list when dropped.
#[derive(Default)]
pub(crate) struct WaitList {
    waiting: Mutex<Waiting>,
    next: AtomicU64,
    /// Registered waits, read without the lock by [`WaitList::is_empty`].
    count: AtomicUsize,
}

impl WaitList {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a wait for `txn_id` until `until`.
    pub(crate) fn register(self: &Arc<Self>, txn_id: &str, until: Until) -> Registered {
        let (tx, rx) = oneshot::channel();
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock()
            .entry(txn_id.to_string())
            .or_default()
            .push((n, until, tx));
        self.count.fetch_add(1, Ordering::Relaxed);
        Registered {
            list: self.clone(),
            txn_id: txn_id.to_string(),
            n,
            rx,
        }
    }

    /// Hands `ev` to every wait for its transaction that ends at its state (without taking
    /// the lock when nothing waits at all, as on a coordinator nobody asks).
    pub(crate) fn deliver(&self, ev: &TransactionEvent) {
        if self.is_empty() {
            return;
        }
        let mut done = Vec::new();
        {
            let mut waiting = self.lock();
            let Some(list) = waiting.get_mut(&ev.txn_id) else {
                return;
            };
            let mut i = 0;
            while i < list.len() {
                if list[i].1.reached(ev.state) {
                    done.push(list.swap_remove(i).2);
                } else {
                    i += 1;
                }
            }
            if list.is_empty() {
                waiting.remove(&ev.txn_id);
            }
        }
        self.count.fetch_sub(done.len(), Ordering::Relaxed);
        for tx in done {
            let _ = tx.send(ev.clone());
        }
    }

    /// Whether nothing waits (a check without the lock, for hot paths).
    pub(crate) fn is_empty(&self) -> bool {
        self.count.load(Ordering::Relaxed) == 0
    }

    fn remove(&self, txn_id: &str, n: u64) {
        let mut waiting = self.lock();
        if let Some(list) = waiting.get_mut(txn_id) {
            let before = list.len();
            list.retain(|(m, _, _)| *m != n);
            self.count.fetch_sub(before - list.len(), Ordering::Relaxed);
            if list.is_empty() {
                waiting.remove(txn_id);
            }
        }
    }
}

/// One wait in a [`WaitList`]; dropping it ends the wait.
pub(crate) struct Registered {
    list: Arc<WaitList>,
    txn_id: String,
    n: u64,
    rx: oneshot::Receiver<TransactionEvent>,
}

impl Registered {
    /// The event that ended the wait; `None` if the list went away first.
    pub(crate) async fn event(&mut self) -> Option<TransactionEvent> {
        (&mut self.rx).await.ok()
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.list.remove(&self.txn_id, self.n);
    }
}

struct Shared {
    waits: Arc<WaitList>,
    /// This client's inbox for notices ([`crate::proto::DECIDED_TO_HEADER`],
    /// [`crate::proto::OUTCOME_TO_HEADER`]).
    inbox: String,
    nc: async_nats::Client,
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

/// Hands out transactions' outcomes (and decisions) to the tasks waiting for them. Cheap to
/// clone; the subscriptions end when the last clone is dropped.
///
/// A decision comes only on this client's own inbox ([`Outcomes::decided_to`], named in a
/// submission's [`crate::proto::DECIDED_TO_HEADER`]), where the coordinator publishes it
/// after JetStream acknowledged it, or from the log. An outcome comes on that inbox too
/// ([`crate::proto::OUTCOME_TO_HEADER`]), from the log, or from the transaction's events.
#[derive(Clone)]
pub struct Outcomes {
    shared: Arc<Shared>,
}

impl Outcomes {
    /// Subscribes to a new inbox for this client's notices; `events` is the events stream
    /// (the log), read by the safety net.
    pub async fn start(
        nc: &async_nats::Client,
        subjects: Subjects,
        events: jetstream::stream::Stream,
    ) -> Result<Outcomes, ClientError> {
        let inbox = nc.new_inbox();
        let mut notices =
            nc.subscribe(inbox.clone())
                .await
                .map_err(|e| ClientError::Subscribe {
                    subject: inbox.clone(),
                    source: e,
                })?;
        let shared = Arc::new_cyclic(|weak: &std::sync::Weak<Shared>| {
            let weak = weak.clone();
            let task = tokio::spawn(async move {
                while let Some(msg) = notices.next().await {
                    // A notice is a durable decision or outcome; anything else here is not
                    // one (read the state alone first, the whole event only if it is).
                    let ends = serde_json::from_slice::<StateOnly>(&msg.payload)
                        .is_ok_and(|head| head.state.is_decided());
                    if !ends {
                        continue;
                    }
                    let Ok(ev) = serde_json::from_slice::<TransactionEvent>(&msg.payload) else {
                        continue;
                    };
                    let Some(shared) = weak.upgrade() else { break };
                    shared.waits.deliver(&ev);
                }
            });
            Shared {
                waits: Arc::new(WaitList::default()),
                inbox,
                nc: nc.clone(),
                events,
                subjects,
                reads: Semaphore::new(32),
                task,
            }
        });
        Ok(Outcomes { shared })
    }

    /// Starts waiting for `txn_id`'s outcome, for a transaction whose submission does not
    /// name this client's inbox (one submitted elsewhere, or before this client started):
    /// the wait follows the transaction's events and the log from its start.
    pub fn watch(&self, txn_id: &str) -> Watch {
        self.watch_until(txn_id, Until::Outcome)
    }

    /// As [`Outcomes::watch`], until `until`: its outcome, or its durable decision (which
    /// only the log tells such a wait).
    pub fn watch_until(&self, txn_id: &str, until: Until) -> Watch {
        self.register(txn_id, until, false)
    }

    /// Starts waiting for `txn_id` until `until`, for a submission of this client that
    /// carries [`Outcomes::header_for`]`(until)`: the coordinator's notice ends the wait, and
    /// the transaction's events and the log are followed only if it has not come after a
    /// second. Call it before publishing the submission.
    pub fn watch_submitted(&self, txn_id: &str, until: Until) -> Watch {
        self.register(txn_id, until, true)
    }

    fn register(&self, txn_id: &str, until: Until, notified: bool) -> Watch {
        Watch {
            wait: self.shared.waits.register(txn_id, until),
            until,
            notified,
            shared: self.shared.clone(),
        }
    }

    /// This client's inbox for notices (decisions and outcomes alike).
    pub fn decided_to(&self) -> &str {
        &self.shared.inbox
    }

    /// The header a submission carries so that a wait `until` hears of it: this client's
    /// inbox in [`crate::proto::DECIDED_TO_HEADER`] for [`Until::Decided`], in
    /// [`crate::proto::OUTCOME_TO_HEADER`] for [`Until::Outcome`].
    pub fn header_for(&self, until: Until) -> Option<(&'static str, &str)> {
        let name = match until {
            Until::Decided => crate::proto::DECIDED_TO_HEADER,
            Until::Outcome => crate::proto::OUTCOME_TO_HEADER,
        };
        Some((name, self.decided_to()))
    }

    /// How many waits are registered (for tests and metrics).
    pub fn waiting(&self) -> usize {
        self.shared.waits.count.load(Ordering::Relaxed)
    }
}

/// One registered wait for one transaction's outcome (or decision).
pub struct Watch {
    wait: Registered,
    until: Until,
    /// Whether the submission names this client's inbox, so that the coordinator's notice
    /// is expected and the events are followed only if it is late.
    notified: bool,
    shared: Arc<Shared>,
}

impl Watch {
    /// The transaction this waits for.
    pub fn txn_id(&self) -> &str {
        &self.wait.txn_id
    }

    /// Waits up to `timeout` for the outcome (a terminal state, or `failed`), or for what
    /// [`Outcomes::watch_until`] named.
    pub async fn outcome(mut self, timeout: Duration) -> Result<TransactionEvent, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut every = Duration::from_secs(1);
        let mut events = None;
        let txn_id = self.txn_id().to_string();
        if !self.notified {
            events = self.follow().await;
            if let Some(ev) = self.look_up().await {
                return Ok(ev);
            }
        }
        loop {
            let check = (tokio::time::Instant::now() + every).min(deadline);
            tokio::select! {
                got = self.wait.event() => {
                    return got.ok_or_else(|| self.timed_out(timeout));
                }
                ev = next_outcome(&mut events, &txn_id) => return Ok(ev),
                _ = tokio::time::sleep_until(check) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(self.timed_out(timeout));
                    }
                    // Subscribed before the read: a record written after the read comes as
                    // an event, one written before it is what the read finds.
                    if events.is_none() {
                        events = self.follow().await;
                    }
                    if let Some(ev) = self.look_up().await {
                        return Ok(ev);
                    }
                    every = (every * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Subscribes to this transaction's events; `None` (the log reads go on) if it cannot.
    async fn follow(&self) -> Option<async_nats::Subscriber> {
        let subject = self.shared.subjects.events(self.txn_id());
        match self.shared.nc.subscribe(subject).await {
            Ok(sub) => Some(sub),
            Err(e) => {
                tracing::debug!(txn_id = %self.txn_id(), error = %e, "cannot follow the transaction's events; reading its log");
                None
            }
        }
    }

    /// The outcome (or decision) if the log already has it: a record read from the log is
    /// durable, so a decision read there is one.
    async fn look_up(&self) -> Option<TransactionEvent> {
        let _permit = self.shared.reads.acquire().await.ok()?;
        last_record_of(&self.shared.events, &self.shared.subjects, self.txn_id())
            .await
            .filter(|ev| self.until.reached(ev.state))
    }

    fn timed_out(&self, waited: Duration) -> ClientError {
        ClientError::TimedOut {
            txn_id: self.txn_id().to_string(),
            waited,
        }
    }
}

/// The next outcome of `txn_id` among its events, if they are followed; never otherwise (nor
/// once the subscription ended: the log reads go on). Only an outcome: a decision seen on the
/// bus is not taken as a promise.
async fn next_outcome(
    events: &mut Option<async_nats::Subscriber>,
    txn_id: &str,
) -> TransactionEvent {
    if let Some(sub) = events {
        while let Some(msg) = sub.next().await {
            if !serde_json::from_slice::<StateOnly>(&msg.payload)
                .is_ok_and(|head| head.state.is_outcome())
            {
                continue;
            }
            if let Ok(ev) = serde_json::from_slice::<TransactionEvent>(&msg.payload)
                && ev.txn_id == txn_id
            {
                return ev;
            }
        }
    }
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::TxnState;

    fn event(txn_id: &str, state: TxnState) -> TransactionEvent {
        TransactionEvent::new(txn_id.to_string(), state, crate::proto::Mode::TwoPc, 0)
    }

    #[tokio::test]
    async fn a_wait_ends_at_the_state_it_names_and_only_for_its_transaction() {
        let list = Arc::new(WaitList::default());
        let mut decided = list.register("t1", Until::Decided);
        let mut outcome = list.register("t1", Until::Outcome);
        let mut other = list.register("t2", Until::Decided);
        assert_eq!(list.count.load(Ordering::Relaxed), 3);

        list.deliver(&event("t1", TxnState::Preparing));
        list.deliver(&event("t1", TxnState::Committing));
        assert_eq!(
            decided.event().await.map(|e| e.state),
            Some(TxnState::Committing)
        );
        assert_eq!(list.count.load(Ordering::Relaxed), 2);
        assert!(matches!(
            outcome.rx.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));

        list.deliver(&event("t1", TxnState::Committed));
        assert_eq!(
            outcome.event().await.map(|e| e.state),
            Some(TxnState::Committed)
        );
        assert!(matches!(
            other.rx.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        drop(other);
        assert!(list.is_empty());
        assert!(list.lock().is_empty(), "nothing left behind");
    }

    #[tokio::test]
    async fn a_dropped_wait_leaves_the_list_and_the_others_stay() {
        let list = Arc::new(WaitList::default());
        let first = list.register("t", Until::Outcome);
        let mut second = list.register("t", Until::Outcome);
        drop(first);
        assert_eq!(list.count.load(Ordering::Relaxed), 1);
        list.deliver(&event("t", TxnState::Aborted));
        assert_eq!(
            second.event().await.map(|e| e.state),
            Some(TxnState::Aborted)
        );
        assert!(list.is_empty());
    }
}
