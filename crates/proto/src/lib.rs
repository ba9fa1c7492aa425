//! The wire contract: every JSON message txcoord reads or writes, the subjects they travel
//! on, and the validation of untrusted transaction requests.
//!
//! These types are the public contract described in `schemas/`. Field names are fixed; new
//! optional fields may be added. A test validates every message the code emits against its
//! schema, so this module and `schemas/*.json` cannot drift apart.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Largest number of steps one transaction may have.
pub const MAX_STEPS: usize = 100;
/// Largest length of a service name, an action or a txn_id.
pub const MAX_NAME_LEN: usize = 64;
/// Largest length of a txn_id.
pub const MAX_TXN_ID_LEN: usize = 128;

/// How a transaction is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Mode {
    /// Two-phase commit, presumed abort.
    #[default]
    #[serde(rename = "2pc")]
    TwoPc,
    /// A saga: ordered steps with compensations.
    #[serde(rename = "saga")]
    Saga,
}

/// One branch of a transaction, as a client asks for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRequest {
    /// The service that runs this step; becomes a subject token. May be left out when `url`
    /// is given: the coordinator's `http_url_service` (the bridge that runs URL steps) then
    /// runs it.
    #[serde(default)]
    pub service: String,
    /// An HTTP service named by its base URL instead of by a service name. The coordinator
    /// accepts it only when it matches an entry of its `http_allow` list (no open relay to
    /// arbitrary hosts), and `txcoord http-bridge` checks it again before each request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// What the service is asked to do (`reserve`, `charge`, ...).
    pub action: String,
    /// Free-form input for the service.
    #[serde(default)]
    pub payload: Value,
    /// Sagas: the compensating action (the participant's own default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensate: Option<String>,
    /// Sagas: this step's timeout in milliseconds, overriding the request's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// A client's request to run one transaction (`<prefix>.submit`, `<prefix>.api.execute`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransactionRequest {
    /// The transaction's id; the coordinator assigns one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txn_id: Option<String>,
    /// `2pc` (the default) or `saga`.
    #[serde(default)]
    pub mode: Mode,
    /// The branches, keyed by their index.
    pub steps: Vec<StepRequest>,
    /// Prepare timeout in milliseconds; the configured default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Opaque client data, echoed in every event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// The transaction's age for deadlock prevention, in Unix milliseconds (older is
    /// smaller); by default the time the coordinator accepted it. A client resubmitting a
    /// transaction that a `wait-die` refusal ended passes the first one's `lock_ts` (from
    /// its events), so the retry is older than before and cannot starve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_ts: Option<u64>,
    /// The W3C trace context of the caller (`00-<trace-id>-<parent-id>-<flags>`), passed on
    /// in every command and, by the HTTP bridge, as the `traceparent` header of every call.
    /// The coordinator fills it from a valid `traceparent` header on the submission (a NATS
    /// message header, or the front door's HTTP header) when the body has none. It is not
    /// part of what makes two requests the same transaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// The header (NATS or HTTP) that carries a W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The W3C trace context in `value`, when it is a valid `traceparent`
/// (<https://www.w3.org/TR/trace-context/#traceparent-header>): version, 32 hex digits of
/// trace id, 16 of parent id and 2 of flags, lowercase, dash-separated, with neither id all
/// zeros and version `ff` refused. A later version may append fields after a dash: only
/// the first 55 characters, the part this version defines, are kept.
pub fn traceparent(value: &str) -> Option<&str> {
    let value = value.trim();
    let head = value.get(..55)?;
    let rest = &value[55..];
    let parts: Vec<&str> = head.split('-').collect();
    let [version, trace, parent, flags] = parts[..] else {
        return None;
    };
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let zeros = |s: &str| s.bytes().all(|b| b == b'0');
    let ok = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && !zeros(trace)
        && hex(parent, 16)
        && !zeros(parent)
        && hex(flags, 2)
        && (rest.is_empty() || (version != "00" && rest.starts_with('-')));
    ok.then_some(head)
}

/// How the coordinator deals with distributed deadlocks between lock-holding branches
/// (config key `deadlock`; carried in every prepare so the participant's lock table applies
/// it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeadlockPolicy {
    /// A prepare that finds its resource locked waits (up to its lock wait) and reports the
    /// wait on `<prefix>.waits`; the coordinator finds cycles in the wait-for graph and
    /// aborts the youngest undecided transaction of each.
    #[default]
    Detect,
    /// An older transaction (smaller `lock_ts`) may wait for a younger holder; a younger
    /// one refuses at once.
    WaitDie,
    /// Any conflict refuses at once.
    NoWait,
}

impl DeadlockPolicy {
    /// The name used in configuration and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadlockPolicy::Detect => "detect",
            DeadlockPolicy::WaitDie => "wait-die",
            DeadlockPolicy::NoWait => "no-wait",
        }
    }
}

/// How a branch holds a named resource in a participant's lock table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockMode {
    /// With other shared holders.
    Shared,
    /// Alone.
    #[default]
    Exclusive,
}

/// A wait-for edge (`<prefix>.waits`): a prepare of `waiter` waits at `service` for
/// `resource`, which `holder` holds (or waits for ahead of it). Published when the wait
/// begins and again every second while it lasts (an edge not refreshed within the
/// coordinator's TTL expires, so a crashed waiter leaves no ghost), and once more with
/// `withdrawn` when it ends. Schema: `schemas/wait-edge.schema.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitEdge {
    /// The waiting transaction.
    pub waiter: String,
    /// Its step at `service`.
    pub waiter_step: usize,
    /// The waiter's `lock_ts`.
    #[serde(default)]
    pub waiter_ts: u64,
    /// The transaction it waits for.
    pub holder: String,
    /// The holder's `lock_ts`, when known.
    #[serde(default)]
    pub holder_ts: u64,
    /// The resource.
    pub resource: String,
    /// The service whose lock table this is.
    pub service: String,
    /// The waiting prepare's attempt.
    #[serde(default)]
    pub attempt: u32,
    /// The waiting prepare's token, echoed: only the service that read the prepare knows
    /// it, so nobody else can make a transaction look like it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The wait ended (granted, refused or cancelled).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub withdrawn: bool,
    /// When the wait began, Unix milliseconds (a cycle forms when its last wait begins).
    #[serde(default)]
    pub since_ms: u64,
}

/// Why a prepare refused for a lock: in the reply (and the branch's record) next to the
/// abort reason, so the coordinator can say `deadlock` ("prevented") instead of a plain
/// refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockConflict {
    /// The resource.
    pub resource: String,
    /// The transactions holding it (or waiting for it ahead).
    pub holders: Vec<String>,
    /// The rule that refused: `wait-die` or `no-wait` (a prevention), or `detect` (the
    /// lock wait ran out, or the wait was cancelled by the transaction's abort).
    pub policy: DeadlockPolicy,
}

/// What a command asks a participant to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// Phase 1: hold the resources and vote.
    Prepare,
    /// Phase 2: make the prepared change permanent.
    Commit,
    /// Phase 2: release whatever was prepared.
    Abort,
    /// Saga: do the step for real.
    Execute,
    /// Saga: undo a step that executed (or may have).
    Compensate,
    /// One-phase commit of a transaction's only step: prepare and, if ready, commit at
    /// once; the participant decides. Answered `done` (committed), `read_only` or `abort`
    /// (nothing applied). Sent only to a service whose replies carry [`ONE_PHASE_HEADER`].
    CommitOnePhase,
}

impl CommandKind {
    /// The lower-case name used in subjects and message ids.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Prepare => "prepare",
            CommandKind::Commit => "commit",
            CommandKind::Abort => "abort",
            CommandKind::Execute => "execute",
            CommandKind::Compensate => "compensate",
            CommandKind::CommitOnePhase => "commit_one_phase",
        }
    }
}

/// A command from the coordinator to one service (`<prefix>.cmd.<service>.<txn_id>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParticipantCommand {
    /// The transaction.
    pub txn_id: String,
    /// The service this command is for.
    pub service: String,
    /// The step's index in the request.
    pub step: usize,
    /// prepare, commit or abort.
    pub kind: CommandKind,
    /// The step's action.
    pub action: String,
    /// The step's payload (on prepare; `null` on commit and abort).
    #[serde(default)]
    pub payload: Value,
    /// Where to publish the reply, with JetStream.
    pub reply_to: String,
    /// 1 on the first send, one more on each resend by the coordinator.
    pub attempt: u32,
    /// Unix milliseconds after which a prepare should vote abort instead of being run.
    pub deadline_ms: u64,
    /// Sagas, on compensate: the compensating action named in the request, if any (`action`
    /// and `payload` are the original step's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensate_action: Option<String>,
    /// This command's token: the reply must echo it (and carry it in its `Nats-Msg-Id`).
    /// Only someone who read the command knows it, so nobody else can answer for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The transaction's age for deadlock prevention (see [`TransactionRequest::lock_ts`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_ts: Option<u64>,
    /// On prepare: the coordinator's deadlock policy, for the participant's lock table
    /// (absent: `detect`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadlock: Option<DeadlockPolicy>,
    /// The step's URL, when the request named its HTTP service by one
    /// ([`StepRequest::url`]); on every command of the branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The transaction's W3C trace context, when its request had one
    /// ([`TransactionRequest::traceparent`]); on every command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl ParticipantCommand {
    /// A command with only its transaction, service, step and kind: no action, a null
    /// payload, no reply subject, attempt 0, no deadline, and every optional field empty.
    /// Set the rest with struct update syntax
    /// (`ParticipantCommand { attempt: 1, ..ParticipantCommand::new(..) }`).
    pub fn new(txn_id: String, service: String, step: usize, kind: CommandKind) -> Self {
        ParticipantCommand {
            txn_id,
            service,
            step,
            kind,
            action: String::new(),
            payload: Value::Null,
            reply_to: String::new(),
            attempt: 0,
            deadline_ms: 0,
            compensate_action: None,
            token: None,
            lock_ts: None,
            deadlock: None,
            url: None,
            traceparent: None,
        }
    }
}

/// A participant's answer to a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyOutcome {
    /// Prepared: ready to commit.
    Ready,
    /// Nothing to commit or abort: no phase 2 for this step.
    ReadOnly,
    /// Will not commit.
    Abort,
    /// The commit, abort, execute or compensate was applied.
    Done,
    /// Sagas: the execute or compensate did not apply.
    Failed,
}

impl ReplyOutcome {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyOutcome::Ready => "ready",
            ReplyOutcome::ReadOnly => "read_only",
            ReplyOutcome::Abort => "abort",
            ReplyOutcome::Done => "done",
            ReplyOutcome::Failed => "failed",
        }
    }
}

/// A participant's reply, published with JetStream to the command's `reply_to`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParticipantReply {
    /// The transaction.
    pub txn_id: String,
    /// The replying service.
    pub service: String,
    /// The step's index.
    pub step: usize,
    /// The kind of the command answered.
    pub kind: CommandKind,
    /// The vote, or `done`.
    pub outcome: ReplyOutcome,
    /// Why, when the vote is `abort`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The attempt of the command answered.
    #[serde(default)]
    pub attempt: u32,
    /// Sagas, with `failed`: whether trying again may succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
    /// The token of the command answered, echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// An abort vote caused by a lock conflict says which (see [`LockConflict`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<LockConflict>,
}

/// Several commands for one service in one message, on
/// `<prefix>.cmd.<service>.batch.<id>`: the batched form of the command contract. The
/// coordinator sends it only to a service whose replies carry [`BATCH_HEADER`] (the SDK's
/// do, unless its batching is off); every other service gets one message per command.
/// Each command is the same as alone, with its own token and attempt; the service may
/// answer them in one [`ReplyBatch`] or one by one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandBatch {
    /// The commands, at most [`MAX_BATCH`], each for the service the subject names.
    pub commands: Vec<ParticipantCommand>,
}

/// Several replies of one service in one message, on `<prefix>.reply.<service>.batch.<id>`.
/// Each reply is checked as if it came alone (its token, its service: the subject's), so a
/// batch can carry replies of any transactions the service was sent commands of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyBatch {
    /// The replies, at most [`MAX_BATCH`].
    pub replies: Vec<ParticipantReply>,
}

/// The most commands or replies one batch carries.
pub const MAX_BATCH: usize = 512;

/// The header with which a participant's reply (alone or a batch) says it reads
/// [`CommandBatch`]es: value `1`. The coordinator sends a service batches from the first
/// reply that says so until one that does not.
pub const BATCH_HEADER: &str = "Txcoord-Batch";

/// The header with which a participant's reply (alone or a batch) says it takes
/// [`CommandKind::CommitOnePhase`]: value `1`. The coordinator commits a transaction of one
/// step in one phase only when the latest reply it believed from that step's service said
/// so (and `one_phase` is on in its configuration).
pub const ONE_PHASE_HEADER: &str = "Txcoord-One-Phase";

impl ParticipantReply {
    /// The deterministic `Nats-Msg-Id` of this reply:
    /// `<txn_id>.<service>.<step>.<kind>.<attempt>.<token>` (without `.<token>` when the
    /// command had none).
    pub fn msg_id(&self) -> String {
        let mut id = format!(
            "{}.{}.{}.{}.{}",
            self.txn_id,
            self.service,
            self.step,
            self.kind.as_str(),
            self.attempt
        );
        if let Some(t) = &self.token {
            id.push('.');
            id.push_str(t);
        }
        id
    }
}

/// A step's vote as recorded by the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Vote {
    /// Prepared.
    Ready,
    /// Nothing to do in phase 2.
    ReadOnly,
    /// Refused.
    Abort,
}

/// The state of a transaction, as published in its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TxnState {
    /// Durably recorded; prepares are about to go out.
    Accepted,
    /// Prepares sent; collecting votes.
    Preparing,
    /// Every vote is ready or read-only and the caller decides (the embedded coordinator's
    /// prepare/commit split; the server decides at once and never shows this state).
    Prepared,
    /// Decided commit (durably); confirmations pending.
    Committing,
    /// Decided abort (durably); confirmations pending.
    Aborting,
    /// Every participant committed.
    Committed,
    /// Every participant aborted.
    Aborted,
    /// The request was invalid; nothing ran.
    Rejected,
    /// Saga: running its steps forward.
    Executing,
    /// Saga: undoing the steps that executed, newest first.
    Compensating,
    /// Saga: every step done.
    Completed,
    /// Saga: every step that executed (or may have) was undone.
    Compensated,
    /// Saga: a compensation could not be applied after its retries; a person must look. It
    /// is still retried at the longest backoff, and may yet end `compensated`.
    Failed,
}

impl TxnState {
    /// The state's name on the wire (`committing`, `compensated`...).
    pub fn as_str(self) -> &'static str {
        match self {
            TxnState::Accepted => "accepted",
            TxnState::Preparing => "preparing",
            TxnState::Prepared => "prepared",
            TxnState::Committing => "committing",
            TxnState::Aborting => "aborting",
            TxnState::Committed => "committed",
            TxnState::Aborted => "aborted",
            TxnState::Rejected => "rejected",
            TxnState::Executing => "executing",
            TxnState::Compensating => "compensating",
            TxnState::Completed => "completed",
            TxnState::Compensated => "compensated",
            TxnState::Failed => "failed",
        }
    }

    /// Whether no further event follows this one.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TxnState::Committed
                | TxnState::Aborted
                | TxnState::Rejected
                | TxnState::Completed
                | TxnState::Compensated
        )
    }

    /// Whether a client waiting for the outcome can stop: a terminal state, or `failed`
    /// (which needs a person, though the coordinator keeps trying).
    pub fn is_outcome(self) -> bool {
        self.is_terminal() || self == TxnState::Failed
    }

    /// Whether the transaction's fate is settled, once this state is durable in the log:
    /// an outcome, or a two-phase decision (`committing`, `aborting`) whose confirmations
    /// are still on their way. A client that waits only for the decision
    /// ([`Until::Decided`]) stops here; the participants apply it afterwards.
    pub fn is_decided(self) -> bool {
        self.is_outcome() || matches!(self, TxnState::Committing | TxnState::Aborting)
    }

    /// Whether the transaction took effect or, durably decided, will: `committed`,
    /// `completed`, or `committing`.
    pub fn takes_effect(self) -> bool {
        matches!(
            self,
            TxnState::Committed | TxnState::Completed | TxnState::Committing
        )
    }
}

/// How long a client waits on a transaction it submits (`<prefix>.api.execute` with the
/// [`WAIT_HEADER`], `POST /v1/transactions?wait=`, `txcoord submit --until`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Until {
    /// Until the outcome: every participant confirmed (`committed`, `aborted`...), or a
    /// saga `failed`. The default.
    #[default]
    Outcome,
    /// Until the decision is durable in the log (`committing` or `aborting` for 2PC; a
    /// saga or a one-phase commit has no earlier decision than its outcome). The
    /// participants apply it afterwards, so a read of a service right after the answer may
    /// not see it yet; the outcome follows on `<prefix>.events.<txn_id>`. The answer comes
    /// only from the coordinator that wrote the decision (after JetStream acknowledged it)
    /// or from a read of the log, never from an event on the bus, where anyone the server
    /// lets publish can put a message.
    Decided,
}

impl Until {
    /// The name on the wire: `outcome` or `decided`.
    pub fn as_str(self) -> &'static str {
        match self {
            Until::Outcome => "outcome",
            Until::Decided => "decided",
        }
    }

    /// Whether a wait of this kind ends at `state`.
    pub fn reached(self, state: TxnState) -> bool {
        match self {
            Until::Outcome => state.is_outcome(),
            Until::Decided => state.is_decided(),
        }
    }
}

impl std::str::FromStr for Until {
    type Err = String;

    fn from_str(s: &str) -> Result<Until, String> {
        match s.trim() {
            "outcome" => Ok(Until::Outcome),
            "decided" => Ok(Until::Decided),
            other => Err(format!(
                "unknown wait {other:?}: expected \"outcome\" or \"decided\""
            )),
        }
    }
}

/// The header of a `<prefix>.api.execute` request that says how long to wait: `outcome`
/// (the default) or `decided` (see [`Until`]).
pub const WAIT_HEADER: &str = "Txcoord-Wait";

/// The header of a submission (on `<prefix>.submit`) that names a client's inbox: the
/// coordinator that makes the transaction's decision durable (`committing`, `aborting`, or
/// an outcome that comes first) publishes that record there, once, after JetStream
/// acknowledged it; a wait for [`Until::Decided`] without a round trip through the API. The
/// subject must start with one of the coordinator's `api_reply_prefixes` (`_INBOX` by
/// default) and have no wildcards; any other value is ignored (with a warning), so the
/// client's wait ends at the outcome instead.
pub const DECIDED_TO_HEADER: &str = "Txcoord-Decided-To";

/// The header of a submission (on `<prefix>.submit`) that names a client's inbox for the
/// transaction's outcome: the coordinator that writes the final record (`committed`,
/// `aborted`, `completed`, `compensated`, `failed`, or `rejected`) publishes it there, once,
/// after JetStream acknowledged it. A client then waits for its own transactions without
/// receiving every transaction's events on `<prefix>.events.*`. The same rules as
/// [`DECIDED_TO_HEADER`]: under the coordinator's `api_reply_prefixes`, no wildcards,
/// anything else ignored with a warning. A notice is at most once (core NATS), and a
/// coordinator that resumes the transaction from the log sends none: a client's wait falls
/// back to the log and to `<prefix>.events.<txn_id>` (as [`crate::Subjects`] names it).
pub const OUTCOME_TO_HEADER: &str = "Txcoord-Outcome-To";

/// Whether `subject` is one a message can be published on: dot-separated non-empty tokens
/// without whitespace or wildcards, at most `max` bytes.
pub fn is_publish_subject(subject: &str, max: usize) -> bool {
    !subject.is_empty()
        && subject.len() <= max
        && subject.split('.').all(|t| {
            !t.is_empty()
                && t != "*"
                && t != ">"
                && !t
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        })
}

/// Cuts `text` to at most `max` bytes (at a character boundary), saying how much was cut.
pub fn cut_text(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max.saturating_sub(48);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} [cut: {} bytes in all]", &text[..end], text.len())
}

impl Reason {
    /// Cuts the participant's or the log's text in this reason to `max` bytes.
    pub fn cut(&mut self, max: usize) {
        match self {
            Reason::VoteAbort { message, .. }
            | Reason::StepFailed { message, .. }
            | Reason::CompensationFailed { message, .. }
            | Reason::LogRefused { message }
            | Reason::RolledBack { message }
            | Reason::Operator { message, .. }
            | Reason::InvalidRequest { message, .. } => {
                *message = cut_text(std::mem::take(message), max);
            }
            Reason::Deadlock {
                message, resources, ..
            } => {
                *message = cut_text(std::mem::take(message), max);
                for r in resources {
                    *r = cut_text(std::mem::take(r), max);
                }
            }
            Reason::Timeout { .. } => {}
        }
    }
}

/// Why a transaction aborted or was rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reason {
    /// A participant voted abort.
    VoteAbort {
        /// The service that refused.
        service: String,
        /// Its step.
        step: usize,
        /// Its text.
        message: String,
    },
    /// The prepare timeout fired before every vote arrived.
    Timeout {
        /// The services that did not answer.
        services: Vec<String>,
        /// Their steps.
        steps: Vec<usize>,
    },
    /// Saga: a step failed for good.
    StepFailed {
        /// Its service.
        service: String,
        /// The step.
        step: usize,
        /// The participant's text.
        message: String,
    },
    /// Saga: a compensation kept failing; the saga is `failed` and still retried.
    CompensationFailed {
        /// Its service.
        service: String,
        /// The step being compensated.
        step: usize,
        /// The participant's last text.
        message: String,
    },
    /// The coordinator's log refused one of the transaction's records for good (too large
    /// for the stream, say) before anything was decided: it aborted (a saga compensated),
    /// and its records from then on leave out the client's metadata.
    LogRefused {
        /// The log's refusal.
        message: String,
    },
    /// A distributed deadlock: the coordinator found a cycle of waits and aborted this
    /// transaction, the youngest undecided one in it (`how`: `detected`); or a participant's
    /// lock table refused a wait that could close one (`how`: `prevented`, under `wait-die`
    /// or `no-wait`).
    Deadlock {
        /// `detected` or `prevented`.
        how: String,
        /// The transactions of the cycle in wait order, this one first (prevented: this one
        /// and the holders it would have waited for).
        txns: Vec<String>,
        /// The service of each wait.
        services: Vec<String>,
        /// The resource of each wait.
        resources: Vec<String>,
        /// Said in words.
        message: String,
        /// Detected: when the cycle formed (its last wait began), Unix milliseconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        formed_ms: Option<u64>,
    },
    /// The caller rolled the transaction back before deciding commit (the embedded
    /// coordinator's `rollback_transaction`).
    RolledBack {
        /// Who, or why.
        message: String,
    },
    /// The request broke the contract.
    InvalidRequest {
        /// What was wrong.
        message: String,
        /// Where in the request (a JSON path), when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
    },
    /// An operator aborted it before anything was decided (`txcoord resolve <id> abort`).
    Operator {
        /// Who asked.
        by: String,
        /// Why, in their words.
        message: String,
    },
}

/// What an operator asks the active coordinator to do to one transaction
/// (`txcoord resolve`, `<prefix>.api.resolve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResolveAction {
    /// Resend now what is unanswered (prepares to the silent steps, the decision to the
    /// unconfirmed, a saga's current command) instead of waiting for the next retry.
    RetryNow,
    /// Abort: only while nothing is decided (a saga: while it executes, it compensates).
    Abort,
    /// The operator applied one step's part by hand: count it as confirmed. Only for a
    /// decided transaction (2PC: committing or aborting; a saga: the step being compensated).
    MarkDone,
}

impl ResolveAction {
    /// The name used on the command line and the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ResolveAction::RetryNow => "retry-now",
            ResolveAction::Abort => "abort",
            ResolveAction::MarkDone => "mark-done",
        }
    }
}

/// What the participant of a one-phase transaction did, as an operator confirmed it at the
/// service ([`Resolution::outcome`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfirmedOutcome {
    /// It committed: the transaction ends `committed`.
    Committed,
    /// It aborted, or never prepared and never will: the transaction ends `aborted`.
    Aborted,
}

impl ConfirmedOutcome {
    /// The name used on the command line and the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ConfirmedOutcome::Committed => "committed",
            ConfirmedOutcome::Aborted => "aborted",
        }
    }
}

/// An operator's action on a transaction, as asked and as recorded (the audit): the record
/// that carries it out has it in [`TransactionEvent::resolved`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    /// What to do.
    pub action: ResolveAction,
    /// `mark-done`: the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    /// `mark-done` of a one-phase transaction whose participant never answered: what that
    /// participant did, as the operator confirmed at its service (a heuristic decision,
    /// recorded as such). Refused on any other transaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<ConfirmedOutcome>,
    /// Why, in the operator's words (required).
    pub reason: String,
    /// Who asked (the CLI sends `--by`, or the user and host it runs as).
    pub by: String,
    /// When it was asked, Unix milliseconds (set by the coordinator).
    #[serde(default)]
    pub at_ms: u64,
}

/// The request body of `<prefix>.api.resolve`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolveRequest {
    /// The transaction.
    pub txn_id: String,
    /// What to do, by whom and why.
    #[serde(flatten)]
    pub resolution: Resolution,
    /// Only check the rules: change nothing, say what would happen.
    #[serde(default)]
    pub dry_run: bool,
}

/// What an alert on `<prefix>.alerts` is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// Phase 2 (or a saga's compensation) unconfirmed past `stuck_after_ms`.
    Stuck,
    /// A saga whose compensation keeps failing: it needs a person.
    Failed,
    /// Aborted as the victim of a distributed deadlock.
    Deadlock,
    /// An operator resolved it (`txcoord resolve`).
    Resolved,
    /// A participant answered after an operator had recorded its outcome by hand
    /// (`mark-done --outcome`), and its answer says the other thing: the service and the log
    /// disagree, and a person must reconcile them.
    Contradicted,
}

/// An alert on `<prefix>.alerts` (core NATS, published by the active coordinator once the
/// record it is about is durable): something an operator should look at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// What it is about.
    pub kind: AlertKind,
    /// The transaction.
    pub txn_id: String,
    /// Its state in the record.
    pub state: TxnState,
    /// 2PC or saga.
    #[serde(default)]
    pub mode: Mode,
    /// The record's time, Unix milliseconds.
    pub timestamp_ms: u64,
    /// Said in words.
    pub message: String,
    /// The record's reason, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// Resolved: the operator's action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<Resolution>,
}

/// The longest `reason` or `by` a resolve request may carry.
pub const MAX_RESOLVE_TEXT: usize = 1024;

/// One step as seen in an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepStatus {
    /// The step's index.
    pub step: usize,
    /// Its service.
    pub service: String,
    /// The HTTP service's base URL, when the request named it by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Its action.
    pub action: String,
    /// The vote, once received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vote: Option<Vote>,
    /// Whether the participant confirmed phase 2.
    #[serde(default)]
    pub done: bool,
    /// How many times prepare was sent.
    #[serde(default)]
    pub prepare_attempt: u32,
    /// How many times the phase-2 command was sent.
    #[serde(default)]
    pub decision_attempt: u32,
    /// The payload (only in the `accepted` record, which the coordinator recovers from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// Sagas: where this step stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saga: Option<SagaStep>,
    /// Sagas: the compensating action named in the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensate: Option<String>,
    /// Sagas: this step's own timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// Where one saga step stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaStep {
    /// The step's state.
    pub state: SagaStepState,
    /// How many times execute was sent.
    #[serde(default)]
    pub execute_attempt: u32,
    /// How many times compensate was sent.
    #[serde(default)]
    pub compensate_attempt: u32,
    /// Failed executes or compensations so far (for retry limits).
    #[serde(default)]
    pub failures: u32,
}

/// The state of one saga step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStepState {
    /// Not started.
    Pending,
    /// Execute sent, no answer yet.
    Executing,
    /// Executed.
    Done,
    /// Execute failed; nothing to undo.
    Failed,
    /// No answer in time: it may have executed, so it is compensated too.
    TimedOut,
    /// Failed retryably until its tries ran out: an earlier attempt may still be in flight
    /// and succeed, so it is compensated too (a compensation that finds nothing executed is
    /// recorded by the participant, which then refuses any late execute).
    Uncertain,
    /// Compensate sent, not confirmed yet.
    Compensating,
    /// Undone.
    Compensated,
}

/// A state change of one transaction (`<prefix>.events.<txn_id>`). These records are also the
/// coordinator's durable log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransactionEvent {
    /// The transaction.
    pub txn_id: String,
    /// Its state after this change.
    pub state: TxnState,
    /// How it runs.
    #[serde(default)]
    pub mode: Mode,
    /// Every step with its vote so far.
    pub steps: Vec<StepStatus>,
    /// When this event was made, Unix milliseconds.
    pub timestamp_ms: u64,
    /// Why it aborted or was rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// Phase 2 has been unconfirmed longer than the configured limit; still retried.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stuck: bool,
    /// The prepare timeout in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// The client's metadata, echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// The stream sequence of the submission this transaction came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submit_seq: Option<u64>,
    /// Sagas: the step being executed or compensated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step: Option<usize>,
    /// Sagas: why compensation started, kept while `reason` says a compensation is failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<Reason>,
    /// In the `accepted` record: the transaction's `lock_ts` when the request gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_ts: Option<u64>,
    /// In the `accepted` record: the request's W3C trace context, so a recovered
    /// transaction's commands carry it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// On the record that carries out an operator's action: the action, who asked, why
    /// and when (the audit record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<Resolution>,
    /// 2PC with one step, committed in one phase ([`CommandKind::CommitOnePhase`]): the
    /// participant decides, there is no `committing`/`aborting` record, and the coordinator
    /// never aborts it on its own once the command is out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub one_phase: bool,
}

impl TransactionEvent {
    /// An event with only its identity, state, mode and time: no steps, and every optional
    /// field empty. Set the rest with struct update syntax
    /// (`TransactionEvent { steps, ..TransactionEvent::new(..) }`).
    pub fn new(txn_id: String, state: TxnState, mode: Mode, timestamp_ms: u64) -> Self {
        TransactionEvent {
            txn_id,
            state,
            mode,
            steps: Vec::new(),
            timestamp_ms,
            reason: None,
            stuck: false,
            timeout_ms: None,
            metadata: None,
            submit_seq: None,
            current_step: None,
            cause: None,
            lock_ts: None,
            traceparent: None,
            resolved: None,
            one_phase: false,
        }
    }
}

/// One step's part of a [`RequestShape`]: service, URL, action, payload, compensation,
/// timeout.
type StepShape = (
    String,
    Option<String>,
    String,
    Value,
    Option<String>,
    Option<u64>,
);

/// What makes two requests the same transaction: mode, steps (service, URL, action, payload,
/// compensation, step timeout), timeout and metadata. A resubmission of the same request
/// under a taken txn_id is a retry; any other is a reused id.
#[derive(Debug, PartialEq)]
pub struct RequestShape {
    mode: Mode,
    steps: Vec<StepShape>,
    timeout_ms: Option<u64>,
    metadata: Option<Value>,
}

impl RequestShape {
    /// The shape of a request as a client sent it (the timeout only if it named one).
    pub fn of_request(r: &TransactionRequest) -> RequestShape {
        RequestShape {
            mode: r.mode,
            steps: r
                .steps
                .iter()
                .map(|s| {
                    (
                        s.service.clone(),
                        s.url.clone(),
                        s.action.clone(),
                        s.payload.clone(),
                        s.compensate.clone(),
                        s.timeout_ms,
                    )
                })
                .collect(),
            timeout_ms: r.timeout_ms,
            metadata: r.metadata.clone(),
        }
    }

    /// The shape of the request an `accepted` record carries.
    pub fn of_accepted(ev: &TransactionEvent) -> RequestShape {
        RequestShape {
            mode: ev.mode,
            steps: ev
                .steps
                .iter()
                .map(|s| {
                    (
                        s.service.clone(),
                        s.url.clone(),
                        s.action.clone(),
                        s.payload.clone().unwrap_or(Value::Null),
                        s.compensate.clone(),
                        s.timeout_ms,
                    )
                })
                .collect(),
            timeout_ms: ev.timeout_ms,
            metadata: ev.metadata.clone(),
        }
    }

    /// Whether `self` (what a client sent) asks for the transaction `accepted` records.
    /// A request that named no timeout matches any.
    pub fn matches(&self, accepted: &RequestShape) -> bool {
        self.mode == accepted.mode
            && self.steps == accepted.steps
            && self.metadata == accepted.metadata
            && (self.timeout_ms.is_none() || self.timeout_ms == accepted.timeout_ms)
    }
}

/// What went wrong with a submission; published on `<prefix>.errors` when the request has no
/// usable txn_id (otherwise the same content goes into a `rejected` event).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitError {
    /// The stream sequence of the bad submission, kept in the submit stream for inspection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submit_seq: Option<u64>,
    /// The txn_id, if one could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txn_id: Option<String>,
    /// What kind of problem: `too_large`, `malformed_json`, `invalid_request`, `duplicate_txn_id`.
    pub kind: String,
    /// What was wrong.
    pub message: String,
    /// Where (a JSON path), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// When, Unix milliseconds.
    pub timestamp_ms: u64,
}

/// The request body of `<prefix>.api.status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusRequest {
    /// The transaction to look up.
    pub txn_id: String,
}

/// An error reply of the request/reply API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// What was wrong.
    pub error: String,
}

/// Whether `name` can be a subject token: `[A-Za-z0-9_-]{1,max}`.
pub fn is_token(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Why a submission was refused, with where it went wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// Bigger than the configured limit.
    #[error("request is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not JSON at all.
    #[error("request is not valid JSON: {0}")]
    MalformedJson(String),
    /// JSON, but not a valid transaction request.
    #[error("invalid request at {path}: {message}")]
    Invalid {
        /// A JSON path such as `steps[1].service`.
        path: String,
        /// What was wrong.
        message: String,
    },
}

impl RequestError {
    /// The `kind` used in [`SubmitError`].
    pub fn kind(&self) -> &'static str {
        match self {
            RequestError::TooLarge { .. } => "too_large",
            RequestError::MalformedJson(_) => "malformed_json",
            RequestError::Invalid { .. } => "invalid_request",
        }
    }

    /// The JSON path, when known.
    pub fn path(&self) -> Option<String> {
        match self {
            RequestError::Invalid { path, .. } => Some(path.clone()),
            _ => None,
        }
    }

    /// A request that breaks a rule at `path` (JSON-path-like: `steps[1].url`).
    pub fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        RequestError::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Limits applied to incoming requests.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Largest accepted request, in bytes.
    pub max_bytes: usize,
    /// Largest number of steps.
    pub max_steps: usize,
    /// Largest timeout a request may ask for, in milliseconds.
    pub max_timeout_ms: u64,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_bytes: 256 * 1024,
            max_steps: MAX_STEPS,
            max_timeout_ms: 3_600_000,
        }
    }
}

/// The outcome of parsing a submission: the request, or the error with whatever txn_id could
/// be salvaged so the rejection can be published on that transaction's event subject.
#[derive(Debug)]
pub struct Parsed {
    /// The txn_id found in the submission, if it was a valid token.
    pub txn_id: Option<String>,
    /// The request, or why it was refused.
    pub result: Result<TransactionRequest, RequestError>,
}

/// Parses and validates an untrusted submission.
pub fn parse_request(bytes: &[u8], limits: &RequestLimits) -> Parsed {
    if bytes.len() > limits.max_bytes {
        return Parsed {
            txn_id: None,
            result: Err(RequestError::TooLarge {
                size: bytes.len(),
                limit: limits.max_bytes,
            }),
        };
    }
    let value: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => {
            return Parsed {
                txn_id: None,
                result: Err(RequestError::MalformedJson(e.to_string())),
            };
        }
    };
    let txn_id = value
        .get("txn_id")
        .and_then(Value::as_str)
        .filter(|id| is_token(id, MAX_TXN_ID_LEN))
        .map(str::to_owned);
    let result = request_from_value(value, limits);
    Parsed { txn_id, result }
}

fn request_from_value(
    value: Value,
    limits: &RequestLimits,
) -> Result<TransactionRequest, RequestError> {
    if !value.is_object() {
        return Err(RequestError::invalid(
            "$",
            "a transaction request must be a JSON object",
        ));
    }
    let request: TransactionRequest = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        RequestError::invalid(
            if path == "." { "$".into() } else { path },
            e.into_inner().to_string(),
        )
    })?;
    validate_request(&request, limits)?;
    Ok(request)
}

/// Longest step URL accepted (the URL rides in every command and record of its branch).
/// Its shape and whether it is allowed are the coordinator's `http_allow` check.
pub const MAX_URL_LEN: usize = 2048;

/// Checks the rules a well-typed request must still follow.
pub fn validate_request(
    request: &TransactionRequest,
    limits: &RequestLimits,
) -> Result<(), RequestError> {
    if let Some(id) = &request.txn_id
        && !is_token(id, MAX_TXN_ID_LEN)
    {
        return Err(RequestError::invalid(
            "txn_id",
            format!(
                "txn_id {id:?} must be 1 to {MAX_TXN_ID_LEN} characters of A-Z, a-z, 0-9, '_' or '-'"
            ),
        ));
    }
    if request.steps.is_empty() {
        return Err(RequestError::invalid(
            "steps",
            "a transaction needs at least one step",
        ));
    }
    if request.steps.len() > limits.max_steps {
        return Err(RequestError::invalid(
            "steps",
            format!(
                "{} steps is more than the limit of {}",
                request.steps.len(),
                limits.max_steps
            ),
        ));
    }
    for (i, step) in request.steps.iter().enumerate() {
        if let Some(url) = &step.url
            && url.len() > MAX_URL_LEN
        {
            return Err(RequestError::invalid(
                format!("steps[{i}].url"),
                format!(
                    "url is {} bytes, over the limit of {MAX_URL_LEN}",
                    url.len()
                ),
            ));
        }
        // A URL step may leave its service to the coordinator's configuration.
        let named_by_url = step.url.is_some() && step.service.is_empty();
        if !named_by_url && !is_token(&step.service, MAX_NAME_LEN) {
            return Err(RequestError::invalid(
                format!("steps[{i}].service"),
                format!(
                    "service name {:?} must be 1 to {MAX_NAME_LEN} characters of A-Z, a-z, 0-9, '_' or '-'",
                    step.service
                ),
            ));
        }
        if step.action.is_empty() || step.action.len() > MAX_NAME_LEN {
            return Err(RequestError::invalid(
                format!("steps[{i}].action"),
                format!("action must be 1 to {MAX_NAME_LEN} characters"),
            ));
        }
        if request.mode == Mode::TwoPc && (step.compensate.is_some() || step.timeout_ms.is_some()) {
            return Err(RequestError::invalid(
                format!("steps[{i}]"),
                "compensate and a per-step timeout_ms belong to mode \"saga\"",
            ));
        }
        if let Some(c) = &step.compensate
            && (c.is_empty() || c.len() > MAX_NAME_LEN)
        {
            return Err(RequestError::invalid(
                format!("steps[{i}].compensate"),
                format!("compensate must be 1 to {MAX_NAME_LEN} characters"),
            ));
        }
        if let Some(t) = step.timeout_ms
            && (t == 0 || t > limits.max_timeout_ms)
        {
            return Err(RequestError::invalid(
                format!("steps[{i}].timeout_ms"),
                format!(
                    "timeout_ms must be between 1 and {} (got {t})",
                    limits.max_timeout_ms
                ),
            ));
        }
    }
    if let Some(t) = request.timeout_ms
        && (t == 0 || t > limits.max_timeout_ms)
    {
        return Err(RequestError::invalid(
            "timeout_ms",
            format!(
                "timeout_ms must be between 1 and {} (got {t})",
                limits.max_timeout_ms
            ),
        ));
    }
    if let Some(m) = &request.metadata
        && !m.is_object()
    {
        return Err(RequestError::invalid(
            "metadata",
            "metadata must be a JSON object",
        ));
    }
    if let Some(t) = &request.traceparent
        && traceparent(t) != Some(t.as_str())
    {
        return Err(RequestError::invalid(
            "traceparent",
            format!(
                "traceparent {:?} is not a W3C trace context (00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>, lowercase, ids not all zeros)",
                cut_text(t.clone(), 80)
            ),
        ));
    }
    Ok(())
}

/// The subjects and stream names derived from the configured prefix.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// Subjects under `prefix` (`txn` by default).
    pub fn new(prefix: impl Into<String>) -> Self {
        Subjects {
            prefix: prefix.into(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Where the coordinator publishes [`Alert`]s: `<prefix>.alerts`.
    pub fn alerts(&self) -> String {
        format!("{}.alerts", self.prefix)
    }

    /// Where participants report wait-for edges ([`WaitEdge`]): `<prefix>.waits`.
    pub fn waits(&self) -> String {
        format!("{}.waits", self.prefix)
    }

    /// Where clients submit requests (as the anonymous client).
    pub fn submit(&self) -> String {
        format!("{}.submit", self.prefix)
    }

    /// Where the client `client` submits: `<prefix>.submit.<client>`. NATS permissions can
    /// give each client user its own, so the coordinator knows who submitted (fair shares).
    pub fn submit_as(&self, client: &str) -> String {
        format!("{}.submit.{client}", self.prefix)
    }

    /// Every submit subject with a client name.
    pub fn submit_named(&self) -> String {
        format!("{}.submit.*", self.prefix)
    }

    /// The client a submission came from, by its subject (None for plain `<prefix>.submit`).
    pub fn submitter<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".submit.")
            .filter(|c| !c.is_empty() && !c.contains('.'))
    }

    /// The events of one transaction.
    pub fn events(&self, txn_id: &str) -> String {
        format!("{}.events.{txn_id}", self.prefix)
    }

    /// The txn_id whose events go on `subject` (the inverse of [`Subjects::events`]).
    pub fn events_txn<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".events.")
            .filter(|id| !id.is_empty())
    }

    /// Every transaction's events.
    pub fn events_all(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    /// Where the coordinator writes one transaction's log records. The events stream takes
    /// them here, stores them as [`Subjects::events`] (a subject transform) and only then
    /// republishes them there: a write the stream refuses (a wrong expected sequence: a
    /// fenced coordinator, a reused txn_id) never reaches subscribers of the events, and a
    /// publish straight on the events subject is never stored. Nobody subscribes here.
    pub fn log(&self, txn_id: &str) -> String {
        format!("{}.log.{txn_id}", self.prefix)
    }

    /// Every transaction's log writes (what the events stream listens on).
    pub fn log_all(&self) -> String {
        format!("{}.log.*", self.prefix)
    }

    /// Submission errors that have no txn_id.
    pub fn errors(&self) -> String {
        format!("{}.errors", self.prefix)
    }

    /// A command for one service about one transaction.
    pub fn command(&self, service: &str, txn_id: &str) -> String {
        format!("{}.cmd.{service}.{txn_id}", self.prefix)
    }

    /// A batch of commands for one service ([`CommandBatch`]); `id` is one token.
    pub fn command_batch(&self, service: &str, id: &str) -> String {
        format!("{}.cmd.{service}.batch.{id}", self.prefix)
    }

    /// The batch id of a command batch's subject, when `subject` is one for `service`.
    pub fn command_batch_id<'a>(&self, service: &str, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".cmd.")?
            .strip_prefix(service)?
            .strip_prefix(".batch.")
    }

    /// A batch of one service's replies ([`ReplyBatch`]); `id` is one token.
    pub fn reply_batch(&self, service: &str, id: &str) -> String {
        format!("{}.reply.{service}.batch.{id}", self.prefix)
    }

    /// The service whose reply batch `subject` is, if it is one (a txn_id has no dot, so a
    /// batch subject is never a transaction's).
    pub fn reply_batch_service<'a>(&self, subject: &'a str) -> Option<&'a str> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".reply.")?;
        let (service, tail) = rest.split_once('.')?;
        let id = tail.strip_prefix("batch.")?;
        (is_token(service, MAX_NAME_LEN) && is_token(id, 128)).then_some(service)
    }

    /// Every command for one service (its durable consumer's filter).
    pub fn commands_for(&self, service: &str) -> String {
        format!("{}.cmd.{service}.>", self.prefix)
    }

    /// Every command.
    pub fn commands_all(&self) -> String {
        format!("{}.cmd.>", self.prefix)
    }

    /// Where participants replied about one transaction before replies named their service
    /// (still accepted; NATS permissions cannot keep services apart on it).
    pub fn reply(&self, txn_id: &str) -> String {
        format!("{}.reply.{txn_id}", self.prefix)
    }

    /// Where one service replies about one transaction: `<prefix>.reply.<service>.<txn_id>`,
    /// so a service's permissions can allow its own replies only.
    pub fn reply_for(&self, service: &str, txn_id: &str) -> String {
        format!("{}.reply.{service}.{txn_id}", self.prefix)
    }

    /// Who may have published a reply on `subject`: the service a per-service reply subject
    /// names (under `txcoord auth`'s permissions only it may publish there), or anyone
    /// allowed on the old shared subject `<prefix>.reply.<txn_id>`.
    pub fn reply_sender(&self, subject: &str) -> String {
        let rest = subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix(".reply."));
        match rest.and_then(|r| r.split_once('.')) {
            Some((service, _)) => format!("the identity of service {service:?}"),
            None => "anyone who may publish on the shared reply subject".into(),
        }
    }

    /// Every reply.
    pub fn replies_all(&self) -> String {
        format!("{}.reply.>", self.prefix)
    }

    /// `<prefix>.api.execute.<client>`: execute as the named client (its fair share; `txcoord
    /// auth` lets a client user call only its own).
    pub fn api_execute_as(&self, client: &str) -> String {
        format!("{}.api.execute.{client}", self.prefix)
    }

    /// The client a `<prefix>.api.execute.<client>` subject names (`None` for plain execute).
    pub fn execute_caller<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".api.execute.")
            .filter(|c| !c.is_empty() && !c.contains('.'))
    }

    /// A request/reply API endpoint, e.g. `api("execute")`.
    pub fn api(&self, name: &str) -> String {
        format!("{}.api.{name}", self.prefix)
    }

    fn stream(&self, what: &str) -> String {
        let p: String = self
            .prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("{p}_{what}")
    }

    /// The stream holding submissions.
    pub fn submit_stream(&self) -> String {
        self.stream("SUBMIT")
    }

    /// The stream holding events (the coordinator's log) and errors.
    pub fn events_stream(&self) -> String {
        self.stream("EVENTS")
    }

    /// The stream holding participant commands.
    pub fn command_stream(&self) -> String {
        self.stream("CMD")
    }

    /// The stream holding participant replies.
    pub fn reply_stream(&self) -> String {
        self.stream("REPLY")
    }
}

impl Default for Subjects {
    fn default() -> Self {
        Subjects::new("txn")
    }
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Parsed {
        parse_request(s.as_bytes(), &RequestLimits::default())
    }

    #[test]
    fn accepts_the_documented_example() {
        let p = parse(
            r#"{"txn_id":"t-1","mode":"2pc","steps":[
                {"service":"inventory","action":"reserve","payload":{"sku":"apple","qty":2}},
                {"service":"payment","action":"charge","payload":{"account":"alice","amount":300}}],
                "timeout_ms":5000,"metadata":{}}"#,
        );
        let r = p.result.expect("valid");
        assert_eq!(p.txn_id.as_deref(), Some("t-1"));
        assert_eq!(r.steps.len(), 2);
        assert_eq!(r.steps[1].service, "payment");
        assert_eq!(r.timeout_ms, Some(5000));
    }

    #[test]
    fn mode_defaults_to_2pc_and_payload_to_null() {
        let r = parse(r#"{"steps":[{"service":"a","action":"x"}]}"#)
            .result
            .expect("valid");
        assert_eq!(r.mode, Mode::TwoPc);
        assert_eq!(r.steps[0].payload, Value::Null);
    }

    #[test]
    fn malformed_json_says_where() {
        let p = parse(r#"{"steps": [}"#);
        match p.result {
            Err(RequestError::MalformedJson(m)) => assert!(m.contains("column"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn schema_errors_name_the_path() {
        let p = parse(r#"{"txn_id":"a","steps":[{"service":"a","action":"x"},{"service":"b"}]}"#);
        assert_eq!(p.txn_id.as_deref(), Some("a"));
        match p.result {
            Err(RequestError::Invalid { path, message }) => {
                assert_eq!(path, "steps[1]");
                assert!(message.contains("action"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_service_names_are_refused() {
        for name in ["", "a.b", "a b", "a>", "*", &"x".repeat(65)] {
            let body = serde_json::json!({"steps":[{"service": name, "action":"x"}]});
            let p = parse(&body.to_string());
            match p.result {
                Err(RequestError::Invalid { path, .. }) => assert_eq!(path, "steps[0].service"),
                other => panic!("{name:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn step_count_limits() {
        let none = parse(r#"{"steps":[]}"#);
        assert!(
            matches!(none.result, Err(RequestError::Invalid { ref path, .. }) if path == "steps")
        );
        let steps: Vec<_> = (0..101)
            .map(|_| serde_json::json!({"service":"s","action":"a"}))
            .collect();
        let many = parse(&serde_json::json!({ "steps": steps }).to_string());
        assert!(
            matches!(many.result, Err(RequestError::Invalid { ref path, .. }) if path == "steps")
        );
    }

    #[test]
    fn oversize_is_refused_before_parsing() {
        let limits = RequestLimits {
            max_bytes: 10,
            ..RequestLimits::default()
        };
        let p = parse_request(br#"{"steps":[{"service":"a","action":"b"}]}"#, &limits);
        assert!(matches!(
            p.result,
            Err(RequestError::TooLarge { limit: 10, .. })
        ));
    }

    #[test]
    fn bad_txn_id_is_not_salvaged() {
        let p = parse(r#"{"txn_id":"a.b","steps":[{"service":"a","action":"b"}]}"#);
        assert_eq!(p.txn_id, None);
        assert!(
            matches!(p.result, Err(RequestError::Invalid { ref path, .. }) if path == "txn_id")
        );
    }

    #[test]
    fn traceparents_follow_the_w3c_format() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(traceparent(good), Some(good));
        assert_eq!(traceparent(&format!(" {good} ")), Some(good));
        // A later version may add fields; only the defined part is kept.
        let v1 = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future";
        assert_eq!(traceparent(v1), Some(&v1[..55]));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0\u{e9}",
        ] {
            assert_eq!(traceparent(bad), None, "{bad:?}");
        }
        let req = |t: &str| {
            parse(
                serde_json::json!({"steps": [{"service": "a", "action": "b"}], "traceparent": t})
                    .to_string()
                    .as_str(),
            )
            .result
        };
        assert_eq!(req(good).map(|r| r.traceparent), Ok(Some(good.to_string())));
        match req("00-nope") {
            Err(RequestError::Invalid { path, .. }) => assert_eq!(path, "traceparent"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn non_object_is_refused() {
        let p = parse("[1,2]");
        assert!(matches!(p.result, Err(RequestError::Invalid { ref path, .. }) if path == "$"));
    }

    #[test]
    fn reply_msg_id_is_deterministic() {
        let r = ParticipantReply {
            conflict: None,
            txn_id: "t".into(),
            service: "inv".into(),
            step: 2,
            kind: CommandKind::Commit,
            outcome: ReplyOutcome::Done,
            reason: None,
            attempt: 3,
            retryable: None,
            token: None,
        };
        assert_eq!(r.msg_id(), "t.inv.2.commit.3");
        let tokened = ParticipantReply {
            token: Some("ab12".into()),
            ..r
        };
        assert_eq!(tokened.msg_id(), "t.inv.2.commit.3.ab12");
    }

    /// Every state, for the tests that go through them all.
    const ALL_STATES: [TxnState; 13] = [
        TxnState::Accepted,
        TxnState::Preparing,
        TxnState::Prepared,
        TxnState::Committing,
        TxnState::Aborting,
        TxnState::Committed,
        TxnState::Aborted,
        TxnState::Rejected,
        TxnState::Executing,
        TxnState::Compensating,
        TxnState::Completed,
        TxnState::Compensated,
        TxnState::Failed,
    ];

    #[test]
    fn state_names_are_the_wire_names() {
        for s in ALL_STATES {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for o in [
            ReplyOutcome::Ready,
            ReplyOutcome::ReadOnly,
            ReplyOutcome::Abort,
            ReplyOutcome::Done,
            ReplyOutcome::Failed,
        ] {
            assert_eq!(serde_json::to_value(o).unwrap(), o.as_str());
        }
        for o in [ConfirmedOutcome::Committed, ConfirmedOutcome::Aborted] {
            assert_eq!(serde_json::to_value(o).unwrap(), o.as_str());
        }
    }

    #[test]
    fn a_decided_wait_ends_at_a_decision_or_any_outcome_and_parses_only_its_names() {
        use TxnState::*;
        for s in ALL_STATES {
            assert_eq!(Until::Outcome.reached(s), s.is_outcome(), "{s:?}");
            let decided = s.is_outcome() || matches!(s, Committing | Aborting);
            assert_eq!(Until::Decided.reached(s), decided, "{s:?}");
            // What took effect or durably will: never an abort, a compensation, a failure.
            let effect = matches!(s, Committed | Completed | Committing);
            assert_eq!(s.takes_effect(), effect, "{s:?}");
        }
        for u in [Until::Outcome, Until::Decided] {
            assert_eq!(u.as_str().parse::<Until>(), Ok(u));
            assert_eq!(serde_json::to_value(u).unwrap(), u.as_str());
        }
        for good in ["_INBOX.abc", "_INBOX_shop.x.y-1"] {
            assert!(is_publish_subject(good, 256), "{good}");
        }
        for bad in [
            "",
            "_INBOX.",
            "_INBOX..a",
            "_INBOX.*",
            "_INBOX.>",
            "_INBOX.a b",
            "a\r\nPUB",
        ] {
            assert!(!is_publish_subject(bad, 256), "{bad:?}");
        }
        assert!(!is_publish_subject(&"a".repeat(300), 256));
        let err = "soon".parse::<Until>().unwrap_err();
        assert!(
            err.contains("\"soon\"") && err.contains("\"decided\""),
            "{err}"
        );
        assert_eq!(Until::default(), Until::Outcome);
    }

    #[test]
    fn batch_subjects_never_look_like_a_transaction() {
        let s = Subjects::new("txn");
        let cmd = s.command_batch("inv", "r1-7");
        assert_eq!(cmd, "txn.cmd.inv.batch.r1-7");
        assert_eq!(s.command_batch_id("inv", &cmd), Some("r1-7"));
        assert_eq!(s.command_batch_id("in", &cmd), None);
        assert_eq!(s.command_batch_id("inv", "txn.cmd.inv.batch"), None);
        assert_eq!(s.command_batch_id("inv", &s.command("inv", "batch")), None);
        let reply = s.reply_batch("inv", "abc");
        assert_eq!(s.reply_batch_service(&reply), Some("inv"));
        for not_batch in [
            s.reply_for("inv", "batch"),
            s.reply_for("inv", "t1"),
            "txn.reply.batch.x".to_string(),
            "txn.reply.inv.batch.a.b".to_string(),
            "other.reply.inv.batch.a".to_string(),
        ] {
            assert_eq!(s.reply_batch_service(&not_batch), None, "{not_batch}");
        }
    }

    #[test]
    fn subjects_follow_the_prefix() {
        let s = Subjects::new("acme-txn");
        assert_eq!(s.command("inv", "t1"), "acme-txn.cmd.inv.t1");
        assert_eq!(s.events_stream(), "ACME_TXN_EVENTS");
        assert_eq!(s.api("execute"), "acme-txn.api.execute");
        assert_eq!(s.api_execute_as("shop"), "acme-txn.api.execute.shop");
        assert_eq!(s.execute_caller("acme-txn.api.execute.shop"), Some("shop"));
        assert_eq!(s.execute_caller("acme-txn.api.execute"), None);
        assert_eq!(s.events_txn("acme-txn.events.t-1"), Some("t-1"));
        assert_eq!(s.events_txn("other.events.t-1"), None);
        assert!(s.reply_sender("acme-txn.reply.pay.t-1").contains("\"pay\""));
        assert!(s.reply_sender("acme-txn.reply.t-1").starts_with("anyone"));
    }
}
