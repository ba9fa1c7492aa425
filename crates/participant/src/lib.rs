//! The participant SDK: implement [`Participant`] and call [`run`]. The SDK owns the durable
//! consumer, concurrency, acks and replies, and keeps each branch's state in a JetStream KV
//! bucket of the service (`txp_<service>`, key `<txn_id>.<step>`), so that:
//!
//! - the vote is durable before the reply is sent;
//! - a redelivered prepare returns the stored vote without calling `prepare` again; commit
//!   after commit and abort after abort are no-ops;
//! - an abort for a branch with no recorded vote is passed to the service (a prepare may
//!   have held resources and crashed before its vote was stored) and then recorded, so a
//!   late prepare votes abort without calling the service;
//! - after a crash, the service's durable consumer replays what it missed and every
//!   in-doubt branch gets its decision (the coordinator resends it until confirmed).
//!
//! For sagas the same record is the barrier:
//!
//! - a repeated execute or compensate answers the first result without calling the service;
//! - a compensate with no execute recorded is a null compensation: the service's
//!   `compensate` runs (an execute may have applied and crashed before it was stored, and
//!   must do nothing if nothing was applied), then it is recorded and answered `done`;
//! - an execute after its compensate is refused (`failed`, not retryable) without calling the
//!   service (hanging prevention); if the compensate overtook an execute already running,
//!   the SDK undoes that execute's effect when it returns.
//!
//! Every rule above is a row of one pure table, [`barrier::decide`] (printed in its module
//! doc, one unit test per row); the consumer loop only carries out its plans. A command that
//! contradicts its record (a commit for a branch that never prepared) is a protocol
//! violation: refused, counted and terminated, never retried.
//!
//! Every state change is a compare-and-set on the record's KV revision, so several instances
//! of one service (sharing the durable consumer) never overwrite each other, and commands for
//! one branch take turns inside a process.
//!
//! What the service must do itself: keep whatever `prepare` holds durable (a service that
//! loses its holds in a crash cannot honour a later commit), and make every call safe to run
//! twice for the same branch, since a crash between the call and the SDK's record write
//! repeats it. The way to do that is to make the effect and a per-branch marker one atomic
//! write:
//!
//! - in a JetStream KV bucket, keep the marker (`<txn_id>.<step>`) inside the record the
//!   effect changes and write both with one compare-and-set on the key's revision
//!   ([`crate::kvtable::Table::update`]); the example services do exactly this;
//! - in a database, write the effect and a barrier row keyed by (txn_id, step), unique, in
//!   one transaction, and treat a duplicate key as "already done".

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod barrier;
pub mod keyed;
pub mod kvtable;
pub mod locks;
pub mod trace;

use barrier::{Answer, Call, Facts, Plan, Returned, Settled, Write};
pub use barrier::{BranchRecord, BranchState, HeldLock};
pub use txcoord_proto::{DeadlockPolicy, LockMode};

/// Sets up logging the way every txcoord process does: `TXCOORD_LOG` (a tracing filter) or
/// `info,async_nats=warn`, on standard error, in colour only on a terminal.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TXCOORD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::Semaphore;
use tracing::Instrument;

use txcoord_nats::{Expect, NatsError, publish_durable_with};
use txcoord_proto::{
    BATCH_HEADER, CommandBatch, CommandKind, LockConflict, MAX_NAME_LEN, ONE_PHASE_HEADER,
    ParticipantCommand, ParticipantReply, ReplyBatch, ReplyOutcome, Subjects, TxnState, is_token,
    now_ms,
};

/// What a service's `prepare` decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vote {
    /// Prepared: resources held, ready to commit.
    Ready,
    /// Nothing changed here; no phase 2 needed.
    ReadOnly,
    /// Refuses, with a reason the client will see.
    Abort(String),
}

/// What the service knows about the branch it is asked about.
#[derive(Debug, Clone, PartialEq)]
pub struct TxnContext {
    /// The transaction.
    pub txn_id: String,
    /// The service's own name.
    pub service: String,
    /// The branch's step index.
    pub step: usize,
    /// The step's action (also on commit and abort: taken from the prepare).
    pub action: String,
    /// The step's payload (also on commit and abort: taken from the prepare).
    pub payload: Value,
    /// The coordinator's attempt number for this command.
    pub attempt: u32,
    /// Sagas, on compensate: the compensating action the request named, if any.
    pub compensate_action: Option<String>,
    /// Unix milliseconds after which the coordinator no longer waits for this prepare or
    /// execute (0 on commit, abort and compensate: those are waited for until confirmed).
    pub deadline_ms: u64,
    /// The step's URL, when the request named its HTTP service by one (also on commit and
    /// abort: taken from the prepare's record when there is one).
    pub url: Option<String>,
    /// The transaction's W3C trace context, when its request had one (the coordinator
    /// sends it on every command).
    pub traceparent: Option<String>,
}

/// What a saga step's `execute` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepResult {
    /// Applied.
    Done,
    /// Not applied. A retryable failure is tried again (up to the coordinator's limit); any
    /// other starts the saga's compensation.
    Failed {
        /// Why, for the client.
        reason: String,
        /// Whether trying again may succeed.
        retryable: bool,
    },
}

/// An error a service returns from commit or abort; the command is retried with backoff.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ServiceError(pub String);

/// A service taking part in transactions: two-phase commit (`prepare`, `commit`, `abort`),
/// sagas (`execute`, `compensate`), or both. Implement the phases your service takes part
/// in; the defaults refuse.
pub trait Participant: Send + Sync + 'static {
    /// 2PC: holds what the step needs and votes. Called at most once per branch, except
    /// after a crash before the vote was stored.
    fn prepare(
        &self,
        _txn: &TxnContext,
        _action: &str,
        _payload: &Value,
    ) -> impl Future<Output = Vote> + Send {
        async { Vote::Abort("this service does not take part in two-phase commit".into()) }
    }
    /// 2PC: the named resources this branch must hold from its prepare until its commit
    /// or abort (see [`locks`]). The SDK takes them before it calls `prepare` (waiting its
    /// turn, and reporting the wait to the coordinator, which breaks deadlocks across
    /// services), keeps them in the branch's record, and releases them when the branch
    /// ends. A prepare that cannot get them votes abort without `prepare` being called.
    /// Default: none.
    fn locks(&self, _txn: &TxnContext, _action: &str, _payload: &Value) -> Vec<HeldLock> {
        Vec::new()
    }
    /// 2PC: makes the prepared change permanent.
    fn commit(&self, _txn: &TxnContext) -> impl Future<Output = Result<(), ServiceError>> + Send {
        async { Ok(()) }
    }
    /// 2PC: releases what prepare held. Also called for a branch with no recorded vote (the
    /// abort came first, or a prepare applied its effect and its process died before the
    /// vote was stored): release whatever this branch holds, and do nothing if it holds
    /// nothing.
    fn abort(&self, _txn: &TxnContext) -> impl Future<Output = Result<(), ServiceError>> + Send {
        async { Ok(()) }
    }
    /// Saga: does the step for real. Called at most once per branch (a retryable failure is
    /// not recorded, so the retry calls again), except after a crash before the result was
    /// stored; never after the branch's compensation arrived.
    fn execute(
        &self,
        _txn: &TxnContext,
        _action: &str,
        _payload: &Value,
    ) -> impl Future<Output = StepResult> + Send {
        async {
            StepResult::Failed {
                reason: "this service does not run saga steps".into(),
                retryable: false,
            }
        }
    }
    /// Saga: undoes an executed step (`txn.action` and `txn.payload` are the original ones,
    /// `txn.compensate_action` the name the request gave). Called for a branch whose execute
    /// succeeded, and for one with no execute recorded (the compensate came first, or an
    /// execute applied its effect and its process died before it was stored): undo whatever
    /// this branch did, and do nothing if it did nothing. An error is reported as `failed`
    /// and the coordinator retries.
    fn compensate(
        &self,
        _txn: &TxnContext,
    ) -> impl Future<Output = Result<(), ServiceError>> + Send {
        async { Ok(()) }
    }
}

/// SDK settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Subject prefix (`txn`).
    pub prefix: String,
    /// Commands handled at once.
    pub max_concurrent: usize,
    /// How long JetStream waits for a command's ack before it redelivers it. A command being
    /// handled is kept alive with in-progress acks every third of this, however long the
    /// service takes; so this only bounds how long a command handed to a process that died
    /// (or to a pull request it left behind) waits before another instance gets it.
    pub ack_wait: Duration,
    /// Delay before a failed commit/abort is retried.
    pub retry_delay: Duration,
    /// KV bucket replicas (1 or 3).
    pub replicas: usize,
    /// How long to wait for JetStream to acknowledge a write before retrying it (retries are
    /// idempotent; a short wait recovers fast when a server dies with the write in flight).
    pub ack_timeout: Duration,
    /// How long a branch record in a final state (committed, aborted, refused, read-only,
    /// compensated, or an abort/compensation that came first) is kept. `None` (the
    /// default): the command stream's retention plus a day, so no command that could still
    /// be delivered finds its record gone; forever if commands are kept forever.
    /// `Some(ZERO)`: forever. Prepared branches and executed saga steps are always kept.
    pub finished_record_ttl: Option<Duration>,
    /// How long a prepared branch may hear nothing from the coordinator before the SDK
    /// reads the decision from the log (`<prefix>.events.<txn_id>`) and applies it. No
    /// decision in the log means keep waiting: a participant never decides on its own.
    /// `ZERO` turns this off.
    pub in_doubt_after: Duration,
    /// How long a prepare waits for a resource another transaction holds before it votes
    /// abort (never past the command's deadline). Under `wait-die` only an older
    /// transaction waits; under `no-wait` none does.
    pub lock_wait: Duration,
    /// Chaos: hold each command for a random time up to this before handling it, as a
    /// network with jitter does (commands of concurrent transactions then reach services in
    /// different orders, which is how cycles of lock waits form). Zero, the default: none.
    pub jitter: Duration,
    /// Read command batches (`<prefix>.cmd.<service>.batch.<id>`, many commands in one
    /// message) and say so on every reply, so the coordinator sends this service batches;
    /// the replies then go out in batches too. On by default; every instance of a service
    /// must have the same setting (they share one consumer).
    pub batch: bool,
    /// Take one-phase commits (`commit_one_phase`: prepare and commit in one command, for a
    /// transaction whose only step is this service's) and say so on every reply, so the
    /// coordinator skips the decision round for such transactions. On by default.
    pub one_phase: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            prefix: "txn".into(),
            max_concurrent: 256,
            ack_wait: Duration::from_secs(5),
            retry_delay: Duration::from_millis(500),
            replicas: 1,
            ack_timeout: Duration::from_secs(1),
            finished_record_ttl: None,
            in_doubt_after: Duration::from_secs(10),
            lock_wait: Duration::from_secs(10),
            jitter: Duration::ZERO,
            batch: true,
            one_phase: true,
        }
    }
}

/// Why the participant stopped.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    /// The service name cannot be a subject token.
    #[error("service name {0:?} must be 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-'")]
    InvalidService(String),
    /// NATS trouble during setup.
    #[error(transparent)]
    Nats(#[from] NatsError),
    /// The KV bucket or consumer could not be set up.
    #[error("setup of {what} failed: {message}")]
    Setup {
        /// What was being set up.
        what: String,
        /// Why it failed.
        message: String,
    },
}

/// The KV bucket holding a service's branch records.
pub fn bucket_name(service: &str) -> String {
    format!("txp_{service}")
}

/// The KV key of a branch.
pub fn branch_key(txn_id: &str, step: usize) -> String {
    format!("{txn_id}.{step}")
}

/// Opens (or creates) the service's branch-record bucket.
pub async fn branch_store(
    js: &jetstream::Context,
    service: &str,
    replicas: usize,
) -> Result<kv::Store, SdkError> {
    let name = bucket_name(service);
    txcoord_nats::key_value(js, &name, replicas, Duration::ZERO)
        .await
        .map_err(|message| SdkError::Setup {
            what: format!("KV bucket {name}"),
            message,
        })
}

/// Reads a branch record (for tests and tools).
pub async fn read_branch(store: &kv::Store, txn_id: &str, step: usize) -> Option<BranchRecord> {
    let entry = store.entry(branch_key(txn_id, step)).await.ok()??;
    serde_json::from_slice(&entry.value).ok()
}

struct Ctx<P> {
    /// Commands for one branch take turns in this process: a redelivery or a resend that
    /// arrives while the first is still running then answers from the record instead of
    /// calling the service a second time.
    branches: crate::keyed::KeyedLocks,
    service: String,
    participant: P,
    js: jetstream::Context,
    store: Records,
    options: Options,
    /// The coordinator's log, where an in-doubt branch reads its decision.
    events: jetstream::stream::Stream,
    subjects: Subjects,
    /// Prepared branches of this process, with when they last heard from the coordinator.
    in_doubt: std::sync::Mutex<HashMap<String, InDoubt>>,
    /// Commands refused because they contradict their branch's state (see
    /// [`ApplyError::Violation`]).
    violations: AtomicU64,
    /// The test hook set in `TXCOORD_FAILPOINT`, if any.
    failpoint: Option<Failpoint>,
    /// What this process's prepared branches hold.
    locks: locks::LockTable,
    /// The newest prepare attempt and token of each branch that waits for a lock: its
    /// edges carry them (a restarted coordinator resends with new tokens).
    waiting_as: std::sync::Mutex<HashMap<String, (u32, Option<String>)>>,
    /// Wait-for edges on their way to `<prefix>.waits`, in order.
    edges: tokio::sync::mpsc::UnboundedSender<txcoord_proto::WaitEdge>,
    /// [`Failpoint::LoseReplyBatch`] has lost its batch.
    lost_reply_batch: std::sync::atomic::AtomicBool,
    /// The `prepared` records this process wrote, with their revisions, until their
    /// decision comes: a first commit or abort soon after acts on it without reading it
    /// back ([`barrier::trust_own_record`]).
    own: std::sync::Mutex<HashMap<String, OwnRecord>>,
}

/// A `prepared` record as this process wrote it.
struct OwnRecord {
    record: BranchRecord,
    revision: u64,
    written: std::time::Instant,
}

/// The most `prepared` records [`Ctx::own`] keeps (a branch whose decision went to another
/// instance stays until the map is full, then goes with the old ones).
const OWN_RECORDS: usize = 65_536;

/// The SDK's test hooks, named in `TXCOORD_FAILPOINT` (other values are the coordinator's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// `participant-exit-before-record`: the process exits after the service's `prepare`
    /// voted ready, or its `execute` succeeded, and before that is recorded, as a crash
    /// there does.
    ExitBeforeRecord,
    /// `participant-lose-reply-batch`: the first reply batch this process sends is not
    /// published (and its commands are acked), as if the message were lost on the way.
    LoseReplyBatch,
    /// `participant-exit-before-one-phase-commit`: the process exits after a one-phase
    /// commit's `prepared` record is written and before the service's `commit` runs, as a
    /// crash there does.
    ExitBeforeOnePhaseCommit,
}

impl Failpoint {
    /// The SDK failpoint `value` names, if it names one.
    pub fn parse(value: &str) -> Option<Failpoint> {
        match value {
            "participant-exit-before-record" => Some(Failpoint::ExitBeforeRecord),
            "participant-lose-reply-batch" => Some(Failpoint::LoseReplyBatch),
            "participant-exit-before-one-phase-commit" => Some(Failpoint::ExitBeforeOnePhaseCommit),
            _ => None,
        }
    }
}

/// A prepared branch waiting for its decision.
#[derive(Debug, Clone)]
struct InDoubt {
    txn_id: String,
    step: usize,
    since: std::time::Instant,
}

impl<P> Ctx<P> {
    fn in_doubt(&self) -> std::sync::MutexGuard<'_, HashMap<String, InDoubt>> {
        // A poisoned lock only means a task panicked mid-insert; the map is still sound.
        self.in_doubt.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes what a branch now is: prepared (in doubt from now on) or anything else.
    fn note(&self, cmd: &ParticipantCommand, state: Option<BranchState>) {
        let key = branch_key(&cmd.txn_id, cmd.step);
        if state == Some(BranchState::Prepared) {
            self.in_doubt().insert(
                key,
                InDoubt {
                    txn_id: cmd.txn_id.clone(),
                    step: cmd.step,
                    since: std::time::Instant::now(),
                },
            );
        } else {
            self.in_doubt().remove(&key);
        }
    }
}

/// Runs `participant` as service `service` until `shutdown` completes.
pub async fn run<P: Participant>(
    client: async_nats::Client,
    service: &str,
    participant: P,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SdkError> {
    if !is_token(service, MAX_NAME_LEN) {
        return Err(SdkError::InvalidService(service.to_string()));
    }
    let subjects = Subjects::new(options.prefix.clone());
    let (edges, edge_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(publish_edges(client.clone(), subjects.waits(), edge_rx));
    let js = txcoord_nats::jetstream(client, options.ack_timeout);
    let streams = txcoord_nats::ensure_streams(
        &js,
        &subjects,
        &txcoord_nats::StreamSettings {
            replicas: options.replicas,
            ..Default::default()
        },
    )
    .await?;
    let finished_ttl = match options.finished_record_ttl {
        Some(ttl) if ttl.is_zero() => None,
        Some(ttl) => Some(ttl),
        // Longer than an unacknowledged command can wait in the stream, plus a day.
        None => {
            let max_age = streams.commands.cached_info().config.max_age;
            (!max_age.is_zero()).then(|| max_age + Duration::from_secs(24 * 3600))
        }
    };
    let kv = branch_store(&js, service, options.replicas).await?;
    let finished_ttl = match finished_ttl {
        Some(ttl) => allow_ttl(&js, &kv, ttl).await,
        None => None,
    };
    let store = Records {
        kv,
        js: js.clone(),
        finished_ttl,
    };
    let consumer = txcoord_nats::durable_consumer(
        &streams.commands,
        consumer::pull::Config {
            durable_name: Some(service.to_string()),
            filter_subject: subjects.commands_for(service),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: options.ack_wait,
            max_ack_pending: (options.max_concurrent * 4) as i64,
            ..Default::default()
        },
    )
    .await
    .map_err(|message| SdkError::Setup {
        what: format!("durable consumer {service}"),
        message,
    })?;
    let permits = Arc::new(Semaphore::new(options.max_concurrent));
    let ctx = Arc::new(Ctx {
        branches: Default::default(),
        service: service.to_string(),
        participant,
        js,
        store,
        options,
        events: streams.events.clone(),
        subjects,
        in_doubt: Default::default(),
        own: Default::default(),
        violations: AtomicU64::new(0),
        failpoint: std::env::var("TXCOORD_FAILPOINT")
            .ok()
            .and_then(|v| Failpoint::parse(&v)),
        locks: Default::default(),
        waiting_as: Default::default(),
        edges,
        lost_reply_batch: Default::default(),
    });
    // Before any command is read: the prepared branches hold their locks again.
    scan_prepared(&ctx).await;
    if !ctx.options.in_doubt_after.is_zero() {
        tokio::spawn(resolve_in_doubt(ctx.clone()));
    }
    tracing::info!(service, "participant ready");
    let work = async {
        loop {
            // Short pull requests: the server may hand commands to a request this process
            // left behind when it died, and those wait out the ack wait; requests that
            // expire soon leave little behind.
            let mut messages = match consumer
                .stream()
                .expires(Duration::from_secs(5))
                .heartbeat(Duration::from_secs(2))
                .messages()
                .await
            {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read commands, retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            while let Some(next) = messages.next().await {
                let msg = match next {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::debug!(error = %e, "command stream error");
                        continue;
                    }
                };
                // The permit is awaited inside, with the in-progress acks running, so a command
                // waiting for its turn is not redelivered meanwhile. (The consumer's
                // max_ack_pending bounds how many wait.)
                let (ctx, permits) = (ctx.clone(), permits.clone());
                tokio::spawn(async move {
                    handle_alive(&ctx, &msg, permits).await;
                });
            }
        }
    };
    tokio::select! {
        biased;
        _ = shutdown => {}
        _ = work => {}
    }
    Ok(())
}

/// Handles one command once a concurrency permit is free, telling JetStream it is in
/// progress every third of the ack wait (waiting for the permit and for the branch's turn
/// included), so only a dead process's commands are redelivered.
async fn handle_alive<P: Participant>(
    ctx: &Ctx<P>,
    msg: &jetstream::Message,
    permits: Arc<Semaphore>,
) {
    let every = (ctx.options.ack_wait / 3).max(Duration::from_millis(100));
    let done = async {
        // A batch takes a permit per command as each one starts (holding one for the whole
        // batch would let batches wait on each other for permits).
        if let Some(id) = ctx.subjects.command_batch_id(&ctx.service, &msg.subject) {
            return handle_batch(ctx, msg, id, &permits).await;
        }
        // Closed only when the SDK stops: the command is then left to its redelivery.
        let Ok(_permit) = permits.acquire().await else {
            return;
        };
        handle(ctx, msg).await
    };
    tokio::pin!(done);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = &mut done => return,
            _ = tick.tick() => {
                if let Err(e) = msg.ack_with(jetstream::AckKind::Progress).await {
                    tracing::debug!(error = %e, "in-progress ack failed");
                }
            }
        }
    }
}

async fn handle<P: Participant>(ctx: &Ctx<P>, msg: &jetstream::Message) {
    let cmd: ParticipantCommand = match serde_json::from_slice(&msg.payload) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(subject = %msg.subject, error = %e, "malformed command terminated");
            let _ = msg.ack_with(jetstream::AckKind::Term).await;
            return;
        }
    };
    if cmd.service != ctx.service {
        tracing::warn!(service = %cmd.service, "command for another service terminated");
        let _ = msg.ack_with(jetstream::AckKind::Term).await;
        return;
    }
    let header = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(txcoord_proto::TRACEPARENT_HEADER))
        .map(|v| v.as_str());
    let first = msg.info().is_ok_and(|i| i.delivered == 1);
    match run_command(ctx, &cmd, header, first).await {
        Ran::Answered(answer) => {
            if send_reply(ctx, &cmd, answer).await {
                if let Err(e) = msg.ack().await {
                    tracing::debug!(error = %e, "command ack failed; the redelivery is answered from the record");
                }
            } else {
                let _ = msg
                    .ack_with(jetstream::AckKind::Nak(Some(ctx.options.retry_delay)))
                    .await;
            }
        }
        // Redelivering it would only refuse it again.
        Ran::Violation => {
            let _ = msg.ack_with(jetstream::AckKind::Term).await;
        }
        Ran::Failed => {
            let _ = msg
                .ack_with(jetstream::AckKind::Nak(Some(ctx.options.retry_delay)))
                .await;
        }
    }
}

/// How one command went.
enum Ran {
    /// Applied (or answered from its record): this is the reply.
    Answered(Answer),
    /// Refused as a protocol violation: no reply, and never again.
    Violation,
    /// Failed for now (the store, the service): its redelivery tries again.
    Failed,
}

/// A batch of commands ([`CommandBatch`]): each runs as it would alone, all at once; the
/// replies of those that are done go out together, in one [`ReplyBatch`] per group that
/// finished at the same moment (so a prepare waiting for a lock holds up nobody else's
/// reply). The message is acked when every command is answered; if any failed for now it
/// is delivered again, and the answered ones are then answered from their records.
async fn handle_batch<P: Participant>(
    ctx: &Ctx<P>,
    msg: &jetstream::Message,
    id: &str,
    permits: &Semaphore,
) {
    use futures::FutureExt;
    let batch: CommandBatch = match serde_json::from_slice(&msg.payload) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(subject = %msg.subject, error = %e, "malformed command batch terminated");
            let _ = msg.ack_with(jetstream::AckKind::Term).await;
            return;
        }
    };
    let first = msg.info().is_ok_and(|i| i.delivered == 1);
    let mine = batch.commands.iter().filter(|c| {
        let ok = c.service == ctx.service;
        if !ok {
            tracing::warn!(service = %c.service, txn_id = %c.txn_id, "command for another service in a batch skipped");
        }
        ok
    });
    let mut running: futures::stream::FuturesUnordered<_> = mine
        .map(|cmd| async move {
            // Closed only when the SDK stops: the batch is then left to its redelivery.
            let Ok(_permit) = permits.acquire().await else {
                return (cmd, Ran::Failed);
            };
            (cmd, run_command(ctx, cmd, None, first).await)
        })
        .collect();
    let mut again = false;
    while let Some(first) = running.next().await {
        let mut done = vec![first];
        while let Some(Some(more)) = running.next().now_or_never() {
            done.push(more);
        }
        let mut replies = Vec::with_capacity(done.len());
        for (cmd, ran) in done {
            match ran {
                Ran::Answered(answer) => replies.push(answer.reply_to(cmd, &ctx.service)),
                Ran::Violation => {}
                Ran::Failed => again = true,
            }
        }
        if !replies.is_empty() && !send_replies(ctx, id, replies).await {
            again = true;
        }
    }
    if again {
        let _ = msg
            .ack_with(jetstream::AckKind::Nak(Some(ctx.options.retry_delay)))
            .await;
    } else if let Err(e) = msg.ack().await {
        tracing::debug!(error = %e, "batch ack failed; the redelivery is answered from the records");
    }
}

/// Runs one command inside a span continuing its trace: `header` is the command message's
/// `traceparent` (the coordinator's span for the send), else the command's own field (the
/// client's; a batch's commands have only that). Without either, no span.
async fn run_command<P: Participant>(
    ctx: &Ctx<P>,
    cmd: &ParticipantCommand,
    header: Option<&str>,
    first_delivery: bool,
) -> Ran {
    let parent = header
        .and_then(trace::remote_context)
        .or_else(|| cmd.traceparent.as_deref().and_then(trace::remote_context));
    let Some(parent) = parent else {
        return run_branch(ctx, cmd, first_delivery).await;
    };
    // `cmd.service` is this service's: the callers refuse any other.
    let span = trace::start(
        format!("{} {}", cmd.service, cmd.kind.as_str()),
        opentelemetry::trace::SpanKind::Consumer,
        Some(&parent),
        trace::command_attributes(cmd),
    );
    // The span is the current context while the command runs: a service's own spans
    // (made from `Context::current()`) are its children.
    let ran = opentelemetry::context::FutureExt::with_context(
        run_branch(ctx, cmd, first_delivery),
        span.clone(),
    )
    .await;
    let error = match &ran {
        Ran::Answered(_) => None,
        Ran::Violation => Some("protocol violation: refused".to_string()),
        Ran::Failed => Some("failed for now: left to its redelivery".to_string()),
    };
    trace::end(&span, error);
    ran
}

/// Runs one command under its branch's turn: the lock table's bookkeeping, the barrier's
/// plan, what the in-doubt resolver must know. Replying is the caller's. `first_delivery`:
/// JetStream delivers this message for the first time.
async fn run_branch<P: Participant>(
    ctx: &Ctx<P>,
    cmd: &ParticipantCommand,
    first_delivery: bool,
) -> Ran {
    if !ctx.options.jitter.is_zero() {
        use std::hash::BuildHasher;
        // A fresh RandomState draws new keys: a random number per command.
        let r = std::collections::hash_map::RandomState::new().hash_one(&cmd.txn_id);
        let ms = r % (ctx.options.jitter.as_millis() as u64 + 1);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let branch = locks::BranchId {
        txn_id: cmd.txn_id.clone(),
        step: cmd.step,
    };
    match cmd.kind {
        // A prepare waiting for a lock ends now: the transaction is over.
        CommandKind::Abort if ctx.locks.cancel(&branch) => {
            tracing::info!(txn_id = %cmd.txn_id, step = cmd.step, "abort ends the prepare's lock wait");
        }
        // A resend (a restarted coordinator's, with a new token) of a prepare still waiting
        // for its lock: its edges carry the new token from now on.
        CommandKind::Prepare | CommandKind::CommitOnePhase => {
            if let Some(seen) =
                lock_std(&ctx.waiting_as).get_mut(&branch_key(&cmd.txn_id, cmd.step))
                && cmd.attempt > seen.0
            {
                *seen = (cmd.attempt, cmd.token.clone());
            }
        }
        _ => {}
    }
    let _turn = ctx.branches.lock(&branch_key(&cmd.txn_id, cmd.step)).await;
    let span = tracing::info_span!("branch", txn_id = %cmd.txn_id, step = cmd.step, kind = cmd.kind.as_str());
    async {
        let applied = apply(ctx, cmd, first_delivery).await;
        // Locks are held while the branch may be prepared: a refusal, a read-only vote and
        // the branch's end (commit or abort applied) let go. A command that failed lets go
        // of nothing: the branch may be prepared (a commit to retry, a redelivered prepare
        // that could not read its record), and its redelivery or its abort settles it.
        let ends = match (&applied, cmd.kind) {
            (Ok(a), CommandKind::Prepare) => a.outcome != ReplyOutcome::Ready,
            (Ok(_), CommandKind::Commit | CommandKind::Abort | CommandKind::CommitOnePhase) => true,
            _ => false,
        };
        if ends {
            ctx.locks.release(&branch);
        }
        match applied {
            Ok(outcome) => {
                match (cmd.kind, outcome.outcome) {
                    (CommandKind::Prepare, ReplyOutcome::Ready) => {
                        ctx.note(cmd, Some(BranchState::Prepared))
                    }
                    (CommandKind::Commit | CommandKind::Abort | CommandKind::CommitOnePhase, _) => {
                        ctx.note(cmd, None)
                    }
                    _ => {}
                }
                Ran::Answered(outcome)
            }
            Err(ApplyError::Violation(what)) => {
                let n = ctx.violations.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::error!(violation = %what, attempt = cmd.attempt, total = n,
                    "PROTOCOL VIOLATION: command refused, not applied and not confirmed");
                Ran::Violation
            }
            Err(e) => {
                tracing::warn!(error = %e, "command failed, will be retried");
                Ran::Failed
            }
        }
    }
    .instrument(span)
    .await
}

/// Every so often, reads the decision of each branch that has been prepared for longer than
/// `in_doubt_after` without hearing from the coordinator, and applies it. A decided
/// transaction so completes while no coordinator runs; an undecided one keeps waiting.
/// After a restart the prepared branches are found by one scan of the service's records.
async fn resolve_in_doubt<P: Participant>(ctx: Arc<Ctx<P>>) {
    let after = ctx.options.in_doubt_after;
    loop {
        tokio::time::sleep((after / 2).max(Duration::from_millis(100))).await;
        let due: Vec<InDoubt> = ctx
            .in_doubt()
            .values()
            .filter(|b| b.since.elapsed() >= after)
            .cloned()
            .collect();
        for branch in due {
            resolve_one(&ctx, branch).await;
        }
    }
}

/// Finds the prepared branches stored before this process started: they wait for their
/// decision (in doubt), and hold their locks again.
async fn scan_prepared<P: Participant>(ctx: &Ctx<P>) {
    let mut keys = match ctx.store.kv.keys().await {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list branch records; in-doubt branches from before this start wait for the coordinator");
            return;
        }
    };
    let mut found = 0usize;
    while let Some(key) = keys.next().await {
        let Ok(key) = key else { continue };
        let Some((txn_id, step)) = key
            .rsplit_once('.')
            .and_then(|(t, s)| Some((t.to_string(), s.parse::<usize>().ok()?)))
        else {
            continue;
        };
        if let Ok(Some((rec, _))) = load(&ctx.store.kv, &key).await
            && rec.state == BranchState::Prepared
        {
            found += 1;
            if !rec.locks.is_empty() {
                let branch = locks::BranchId {
                    txn_id: txn_id.clone(),
                    step,
                };
                ctx.locks
                    .grant(&branch, rec.lock_ts.unwrap_or(rec.updated_ms), &rec.locks);
            }
            ctx.in_doubt().entry(key).or_insert(InDoubt {
                txn_id,
                step,
                since: std::time::Instant::now(),
            });
        }
    }
    if found > 0 {
        tracing::info!(
            found,
            "prepared branches from before this start are waiting for their decision"
        );
    }
}

/// Reads one in-doubt branch's decision from the log and applies it, as if the
/// coordinator's command had come (no reply: nobody waits for one).
async fn resolve_one<P: Participant>(ctx: &Ctx<P>, branch: InDoubt) {
    let subject = ctx.subjects.events(&branch.txn_id);
    let decision = match ctx.events.direct_get_last_for_subject(subject).await {
        Ok(msg) => match serde_json::from_slice::<txcoord_proto::TransactionEvent>(&msg.payload) {
            Ok(ev) => match ev.state {
                TxnState::Committing | TxnState::Committed => Some(CommandKind::Commit),
                TxnState::Aborting | TxnState::Aborted => Some(CommandKind::Abort),
                _ => None,
            },
            Err(e) => {
                tracing::warn!(txn_id = %branch.txn_id, error = %e, "unreadable log record; still in doubt");
                None
            }
        },
        Err(e) => {
            tracing::debug!(txn_id = %branch.txn_id, error = %e, "no decision readable in the log; still in doubt");
            None
        }
    };
    let Some(kind) = decision else {
        // Keep waiting; look again after another interval.
        if let Some(b) = ctx
            .in_doubt()
            .get_mut(&branch_key(&branch.txn_id, branch.step))
        {
            b.since = std::time::Instant::now();
        }
        return;
    };
    let cmd = ParticipantCommand::new(
        branch.txn_id.clone(),
        ctx.service.clone(),
        branch.step,
        kind,
    );
    let _turn = ctx.branches.lock(&branch_key(&cmd.txn_id, cmd.step)).await;
    match apply(ctx, &cmd, false).await {
        Ok(_) => {
            ctx.note(&cmd, None);
            ctx.locks.release(&locks::BranchId {
                txn_id: cmd.txn_id.clone(),
                step: cmd.step,
            });
            tracing::info!(txn_id = %cmd.txn_id, step = cmd.step, kind = kind.as_str(),
            "in-doubt branch resolved from the coordinator's log");
        }
        Err(e) => tracing::warn!(txn_id = %cmd.txn_id, step = cmd.step, error = %e,
            "in-doubt branch not resolved; trying again later"),
    }
}

/// The reply: published durably with its deterministic id before the command is acked.
async fn send_reply<P>(ctx: &Ctx<P>, cmd: &ParticipantCommand, answer: Answer) -> bool {
    let reply = answer.reply_to(cmd, &ctx.service);
    let body = Bytes::from(serde_json::to_vec(&reply).unwrap_or_default());
    // Retry through a NATS blip (a server restart takes a second or two): giving up early
    // would leave the command to its ack_wait redelivery, long after the prepare timeout.
    publish_reply(ctx, &cmd.reply_to, &reply.msg_id(), body).await
}

/// Publishes a reply or a batch of them, saying with [`BATCH_HEADER`] whether this
/// participant reads command batches and with [`ONE_PHASE_HEADER`] whether it takes
/// one-phase commits.
async fn publish_reply<P>(ctx: &Ctx<P>, subject: &str, msg_id: &str, body: Bytes) -> bool {
    let headers: &[(&str, &str)] = match (ctx.options.batch, ctx.options.one_phase) {
        (true, true) => &[(BATCH_HEADER, "1"), (ONE_PHASE_HEADER, "1")],
        (true, false) => &[(BATCH_HEADER, "1")],
        (false, true) => &[(ONE_PHASE_HEADER, "1")],
        (false, false) => &[],
    };
    match publish_durable_with(
        &ctx.js,
        subject,
        msg_id,
        headers,
        body,
        Expect::default(),
        Some(30),
    )
    .await
    {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, "reply not stored; the command will be redelivered");
            false
        }
    }
}

/// The replies to some commands of batch `id`, in one message on
/// `<prefix>.reply.<service>.batch.<id>`. Its message id is a hash of theirs, so the same
/// replies again (a redelivered batch) are the same write.
async fn send_replies<P>(ctx: &Ctx<P>, id: &str, replies: Vec<ParticipantReply>) -> bool {
    // FNV-1a over the replies' own deterministic ids.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for r in &replies {
        for b in r.msg_id().bytes().chain([b'\n']) {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let msg_id = format!("{}.batch.{id}.{}.{hash:016x}", ctx.service, replies.len());
    if ctx.failpoint == Some(Failpoint::LoseReplyBatch)
        && !ctx.lost_reply_batch.swap(true, Ordering::Relaxed)
    {
        let txns: Vec<&str> = replies.iter().map(|r| r.txn_id.as_str()).collect();
        tracing::warn!(
            ?txns,
            "failpoint participant-lose-reply-batch: this reply batch is lost"
        );
        return true;
    }
    let body = Bytes::from(serde_json::to_vec(&ReplyBatch { replies }).unwrap_or_default());
    let subject = ctx.subjects.reply_batch(&ctx.service, id);
    publish_reply(ctx, &subject, &msg_id, body).await
}

#[derive(Debug, thiserror::Error)]
enum ApplyError {
    #[error("branch store: {0}")]
    Store(String),
    #[error("service: {0}")]
    Service(#[from] ServiceError),
    #[error("record of {0} is unreadable")]
    Corrupt(String),
    /// The command contradicts what the branch is (an abort for a committed branch, a
    /// commit for one that never prepared): the coordinator, or whoever sent it, broke the
    /// protocol. It is refused, counted, and not retried.
    #[error("protocol violation: {0}")]
    Violation(String),
}

/// Retries a KV operation through transient failures (a server restarting answers "no
/// responders" for a second or two). Only conflicts and unreadable records come back at once.
async fn kv_retry<T, F, Fut>(mut op: F) -> Result<T, ApplyError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ApplyError>>,
{
    let mut delay = Duration::from_millis(50);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match op().await {
            Err(ApplyError::Store(e)) if attempt < 40 => {
                if attempt == 3 {
                    tracing::warn!(error = %e, "branch store unavailable, retrying");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

async fn load(store: &kv::Store, key: &str) -> Result<Option<(BranchRecord, u64)>, ApplyError> {
    kv_retry(|| async {
        match store.entry(key).await {
            Ok(Some(entry)) if matches!(entry.operation, kv::Operation::Put) => {
                let rec = serde_json::from_slice(&entry.value)
                    .map_err(|_| ApplyError::Corrupt(key.to_string()))?;
                Ok(Some((rec, entry.revision)))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(ApplyError::Store(e.to_string())),
        }
    })
    .await
}

/// Where branch records live, and how long finished ones are kept.
struct Records {
    kv: kv::Store,
    js: jetstream::Context,
    /// Time-to-live of a record in a final state (`None`: kept forever).
    finished_ttl: Option<Duration>,
}

/// Whether a branch in `state` can still be asked to do anything once its commands are
/// gone from the stream. A prepared branch waits for its decision, and an executed (or
/// failed) saga step may still be compensated, however late: those are kept forever. The
/// others only answer repeats of commands already handled.
fn is_final(state: BranchState) -> bool {
    !matches!(
        state,
        BranchState::Prepared | BranchState::Executed | BranchState::ExecuteFailed
    )
}

/// Makes sure the bucket accepts per-record TTLs (buckets from older versions do not);
/// `None` if it cannot, and then finished records are kept forever.
async fn allow_ttl(js: &jetstream::Context, kv: &kv::Store, ttl: Duration) -> Option<Duration> {
    let mut stream = js.get_stream(&kv.stream_name).await.ok()?;
    let info = stream.info().await.ok()?;
    if info.config.allow_message_ttl {
        return Some(ttl);
    }
    let config = jetstream::stream::Config {
        allow_message_ttl: true,
        ..info.config.clone()
    };
    match js.update_stream(config).await {
        Ok(_) => Some(ttl),
        Err(e) => {
            tracing::warn!(bucket = %kv.name, error = %e, "cannot enable record TTLs; finished branch records are kept forever");
            None
        }
    }
}

/// Writes a record: create when `revision` is None, else compare-and-set. `Ok(Some(rev))`
/// with the record's new revision, `Ok(None)` when another writer got there first. A
/// retried write that already landed shows up as a conflict, and the caller's loop re-reads
/// and finds its own record. A record in a final state gets the finished-record TTL.
async fn store(
    records: &Records,
    key: &str,
    rec: &BranchRecord,
    revision: Option<u64>,
) -> Result<Option<u64>, ApplyError> {
    let body = Bytes::from(serde_json::to_vec(rec).unwrap_or_default());
    let ttl = records.finished_ttl.filter(|_| is_final(rec.state));
    let store = &records.kv;
    kv_retry(|| async {
        let result = match (ttl, revision) {
            (Some(ttl), rev) => {
                // The KV API has no compare-and-set with a TTL: publish to the key's subject
                // with the same headers it would use, plus Nats-TTL.
                let subject = format!(
                    "{}{key}",
                    store.put_prefix.as_deref().unwrap_or(&store.prefix)
                );
                let msg = jetstream::message::PublishMessage::build()
                    .payload(body.clone())
                    .expected_last_subject_sequence(rev.unwrap_or(0))
                    .ttl(ttl);
                match records.js.send_publish(subject, msg).await {
                    Ok(ack) => ack.await.map(|a| a.sequence),
                    Err(e) => Err(e),
                }
                .map_err(|e| {
                    let lost = matches!(
                        e.kind(),
                        jetstream::context::PublishErrorKind::WrongLastSequence
                    );
                    (lost, e.to_string())
                })
            }
            (None, None) => store.create(key, body.clone()).await.map_err(|e| {
                let lost = matches!(e.kind(), kv::CreateErrorKind::AlreadyExists);
                (lost, e.to_string())
            }),
            (None, Some(rev)) => store.update(key, body.clone(), rev).await.map_err(|e| {
                let lost = matches!(e.kind(), kv::UpdateErrorKind::WrongLastRevision);
                (lost, e.to_string())
            }),
        };
        match result {
            Ok(revision) => Ok(Some(revision)),
            Err((true, _)) => Ok(None),
            Err((false, e)) => Err(ApplyError::Store(e)),
        }
    })
    .await
}

fn record(
    state: BranchState,
    action: &str,
    payload: &Value,
    reason: Option<String>,
) -> BranchRecord {
    BranchRecord {
        state,
        action: action.to_string(),
        payload: payload.clone(),
        reason,
        updated_ms: now_ms(),
        conflict: None,
        locks: Vec::new(),
        lock_ts: None,
        url: None,
    }
}

/// The `participant-exit-before-record` failpoint.
fn exit_before_record(key: &str) -> ! {
    tracing::error!(%key, "failpoint participant-exit-before-record: exiting before the result is recorded");
    std::process::exit(101)
}

/// Carries out the barrier's plan for `cmd` ([`barrier::decide`]): load the record (unless
/// it is this process's own, just written: [`barrier::trust_own_record`]), call the service
/// if the plan says so, write the record (create, or compare-and-set), answer. A write lost to a
/// concurrent writer (another instance, a racing redelivery) is decided again from what is
/// stored.
async fn apply<P: Participant>(
    ctx: &Ctx<P>,
    cmd: &ParticipantCommand,
    first_delivery: bool,
) -> Result<Answer, ApplyError> {
    let key = branch_key(&cmd.txn_id, cmd.step);
    let from_command = TxnContext {
        txn_id: cmd.txn_id.clone(),
        service: ctx.service.clone(),
        step: cmd.step,
        action: cmd.action.clone(),
        payload: cmd.payload.clone(),
        attempt: cmd.attempt,
        compensate_action: cmd.compensate_action.clone(),
        deadline_ms: cmd.deadline_ms,
        url: cmd.url.clone(),
        traceparent: cmd.traceparent.clone(),
    };
    // The record as this command last wrote it, when the table goes on from there (a
    // one-phase commit after its prepare's record): no need to read it back.
    let mut written: Option<(BranchRecord, u64)> = None;
    if matches!(cmd.kind, CommandKind::Commit | CommandKind::Abort)
        && let Some(own) = lock_std(&ctx.own).remove(&key)
        && barrier::trust_own_record(cmd.attempt, first_delivery, own.written.elapsed())
    {
        written = Some((own.record, own.revision));
    }
    for _ in 0..16 {
        let current = match written.take() {
            Some(known) => Some(known),
            None => load(&ctx.store.kv, &key).await?,
        };
        let facts = Facts {
            now_ms: now_ms(),
            deadline_ms: cmd.deadline_ms,
            has_payload: !cmd.payload.is_null(),
            finished_records_expire: ctx.store.finished_ttl.is_some(),
        };
        let (call, write, target) =
            match barrier::decide(cmd.kind, current.as_ref().map(|(r, _)| r), &facts) {
                Plan::Answer(from) => {
                    if cmd.kind == CommandKind::Commit && current.is_none() {
                        tracing::warn!(
                            "commit for a branch whose record has expired; it was committed"
                        );
                    }
                    return Ok(barrier::answer_from(from, current.as_ref().map(|(r, _)| r)));
                }
                Plan::Refuse(why) => return Err(ApplyError::Violation(why)),
                Plan::Run {
                    call,
                    write,
                    target,
                } => (call, write, target),
            };
        // Commit and abort act on what the prepare recorded.
        let mut txn = from_command.clone();
        if let (Some((rec, _)), Some(Call::Commit | Call::Abort)) = (&current, call) {
            txn.action = rec.action.clone();
            txn.payload = rec.payload.clone();
            if rec.url.is_some() {
                txn.url = rec.url.clone();
            }
        }
        let mut conflict = None;
        let mut held = Vec::new();
        let returned = match call {
            Some(Call::Prepare) => {
                let wanted = ctx.participant.locks(&txn, &cmd.action, &cmd.payload);
                match take_locks(ctx, cmd, &wanted).await {
                    Ok(()) => {
                        held = wanted;
                        perform(ctx, Call::Prepare, &txn, cmd).await
                    }
                    Err(c) => {
                        let why = conflict_text(&c);
                        conflict = Some(c);
                        Returned::Voted(Vote::Abort(why))
                    }
                }
            }
            Some(c) => perform(ctx, c, &txn, cmd).await,
            None => Returned::Nothing,
        };
        let (state, reason) = match target.settle(call, returned) {
            Settled::Store(state, reason) => (state, reason),
            Settled::Answer(answer) => return Ok(answer),
            Settled::Retry(why) => return Err(ApplyError::Service(ServiceError(why))),
        };
        if ctx.failpoint == Some(Failpoint::ExitBeforeRecord)
            && matches!(state, BranchState::Prepared | BranchState::Executed)
        {
            exit_before_record(&key);
        }
        let stored = match (write, current) {
            (Write::Advance, Some((rec, rev))) => {
                let new = BranchRecord {
                    state,
                    updated_ms: now_ms(),
                    ..rec
                };
                store(&ctx.store, &key, &new, Some(rev))
                    .await?
                    .map(|rev| (new, rev))
            }
            (_, _) => {
                // An abort that came first has nothing to find the branch by later.
                let payload = if state == BranchState::AbortedBeforePrepare {
                    Value::Null
                } else {
                    cmd.payload.clone()
                };
                let mut rec = record(state, &cmd.action, &payload, reason);
                rec.url = cmd.url.clone();
                if state == BranchState::Prepared {
                    rec.locks = held;
                    rec.lock_ts = cmd.lock_ts;
                } else if state == BranchState::VotedAbort {
                    rec.conflict = conflict;
                }
                if let Some(rev) = store(&ctx.store, &key, &rec, None).await? {
                    Some((rec, rev))
                } else {
                    // Another writer created the record first: undo what our call did if
                    // its record contradicts it, then decide again from it.
                    if let Some((other, _)) = load(&ctx.store.kv, &key).await?
                        && let Some(undo) = barrier::undo_after_lost_create(state, other.state)
                        && let Returned::Did(Err(e)) = perform(ctx, undo, &from_command, cmd).await
                    {
                        return Err(ApplyError::Service(e));
                    }
                    None
                }
            }
        };
        match stored {
            Some((rec, rev)) if barrier::continues(cmd.kind, rec.state) => {
                if ctx.failpoint == Some(Failpoint::ExitBeforeOnePhaseCommit) {
                    tracing::error!(%key, "failpoint participant-exit-before-one-phase-commit: exiting between the prepared record and the commit");
                    std::process::exit(101)
                }
                written = Some((rec, rev));
            }
            Some((rec, rev)) => {
                if cmd.kind == CommandKind::Prepare && rec.state == BranchState::Prepared {
                    remember_own(ctx, &key, &rec, rev);
                }
                return Ok(barrier::answer_of(cmd.kind, &rec));
            }
            None => {}
        }
    }
    Err(ApplyError::Store(
        "too many concurrent writers on one branch".into(),
    ))
}

/// Keeps the `prepared` record this process just wrote for its decision
/// ([`Ctx::own`]); when the map is full, records older than a minute go first.
fn remember_own<P>(ctx: &Ctx<P>, key: &str, rec: &BranchRecord, revision: u64) {
    let mut own = lock_std(&ctx.own);
    if own.len() >= OWN_RECORDS {
        own.retain(|_, o| o.written.elapsed() < Duration::from_secs(60));
    }
    if own.len() < OWN_RECORDS {
        own.insert(
            key.to_string(),
            OwnRecord {
                record: rec.clone(),
                revision,
                written: std::time::Instant::now(),
            },
        );
    }
}

fn lock_std<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a task panicked mid-update; the map is still sound.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The abort reason of a lock refusal, for the client.
fn conflict_text(c: &LockConflict) -> String {
    let whom = c.holders.join(", ");
    match c.policy {
        DeadlockPolicy::Detect => {
            format!("lock wait for {} ran out (held by {whom})", c.resource)
        }
        policy => format!(
            "deadlock prevented ({}): {} is held by {whom}",
            policy.as_str(),
            c.resource
        ),
    }
}

/// Takes the locks a prepare needs in the service's lock table, reporting its waits on
/// `<prefix>.waits` (see [`locks`]).
async fn take_locks<P: Participant>(
    ctx: &Ctx<P>,
    cmd: &ParticipantCommand,
    wanted: &[HeldLock],
) -> Result<(), LockConflict> {
    if wanted.is_empty() {
        return Ok(());
    }
    let key = branch_key(&cmd.txn_id, cmd.step);
    lock_std(&ctx.waiting_as).insert(key.clone(), (cmd.attempt, cmd.token.clone()));
    let ts = cmd.lock_ts.unwrap_or_else(now_ms);
    let since_ms = now_ms();
    let left = Duration::from_millis(cmd.deadline_ms.saturating_sub(now_ms()));
    let wait = if cmd.deadline_ms == 0 {
        ctx.options.lock_wait
    } else {
        ctx.options.lock_wait.min(left)
    };
    let report = |e: locks::EdgeChange| {
        let (attempt, token) = lock_std(&ctx.waiting_as)
            .get(&key)
            .cloned()
            .unwrap_or((cmd.attempt, cmd.token.clone()));
        let _ = ctx.edges.send(txcoord_proto::WaitEdge {
            waiter: cmd.txn_id.clone(),
            waiter_step: cmd.step,
            waiter_ts: ts,
            holder: e.holder,
            holder_ts: e.holder_ts,
            resource: e.resource,
            service: ctx.service.clone(),
            attempt,
            token,
            withdrawn: e.withdrawn,
            since_ms,
        });
    };
    let branch = locks::BranchId {
        txn_id: cmd.txn_id.clone(),
        step: cmd.step,
    };
    let result = ctx
        .locks
        .acquire(
            &branch,
            ts,
            wanted,
            cmd.deadlock.unwrap_or_default(),
            tokio::time::Instant::now() + wait,
            &report,
        )
        .await;
    lock_std(&ctx.waiting_as).remove(&key);
    result
}

/// Publishes wait-for edges in the order the lock table reported them (core NATS: an edge
/// lives only while it is refreshed, so a lost one is sent again within a second).
async fn publish_edges(
    client: async_nats::Client,
    subject: String,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<txcoord_proto::WaitEdge>,
) {
    while let Some(edge) = rx.recv().await {
        let body = Bytes::from(serde_json::to_vec(&edge).unwrap_or_default());
        if let Err(e) = client.publish(subject.clone(), body).await {
            tracing::debug!(error = %e, "wait-for edge not published; the next refresh sends it");
        }
    }
}

/// Calls the service.
async fn perform<P: Participant>(
    ctx: &Ctx<P>,
    call: Call,
    txn: &TxnContext,
    cmd: &ParticipantCommand,
) -> Returned {
    let p = &ctx.participant;
    match call {
        Call::Prepare => Returned::Voted(p.prepare(txn, &cmd.action, &cmd.payload).await),
        Call::Execute => Returned::Stepped(p.execute(txn, &cmd.action, &cmd.payload).await),
        Call::Commit => Returned::Did(p.commit(txn).await),
        Call::Abort => Returned::Did(p.abort(txn).await),
        Call::Compensate => Returned::Did(p.compensate(txn).await),
    }
}
