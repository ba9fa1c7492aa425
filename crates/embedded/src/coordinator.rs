//! The coordinator: transactions in a sharded map, each with its own locks, each driven by
//! the 2PC engine (`txcoord_engine::twopc::TwoPc`, the server's engine, with the caller
//! deciding). The driver performs the engine's commands in order: a `Send` becomes a call
//! on the participant (at most one call per branch and kind in flight: the engine's resends
//! for restarted services would otherwise call a slow participant twice), timers run on
//! tokio, and the records the engine persists are the transaction's state here (memory is
//! this coordinator's log).

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio::sync::broadcast;
use tokio::time::Instant;
use txcoord_engine::twopc::TwoPc;
use txcoord_engine::{Command, EngineConfig, Event, Timer};
use txcoord_proto::{
    CommandKind, Mode, ParticipantCommand, ParticipantReply, Reason, ReplyOutcome, StepRequest,
    TransactionRequest,
};

use crate::{Participant, PreparedResult, Registered, Resource, TxnError, TxnId, TxnState};

/// How the coordinator behaves.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long prepare waits for every vote; a silent participant counts as a refusal.
    pub prepare_timeout: Duration,
    /// Participants and resources per transaction.
    pub max_participants: usize,
    /// Unfinished transactions at once.
    pub max_concurrent: usize,
    /// A transaction still active this long after its begin (or prepared and undecided this
    /// long after its prepare) is rolled back; registering participants does not reset it.
    pub orphan_timeout: Duration,
    /// First delay before a failed commit or rollback call is tried again (doubling).
    pub retry_base: Duration,
    /// Longest delay between tries.
    pub retry_cap: Duration,
    /// How long `commit_transaction` and `rollback_transaction` wait for every
    /// confirmation before they return (the coordinator goes on retrying after).
    pub commit_patience: Duration,
    /// How long a finished transaction's state stays readable.
    pub keep_finished: Duration,
    /// Where decisions are kept: in memory (the default), or in a file that survives the
    /// process ([`TransactionCoordinator::open`] resumes what it holds).
    pub log: Log,
}

/// Where the coordinator keeps its decisions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Log {
    /// In memory: a crash loses the transactions in flight (their participants roll back
    /// what they hold on their own terms).
    #[default]
    Memory,
    /// A JSON Lines file: each decision is appended and fsynced before any participant
    /// hears it, each finish appended, and the file compacted when mostly finished.
    File(std::path::PathBuf),
}

impl Default for Config {
    fn default() -> Self {
        Config {
            prepare_timeout: Duration::from_secs(5),
            max_participants: 100,
            max_concurrent: 1000,
            orphan_timeout: Duration::from_secs(60),
            retry_base: Duration::from_millis(50),
            retry_cap: Duration::from_secs(2),
            commit_patience: Duration::from_secs(5),
            keep_finished: Duration::from_secs(10),
            log: Log::Memory,
        }
    }
}

/// A state change of one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnEvent {
    /// The transaction.
    pub txn: TxnId,
    /// Its new state.
    pub state: TxnState,
    /// Why (a refusal, a timeout, an orphan, a stuck participant).
    pub reason: Option<String>,
}

/// Follows every transaction's state changes ([`TransactionCoordinator::subscribe`]).
pub struct Events {
    rx: broadcast::Receiver<TxnEvent>,
    missed: u64,
    subscribers: Arc<AtomicUsize>,
}

impl Drop for Events {
    fn drop(&mut self) {
        self.subscribers.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Events {
    /// The next change; `None` once the coordinator is gone. A subscriber too slow to keep
    /// up skips the changes it missed ([`Events::missed`] counts them).
    pub async fn next(&mut self) -> Option<TxnEvent> {
        loop {
            match self.rx.recv().await {
                Ok(ev) => return Some(ev),
                Err(broadcast::error::RecvError::Lagged(n)) => self.missed += n,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// Changes skipped because this subscriber fell behind.
    pub fn missed(&self) -> u64 {
        self.missed
    }
}

enum Branch {
    Participant(Arc<dyn Participant>),
    Resource(Arc<dyn Resource>),
}

impl Branch {
    fn ptr(&self) -> *const () {
        match self {
            Branch::Participant(p) => Arc::as_ptr(p) as *const (),
            Branch::Resource(r) => Arc::as_ptr(r) as *const (),
        }
    }
}

struct Entry {
    label: String,
    id: Option<String>,
    branch: Arc<Branch>,
}

struct Status {
    state: TxnState,
    why: Option<String>,
    orphaned: bool,
    touched: Instant,
}

#[derive(Default)]
struct Work {
    branches: Vec<Entry>,
    engine: Option<TwoPc>,
    /// When each armed engine timer fires, in engine milliseconds (a handful at most).
    timers: Vec<(Timer, u64)>,
    last_error: Option<String>,
    /// Why it ended, kept when the engine is let go.
    ended_because: Option<Reason>,
}

struct Txn {
    id: TxnId,
    status: Mutex<Status>,
    work: tokio::sync::Mutex<Work>,
    counted: AtomicBool,
}

const SHARDS: usize = 64;

/// One shard of the transaction map. Unfinished and finished transactions are kept apart,
/// so the reaper looks at the few unfinished ones for orphans and expires finished ones
/// from the front of a queue, instead of walking every transaction it still remembers.
#[derive(Default)]
struct Shard {
    live: HashMap<TxnId, Arc<Txn>, IdHash>,
    done: HashMap<TxnId, Arc<Txn>, IdHash>,
    /// When each finished transaction is forgotten, oldest first.
    expiry: std::collections::VecDeque<(Instant, TxnId)>,
}

/// Hashes a transaction id by mixing its bytes (FxHash's multiply-rotate): ids are random
/// UUIDs this coordinator made (or read back from its own log), so a keyed hash (SipHash,
/// the standard default) would only cost time, a profile showed about 4% of a transaction.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type IdHash = BuildHasherDefault<IdHasher>;

struct Inner {
    cfg: Config,
    shards: Vec<Mutex<Shard>>,
    unfinished: AtomicUsize,
    events: broadcast::Sender<TxnEvent>,
    /// Live [`Events`]: with none, a state change sends nothing (the channel has a lock).
    subscribers: Arc<AtomicUsize>,
    /// The engine's clock starts here (tokio's clock, so a test can pause and advance it).
    epoch: Instant,
    reaper: AtomicBool,
    /// The durable log, with `Log::File`.
    log: Option<Mutex<crate::log::DecisionLog>>,
    /// Why the log could not be opened (every `begin_transaction` then says so).
    log_error: Option<crate::LogError>,
}

/// An in-process transaction coordinator. Cheap to clone (all clones are one coordinator).
#[derive(Clone)]
pub struct TransactionCoordinator {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TransactionCoordinator {
    /// A coordinator with `cfg`. With `Log::File`, decisions the file holds from before
    /// stay in it, unresumed: use [`TransactionCoordinator::open`] to resume them. A log
    /// that cannot be opened makes every `begin_transaction` fail with the reason.
    pub fn new(cfg: Config) -> TransactionCoordinator {
        let (log, log_error) = match &cfg.log {
            Log::Memory => (None, None),
            Log::File(path) => match crate::log::DecisionLog::open(path) {
                Ok((log, unfinished)) => {
                    if !unfinished.is_empty() {
                        tracing::warn!(path = %path.display(), count = unfinished.len(), "the log holds unfinished decisions; open the coordinator with its participants to resume them");
                    }
                    (Some(Mutex::new(log)), None)
                }
                Err(e) => (None, Some(e)),
            },
        };
        let (events, _) = broadcast::channel(4096);
        let coord = TransactionCoordinator {
            inner: Arc::new(Inner {
                cfg,
                shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
                unfinished: AtomicUsize::new(0),
                events,
                subscribers: Arc::new(AtomicUsize::new(0)),
                epoch: Instant::now(),
                reaper: AtomicBool::new(false),
                log,
                log_error,
            }),
        };
        coord.ensure_reaper();
        coord
    }

    /// Opens a coordinator on `cfg`'s file log and resumes every decided, unfinished
    /// transaction in it: each decision is sent again to its participants, found among
    /// `participants` by [`Participant::id`] (a participant must have an id to be
    /// re-attached). Returns the coordinator and the resumed transactions.
    pub async fn open(
        cfg: Config,
        participants: Vec<Arc<dyn Participant>>,
    ) -> Result<(TransactionCoordinator, Vec<TxnId>), TxnError> {
        let Log::File(path) = &cfg.log else {
            return Ok((TransactionCoordinator::new(cfg), Vec::new()));
        };
        let (_, unfinished) = crate::log::DecisionLog::open(path)?;
        let by_id: HashMap<String, Arc<dyn Participant>> = participants
            .into_iter()
            .filter_map(|p| p.id().map(|id| (id, p)))
            .collect();
        for u in &unfinished {
            if let Some(missing) = u.participants.iter().find(|p| !by_id.contains_key(*p)) {
                return Err(TxnError::MissingParticipant {
                    txn: u.txn,
                    participant: missing.clone(),
                });
            }
        }
        let coord = TransactionCoordinator::new(cfg);
        if let Some(e) = &coord.inner.log_error {
            return Err(e.clone().into());
        }
        let mut resumed = Vec::new();
        for u in unfinished {
            coord.inner.resume(&u, &by_id)?;
            resumed.push(u.txn);
        }
        Ok((coord, resumed))
    }

    /// Begins a transaction: `Active`, ready for participants and resources.
    pub fn begin_transaction(&self) -> Result<TxnId, TxnError> {
        self.ensure_reaper();
        if let Some(e) = &self.inner.log_error {
            return Err(e.clone().into());
        }
        let max = self.inner.cfg.max_concurrent;
        if self
            .inner
            .unfinished
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            return Err(TxnError::TooManyConcurrent { max });
        }
        let id = TxnId(uuid::Uuid::new_v4());
        let txn = Arc::new(Txn {
            id,
            status: Mutex::new(Status {
                state: TxnState::Active,
                why: None,
                orphaned: false,
                touched: Instant::now(),
            }),
            work: tokio::sync::Mutex::new(Work::default()),
            counted: AtomicBool::new(true),
        });
        lock(self.inner.shard(&id)).live.insert(id, txn);
        self.inner.changed(id, TxnState::Active, None);
        Ok(id)
    }

    /// Adds a participant to an active transaction. The same participant again (the same
    /// `Arc`, or the same [`Participant::id`]) is a no-op that says so.
    pub fn register_participant(
        &self,
        txn: TxnId,
        participant: Arc<dyn Participant>,
    ) -> Result<Registered, TxnError> {
        let id = participant.id();
        self.add(
            txn,
            Branch::Participant(participant),
            id,
            "register a participant in",
        )
    }

    /// Enlists a resource in an active transaction (its [`Resource::enlisted`] runs now).
    pub fn enlist_resource(
        &self,
        txn: TxnId,
        resource: Arc<dyn Resource>,
    ) -> Result<Registered, TxnError> {
        let id = resource.id();
        let added = self.add(
            txn,
            Branch::Resource(resource.clone()),
            id,
            "enlist a resource in",
        )?;
        if added == Registered::Added {
            resource.enlisted(txn);
        }
        Ok(added)
    }

    fn add(
        &self,
        txn: TxnId,
        branch: Branch,
        id: Option<String>,
        operation: &'static str,
    ) -> Result<Registered, TxnError> {
        let t = self.inner.get(txn)?;
        self.inner.check_active(&t, operation)?;
        // A prepare in progress holds the work: the transaction is no longer active.
        let Ok(mut work) = t.work.try_lock() else {
            return Err(self.inner.illegal(&t, operation));
        };
        self.inner.check_active(&t, operation)?;
        let ptr = branch.ptr();
        if work
            .branches
            .iter()
            .any(|e| e.branch.ptr() == ptr || (id.is_some() && e.id == id))
        {
            return Ok(Registered::AlreadyRegistered);
        }
        let max = self.inner.cfg.max_participants;
        if work.branches.len() >= max {
            return Err(TxnError::TooManyParticipants { txn, max });
        }
        let n = work.branches.len();
        let label = id.clone().unwrap_or_else(|| match branch {
            Branch::Participant(_) => format!("participant-{n}"),
            Branch::Resource(_) => format!("resource-{n}"),
        });
        work.branches.push(Entry {
            label,
            id,
            branch: Arc::new(branch),
        });
        Ok(Registered::Added)
    }

    /// Phase 1: asks every participant and resource to prepare. `Ok` only when every vote
    /// is ready or read-only (the transaction is then `Prepared`); a refusal or the prepare
    /// timeout rolls it back, and the error names who.
    pub async fn prepare_transaction(&self, txn: TxnId) -> Result<(), TxnError> {
        let t = self.inner.get(txn)?;
        let mut work = t.work.lock().await;
        self.inner.check_active(&t, "prepare")?;
        if work.branches.is_empty() {
            // Nothing to ask: prepared at once.
            self.inner.set(&t, TxnState::Prepared, None);
            return Ok(());
        }
        let request = TransactionRequest {
            lock_ts: None,
            txn_id: Some(txn.to_string()),
            mode: Mode::TwoPc,
            steps: work
                .branches
                .iter()
                .map(|e| StepRequest {
                    url: None,
                    service: e.label.clone(),
                    // The engine copies the action into every command; nothing reads it.
                    action: String::new(),
                    payload: serde_json::Value::Null,
                    compensate: None,
                    timeout_ms: None,
                })
                .collect(),
            timeout_ms: None,
            metadata: None,
            traceparent: None,
        };
        let mut out = Vec::with_capacity(work.branches.len() + 4);
        let mut engine = TwoPc::start(
            txn.to_string(),
            &request,
            None,
            String::new(),
            self.inner.engine_config(),
            self.inner.now_ms(),
            &mut out,
        );
        engine.caller_decides();
        // Memory (or the decision file) is this coordinator's log: records need only the state.
        engine.lean_records();
        work.engine = Some(engine);
        let state = self
            .inner
            .drive(&t, &mut work, out, |s| s != TxnState::Preparing, None)
            .await;
        if state == TxnState::Prepared {
            lock(&t.status).touched = Instant::now();
            return Ok(());
        }
        // Refused or timed out: the rollback is decided; see it through (within patience).
        let reason = match &work.engine {
            Some(e) => e.snapshot(0).reason,
            None => work.ended_because.clone(),
        };
        let patience = Instant::now() + self.inner.cfg.commit_patience;
        let state = self
            .inner
            .drive(
                &t,
                &mut work,
                Vec::new(),
                TxnState::is_final,
                Some(patience),
            )
            .await;
        if !state.is_final() {
            self.inner.finish_in_background(t.clone());
        }
        Err(match reason {
            Some(Reason::VoteAbort {
                service, message, ..
            }) => TxnError::PrepareRefused {
                txn,
                participant: service,
                reason: message,
            },
            Some(Reason::Timeout { services, .. }) => TxnError::PrepareTimedOut {
                txn,
                participants: services,
                timeout: self.inner.cfg.prepare_timeout,
            },
            other => TxnError::PrepareRefused {
                txn,
                participant: "?".into(),
                reason: format!("{other:?}"),
            },
        })
    }

    /// Phase 2: commits a prepared transaction. Waits up to [`Config::commit_patience`] for
    /// every confirmation; past that the decision stands, [`TxnError::CommitStuck`] names
    /// who has not confirmed, and the coordinator keeps retrying. Committing again waits
    /// again; a committed transaction commits again as a no-op.
    pub async fn commit_transaction(&self, txn: TxnId) -> Result<(), TxnError> {
        let t = self.inner.get(txn)?;
        let mut work = t.work.lock().await;
        let state = lock(&t.status).state;
        let out = match state {
            TxnState::Committed => return Ok(()),
            TxnState::Committing => Vec::new(),
            TxnState::Prepared => {
                let mut out = Vec::with_capacity(work.branches.len() + 4);
                let Some(engine) = work.engine.as_mut() else {
                    // Nothing was asked to prepare: nothing to commit.
                    self.inner.set(&t, TxnState::Committed, None);
                    return Ok(());
                };
                let now = self.inner.now_ms();
                if let Err(e) = engine.caller_decision(now, true, rolled_back(""), &mut out) {
                    tracing::warn!(%txn, error = %e, "commit refused by the engine");
                    return Err(self.inner.illegal(&t, "commit"));
                }
                out
            }
            _ => return Err(self.inner.illegal(&t, "commit")),
        };
        let patience = Instant::now() + self.inner.cfg.commit_patience;
        let state = self
            .inner
            .drive(&t, &mut work, out, TxnState::is_final, Some(patience))
            .await;
        if state == TxnState::Committed {
            return Ok(());
        }
        let stuck = TxnError::CommitStuck {
            txn,
            participants: pending_labels(&work),
            last_error: work.last_error.clone().unwrap_or_default(),
        };
        drop(work);
        self.inner.finish_in_background(t);
        Err(stuck)
    }

    /// Rolls back a transaction any time before a commit decision (active, or prepared).
    /// Rolling back a rolled-back transaction is a no-op; a committing or committed one is
    /// an error (rolling it back would break atomicity).
    pub async fn rollback_transaction(&self, txn: TxnId) -> Result<(), TxnError> {
        let t = self.inner.get(txn)?;
        let mut work = t.work.lock().await;
        self.inner
            .rollback_locked(&t, &mut work, "rolled back by the caller")
            .await
    }

    /// The transaction's state; `None` for an unknown (or long finished) transaction.
    pub fn get_transaction_state(&self, txn: TxnId) -> Option<TxnState> {
        let t = self.inner.get(txn).ok()?;
        Some(lock(&t.status).state)
    }

    /// Why the transaction is where it is (a refusal, a timeout, an orphan rollback, a
    /// participant that has not confirmed), if anything needs saying.
    pub fn transaction_reason(&self, txn: TxnId) -> Option<String> {
        let t = self.inner.get(txn).ok()?;
        lock(&t.status).why.clone()
    }

    /// Unfinished transactions.
    pub fn unfinished(&self) -> usize {
        self.inner.unfinished.load(Ordering::Acquire)
    }

    /// Follows every transaction's state changes from now on.
    pub fn subscribe(&self) -> Events {
        self.inner.subscribers.fetch_add(1, Ordering::AcqRel);
        Events {
            rx: self.inner.events.subscribe(),
            missed: 0,
            subscribers: self.inner.subscribers.clone(),
        }
    }

    /// Starts the orphan reaper once, on the current tokio runtime if there is one (else at
    /// the next call made on one).
    fn ensure_reaper(&self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.inner.reaper.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let every = (self.inner.cfg.orphan_timeout / 4)
            .min(self.inner.cfg.keep_finished / 4)
            .clamp(Duration::from_millis(5), Duration::from_secs(1));
        handle.spawn(reap(weak, every));
    }
}

fn rolled_back(message: &str) -> Reason {
    Reason::RolledBack {
        message: message.to_string(),
    }
}

/// The labels of the branches that owe a phase-2 confirmation.
fn pending_labels(work: &Work) -> Vec<String> {
    let Some(engine) = &work.engine else {
        return Vec::new();
    };
    let snap = engine.snapshot(0);
    snap.steps
        .iter()
        .filter(|s| !s.done && s.vote == Some(txcoord_proto::Vote::Ready))
        .filter_map(|s| work.branches.get(s.step).map(|e| e.label.clone()))
        .collect()
}

/// Every so often: rolls back orphans (active, or prepared and undecided, and left alone
/// longer than the orphan timeout) and forgets transactions finished long enough ago.
async fn reap(inner: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        let mut orphans = Vec::new();
        for shard in &inner.shards {
            let mut sh = lock(shard);
            while sh.expiry.front().is_some_and(|(at, _)| *at <= now) {
                if let Some((_, id)) = sh.expiry.pop_front() {
                    sh.done.remove(&id);
                }
            }
            for t in sh.live.values() {
                let s = lock(&t.status);
                if matches!(s.state, TxnState::Active | TxnState::Prepared)
                    && now.duration_since(s.touched) > inner.cfg.orphan_timeout
                {
                    orphans.push(t.clone());
                }
            }
        }
        for t in orphans {
            let inner = inner.clone();
            tokio::spawn(async move {
                // Someone is working on it right now: not an orphan.
                let Ok(mut work) = t.work.try_lock() else {
                    return;
                };
                let after = inner.cfg.orphan_timeout;
                lock(&t.status).orphaned = true;
                let why = format!(
                    "orphaned: neither prepared, committed nor rolled back within {after:?}; rolled back by the coordinator"
                );
                tracing::warn!(txn = %t.id, "{why}");
                let _ = inner.rollback_locked(&t, &mut work, &why).await;
            });
        }
    }
}

/// A call's answer: the step, the command kind, and the reply (`Err` when a commit or
/// rollback failed).
type Answer = (usize, CommandKind, Result<ParticipantReply, String>);
type Call = BoxFuture<'static, Answer>;

impl Inner {
    fn shard(&self, id: &TxnId) -> &Mutex<Shard> {
        // The top bits: the map inside the shard indexes by the low ones.
        &self.shards[(IdHash::default().hash_one(id) >> 58) as usize % SHARDS]
    }

    fn get(&self, id: TxnId) -> Result<Arc<Txn>, TxnError> {
        let sh = lock(self.shard(&id));
        sh.live
            .get(&id)
            .or_else(|| sh.done.get(&id))
            .cloned()
            .ok_or(TxnError::UnknownTransaction(id))
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn engine_config(&self) -> EngineConfig {
        let ms = |d: Duration| d.as_millis().min(u64::MAX as u128) as u64;
        EngineConfig {
            deadlock: txcoord_proto::DeadlockPolicy::Detect,
            default_timeout_ms: ms(self.cfg.prepare_timeout).max(1),
            retry_base_ms: ms(self.cfg.retry_base).max(1),
            retry_cap_ms: ms(self.cfg.retry_cap).max(1),
            stuck_after_ms: ms(self.cfg.commit_patience).max(1),
            execute_attempts: 1,
            compensation_attempts: 1,
            // The caller decides after prepare: never one phase.
            one_phase: false,
        }
    }

    fn illegal(&self, t: &Txn, operation: &'static str) -> TxnError {
        let s = lock(&t.status);
        if s.orphaned {
            return TxnError::Orphaned {
                txn: t.id,
                after: self.cfg.orphan_timeout,
            };
        }
        TxnError::IllegalState {
            txn: t.id,
            operation,
            state: s.state,
        }
    }

    fn check_active(&self, t: &Txn, operation: &'static str) -> Result<(), TxnError> {
        if lock(&t.status).state == TxnState::Active {
            Ok(())
        } else {
            Err(self.illegal(t, operation))
        }
    }

    /// Sets the state, tells the subscribers and `tracing`, and counts a finish once.
    fn set(&self, t: &Txn, state: TxnState, why: Option<String>) {
        {
            let mut s = lock(&t.status);
            if s.state == state && (why.is_none() || s.why == why) {
                return;
            }
            s.state = state;
            if why.is_some() {
                s.why = why.clone();
            }
        }
        if state.is_final() && t.counted.swap(false, Ordering::AcqRel) {
            self.unfinished.fetch_sub(1, Ordering::AcqRel);
            let mut sh = lock(self.shard(&t.id));
            if let Some(done) = sh.live.remove(&t.id) {
                sh.done.insert(t.id, done);
                let forget_at = Instant::now() + self.cfg.keep_finished;
                sh.expiry.push_back((forget_at, t.id));
            }
        }
        self.changed(t.id, state, why);
    }

    fn changed(&self, txn: TxnId, state: TxnState, reason: Option<String>) {
        tracing::debug!(%txn, ?state, reason = reason.as_deref().unwrap_or(""), "transaction state");
        if self.subscribers.load(Ordering::Acquire) > 0 {
            let _ = self.events.send(TxnEvent { txn, state, reason });
        }
    }

    async fn rollback_locked(
        &self,
        t: &Arc<Txn>,
        work: &mut Work,
        why: &str,
    ) -> Result<(), TxnError> {
        let state = lock(&t.status).state;
        let out = match state {
            TxnState::Aborted => return Ok(()),
            TxnState::Aborting => Vec::new(),
            TxnState::Active | TxnState::Prepared if work.engine.is_none() => {
                // Never asked to prepare: each is told to roll back, once, best effort.
                self.set(t, TxnState::Aborting, Some(why.to_string()));
                let calls = work.branches.iter().map(|e| {
                    let b = e.branch.clone();
                    let txn = t.id;
                    async move {
                        match &*b {
                            Branch::Participant(p) => p.rollback(txn).await,
                            Branch::Resource(r) => r.rollback(txn).await,
                        }
                    }
                });
                for (e, r) in work
                    .branches
                    .iter()
                    .zip(futures::future::join_all(calls).await)
                {
                    if let Err(err) = r {
                        tracing::warn!(txn = %t.id, participant = %e.label, error = %err, "rollback of a branch that never prepared failed");
                    }
                }
                self.set(t, TxnState::Aborted, Some(why.to_string()));
                return Ok(());
            }
            TxnState::Prepared => {
                let Some(engine) = work.engine.as_mut() else {
                    return Err(self.illegal(t, "roll back"));
                };
                let mut out = Vec::with_capacity(work.branches.len() + 4);
                if engine
                    .caller_decision(self.now_ms(), false, rolled_back(why), &mut out)
                    .is_err()
                {
                    return Err(self.illegal(t, "roll back"));
                }
                out
            }
            _ => return Err(self.illegal(t, "roll back")),
        };
        let patience = Instant::now() + self.cfg.commit_patience;
        let state = self
            .drive(t, work, out, TxnState::is_final, Some(patience))
            .await;
        if state == TxnState::Aborted {
            return Ok(());
        }
        let stuck = TxnError::RollbackStuck {
            txn: t.id,
            participants: pending_labels(work),
            last_error: work.last_error.clone().unwrap_or_default(),
        };
        Err(stuck)
    }

    /// Keeps driving a decided transaction until every participant confirmed.
    fn finish_in_background(self: &Arc<Self>, t: Arc<Txn>) {
        self.finish_with(t, Vec::new());
    }

    fn finish_with(self: &Arc<Self>, t: Arc<Txn>, out: Vec<Command>) {
        let inner = self.clone();
        tokio::spawn(async move {
            let mut work = t.work.lock().await;
            inner
                .drive(&t, &mut work, out, TxnState::is_final, None)
                .await;
        });
    }

    /// Rebuilds a decided transaction from its log record, on the engine (as the server
    /// recovers one), and finishes it in the background.
    fn resume(
        self: &Arc<Self>,
        u: &crate::log::Unfinished,
        by_id: &HashMap<String, Arc<dyn Participant>>,
    ) -> Result<(), TxnError> {
        use txcoord_proto::{StepStatus, TransactionEvent, TxnState as W, Vote};
        let steps: Vec<StepStatus> = u
            .participants
            .iter()
            .enumerate()
            .map(|(i, id)| StepStatus {
                url: None,
                step: i,
                service: id.clone(),
                action: "prepare".into(),
                vote: Some(Vote::Ready),
                done: false,
                prepare_attempt: 1,
                decision_attempt: 1,
                payload: Some(serde_json::Value::Null),
                saga: None,
                compensate: None,
                timeout_ms: None,
            })
            .collect();
        let record = |state| TransactionEvent {
            steps: steps.clone(),
            ..TransactionEvent::new(u.txn.to_string(), state, Mode::TwoPc, 0)
        };
        let decided = if u.commit { W::Committing } else { W::Aborting };
        let mut out = Vec::new();
        let mut engine = TwoPc::recover(
            &record(W::Accepted),
            &record(decided),
            String::new(),
            self.engine_config(),
            self.now_ms(),
            &mut out,
        )
        .map_err(|e| {
            TxnError::Log(crate::LogError::Corrupt {
                path: String::new(),
                line: 0,
                message: format!("{} cannot be resumed: {e}", u.txn),
            })
        })?;
        engine.lean_records();
        let branches = u
            .participants
            .iter()
            .filter_map(|id| {
                by_id.get(id).map(|p| Entry {
                    label: id.clone(),
                    id: Some(id.clone()),
                    branch: Arc::new(Branch::Participant(p.clone())),
                })
            })
            .collect();
        let state = if u.commit {
            TxnState::Committing
        } else {
            TxnState::Aborting
        };
        let t = Arc::new(Txn {
            id: u.txn,
            status: Mutex::new(Status {
                state,
                why: Some("resumed from the log".into()),
                orphaned: false,
                touched: Instant::now(),
            }),
            work: tokio::sync::Mutex::new(Work {
                branches,
                engine: Some(engine),
                ..Work::default()
            }),
            counted: AtomicBool::new(true),
        });
        self.unfinished.fetch_add(1, Ordering::AcqRel);
        lock(self.shard(&u.txn)).live.insert(u.txn, t.clone());
        tracing::info!(txn = %u.txn, commit = u.commit, "resuming a decided transaction from the log");
        self.changed(u.txn, state, Some("resumed from the log".into()));
        self.finish_with(t, out);
        Ok(())
    }

    /// With a file log: the decision, durable before any participant hears it.
    fn log_decision(&self, t: &Txn, work: &Work, commit: bool) -> Result<(), crate::LogError> {
        let Some(log) = &self.log else {
            return Ok(());
        };
        let ready = work
            .engine
            .as_ref()
            .map(|e| e.snapshot(0).steps)
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s.vote == Some(txcoord_proto::Vote::Ready))
            .filter_map(|s| work.branches.get(s.step).map(|e| e.label.clone()))
            .collect();
        lock(log).decided(t.id, commit, ready)
    }

    fn log_finished(&self, t: &Txn) {
        if let Some(log) = &self.log
            && let Err(e) = lock(log).finished(t.id)
        {
            tracing::warn!(txn = %t.id, error = %e, "cannot record a finished transaction; a restart sends its decision again");
        }
    }

    /// Performs the engine's commands and feeds it the participants' answers and its
    /// timers until `stop(state)`, `patience` passes, or nothing more can happen.
    ///
    /// A call is polled once as it is made: in process most are answered at once, and such
    /// an answer is fed to the engine without a trip through the pending set or a timer.
    async fn drive(
        &self,
        t: &Txn,
        work: &mut Work,
        mut out: Vec<Command>,
        stop: impl Fn(TxnState) -> bool,
        patience: Option<Instant>,
    ) -> TxnState {
        let mut calls: FuturesUnordered<Call> = FuturesUnordered::new();
        // Per branch, a bit per command kind with a call in flight.
        let mut in_flight = vec![0u8; work.branches.len()];
        let mut answered: Vec<Answer> = Vec::new();
        loop {
            let mut replanned = None;
            for cmd in out.drain(..) {
                match cmd {
                    Command::Persist { msg_id, event } if msg_id.ends_with(".decided") => {
                        let commit = event.state == txcoord_proto::TxnState::Committing;
                        if let Err(e) = self.log_decision(t, work, commit) {
                            // Not durable, so nobody may hear it: the engine decides anew
                            // (a commit becomes an abort) or the transaction stops here.
                            tracing::error!(txn = %t.id, error = %e, "the decision could not be logged");
                            let mut again = Vec::new();
                            let Some(engine) = work.engine.as_mut() else {
                                return lock(&t.status).state;
                            };
                            let refusal = engine.log_refused(
                                self.now_ms(),
                                &msg_id,
                                &e.to_string(),
                                &mut again,
                            );
                            if refusal != txcoord_engine::Refusal::Replanned {
                                return lock(&t.status).state;
                            }
                            // The rest of this batch announced the refused decision.
                            replanned = Some(again);
                            break;
                        }
                        let why = event.reason.as_ref().map(describe);
                        self.set(t, state_of(event.state), why);
                    }
                    Command::Persist { event, .. } | Command::Announce { event, .. } => {
                        if event.state.is_terminal() {
                            self.log_finished(t);
                        }
                        let why = event.reason.as_ref().map(describe).or_else(|| {
                            event
                                .stuck
                                .then(|| format!("stuck: waiting for {:?}", pending_labels(work)))
                        });
                        self.set(t, state_of(event.state), why);
                    }
                    Command::Send(cmd) => {
                        let bit = kind_bit(cmd.kind);
                        let (Some(flags), Some(e)) =
                            (in_flight.get_mut(cmd.step), work.branches.get(cmd.step))
                        else {
                            continue;
                        };
                        if *flags & bit != 0 {
                            continue;
                        }
                        *flags |= bit;
                        let mut pending = call(e.branch.clone(), t.id, cmd);
                        match futures::FutureExt::now_or_never(&mut pending) {
                            Some(done) => answered.push(done),
                            None => calls.push(pending),
                        }
                    }
                    Command::SetTimer { timer, at_ms } => {
                        work.timers.retain(|(armed, _)| *armed != timer);
                        work.timers.push((timer, at_ms));
                    }
                    Command::CancelTimer(timer) => {
                        work.timers.retain(|(armed, _)| *armed != timer);
                    }
                    Command::Finished => work.timers.clear(),
                }
            }
            if let Some(again) = replanned {
                out = again;
                continue;
            }
            let Some(engine) = work.engine.as_mut() else {
                return lock(&t.status).state;
            };
            let state = state_of(engine.state());
            // Not every change is a record (the wait in Prepared is not).
            self.set(t, state, None);
            if state.is_final() {
                work.ended_because = engine.snapshot(0).reason;
                // Only the state stays readable (for `keep_finished`): the branches and the
                // engine go now, so a busy coordinator holds little per finished transaction.
                work.engine = None;
                work.branches = Vec::new();
                work.timers.clear();
                return state;
            }
            // Answers already in hand are fed first, in the order their calls were made.
            let answer = if answered.is_empty() {
                if stop(state) || (calls.is_empty() && work.timers.is_empty()) {
                    return state;
                }
                let next = work.timers.iter().min_by_key(|(_, at)| *at).copied();
                let wake = next.map(|(_, at)| {
                    let now = self.now_ms();
                    Instant::now() + Duration::from_millis(at.saturating_sub(now))
                });
                tokio::select! {
                    Some(done) = calls.next(), if !calls.is_empty() => Some(done),
                    _ = sleep_until(wake), if wake.is_some() => {
                        if let Some((timer, _)) = next {
                            work.timers.retain(|(armed, _)| *armed != timer);
                            let _ = engine.handle(self.now_ms(), Event::Timer(timer), &mut out);
                        }
                        None
                    }
                    _ = sleep_until(patience), if patience.is_some() => return state,
                }
            } else {
                Some(answered.remove(0))
            };
            if let Some((step, kind, result)) = answer {
                if let Some(flags) = in_flight.get_mut(step) {
                    *flags &= !kind_bit(kind);
                }
                match result {
                    Ok(reply) => {
                        let _ = engine.handle(self.now_ms(), Event::Reply(reply), &mut out);
                    }
                    // Not confirmed: the engine's next round sends it again.
                    Err(e) => work.last_error = Some(e),
                }
            }
        }
    }
}

fn kind_bit(kind: CommandKind) -> u8 {
    match kind {
        CommandKind::Prepare => 1,
        CommandKind::Commit => 2,
        CommandKind::Abort => 4,
        CommandKind::Execute => 8,
        CommandKind::Compensate => 16,
        // Never sent here (the caller decides, so never one phase).
        CommandKind::CommitOnePhase => 32,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One participant or resource call, answered as the engine's reply to `cmd`; `Err` when a
/// commit or rollback failed (it is sent again).
fn call(branch: Arc<Branch>, txn: TxnId, cmd: ParticipantCommand) -> Call {
    Box::pin(async move {
        // The command's service is the branch's label: the reply carries it back.
        let ParticipantCommand {
            txn_id,
            service,
            step,
            kind,
            attempt,
            ..
        } = cmd;
        let answer: Result<(ReplyOutcome, Option<String>), String> = match (&*branch, kind) {
            (Branch::Participant(p), CommandKind::Prepare) => Ok(match p.prepare(txn).await {
                PreparedResult::Ready => (ReplyOutcome::Ready, None),
                PreparedResult::ReadOnly => (ReplyOutcome::ReadOnly, None),
                PreparedResult::Aborted(why) => (ReplyOutcome::Abort, Some(why)),
            }),
            (Branch::Resource(r), CommandKind::Prepare) => Ok(match r.prepare(txn).await {
                Ok(true) => (ReplyOutcome::Ready, None),
                Ok(false) => (
                    ReplyOutcome::Abort,
                    Some("conflict: the resource cannot prepare".into()),
                ),
                Err(e) => (ReplyOutcome::Abort, Some(e)),
            }),
            (Branch::Participant(p), CommandKind::Commit) => {
                p.commit(txn).await.map(|()| (ReplyOutcome::Done, None))
            }
            (Branch::Resource(r), CommandKind::Commit) => {
                r.commit(txn).await.map(|()| (ReplyOutcome::Done, None))
            }
            (Branch::Participant(p), _) => {
                p.rollback(txn).await.map(|()| (ReplyOutcome::Done, None))
            }
            (Branch::Resource(r), _) => r.rollback(txn).await.map(|()| (ReplyOutcome::Done, None)),
        };
        let result = match answer {
            Ok((outcome, reason)) => Ok(ParticipantReply {
                conflict: None,
                txn_id,
                service,
                step,
                kind,
                outcome,
                reason,
                attempt,
                retryable: None,
                token: None,
            }),
            Err(e) => Err(format!("{service}: {e}")),
        };
        (step, kind, result)
    })
}

fn state_of(s: txcoord_proto::TxnState) -> TxnState {
    use txcoord_proto::TxnState as W;
    match s {
        W::Prepared => TxnState::Prepared,
        W::Committing => TxnState::Committing,
        W::Committed => TxnState::Committed,
        W::Aborting => TxnState::Aborting,
        W::Aborted => TxnState::Aborted,
        _ => TxnState::Preparing,
    }
}

fn describe(r: &Reason) -> String {
    match r {
        Reason::VoteAbort {
            service, message, ..
        } => format!("{service} refused to prepare: {message}"),
        Reason::Timeout { services, .. } => format!("no vote in time from {services:?}"),
        Reason::RolledBack { message } => message.clone(),
        other => format!("{other:?}"),
    }
}
