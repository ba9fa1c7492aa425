//! One task per transaction in flight: it owns the engine, performs its commands in order
//! (waiting at every `Persist` until JetStream has the record), and runs its timers. The
//! [`Router`] finds a transaction's task from its txn_id without a global lock.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};

use async_nats::jetstream;
use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::time::Instant;

use super::Shared;
use crate::engine::twopc::EngineError;
use crate::engine::{Command, Timer};
use crate::engine::{Event, Machine};
use crate::nats::{Expect, NatsError, publish_durable};
use crate::proto::RequestError;
use crate::proto::{CommandKind, ParticipantReply, TransactionEvent, TxnState, now_ms};
use async_nats::jetstream::context::PublishErrorKind;

/// A message for a transaction's task.
#[derive(Debug)]
pub enum TxnMsg {
    /// A participant's reply.
    Reply(ParticipantReply),
    /// A status query: answer with a snapshot.
    Status(oneshot::Sender<TransactionEvent>),
    /// JetStream stored a command this transaction sent.
    Stored {
        /// The step.
        step: usize,
        /// The kind.
        kind: CommandKind,
        /// The attempt.
        attempt: u32,
    },
}

const SHARDS: usize = 64;

/// Maps txn_ids to their tasks. Sharded so that thousands of transactions do not contend on
/// one lock; each lock is held only for a map operation.
pub struct Router {
    shards: Vec<Mutex<HashMap<String, mpsc::Sender<TxnMsg>>>>,
    hasher: RandomState,
}

impl Router {
    /// An empty router.
    pub fn new() -> Self {
        Router {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard(
        &self,
        txn_id: &str,
    ) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<TxnMsg>>> {
        let i = (self.hasher.hash_one(txn_id) as usize) % SHARDS;
        // A poisoned shard only means another task panicked mid-insert; the map is still sound.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a transaction; false if it is already running.
    pub fn insert(&self, txn_id: &str, tx: mpsc::Sender<TxnMsg>) -> bool {
        let mut shard = self.shard(txn_id);
        if shard.contains_key(txn_id) {
            return false;
        }
        shard.insert(txn_id.to_string(), tx);
        true
    }

    /// The task of a running transaction.
    pub fn get(&self, txn_id: &str) -> Option<mpsc::Sender<TxnMsg>> {
        self.shard(txn_id).get(txn_id).cloned()
    }

    /// Forgets a finished transaction.
    pub fn remove(&self, txn_id: &str) {
        self.shard(txn_id).remove(txn_id);
    }

    /// How many transactions are running.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Whether none is running.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for Router {
    fn default() -> Self {
        Router::new()
    }
}

/// How the task begins.
pub enum Begin {
    /// A new submission: its accepted record must be the first on the subject.
    New {
        /// The submission to ack once the accepted record is durable.
        submission: Option<Box<jetstream::Message>>,
    },
    /// Rebuilt from the log; its `accepted` record is at this sequence (already tracked).
    Recovered {
        /// The sequence of its `accepted` record.
        accepted_seq: u64,
    },
}

/// Drives one transaction to its end. `commands` are the engine's first batch.
pub async fn drive(
    shared: Arc<Shared>,
    mut engine: Machine,
    commands: Vec<Command>,
    begin: Begin,
    own: mpsc::Sender<TxnMsg>,
    mut rx: mpsc::Receiver<TxnMsg>,
    _permit: Option<OwnedSemaphorePermit>,
) {
    let txn_id = engine.txn_id().to_string();
    let accepted_seq = match &begin {
        Begin::Recovered { accepted_seq } => Some(*accepted_seq),
        Begin::New { .. } => None,
    };
    let mut driver = Driver {
        accepted_seq,
        own: own.downgrade(),
        shared: shared.clone(),
        txn_id: txn_id.clone(),
        timers: BTreeMap::new(),
        begin: Some(begin),
        finished: false,
    };
    drop(own);
    if driver.perform(commands).await.is_ok() && !driver.finished {
        loop {
            let next = driver
                .timers
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(t, at)| (*t, *at));
            let sleep_until = next
                .map(|(_, at)| at)
                .unwrap_or_else(|| Instant::now() + std::time::Duration::from_secs(3600));
            let mut out = Vec::new();
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(TxnMsg::Reply(reply)) => {
                        let attempt = reply.attempt;
                        match engine.handle(now_ms(), Event::Reply(reply), &mut out) {
                            Ok(()) => {}
                            // Duplicates and late answers are normal under at-least-once delivery.
                            Err(e @ EngineError::Late { .. }) => tracing::debug!(error = %e, attempt, "reply ignored"),
                            Err(e) => tracing::warn!(error = %e, attempt, "reply ignored"),
                        }
                    }
                    Some(TxnMsg::Status(tx)) => {
                        let _ = tx.send(engine.snapshot(now_ms()));
                    }
                    Some(TxnMsg::Stored { step, kind, attempt }) => {
                        let _ = engine.handle(now_ms(), Event::Stored { step, kind, attempt }, &mut out);
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(sleep_until), if next.is_some() => {
                    if let Some((timer, _)) = next {
                        driver.timers.remove(&timer);
                        let _ = engine.handle(now_ms(), Event::Timer(timer), &mut out);
                    }
                }
            }
            if driver.perform(out).await.is_err() || driver.finished {
                break;
            }
        }
    }
    shared.router.remove(&txn_id);
    // Only a finished transaction lets the recovery checkpoint pass it.
    if driver.finished
        && let Some(seq) = driver.accepted_seq
    {
        shared.inflight.finished(seq);
    }
    shared.metrics.finished(engine.state());
}

struct Driver {
    /// The sequence of this transaction's `accepted` record, once known.
    accepted_seq: Option<u64>,
    /// Our own inbox, for send acknowledgements (weak, so the task ends when the router
    /// forgets it).
    own: mpsc::WeakSender<TxnMsg>,
    shared: Arc<Shared>,
    txn_id: String,
    timers: BTreeMap<Timer, Instant>,
    begin: Option<Begin>,
    finished: bool,
}

/// The task stops: a duplicate submission, or shutdown.
struct Stop;

impl Driver {
    async fn perform(&mut self, commands: Vec<Command>) -> Result<(), Stop> {
        for cmd in commands {
            // Fencing: nothing is written or sent unless this coordinator holds the lease.
            if matches!(
                cmd,
                Command::Persist { .. } | Command::Announce { .. } | Command::Send(_)
            ) && self.shared.lease.ready().await.is_err()
            {
                return Err(Stop);
            }
            match cmd {
                Command::Persist { msg_id, event } => self.persist(&msg_id, &event).await?,
                Command::Announce { msg_id, event } => {
                    let shared = self.shared.clone();
                    tokio::spawn(async move {
                        let subject = shared.subjects.events(&event.txn_id);
                        if let Err(e) = publish_durable(
                            &shared.js,
                            &subject,
                            &msg_id,
                            to_bytes(&event),
                            Expect::default(),
                            Some(3),
                        )
                        .await
                        {
                            tracing::warn!(error = %e, "event not published");
                        }
                    });
                }
                Command::Send(cmd) => {
                    let shared = self.shared.clone();
                    let own = self.own.clone();
                    tokio::spawn(async move {
                        let subject = shared.subjects.command(&cmd.service, &cmd.txn_id);
                        let msg_id = format!(
                            "{}.{}.{}.{}",
                            cmd.txn_id,
                            cmd.step,
                            cmd.kind.as_str(),
                            cmd.attempt
                        );
                        // Bounded: a lost prepare ends in the prepare timeout, a lost phase-2
                        // command in the next resend round.
                        match publish_durable(
                            &shared.js,
                            &subject,
                            &msg_id,
                            to_bytes(&cmd),
                            Expect::default(),
                            Some(8),
                        )
                        .await
                        {
                            Ok(_) => {
                                if let Some(tx) = own.upgrade() {
                                    let _ = tx
                                        .send(TxnMsg::Stored {
                                            step: cmd.step,
                                            kind: cmd.kind,
                                            attempt: cmd.attempt,
                                        })
                                        .await;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, service = %cmd.service, "command not sent; the next round or the timeout covers it")
                            }
                        }
                    });
                }
                Command::SetTimer { timer, at_ms } => {
                    let delay = at_ms.saturating_sub(now_ms());
                    self.timers.insert(
                        timer,
                        Instant::now() + std::time::Duration::from_millis(delay),
                    );
                }
                Command::CancelTimer(timer) => {
                    self.timers.remove(&timer);
                }
                Command::Finished => self.finished = true,
            }
        }
        Ok(())
    }

    async fn persist(&mut self, msg_id: &str, event: &TransactionEvent) -> Result<(), Stop> {
        let subject = self.shared.subjects.events(&self.txn_id);
        let first =
            event.state == TxnState::Accepted && matches!(self.begin, Some(Begin::New { .. }));
        let expect = Expect {
            last_subject_sequence: first.then_some(0),
        };
        if first {
            self.shared.inflight.accepting();
        }
        let result = publish_durable(
            &self.shared.js,
            &subject,
            msg_id,
            to_bytes(event),
            expect,
            None,
        )
        .await;
        if first {
            // Ours (with the sequence of our accepted record), or not; Err: cannot tell.
            let ours: Result<Option<u64>, ()> = match &result {
                Ok(ack) if !ack.duplicate => Ok(Some(ack.sequence)),
                // The log refused the record for good (too big for the server, say): reject
                // the submission visibly instead of dropping it.
                Err(NatsError::Publish { source, .. })
                    if !matches!(source.kind(), PublishErrorKind::WrongLastSequence) =>
                {
                    let err = RequestError::Invalid {
                        path: "$".into(),
                        message: format!(
                            "the coordinator's log refused this transaction's record: {source}"
                        ),
                    };
                    super::reject(
                        &self.shared,
                        Some(self.txn_id.clone()),
                        event.submit_seq,
                        err,
                    )
                    .await;
                    Ok(None)
                }
                // The subject already had a record, or the id was seen: ours only if the first
                // record came from this very submission (a retried write of ours).
                _ => self.first_record_is_ours(event.submit_seq).await,
            };
            let Ok(ours) = ours else {
                // The record may be ours and we cannot tell. Leave the submission unacked, so
                // its redelivery asks again, and leave the accepted write counted as pending,
                // so the recovery checkpoint cannot pass a record that may start a transaction.
                tracing::warn!(
                    "cannot tell whether the accepted record is ours; the submission will be redelivered"
                );
                self.begin = None;
                return Err(Stop);
            };
            self.shared.inflight.accepted(ours);
            self.accepted_seq = ours;
            let Some(Begin::New { submission }) = self.begin.take() else {
                return Err(Stop);
            };
            if let Some(msg) = submission
                && let Err(e) = msg.ack().await
            {
                tracing::warn!(error = %e, "submission not acked; its redelivery will be recognised as a duplicate");
            }
            if ours.is_none() {
                tracing::info!(
                    "txn_id already has a recorded transaction; the recorded outcome stands, nothing runs again"
                );
                self.shared.metrics.duplicate();
                return Err(Stop);
            }
            self.shared.metrics.accepted();
            return Ok(());
        }
        match result {
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "log write failed for good; the transaction resumes after a restart");
                return Err(Stop);
            }
        }
        if matches!(event.state, TxnState::Committing | TxnState::Aborting)
            && msg_id.ends_with(".decided")
            && self.shared.failpoint.as_deref() == Some("after-decision")
        {
            eprintln!("FAILPOINT after-decision txn_id={}", self.txn_id);
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    /// The sequence of this transaction's first record, if that record came from this very
    /// submission; `Err` if it cannot be read.
    async fn first_record_is_ours(&self, submit_seq: Option<u64>) -> Result<Option<u64>, ()> {
        let subject = self.shared.subjects.events(&self.txn_id);
        match self
            .shared
            .streams
            .events
            .direct_get_first_for_subject(subject)
            .await
        {
            Ok(msg) => match serde_json::from_slice::<TransactionEvent>(&msg.payload) {
                Ok(first)
                    if first.state == TxnState::Accepted
                        && submit_seq.is_some()
                        && first.submit_seq == submit_seq =>
                {
                    Ok(Some(msg.sequence))
                }
                _ => Ok(None),
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the first record");
                Err(())
            }
        }
    }
}

/// Serializes a wire type. These types contain only strings, numbers and JSON values, which
/// always serialize.
pub fn to_bytes<T: serde::Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}
