//! One task per transaction in flight: it owns the engine, performs its commands in order
//! (waiting at every `Persist` until JetStream has the record), and runs its timers. The
//! [`Router`] finds a transaction's task from its txn_id without a global lock.
//!
//! Every record the task writes is fenced: it expects the subject's last sequence to be the
//! one of the record before it, as this task knows it (0 for `accepted`). A write refused for
//! a wrong last sequence means another writer got there (a duplicate submission, a second or
//! stale coordinator): the task stops at once, sends nothing more, and leaves the
//! transaction to what its log says.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};

use async_nats::jetstream;
use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::time::Instant;

use super::{Failpoint, Shared};
use crate::client::LogTail;
use crate::engine::twopc::EngineError;
use crate::engine::{Command, Refusal, Timer};
use crate::engine::{Event, Machine};
use crate::nats::{Expect, NatsError, publish_durable};
use crate::proto::RequestError;
use crate::proto::{
    CommandKind, ParticipantReply, RequestShape, SubmitError, TransactionEvent, TxnState, now_ms,
};
use async_nats::jetstream::context::PublishErrorKind;

/// A message for a transaction's task.
#[derive(Debug)]
pub enum TxnMsg {
    /// A participant's reply.
    Reply(ParticipantReply),
    /// A status query: answer with a snapshot.
    Status(oneshot::Sender<TransactionEvent>),
    /// The deadlock detector chose this transaction as the victim of this cycle.
    Deadlock(crate::engine::deadlock::Cycle),
    /// An operator's action (`txcoord resolve`): answered once its record is durable
    /// (with the transaction's state then), or with the rule that refuses it.
    Resolve {
        /// What, by whom, why.
        resolution: crate::proto::Resolution,
        /// Only check the rules.
        dry_run: bool,
        /// Where the answer goes.
        answer: oneshot::Sender<Result<TransactionEvent, String>>,
    },
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
    /// Rebuilt from the log.
    Recovered {
        /// The sequence of its `accepted` record (already tracked for the checkpoint).
        accepted_seq: u64,
        /// The sequence of its log's last real record.
        record_seq: u64,
        /// The sequence of the last message on its log's subject (the record's, or a
        /// foreign message's after it): the next write must follow it.
        last_seq: u64,
    },
}

/// The inboxes a submission names for notices: its decision
/// ([`crate::proto::DECIDED_TO_HEADER`]) and its outcome
/// ([`crate::proto::OUTCOME_TO_HEADER`]). Each is published to once, after JetStream
/// acknowledged the record, by the coordinator that wrote it.
#[derive(Debug, Default)]
pub(crate) struct Notices {
    decided_to: Option<String>,
    outcome_to: Option<String>,
}

impl Notices {
    /// The inboxes `headers` name, if they are ones the coordinator answers to (as the API's
    /// replies: under `api_reply_prefixes`, and plain subjects); anything else is ignored
    /// with a warning, and the submitter's wait ends another way (its own log reads).
    pub(crate) fn of(
        shared: &Shared,
        txn_id: &str,
        headers: Option<&async_nats::HeaderMap>,
    ) -> Notices {
        let inbox = |header: &'static str| -> Option<String> {
            let to = headers?.get(header)?.as_str();
            let allowed =
                super::api::reply_allowed(&shared.api_reply_prefixes, Some(to)).and_then(|()| {
                    crate::proto::is_publish_subject(to, 256)
                        .then_some(())
                        .ok_or_else(|| {
                            "not a subject one can publish on (at most 256 bytes)".into()
                        })
                });
            match allowed {
                Ok(()) => Some(to.to_string()),
                Err(why) => {
                    tracing::warn!(%txn_id, header, value = %to, %why, "header ignored");
                    None
                }
            }
        };
        Notices {
            decided_to: inbox(crate::proto::DECIDED_TO_HEADER),
            outcome_to: inbox(crate::proto::OUTCOME_TO_HEADER),
        }
    }

    /// The notices of a new submission; none for a transaction resumed from the log.
    fn of_begin(shared: &Shared, txn_id: &str, begin: &Begin) -> Notices {
        match begin {
            Begin::New {
                submission: Some(msg),
            } => Notices::of(shared, txn_id, msg.headers.as_ref()),
            _ => Notices::default(),
        }
    }

    /// Publishes `event`, a durable record, to each inbox it answers and that has not heard
    /// one yet: the decision inbox at the first decided state (a decision, or an outcome
    /// that came first), the outcome inbox at the outcome.
    pub(crate) async fn send(&mut self, js: &jetstream::Context, event: &TransactionEvent) {
        let decided = event
            .state
            .is_decided()
            .then(|| self.decided_to.take())
            .flatten();
        let outcome = event
            .state
            .is_outcome()
            .then(|| self.outcome_to.take())
            .flatten()
            // One inbox named for both hears an outcome that came first once.
            .filter(|to| decided.as_ref() != Some(to));
        for to in [decided, outcome].into_iter().flatten() {
            if let Err(e) = js.client().publish(to, to_bytes(event)).await {
                tracing::debug!(error = %e, "the submitter's notice was not sent");
            }
        }
    }
}

/// Drives one transaction to its end. `commands` are the engine's first batch.
pub async fn drive(
    shared: Arc<Shared>,
    mut engine: Machine,
    commands: Vec<Command>,
    begin: Begin,
    own: mpsc::Sender<TxnMsg>,
    mut rx: mpsc::Receiver<TxnMsg>,
    _permit: Option<(OwnedSemaphorePermit, [super::limits::Held; 2])>,
) {
    let txn_id = engine.txn_id().to_string();
    // A transaction resumed from the log started before this process: its time is unknown.
    let started = matches!(begin, Begin::New { .. }).then(Instant::now);
    let (accepted_seq, record_seq, last_seq) = match &begin {
        Begin::Recovered {
            accepted_seq,
            record_seq,
            last_seq,
        } => (Some(*accepted_seq), *record_seq, *last_seq),
        Begin::New { .. } => (None, 0, 0),
    };
    let notices = Notices::of_begin(&shared, &txn_id, &begin);
    let writer = format!(
        "{}.{}",
        shared.run_id,
        shared
            .drivers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut driver = Driver {
        writer,
        notices,
        accepted_seq,
        record_seq,
        last_seq,
        announces: Vec::new(),
        own: own.downgrade(),
        shared: shared.clone(),
        txn_id: txn_id.clone(),
        timers: BTreeMap::new(),
        begin: Some(begin),
        finished: false,
        alerted: 0,
        trace: None,
    };
    drop(own);
    let mut stopped = driver.perform(&mut engine, commands).await.err();
    // The detector hears once when this transaction leaves the vote: from then on it is
    // never a victim, and its waits are gone.
    let mut undecided = matches!(engine.state(), TxnState::Accepted | TxnState::Preparing);
    if stopped.is_none() && !driver.finished {
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
            let mut resolved = None;
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(TxnMsg::Resolve { resolution, dry_run, answer }) => {
                        let now = now_ms();
                        match engine.check_resolve(&resolution) {
                            Err(e) => {
                                let _ = answer.send(Err(e.0));
                            }
                            Ok(()) if dry_run => {
                                let _ = answer.send(Ok(engine.snapshot(now)));
                            }
                            Ok(()) => match engine.resolve(now, &resolution, &mut out) {
                                Ok(()) => {
                                    tracing::warn!(action = resolution.action.as_str(), by = %resolution.by,
                                        reason = %resolution.reason, step = ?resolution.step, "resolved by an operator");
                                    resolved = Some(answer);
                                }
                                Err(e) => {
                                    let _ = answer.send(Err(e.0));
                                }
                            },
                        }
                    }
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
                    Some(TxnMsg::Deadlock(cycle)) => {
                        match engine.deadlock_victim(now_ms(), cycle.reason(), &mut out) {
                            Ok(()) => tracing::warn!(cycle = ?cycle.txns, "aborted as the victim of a deadlock"),
                            Err(e) => {
                                tracing::info!(error = %e, "not a deadlock victim");
                                let _ = shared.detector.send(super::deadlock::DetectorMsg::NotAVictim(txn_id.clone(), cycle));
                            }
                        }
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
            if let Err(stop) = driver.perform(&mut engine, out).await {
                if let Some(answer) = resolved.take() {
                    let _ = answer.send(Err(format!(
                        "this coordinator stopped before the record was durable ({stop:?}); the transaction resumes from its log, ask again"
                    )));
                }
                stopped = Some(stop);
                break;
            }
            if let Some(answer) = resolved.take() {
                let _ = answer.send(Ok(engine.snapshot(now_ms())));
            }
            if undecided && !matches!(engine.state(), TxnState::Accepted | TxnState::Preparing) {
                undecided = false;
                let _ = shared
                    .detector
                    .send(super::deadlock::DetectorMsg::Decided(txn_id.clone()));
            }
            if driver.finished {
                break;
            }
        }
    }
    shared.router.remove(&txn_id);
    if undecided {
        let _ = shared
            .detector
            .send(super::deadlock::DetectorMsg::Decided(txn_id.clone()));
    }
    match (stopped, driver.accepted_seq) {
        // Someone else wrote this transaction's log. Act only on what the log says: recovery
        // (the one path that resumes a transaction) reads it again and resumes it if it is
        // not finished. The old tracking is released once the new one is in place, so the
        // recovery checkpoint never passes the transaction meanwhile.
        (Some(Stop::Fenced), Some(seq)) => {
            let _stopping = shared.fenced.send((txn_id, seq));
        }
        // Only a finished transaction lets the recovery checkpoint pass it.
        (None, Some(seq)) if driver.finished => {
            shared.inflight.finished(seq);
            let took = started.map(|t| t.elapsed());
            let snapshot = engine.snapshot(now_ms());
            shared
                .metrics
                .ended(engine.state(), took, snapshot.reason.as_ref());
        }
        _ => {}
    }
}

struct Driver {
    /// This driver's own suffix of its writes' message ids (`<run_id>.<n>`): a retry of one
    /// of its writes is a duplicate JetStream drops, and no other driver's write ever is,
    /// not even another driver of the same transaction in the same run.
    writer: String,
    /// The submitter's inboxes for the decision and the outcome, until each is durable and
    /// sent there.
    notices: Notices,
    /// The sequence of this transaction's `accepted` record, once known.
    accepted_seq: Option<u64>,
    /// The sequence of the last record of this transaction's log as this driver knows it (0:
    /// none yet). A write that finds another record after it was overtaken by another
    /// writer, and this driver stops.
    record_seq: u64,
    /// The sequence of the last message on the log's subject as this driver knows it: every
    /// write expects it as the subject's last sequence. It is `record_seq` unless someone
    /// stored a foreign message (not a record of this transaction) after our last record.
    last_seq: u64,
    /// Announcements not yet written: they are written after the commands of their batch
    /// (they announce nothing a participant acts on) but before the next record, so the
    /// log's order is the engine's order.
    announces: Vec<(String, TransactionEvent)>,
    /// Our own inbox, for send acknowledgements (weak, so the task ends when the router
    /// forgets it).
    own: mpsc::WeakSender<TxnMsg>,
    shared: Arc<Shared>,
    txn_id: String,
    timers: BTreeMap<Timer, Instant>,
    begin: Option<Begin>,
    finished: bool,
    /// The alerts this driver published once already (bits: stuck, failed, deadlock).
    alerted: u8,
    /// This run's span of the transaction (OpenTelemetry), from its first record or
    /// command to its end; the parent of every command's span.
    trace: Option<opentelemetry::Context>,
}

/// Why the task stopped before its transaction finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Another writer's record is in the log where ours should go (a duplicate submission,
    /// a stale or a second coordinator): this driver no longer owns the transaction.
    Fenced,
    /// The transaction cannot go on here (no lease, shutdown, a write refused for good);
    /// the next recovery resumes it from the log.
    Halted,
}

/// How a write refused for a wrong last sequence is settled.
#[derive(Debug)]
enum Settled {
    /// For good.
    Written(Written),
    /// Only foreign messages follow our last record; the last is at this sequence.
    AfterForeign(u64),
}

/// What became of one fenced log write.
#[derive(Debug)]
enum Written {
    /// Our record is in the log at `seq`; the next write must expect `last` (`seq`, or a
    /// foreign message's after it).
    Ours {
        /// Our record's sequence.
        seq: u64,
        /// The subject's last sequence.
        last: u64,
    },
    /// Another record follows the one we expected: we were overtaken.
    Fenced,
    /// The log refused the record for good.
    Refused(NatsError),
    /// The lease was lost before the outcome could be known.
    LeaseLost,
}

impl Driver {
    async fn perform(&mut self, engine: &mut Machine, commands: Vec<Command>) -> Result<(), Stop> {
        let mut queue: VecDeque<Command> = commands.into();
        while let Some(cmd) = queue.pop_front() {
            // Fencing: nothing is written or sent unless this coordinator holds the lease.
            if matches!(
                cmd,
                Command::Persist { .. } | Command::Announce { .. } | Command::Send(_)
            ) && self.shared.lease.ready().await.is_err()
            {
                return Err(Stop::Halted);
            }
            match cmd {
                Command::Persist { msg_id, mut event } => {
                    self.flush_announces().await?;
                    self.trace_event(&event);
                    let Some(refusal) = self.persist(&msg_id, &event).await? else {
                        continue;
                    };
                    // The log refused the record for good: nothing after it runs. The engine
                    // decides anew (nothing was decided yet) or has it written again compacted.
                    let message = refusal.to_string();
                    self.shared.metrics.log_refusal();
                    let mut out = Vec::new();
                    match engine.log_refused(now_ms(), &msg_id, &message, &mut out) {
                        Refusal::Replanned => {
                            tracing::warn!(%msg_id, error = %message, state = ?engine.state(), "the log refused a record before a decision; the transaction ends without one, with compact records");
                            queue = out.into();
                        }
                        Refusal::Redo => {
                            tracing::warn!(%msg_id, error = %message, "the log refused a record; writing it again compacted");
                            crate::engine::compact(&mut event);
                            queue.push_front(Command::Persist { msg_id, event });
                            for cmd in queue.iter_mut() {
                                if let Command::Persist { event, .. }
                                | Command::Announce { event, .. } = cmd
                                {
                                    crate::engine::compact(event);
                                }
                            }
                        }
                        Refusal::GiveUp => {
                            tracing::error!(%msg_id, error = %message, "the log refused even a compact record; the transaction stops here and resumes after a restart");
                            return Err(Stop::Halted);
                        }
                    }
                }
                // `preparing` is for observers only; `announce_preparing = false` skips it
                // (a resend round is a Persist, written either way).
                Command::Announce { msg_id, event } => {
                    if self.shared.announce_preparing || event.state != TxnState::Preparing {
                        self.announces.push((msg_id, event));
                    }
                }
                Command::Send(mut cmd) => {
                    let shared = self.shared.clone();
                    shared.reply_key.stamp(&shared.subjects, &mut cmd);
                    let span = self.command_span(&mut cmd);
                    let own = self.own.clone();
                    if shared.batching.reads_batches(&cmd.service) {
                        // One message carries many commands: each command's trace is in
                        // its body (the transaction's), the send span ends at queueing.
                        shared.batching.send(&shared, cmd, own);
                    } else {
                        tokio::spawn(async move {
                            let body = to_bytes(&cmd);
                            let header = crate::trace::traceparent_of(&span);
                            super::batch::publish_one(
                                &shared.js,
                                &shared.subjects,
                                &cmd,
                                body,
                                &own,
                                header.as_deref(),
                            )
                            .await;
                            drop(span);
                        });
                    }
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
                Command::Finished => {
                    self.finished = true;
                    // Ends the transaction's span.
                    self.trace = None;
                }
            }
        }
        self.flush_announces().await
    }

    /// The transaction's span, started on first use as a child of the trace `traceparent`
    /// names (the client's, from the request), or a new trace's root.
    fn trace(&mut self, traceparent: Option<&str>) -> &opentelemetry::Context {
        let txn_id = &self.txn_id;
        self.trace.get_or_insert_with(|| {
            let parent = traceparent.and_then(crate::trace::remote_context);
            crate::trace::start(
                "txcoord transaction".to_string(),
                opentelemetry::trace::SpanKind::Server,
                parent.as_ref(),
                vec![opentelemetry::KeyValue::new(
                    "txcoord.txn_id",
                    txn_id.clone(),
                )],
            )
        })
    }

    /// Marks a record about to be written on the transaction's span.
    fn trace_event(&mut self, event: &TransactionEvent) {
        use opentelemetry::trace::TraceContextExt as _;
        let span = self.trace(event.traceparent.as_deref()).span();
        span.add_event(event.state.as_str(), Vec::new());
    }

    /// A span for sending `cmd`, a child of the transaction's; the command's own
    /// `traceparent` is filled with the transaction's trace when the request had none, so
    /// that a batched command (no header of its own) and the HTTP bridge carry it too.
    fn command_span(
        &mut self,
        cmd: &mut crate::proto::ParticipantCommand,
    ) -> opentelemetry::Context {
        let txn = self.trace(cmd.traceparent.as_deref()).clone();
        if cmd.traceparent.is_none() {
            cmd.traceparent = crate::trace::traceparent_of(&txn);
        }
        crate::trace::start(
            format!("send {} {}", cmd.kind.as_str(), cmd.service),
            opentelemetry::trace::SpanKind::Producer,
            Some(&txn),
            crate::trace::command_attributes(cmd),
        )
    }

    /// Writes the pending announcements, in order, each fenced like any record.
    async fn flush_announces(&mut self) -> Result<(), Stop> {
        for (msg_id, event) in std::mem::take(&mut self.announces) {
            match self.write(&msg_id, &event, None).await {
                Written::Ours { seq, last } => {
                    self.wrote(seq, last);
                    self.recorded(&event).await;
                }
                Written::Fenced => return Err(Stop::Fenced),
                Written::LeaseLost => return Err(Stop::Halted),
                // An announcement is for observers; the transaction goes on without it.
                Written::Refused(e) => tracing::warn!(error = %e, "event not published"),
            }
        }
        Ok(())
    }

    /// Publishes an alert about a durable record that needs a person (stuck, failed, a
    /// deadlock victim: once each per driver; every operator action). Core NATS, best
    /// effort: the record itself is the truth.
    async fn alert(&mut self, event: &TransactionEvent) {
        use crate::proto::{AlertKind, Reason};
        let mut kinds = Vec::new();
        if event.stuck {
            kinds.push((
                AlertKind::Stuck,
                1u8,
                "phase 2 is unconfirmed past stuck_after_ms; still retried",
            ));
        }
        if event.state == TxnState::Failed {
            kinds.push((
                AlertKind::Failed,
                2,
                "a compensation keeps failing; still retried, it needs a person",
            ));
        }
        if matches!(&event.reason, Some(Reason::Deadlock { how, .. }) if how == "detected") {
            kinds.push((
                AlertKind::Deadlock,
                4,
                "aborted as the victim of a distributed deadlock",
            ));
        }
        if event.resolved.is_some() {
            kinds.push((AlertKind::Resolved, 0, "an operator resolved it"));
        }
        for (kind, bit, message) in kinds {
            if bit != 0 && self.alerted & bit != 0 {
                continue;
            }
            self.alerted |= bit;
            publish_alert(&self.shared, kind, event, message.into()).await;
        }
    }

    /// What follows a record of ours that is durable: the waits this coordinator holds for
    /// it (the API's and the front door's, for a decision or an outcome) are answered, the
    /// submitter's inboxes hear the decision and the outcome (`Txcoord-Decided-To`,
    /// `Txcoord-Outcome-To`), and alerts go out. Only here, after the write's
    /// acknowledgement: a record is what the log stored.
    async fn recorded(&mut self, event: &TransactionEvent) {
        if event.state.is_decided() {
            self.shared.waits.deliver(event);
            self.notices.send(&self.shared.js, event).await;
        }
        self.alert(event).await;
    }

    /// Our record landed at `seq`; the subject's last message is at `last`.
    fn wrote(&mut self, seq: u64, last: u64) {
        self.record_seq = seq;
        self.last_seq = last;
    }

    /// Writes one record to this transaction's log with
    /// `Nats-Expected-Last-Subject-Sequence` = the last sequence this driver knows, and a
    /// message id unique to this coordinator's run. A refusal for a wrong last sequence is
    /// settled by reading the log: our own earlier try of this very write landed (its
    /// message id is the last record's), or only foreign messages follow our last record
    /// (the write is tried again after them, a few times), or another writer wrote a record
    /// and we are fenced. While the write is unsettled, `submission` (if any) is kept from
    /// redelivery with progress acks.
    async fn write(
        &self,
        msg_id: &str,
        event: &TransactionEvent,
        submission: Option<&jetstream::Message>,
    ) -> Written {
        const FOREIGN_RETRIES: u32 = 8;
        let subject = self.shared.subjects.log(&self.txn_id);
        let msg_id = format!("{msg_id}@{}", self.writer);
        let mut expect = self.last_seq;
        for _ in 0..=FOREIGN_RETRIES {
            let publish = publish_durable(
                &self.shared.js,
                &subject,
                &msg_id,
                to_bytes(event),
                Expect {
                    last_subject_sequence: Some(expect),
                },
                None,
            );
            let result = match submission {
                Some(msg) => keep_in_progress(msg, self.shared.submit_ack_wait, publish).await,
                None => publish.await,
            };
            match result {
                Ok(ack) => {
                    return Written::Ours {
                        seq: ack.sequence,
                        last: ack.sequence,
                    };
                }
                Err(NatsError::Publish { source, .. })
                    if matches!(source.kind(), PublishErrorKind::WrongLastSequence) =>
                {
                    match self.settle(&msg_id).await {
                        Settled::Written(w) => return w,
                        Settled::AfterForeign(last) => {
                            self.shared.metrics.foreign_log_message();
                            tracing::warn!(
                                %subject,
                                expected_last = expect,
                                found = last,
                                "a foreign message follows this transaction's last record; writing after it"
                            );
                            expect = last;
                        }
                    }
                }
                Err(e) => return Written::Refused(e),
            }
        }
        tracing::error!(%subject, "foreign messages keep landing in this transaction's log; this coordinator stops driving it");
        Written::Fenced
    }

    /// After a wrong-last-sequence refusal: ours if the log's last record carries our message
    /// id (a retry of a write that had landed), to be tried again if only foreign messages
    /// follow our last record, fenced if another writer's record does. Reads the log's end
    /// (a direct get: on a cluster any replica may answer, a lagging one included, which can
    /// only fence this driver or make it try again), retrying until it answers or the lease
    /// is lost.
    async fn settle(&self, msg_id: &str) -> Settled {
        let Some(tail) = log_tail(&self.shared, &self.txn_id).await else {
            return Settled::Written(Written::LeaseLost);
        };
        let record_seq = tail.record.as_ref().map_or(0, |r| r.seq);
        let writer = tail.record.as_ref().and_then(|r| r.msg_id.as_deref());
        if writer == Some(msg_id) {
            return Settled::Written(Written::Ours {
                seq: record_seq,
                last: tail.last_seq,
            });
        }
        if record_seq == self.record_seq {
            return Settled::AfterForeign(tail.last_seq);
        }
        tracing::warn!(
            expected_last = self.record_seq,
            found = record_seq,
            writer = writer.unwrap_or("-"),
            "another writer's record is in this transaction's log; this coordinator stops driving it"
        );
        Settled::Written(Written::Fenced)
    }

    /// Writes one record; `Ok(Some(_))` when the log refused it for good (the first record's
    /// refusal is settled here: the submission is rejected).
    async fn persist(
        &mut self,
        msg_id: &str,
        event: &TransactionEvent,
    ) -> Result<Option<NatsError>, Stop> {
        let first =
            event.state == TxnState::Accepted && matches!(self.begin, Some(Begin::New { .. }));
        if !first {
            return match self.write(msg_id, event, None).await {
                Written::Ours { seq, last } => {
                    self.wrote(seq, last);
                    self.recorded(event).await;
                    self.failpoint(event, msg_id).await;
                    Ok(None)
                }
                Written::Fenced => Err(Stop::Fenced),
                Written::LeaseLost => Err(Stop::Halted),
                Written::Refused(e) => Ok(Some(e)),
            };
        }
        let Some(Begin::New { submission }) = self.begin.take() else {
            return Err(Stop::Halted);
        };
        // Written without reading the log first: a txn_id that has a log already gets its
        // `accepted` refused (it expects no record before it), and a refused write reaches
        // nobody, since the events stream republishes only what it stored
        // (`Subjects::log`). The reuse is then reported from the log.
        // The submission's own sequence in the message id: a redelivered copy of the same
        // submission can never pass for this write.
        let msg_id = format!("{msg_id}.{}", event.submit_seq.unwrap_or(0));
        self.shared.inflight.accepting();
        if self.shared.failpoint == Some(Failpoint::AcceptedWriteStalls) {
            eprintln!("FAILPOINT accepted-write-stalls txn_id={}", self.txn_id);
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        }
        let written = self.write(&msg_id, event, submission.as_deref()).await;
        let fenced = matches!(written, Written::Fenced);
        let ours = match &written {
            Written::Ours { seq, last } => Some((*seq, *last)),
            _ => None,
        };
        match written {
            // The transaction may have started or not: leave the submission unacked for its
            // redelivery, and the write counted as pending, so the recovery checkpoint cannot
            // pass a record that may start a transaction.
            Written::LeaseLost => return Err(Stop::Halted),
            // The log refused the record for good (too big for the server, say): reject the
            // submission visibly instead of dropping it.
            Written::Refused(source) => {
                let err = RequestError::Invalid {
                    path: "$".into(),
                    message: format!(
                        "the coordinator's log refused this transaction's record: {source}"
                    ),
                };
                let notices = std::mem::take(&mut self.notices);
                super::reject(
                    &self.shared,
                    Some(self.txn_id.clone()),
                    event.submit_seq,
                    err,
                    notices,
                )
                .await;
            }
            Written::Ours { .. } | Written::Fenced => {}
        }
        self.shared.inflight.accepted(ours.map(|(seq, _)| seq));
        self.accepted_seq = ours.map(|(seq, _)| seq);
        if let Some(msg) = submission {
            if self.shared.failpoint == Some(Failpoint::SkipSubmissionAck) {
                eprintln!("FAILPOINT skip-submission-ack txn_id={}", self.txn_id);
            } else if let Err(e) = msg.ack().await {
                tracing::warn!(error = %e, "submission not acked; its redelivery will find the transaction's log and run nothing");
            }
        }
        match ours {
            Some((seq, last)) => {
                self.wrote(seq, last);
                self.shared.metrics.accepted();
                Ok(None)
            }
            None => {
                self.shared.metrics.duplicate();
                let first_seq = self.report_reuse(event).await;
                // The log's transaction may be one nobody drives: its writer was a
                // coordinator that has stopped, and this one's recovery did not see it (a
                // replica that lagged, a record stored after the scan). It goes the way
                // of a fenced driver's: the log is read again and the transaction resumed
                // unless it is over.
                if fenced && let Some(seq) = first_seq {
                    self.shared.inflight.track(seq);
                    self.accepted_seq = Some(seq);
                    return Err(Stop::Fenced);
                }
                Err(Stop::Halted)
            }
        }
    }

    /// The txn_id of `ours` (an `accepted` record not written) has a log already. A redelivery
    /// of the same submission, or a resubmission of the same request, is a retry: its
    /// recorded outcome stands. Another request under a taken id gets a SubmitError
    /// (`duplicate_txn_id`) that names the existing transaction's state, read from the
    /// log's first record. The first record's sequence, if it was read.
    async fn report_reuse(&self, ours: &TransactionEvent) -> Option<u64> {
        let (first, first_seq) = match first_record(&self.shared, &self.txn_id).await {
            Ok(Some(found)) => found,
            _ => {
                tracing::info!("txn_id already has a recorded transaction; nothing runs again");
                return None;
            }
        };
        let same_submission = first.submit_seq.is_some() && first.submit_seq == ours.submit_seq;
        if same_submission
            || RequestShape::of_accepted(ours).matches(&RequestShape::of_accepted(&first))
        {
            tracing::info!(
                "txn_id already has a recorded transaction of this request; the recorded outcome stands, nothing runs again"
            );
            return Some(first_seq);
        }
        let now = log_tail(&self.shared, &self.txn_id)
            .await
            .and_then(|t| t.record)
            .map(|r| format!("{:?}", r.event.state).to_lowercase())
            .unwrap_or_else(|| "unknown".into());
        let message = format!(
            "txn_id {} is taken by another request (submission {}), which is {now}; this request does not run",
            self.txn_id,
            first
                .submit_seq
                .map(|s| s.to_string())
                .unwrap_or_else(|| "?".into()),
        );
        tracing::warn!(submit_seq = ours.submit_seq, %message, "reused txn_id");
        super::report_error(
            &self.shared,
            SubmitError {
                submit_seq: ours.submit_seq,
                txn_id: Some(self.txn_id.clone()),
                kind: "duplicate_txn_id".into(),
                message,
                path: Some("txn_id".into()),
                timestamp_ms: now_ms(),
            },
        )
        .await;
        Some(first_seq)
    }

    async fn failpoint(&self, event: &TransactionEvent, msg_id: &str) {
        if matches!(event.state, TxnState::Committing | TxnState::Aborting)
            && msg_id.ends_with(".decided")
            && self.shared.failpoint == Some(Failpoint::AfterDecision)
        {
            eprintln!("FAILPOINT after-decision txn_id={}", self.txn_id);
            std::future::pending::<()>().await;
        }
    }
}

/// The end of `txn_id`'s log (see [`crate::client::log_tail`]), read from the stream leader,
/// retrying until it answers; `None` once this coordinator no longer holds the lease.
pub(crate) async fn log_tail(shared: &Shared, txn_id: &str) -> Option<LogTail> {
    let mut delay = std::time::Duration::from_millis(50);
    loop {
        match crate::client::log_tail(&shared.streams.events, &shared.subjects, txn_id).await {
            Ok(tail) => return Some(tail),
            Err(_) if !shared.lease.is_held() => return None,
            Err(e) => {
                tracing::warn!(%txn_id, error = %e, "cannot read the log's end; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(2));
            }
        }
    }
}

/// The first record of a transaction's log (its `accepted` record, or `rejected`) with its
/// sequence, skipping foreign messages stored before it: `Ok(None)` when it has none,
/// `Err` when the log could not be read.
pub(crate) async fn first_record(
    shared: &Shared,
    txn_id: &str,
) -> Result<Option<(TransactionEvent, u64)>, String> {
    use async_nats::jetstream::stream::DirectGetErrorKind;
    let subject = shared.subjects.events(txn_id);
    let mut from = 1;
    let mut failures = 0;
    loop {
        match shared
            .streams
            .events
            .direct_get_next_for_subject(subject.clone(), Some(from))
            .await
        {
            Ok(msg) => match serde_json::from_slice::<TransactionEvent>(&msg.payload) {
                Ok(ev) if ev.txn_id == txn_id => return Ok(Some((ev, msg.sequence))),
                _ => {
                    tracing::warn!(%subject, seq = msg.sequence, "a foreign message in a log skipped");
                    from = msg.sequence + 1;
                }
            },
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => return Ok(None),
            Err(e) => {
                failures += 1;
                if failures == 3 {
                    return Err(format!("cannot read the log {subject}: {e}"));
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Awaits `work` while sending progress acks for `msg` every third of `ack_wait`, so the
/// server does not hand the submission to another coordinator while its accepted record is
/// still being written (through a NATS restart, say).
async fn keep_in_progress<F: std::future::Future>(
    msg: &jetstream::Message,
    ack_wait: std::time::Duration,
    work: F,
) -> F::Output {
    let mut work = std::pin::pin!(work);
    let every = (ack_wait / 3).max(std::time::Duration::from_millis(100));
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tokio::time::sleep(every) => {
                if let Err(e) = msg.ack_with(jetstream::AckKind::Progress).await {
                    tracing::debug!(error = %e, "progress ack failed");
                }
            }
        }
    }
}

/// Publishes an alert of `kind` about the durable record `event` on `<prefix>.alerts`, and
/// counts it. Core NATS, best effort: the record itself is the truth.
pub(crate) async fn publish_alert(
    shared: &Shared,
    kind: crate::proto::AlertKind,
    event: &TransactionEvent,
    message: String,
) {
    let alert = crate::proto::Alert {
        kind,
        txn_id: event.txn_id.clone(),
        state: event.state,
        mode: event.mode,
        timestamp_ms: event.timestamp_ms,
        message,
        reason: event.reason.clone(),
        resolved: event.resolved.clone(),
    };
    shared
        .metrics
        .alerts
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::warn!(kind = ?kind, txn_id = %event.txn_id, "alert");
    if let Err(e) = shared
        .js
        .client()
        .publish(shared.subjects.alerts(), to_bytes(&alert))
        .await
    {
        tracing::warn!(error = %e, "alert not published");
    }
}

/// Serializes a wire type. These types contain only strings, numbers and JSON values, which
/// always serialize.
pub fn to_bytes<T: serde::Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}
