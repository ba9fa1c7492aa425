//! The barrier as a pure table: what a command does to a branch, for each state of its
//! stored record. [`decide`] turns (command, record, facts) into a [`Plan`]; after the
//! service call the plan names, [`Target::settle`] says what to store and [`answer_of`] what
//! to reply. The consumer loop only carries plans out (load, call, compare-and-set, retry on
//! a lost race); no rule lives there.
//!
//! | command | stored record | plan |
//! |---|---|---|
//! | prepare | any | answer the recorded vote (a saga branch votes abort) |
//! | prepare | none, past its deadline | call abort (an earlier delivery may hold something), create `voted_abort` |
//! | prepare | none | call prepare, create `prepared` / `read_only` / `voted_abort` as it voted |
//! | commit | `committed`, `read_only` | answer done |
//! | commit | `prepared` | call commit, advance to `committed` |
//! | commit | any other | refuse: protocol violation |
//! | commit | none, finished records expire | answer done (a committed record that expired) |
//! | commit | none | refuse: protocol violation |
//! | abort | `prepared` | call abort, advance to `aborted` |
//! | abort | `committed` | refuse: protocol violation |
//! | abort | any other | answer done |
//! | abort | none | call abort (unless the command carries no payload), create `aborted_before_prepare` |
//! | execute | any | answer the recorded result (after a compensation: failed, refused) |
//! | execute | none | call execute, create `executed` / `execute_failed`; a retryable failure is answered, not stored |
//! | compensate | `executed` | call compensate (a failure is answered, retryable), advance to `compensated` |
//! | compensate | `execute_failed` | advance to `compensated` (nothing to undo) |
//! | compensate | any other | answer done |
//! | compensate | none | call compensate (a failure is answered, retryable), create `compensated_before_execute` |
//! | commit_one_phase | `prepared` | call commit, advance to `committed` (its own prepare was recorded: [`continues`]) |
//! | commit_one_phase | any other | answer from the record: `committed` done, `read_only`, else abort |
//! | commit_one_phase | none, past its deadline | call abort, create `voted_abort` |
//! | commit_one_phase | none | call prepare, create `prepared` / `read_only` / `voted_abort` as it voted; `prepared` goes on to commit |
//!
//! A one-phase commit is two rows in turn: the prepare's row writes `prepared` (so a crash
//! between the service's prepare and its commit leaves a record that the redelivery commits
//! from, and a lost create is undone as for a prepare), then [`continues`] sends the loop
//! back to the table, which commits. The participant decides: the coordinator never sends an
//! abort to a branch it asked to commit in one phase.
//!
//! A first commit or abort soon after this process wrote the `prepared` record it acts on
//! skips the read ([`trust_own_record`]). A prepare always reads first: JetStream can
//! deliver a command it had already delivered and removed (its consumer's or its duplicate
//! window's state does not always survive a server crash), so "first delivery" does not
//! prove that nothing is recorded, and a prepare run again after its branch was settled
//! would hold what nothing releases (`txcoord chaos` found that). A create that loses to a concurrent writer is decided again from the winner's record,
//! after [`undo_after_lost_create`]: a hold that lost to `aborted_before_prepare` is
//! released (call abort), an execute that lost to `compensated_before_execute` is undone
//! (call compensate).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use txcoord_proto::{
    CommandKind, LockConflict, LockMode, ParticipantCommand, ParticipantReply, ReplyOutcome,
};

use crate::{ServiceError, StepResult, Vote};

/// Where a branch stands, as stored in the service's KV bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BranchState {
    /// Voted ready; waiting for the decision.
    Prepared,
    /// Voted read-only; nothing to do.
    ReadOnly,
    /// Voted abort.
    VotedAbort,
    /// Committed.
    Committed,
    /// Aborted after a prepare.
    Aborted,
    /// Aborted before any prepare arrived: a later prepare votes abort.
    AbortedBeforePrepare,
    /// Saga: executed.
    Executed,
    /// Saga: execute failed for good; nothing to undo.
    ExecuteFailed,
    /// Saga: compensated after it executed (or failed).
    Compensated,
    /// Saga: a compensate arrived before any execute ("null compensation"): recorded, so a
    /// late execute is refused ("hanging prevention").
    CompensatedBeforeExecute,
}

/// The durable record of one branch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BranchRecord {
    /// Where the branch stands.
    pub state: BranchState,
    /// The prepare's action.
    #[serde(default)]
    pub action: String,
    /// The prepare's payload.
    #[serde(default)]
    pub payload: Value,
    /// The abort reason, when the vote was abort.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Last change, Unix milliseconds.
    pub updated_ms: u64,
    /// The lock conflict an abort vote came from, if it came from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<LockConflict>,
    /// What a prepared branch holds in the service's lock table (kept so that a restarted
    /// service still holds it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locks: Vec<HeldLock>,
    /// The transaction's `lock_ts`, for the lock table's wait-die rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_ts: Option<u64>,
    /// The step's URL, when the request named its HTTP service by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// One lock a branch holds: a named resource and how.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HeldLock {
    /// The resource's name (any string the service chooses: `account:alice`).
    pub resource: String,
    /// Shared or exclusive.
    #[serde(default)]
    pub mode: LockMode,
}

/// What a branch answers a command.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The reply's outcome.
    pub outcome: ReplyOutcome,
    /// Why (an abort vote, a failure).
    pub reason: Option<String>,
    /// Whether a failure may succeed when tried again (sagas).
    pub retryable: Option<bool>,
    /// The lock conflict an abort vote came from.
    pub conflict: Option<LockConflict>,
}

impl Answer {
    /// An outcome with nothing more to say.
    pub fn of(outcome: ReplyOutcome) -> Answer {
        Answer {
            outcome,
            reason: None,
            retryable: None,
            conflict: None,
        }
    }

    /// An outcome with a reason.
    pub fn because(outcome: ReplyOutcome, reason: impl Into<String>) -> Answer {
        Answer {
            outcome,
            reason: Some(reason.into()),
            retryable: None,
            conflict: None,
        }
    }

    /// A failed saga step.
    pub fn failed(reason: impl Into<String>, retryable: bool) -> Answer {
        Answer {
            outcome: ReplyOutcome::Failed,
            reason: Some(reason.into()),
            retryable: Some(retryable),
            conflict: None,
        }
    }

    /// The reply that carries this answer to `cmd`, from `service`, echoing its attempt and
    /// token.
    pub fn reply_to(self, cmd: &ParticipantCommand, service: &str) -> ParticipantReply {
        ParticipantReply {
            txn_id: cmd.txn_id.clone(),
            service: service.to_string(),
            step: cmd.step,
            kind: cmd.kind,
            outcome: self.outcome,
            reason: self.reason,
            attempt: cmd.attempt,
            retryable: self.retryable,
            token: cmd.token.clone(),
            conflict: self.conflict,
        }
    }
}

/// A call on the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// [`crate::Participant::prepare`].
    Prepare,
    /// [`crate::Participant::commit`].
    Commit,
    /// [`crate::Participant::abort`].
    Abort,
    /// [`crate::Participant::execute`].
    Execute,
    /// [`crate::Participant::compensate`].
    Compensate,
}

/// How the record is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// Created: there is none yet (it fails if another writer created one first).
    Create,
    /// The existing record, compare-and-set on its revision.
    Advance,
}

/// What the record becomes once the call returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// This state (when the call, if any, succeeded).
    State(BranchState),
    /// `voted_abort`, with this reason.
    VotedAbort(String),
    /// What the prepare voted.
    Vote,
    /// What the execute returned.
    Step,
}

/// What the consumer loop does with one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Answer from the record: no call, no write.
    Answer(AnswerFrom),
    /// Refuse: the command contradicts the record (a protocol violation). Not applied, not
    /// confirmed, not retried.
    Refuse(String),
    /// Call the service (if `call`), then write the record as `target` says.
    Run {
        /// The call, before the write.
        call: Option<Call>,
        /// How the record is written.
        write: Write,
        /// What it becomes.
        target: Target,
    },
}

/// Which answer a [`Plan::Answer`] is (the record provides the text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerFrom {
    /// The recorded vote.
    Vote,
    /// The recorded saga result.
    Step,
    /// Done.
    Done,
    /// The recorded outcome of a one-phase commit.
    OnePhase,
}

/// What the loop knows besides the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// Now, Unix milliseconds.
    pub now_ms: u64,
    /// The command's deadline (0: none).
    pub deadline_ms: u64,
    /// Whether the command carries a payload (coordinators before abort payloads sent none,
    /// and the service could not find the branch without it).
    pub has_payload: bool,
    /// Whether finished records expire (so a missing record may be an expired one).
    pub finished_records_expire: bool,
}

/// The plan for command `kind` on a branch whose stored record is `record`.
pub fn decide(kind: CommandKind, record: Option<&BranchRecord>, facts: &Facts) -> Plan {
    use BranchState as S;
    let state = record.map(|r| r.state);
    let run = |call, write, target| Plan::Run {
        call,
        write,
        target,
    };
    match (kind, state) {
        (CommandKind::Prepare, Some(_)) => Plan::Answer(AnswerFrom::Vote),
        (CommandKind::CommitOnePhase, Some(S::Prepared)) => run(
            Some(Call::Commit),
            Write::Advance,
            Target::State(S::Committed),
        ),
        (CommandKind::CommitOnePhase, Some(_)) => Plan::Answer(AnswerFrom::OnePhase),
        // A one-phase commit prepares first, under the same rules as a prepare.
        (CommandKind::Prepare | CommandKind::CommitOnePhase, None)
            if facts.deadline_ms != 0 && facts.now_ms > facts.deadline_ms =>
        {
            let what = if kind == CommandKind::Prepare {
                "prepare"
            } else {
                "commit"
            };
            run(
                Some(Call::Abort),
                Write::Create,
                Target::VotedAbort(format!("{what} arrived after its deadline")),
            )
        }
        (CommandKind::Prepare | CommandKind::CommitOnePhase, None) => {
            run(Some(Call::Prepare), Write::Create, Target::Vote)
        }

        (CommandKind::Commit, Some(S::Committed | S::ReadOnly)) => Plan::Answer(AnswerFrom::Done),
        (CommandKind::Commit, Some(S::Prepared)) => run(
            Some(Call::Commit),
            Write::Advance,
            Target::State(S::Committed),
        ),
        (CommandKind::Commit, Some(other)) => {
            Plan::Refuse(format!("commit for a branch in state {other:?}"))
        }
        (CommandKind::Commit, None) if facts.finished_records_expire => {
            Plan::Answer(AnswerFrom::Done)
        }
        (CommandKind::Commit, None) => {
            Plan::Refuse("commit for a branch that never prepared (no record)".into())
        }

        (CommandKind::Abort, Some(S::Prepared)) => {
            run(Some(Call::Abort), Write::Advance, Target::State(S::Aborted))
        }
        (CommandKind::Abort, Some(S::Committed)) => {
            Plan::Refuse("abort for a committed branch".into())
        }
        (CommandKind::Abort, Some(_)) => Plan::Answer(AnswerFrom::Done),
        (CommandKind::Abort, None) => run(
            facts.has_payload.then_some(Call::Abort),
            Write::Create,
            Target::State(S::AbortedBeforePrepare),
        ),

        (CommandKind::Execute, Some(_)) => Plan::Answer(AnswerFrom::Step),
        (CommandKind::Execute, None) => run(Some(Call::Execute), Write::Create, Target::Step),

        (CommandKind::Compensate, Some(S::Executed)) => run(
            Some(Call::Compensate),
            Write::Advance,
            Target::State(S::Compensated),
        ),
        (CommandKind::Compensate, Some(S::ExecuteFailed)) => {
            run(None, Write::Advance, Target::State(S::Compensated))
        }
        (CommandKind::Compensate, Some(_)) => Plan::Answer(AnswerFrom::Done),
        (CommandKind::Compensate, None) => run(
            Some(Call::Compensate),
            Write::Create,
            Target::State(S::CompensatedBeforeExecute),
        ),
    }
}

/// How long after this process wrote a branch's `prepared` record a first commit or abort
/// acts on that record without reading it back ([`trust_own_record`]).
pub const OWN_RECORD_TRUSTED_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether a commit or abort may act on the `prepared` record this very process wrote
/// `age` ago, without reading it back: on the first delivery of the decision's first
/// attempt, within [`OWN_RECORD_TRUSTED_FOR`]. Then only another instance of the service
/// that got a resend of the decision can have changed the record, and a resend comes only
/// after the coordinator's retry delay (or its restart). If that happened anyway, the
/// compare-and-set on the revision fails, the loop reads the record and answers from it:
/// the service's commit (or abort) has then run twice, which every service must bear
/// already (a crash between a call and its record repeats the call). This saves the read
/// before the common commit.
pub fn trust_own_record(attempt: u32, first_delivery: bool, age: std::time::Duration) -> bool {
    first_delivery && attempt == 1 && age < OWN_RECORD_TRUSTED_FOR
}

/// Whether command `kind` goes on after its record was written in `state`: a one-phase
/// commit whose prepare was recorded commits next (the table decides again from the new
/// record). Every other write ends the command.
pub fn continues(kind: CommandKind, state: BranchState) -> bool {
    kind == CommandKind::CommitOnePhase && state == BranchState::Prepared
}

/// What a service call returned.
#[derive(Debug)]
pub enum Returned {
    /// Nothing was called.
    Nothing,
    /// A prepare's vote.
    Voted(Vote),
    /// An execute's result.
    Stepped(StepResult),
    /// Commit, abort or compensate.
    Did(Result<(), ServiceError>),
}

/// What happens after the call.
#[derive(Debug, Clone, PartialEq)]
pub enum Settled {
    /// Write the record in this state, with this reason, then answer from it.
    Store(BranchState, Option<String>),
    /// Answer this and write nothing: the retry runs the call again.
    Answer(Answer),
    /// The service failed at a call that must succeed (commit, abort): the command is
    /// retried later.
    Retry(String),
}

impl Target {
    /// What to store (or answer) given what the call returned.
    pub fn settle(&self, call: Option<Call>, returned: Returned) -> Settled {
        match (self, returned) {
            (_, Returned::Did(Err(e))) if call == Some(Call::Compensate) => {
                Settled::Answer(Answer::failed(e.0, true))
            }
            (_, Returned::Did(Err(e))) => Settled::Retry(e.0),
            (Target::Vote, Returned::Voted(vote)) => match vote {
                Vote::Ready => Settled::Store(BranchState::Prepared, None),
                Vote::ReadOnly => Settled::Store(BranchState::ReadOnly, None),
                Vote::Abort(r) => Settled::Store(BranchState::VotedAbort, Some(r)),
            },
            (Target::Step, Returned::Stepped(result)) => match result {
                StepResult::Done => Settled::Store(BranchState::Executed, None),
                StepResult::Failed {
                    reason,
                    retryable: true,
                } => Settled::Answer(Answer::failed(reason, true)),
                StepResult::Failed {
                    reason,
                    retryable: false,
                } => Settled::Store(BranchState::ExecuteFailed, Some(reason)),
            },
            (Target::State(s), _) => Settled::Store(*s, None),
            (Target::VotedAbort(r), _) => Settled::Store(BranchState::VotedAbort, Some(r.clone())),
            // A vote or a step result without its call cannot happen: plans pair them.
            (Target::Vote | Target::Step, other) => {
                Settled::Retry(format!("no result to record ({other:?})"))
            }
        }
    }
}

/// The reply to command `kind` from the branch's record, as [`Plan::Answer`] or after a write.
pub fn answer_of(kind: CommandKind, rec: &BranchRecord) -> Answer {
    match kind {
        CommandKind::Prepare => vote_of(rec),
        CommandKind::Execute => step_result_of(rec),
        CommandKind::CommitOnePhase => one_phase_of(rec),
        _ => Answer::of(ReplyOutcome::Done),
    }
}

/// The answer for a planned [`AnswerFrom`], from the record (`None`: no record, done).
pub fn answer_from(from: AnswerFrom, rec: Option<&BranchRecord>) -> Answer {
    match (from, rec) {
        (AnswerFrom::Vote, Some(r)) => vote_of(r),
        (AnswerFrom::Step, Some(r)) => step_result_of(r),
        (AnswerFrom::OnePhase, Some(r)) => one_phase_of(r),
        _ => Answer::of(ReplyOutcome::Done),
    }
}

/// After our create lost to another writer's record in state `theirs`: the call that undoes
/// what our call did (if it did anything that record contradicts).
pub fn undo_after_lost_create(ours: BranchState, theirs: BranchState) -> Option<Call> {
    match (ours, theirs) {
        (BranchState::Prepared, BranchState::AbortedBeforePrepare) => Some(Call::Abort),
        (BranchState::Executed, BranchState::CompensatedBeforeExecute) => Some(Call::Compensate),
        _ => None,
    }
}

/// A repeated prepare's answer.
fn vote_of(rec: &BranchRecord) -> Answer {
    match rec.state {
        BranchState::Prepared | BranchState::Committed => Answer::of(ReplyOutcome::Ready),
        BranchState::ReadOnly => Answer::of(ReplyOutcome::ReadOnly),
        BranchState::VotedAbort => Answer {
            reason: rec.reason.clone(),
            conflict: rec.conflict.clone(),
            ..Answer::of(ReplyOutcome::Abort)
        },
        BranchState::Aborted => Answer::because(ReplyOutcome::Abort, "transaction already aborted"),
        BranchState::AbortedBeforePrepare => {
            Answer::because(ReplyOutcome::Abort, "abort arrived before prepare")
        }
        // A 2PC prepare for a branch that ran as a saga step: refuse.
        BranchState::Executed
        | BranchState::ExecuteFailed
        | BranchState::Compensated
        | BranchState::CompensatedBeforeExecute => {
            Answer::because(ReplyOutcome::Abort, "branch already ran as a saga step")
        }
    }
}

/// A one-phase commit's answer: `done` once committed; otherwise the vote (`read_only`, or
/// abort with its reason). `prepared` is never answered: [`continues`] commits it first.
fn one_phase_of(rec: &BranchRecord) -> Answer {
    match rec.state {
        BranchState::Committed => Answer::of(ReplyOutcome::Done),
        _ => vote_of(rec),
    }
}

/// A repeated execute's answer.
fn step_result_of(rec: &BranchRecord) -> Answer {
    match rec.state {
        BranchState::Executed => Answer::of(ReplyOutcome::Done),
        BranchState::ExecuteFailed => {
            Answer::failed(rec.reason.clone().unwrap_or_else(|| "failed".into()), false)
        }
        // Hanging prevention: the compensation came first (or already ran); never execute now.
        BranchState::Compensated | BranchState::CompensatedBeforeExecute => {
            Answer::failed("execute arrived after its compensation; refused", false)
        }
        _ => Answer::failed(
            "branch is a two-phase-commit branch, not a saga step",
            false,
        ),
    }
}

#[cfg(test)]
mod tests;
