//! An embeddable, in-process transaction coordinator on the same sans-IO 2PC engine as the
//! server (`txcoord-engine`): no second 2PC implementation. An in-process driver performs
//! the engine's commands by calling participants directly, with timers on tokio.
//!
//! ```text
//! begin ─▶ Active ─register/enlist─▶ Active ─prepare─▶ Preparing ─all ready─▶ Prepared ─commit─▶ Committing ─▶ Committed
//!                                       │                  │  any refusal, timeout      │
//!                                       └─rollback─────────┴────────────rollback────────┴──▶ Aborting ─▶ Aborted
//! ```
//!
//! - `prepare_transaction` is Ok only when every vote is ready or read-only; a refusal or the
//!   prepare timeout rolls the transaction back and the error names the participant.
//!   Read-only participants get no phase 2.
//! - `commit_transaction` only after a successful prepare. Commit and rollback calls that
//!   fail are retried with backoff. **Once commit is decided it is never turned into a
//!   rollback** (that would commit some participants and roll back others): a commit that
//!   keeps failing returns [`TxnError::CommitStuck`], naming the participants, while the
//!   coordinator goes on retrying in the background.
//! - Operations on one transaction take turns: a `rollback_transaction` called while its
//!   `prepare_transaction` runs waits for the prepare to end (at the latest the prepare
//!   timeout), then rolls back.
//! - A transaction neither prepared, committed nor rolled back within
//!   [`Config::orphan_timeout`] is rolled back by the coordinator, and its state says why.
//! - Every state change is a `tracing` event with the txn id, and [`TransactionCoordinator::subscribe`]
//!   follows them as typed [`TxnEvent`]s.
//! - No global lock on the hot path: transactions live in a sharded map, each with its own
//!   lock.
//!
//! - Decisions are in memory, or with [`Log::File`] in a JSON Lines file, fsynced before
//!   phase 2; [`TransactionCoordinator::open`] resumes the decided, unfinished ones with
//!   participants re-attached by [`Participant::id`].
//!
//! [`Versioned`] is a resource with optimistic concurrency done right: the version is read
//! at enlist, validated **and reserved** at prepare, applied at commit.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod coordinator;
mod log;
mod versioned;

pub use coordinator::{Config, Events, Log, TransactionCoordinator, TxnEvent};
pub use log::LogError;
pub use versioned::Versioned;

use std::fmt;
use std::time::Duration;

/// A transaction's id: a UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxnId(pub uuid::Uuid);

impl fmt::Display for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a transaction stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TxnState {
    /// Begun: participants and resources may be registered.
    Active,
    /// Asking every participant to prepare.
    Preparing,
    /// Every vote ready or read-only: waiting for commit or rollback.
    Prepared,
    /// Commit decided; telling the participants (never turned into a rollback).
    Committing,
    /// Every participant committed.
    Committed,
    /// Rollback decided; telling the participants.
    Aborting,
    /// Rolled back everywhere.
    Aborted,
}

impl TxnState {
    /// Whether nothing more happens to the transaction.
    pub fn is_final(self) -> bool {
        matches!(self, TxnState::Committed | TxnState::Aborted)
    }
}

/// A participant's vote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreparedResult {
    /// Prepared: ready to commit.
    Ready,
    /// Nothing changed here: no phase 2.
    ReadOnly,
    /// Refuses, saying why.
    Aborted(String),
}

/// A party to transactions. Object-safe: register it as `Arc<dyn Participant>`.
#[async_trait::async_trait]
pub trait Participant: Send + Sync {
    /// Phase 1: hold what the transaction needs and vote.
    async fn prepare(&self, txn: TxnId) -> PreparedResult;
    /// Phase 2: make the prepared change permanent. An error is retried with backoff.
    async fn commit(&self, txn: TxnId) -> Result<(), String>;
    /// Release what prepare held (also called when prepare was never asked, or timed out).
    /// An error is retried with backoff.
    async fn rollback(&self, txn: TxnId) -> Result<(), String>;
    /// A stable id: registering a participant of the same id twice in one transaction is a
    /// no-op, and errors name it. `None` (the default): the `Arc` itself identifies it.
    fn id(&self) -> Option<String> {
        None
    }
}

/// A resource enlisted in transactions (a cache, a value with a version...).
#[async_trait::async_trait]
pub trait Resource: Send + Sync {
    /// Phase 1: `Ok(true)` ready, `Ok(false)` cannot (a conflict), `Err` unrecoverable.
    async fn prepare(&self, txn: TxnId) -> Result<bool, String>;
    /// Phase 2: apply. An error is retried with backoff.
    async fn commit(&self, txn: TxnId) -> Result<(), String>;
    /// Release. An error is retried with backoff.
    async fn rollback(&self, txn: TxnId) -> Result<(), String>;
    /// Called once when the resource is enlisted in `txn` (optimistic concurrency reads
    /// the version here). The default does nothing.
    fn enlisted(&self, _txn: TxnId) {}
    /// A stable id, as for [`Participant::id`].
    fn id(&self) -> Option<String> {
        None
    }
}

/// What a registration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// A new branch of the transaction.
    Added,
    /// The same participant (the same `Arc`, or the same id) was registered already: no
    /// second branch.
    AlreadyRegistered,
}

/// Why an operation did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxnError {
    /// No such transaction (never begun, or finished and forgotten).
    #[error("unknown transaction {0}")]
    UnknownTransaction(TxnId),
    /// Not allowed in the transaction's state (commit before prepare, register after
    /// prepare, prepare after rollback...).
    #[error("cannot {operation} transaction {txn}: it is {state:?}")]
    IllegalState {
        /// The transaction.
        txn: TxnId,
        /// What was asked.
        operation: &'static str,
        /// Its state.
        state: TxnState,
    },
    /// More participants and resources than [`Config::max_participants`].
    #[error("transaction {txn} already has {max} participants and resources, the most allowed")]
    TooManyParticipants {
        /// The transaction.
        txn: TxnId,
        /// The limit.
        max: usize,
    },
    /// More unfinished transactions than [`Config::max_concurrent`].
    #[error("{max} transactions are unfinished, the most allowed; finish some first")]
    TooManyConcurrent {
        /// The limit.
        max: usize,
    },
    /// A participant refused to prepare; the transaction was rolled back.
    #[error("transaction {txn} rolled back: {participant} refused to prepare: {reason}")]
    PrepareRefused {
        /// The transaction.
        txn: TxnId,
        /// Who refused.
        participant: String,
        /// Why.
        reason: String,
    },
    /// Participants did not vote within the prepare timeout; the transaction was rolled
    /// back.
    #[error("transaction {txn} rolled back: no vote within {timeout:?} from {participants:?}")]
    PrepareTimedOut {
        /// The transaction.
        txn: TxnId,
        /// The silent ones.
        participants: Vec<String>,
        /// The timeout.
        timeout: Duration,
    },
    /// Commit is decided and stands, but these participants have not confirmed it yet; the
    /// coordinator keeps retrying in the background. Retrying the call does not help; the
    /// transaction's state shows when it is done.
    #[error(
        "transaction {txn} is committed by decision but {participants:?} have not confirmed yet (still retried): {last_error}"
    )]
    CommitStuck {
        /// The transaction.
        txn: TxnId,
        /// Who has not confirmed.
        participants: Vec<String>,
        /// The last error one of them returned.
        last_error: String,
    },
    /// Rolled back, but these participants have not confirmed the rollback yet (still
    /// retried in the background).
    #[error(
        "transaction {txn} is rolled back by decision but {participants:?} have not confirmed yet (still retried): {last_error}"
    )]
    RollbackStuck {
        /// The transaction.
        txn: TxnId,
        /// Who has not confirmed.
        participants: Vec<String>,
        /// The last error one of them returned.
        last_error: String,
    },
    /// The durable log (`Log::File`) could not be opened, read or written.
    #[error("{0}")]
    Log(#[from] LogError),
    /// A decided transaction in the log names a participant the reopened coordinator was
    /// not given (participants are re-attached by [`Participant::id`]).
    #[error("transaction {txn} in the log needs participant {participant:?}, which was not given")]
    MissingParticipant {
        /// The transaction.
        txn: TxnId,
        /// The participant's id.
        participant: String,
    },
    /// The coordinator rolled the transaction back: it was orphaned (neither prepared nor
    /// ended within [`Config::orphan_timeout`] of its begin, or left prepared and undecided
    /// that long).
    #[error(
        "transaction {txn} was rolled back as an orphan: not prepared, committed or rolled back within {after:?}"
    )]
    Orphaned {
        /// The transaction.
        txn: TxnId,
        /// The orphan timeout.
        after: Duration,
    },
}

impl TxnError {
    /// Whether calling again may help: never for a decided transaction (its outcome stands
    /// and the coordinator finishes it), yes when too many transactions run at once.
    pub fn retry_may_help(&self) -> bool {
        matches!(self, TxnError::TooManyConcurrent { .. })
    }
}
