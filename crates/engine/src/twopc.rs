//! The two-phase-commit state machine of one transaction (presumed abort).
//!
//! Transition table (every other pair is ignored with a typed [`EngineError`]):
//!
//! | phase      | event                                   | next        | commands                                     |
//! |------------|-----------------------------------------|-------------|----------------------------------------------|
//! | (start)    | `start`                                 | Preparing   | Persist(accepted), Announce(preparing), Send(prepare)×N, SetTimer(prepare) |
//! | Preparing  | vote abort                              | Aborting    | Persist(aborting), Send(abort) to non-refusers, timers |
//! | Preparing  | last vote, all ready/read_only          | Committing  | Persist(committing), Send(commit) to ready steps, timers |
//! | Preparing  | halfway to the deadline (at most `retry_cap_ms`), then every `retry_cap_ms` | Preparing | Persist(round), Send(prepare) to silent steps, attempt+1 |
//! | Preparing  | prepare timeout                         | Aborting    | as a vote abort, reason `timeout`            |
//! | Committing | `done` from the last pending step          | Committed   | Persist(final), Finished                     |
//! | Aborting   | last pending step `done`, or its abort command stored in JetStream | Aborted | Persist(final), Finished |
//! | Committing/Aborting | retry timer                     | same        | Persist(round), Send to pending, re-arm      |
//! | Committing/Aborting | stuck timer                     | same        | Announce(stuck)                              |
//! | (recover)  | log says accepted/preparing             | Preparing   | Persist(round), Send(prepare)×N with attempt+1, SetTimer |
//! | (recover)  | log says committing/aborting            | same        | Persist(round), Send to pending with attempt+1, timers |
//! | Committed/Aborted | anything                         | same        | none (terminal states absorb late messages)  |
//! | (start, one phase) | `start` with one step, `cfg.one_phase` | Preparing (one phase) | Persist(accepted, `one_phase`), Announce(preparing), Send(commit_one_phase), SetTimer(prepare) |
//! | Preparing (one phase) | the participant's answer        | Committed/Aborted | Persist(final), Finished: `done`/`read_only` commit, `abort` aborts |
//! | Preparing (one phase) | prepare timeout                 | same        | no abort (the participant decides): resend with backoff, SetTimer(stuck) |
//! | Preparing (one phase) | retry timer / stuck timer       | same        | Persist(round), resend / Announce(stuck)     |
//! | Preparing, or Committing whose decision record was refused | log refused a record | Aborting | compact from now on; as a vote abort, reason `log_refused` |
//! | any other  | log refused a record                    | same        | compact from now on; the runtime writes the record again compacted |
//! | any        | log refused a compact record            | same        | none: the runtime stops; a restart resumes   |
//! | Preparing  | operator: retry-now                     | Preparing   | as halfway to the deadline, at once          |
//! | Committing/Aborting | operator: retry-now             | same        | as the retry timer, at once                  |
//! | Preparing/Prepared | operator: abort                  | Aborting    | as a vote abort, reason `operator`           |
//! | Committing/Aborting | operator: mark-done step N      | same, or Committed/Aborted when N was the last | Persist(record) or Persist(final) |
//! | Preparing (one phase), past the deadline | operator: mark-done with the outcome | Committed/Aborted | Persist(final), Finished: as that answer (an abort's reason `operator`) |
//!
//! Every other operator action is refused naming the rule (an abort once commit is
//! decided, a mark-done before a decision...), and the record an allowed one writes
//! carries it (`resolved`: who, what, why).
//!
//! One phase: a transaction of one step whose service said it takes `commit_one_phase`
//! (and `cfg.one_phase` is on) skips the decision round. The participant prepares and
//! commits in one command and its record is the decision; the log goes `accepted`,
//! `preparing`, then `committed` or `aborted`, with no `committing`/`aborting` record, no
//! commit command and no second reply. Once that command is out the coordinator cannot
//! abort on its own: at the deadline it keeps asking (the participant refuses a first
//! delivery past the deadline, so a service that never saw it votes abort), an operator
//! can only `retry-now`, or, past the deadline, name the outcome the participant reached
//! (`mark-done --outcome`, a heuristic decision), and it is never a deadlock victim. Recovery resends the same
//! command, answered from the participant's record.
//!
//! Presumed abort: a commit is over only when every ready participant confirmed it, but an
//! abort is over once each abort command is confirmed *or* durably stored in the command
//! stream. A participant that is down (or never existed) gets its abort from its durable
//! consumer when it comes up, so a dead service cannot hold an aborted transaction open.
//!
//! Every send round is persisted (with its attempt numbers) before it goes out, so a
//! restarted coordinator always resends with a higher attempt than any reply already
//! consumed: reply message ids never collide with ones JetStream has already deduplicated.

use serde_json::Value;

use super::{Command, EngineConfig, Refusal, ResolveRefused, Timer, backoff_ms};
use txcoord_proto::{
    CommandKind, ConfirmedOutcome, DeadlockPolicy, LockConflict, Mode, ParticipantCommand,
    ParticipantReply, Reason, ReplyOutcome, Resolution, ResolveAction, StepStatus,
    TransactionEvent, TransactionRequest, TxnState, Vote,
};

/// The rows of the transition table above, as the engine records them when they fire (see
/// [`TwoPc::rows_hit`]): the simulations check that every row is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Row {
    /// `start`: accepted record, prepares.
    Start,
    /// Preparing, a vote abort: abort decided.
    VoteAbort,
    /// Preparing, the last vote, all ready or read-only: commit decided.
    AllVoted,
    /// Preparing, halfway to the deadline (at most `retry_cap_ms`, then every
    /// `retry_cap_ms`): prepare again to the silent steps.
    PrepareNudge,
    /// Preparing, the prepare timeout: abort decided.
    PrepareTimeout,
    /// Committing, the last confirmation: committed.
    Committed,
    /// Aborting, the last confirmation or stored abort: aborted.
    Aborted,
    /// Committing/aborting, the retry timer: resend to the unconfirmed.
    Phase2Retry,
    /// Committing/aborting, the stuck timer: flagged stuck.
    Stuck,
    /// Recovered before the decision: prepare again.
    RecoverUndecided,
    /// Recovered after the decision: resend it.
    RecoverDecided,
    /// A reply for a phase that is over (late, duplicated): ignored.
    Late,
    /// The log refused a record before the decision: abort.
    LogRefusedUndecided,
    /// The log refused a record after the decision: written again compacted.
    LogRefusedRedo,
    /// The log refused a compact record: stop.
    LogRefusedGiveUp,
    /// The caller decides: every vote in and ready, waiting in Prepared.
    AwaitDecision,
    /// The caller's decision: commit (from Prepared) or roll back (any time before commit).
    CallerDecision,
    /// Preparing, chosen as a deadlock victim: abort decided (reason `deadlock`).
    DeadlockVictim,
    /// An operator's action (`txcoord resolve`) carried out.
    Resolve,
    /// One phase: the participant's answer ends the transaction.
    OnePhaseOutcome,
    /// One phase: the deadline passed with no answer; asked again instead of aborting.
    OnePhaseOverdue,
}

impl Row {
    /// Every row.
    pub const ALL: [Row; 21] = [
        Row::Start,
        Row::VoteAbort,
        Row::AllVoted,
        Row::PrepareNudge,
        Row::PrepareTimeout,
        Row::Committed,
        Row::Aborted,
        Row::Phase2Retry,
        Row::Stuck,
        Row::RecoverUndecided,
        Row::RecoverDecided,
        Row::Late,
        Row::LogRefusedUndecided,
        Row::LogRefusedRedo,
        Row::LogRefusedGiveUp,
        Row::AwaitDecision,
        Row::CallerDecision,
        Row::DeadlockVictim,
        Row::Resolve,
        Row::OnePhaseOutcome,
        Row::OnePhaseOverdue,
    ];
}

/// Where a 2PC transaction stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Collecting votes.
    Preparing,
    /// Every vote ready or read-only; the caller decides ([`TwoPc::caller_decides`]).
    Prepared,
    /// Commit decided and durable; waiting for confirmations.
    Committing,
    /// Abort decided and durable; waiting for confirmations.
    Aborting,
    /// Every participant committed.
    Committed,
    /// Every participant aborted.
    Aborted,
}

impl Phase {
    fn state(self) -> TxnState {
        match self {
            Phase::Preparing => TxnState::Preparing,
            Phase::Prepared => TxnState::Prepared,
            Phase::Committing => TxnState::Committing,
            Phase::Aborting => TxnState::Aborting,
            Phase::Committed => TxnState::Committed,
            Phase::Aborted => TxnState::Aborted,
        }
    }
}

/// An input the engine did not apply, and why. None of these change state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The reply names a step the transaction does not have.
    #[error("reply for step {step}, but the transaction has {steps} steps")]
    UnknownStep {
        /// The step in the reply.
        step: usize,
        /// How many steps there are.
        steps: usize,
    },
    /// The reply's service is not the step's service.
    #[error("reply from service {got:?} for step {step}, which belongs to {expected:?}")]
    ServiceMismatch {
        /// The step.
        step: usize,
        /// The step's service.
        expected: String,
        /// The reply's service.
        got: String,
    },
    /// The outcome does not answer that kind of command.
    #[error("outcome {outcome:?} is not an answer to a {kind:?} command")]
    InvalidOutcome {
        /// The command kind.
        kind: CommandKind,
        /// The outcome.
        outcome: ReplyOutcome,
    },
    /// The reply belongs to a phase that is over (a late or duplicated message).
    #[error("{kind:?} reply arrived while the transaction is {state:?}")]
    Late {
        /// The reply's kind.
        kind: CommandKind,
        /// The transaction's state.
        state: TxnState,
    },
    /// A caller's decision the transaction cannot take in its state (commit before every
    /// vote is ready, anything after a decision).
    #[error("cannot {} a transaction that is {state:?}", if *commit { "commit" } else { "roll back" })]
    NotDecidable {
        /// Commit (or roll back).
        commit: bool,
        /// The transaction's state.
        state: TxnState,
    },
    /// A second, different vote from the same step; the first one stands.
    #[error("step {step} voted {first:?} and then {second:?}; the first vote stands")]
    ConflictingVote {
        /// The step.
        step: usize,
        /// The recorded vote.
        first: Vote,
        /// The new vote.
        second: Vote,
    },
    /// A deadlock victim must be undecided (collecting votes); this one is past that.
    #[error("a transaction that is {state:?} cannot be a deadlock victim")]
    NotAVictim {
        /// The transaction's state.
        state: TxnState,
    },
    /// A one-phase commit is decided by its participant: the coordinator cannot abort it.
    #[error("a one-phase commit is decided by its participant; the coordinator cannot abort it")]
    OnePhase,
}

/// Why a log could not be turned back into a running transaction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecoverError {
    /// The last record is terminal: nothing to resume.
    #[error("transaction is already {0:?}")]
    Finished(TxnState),
    /// The records contradict each other.
    #[error("inconsistent log: {0}")]
    Inconsistent(String),
}

pub use super::Event;

#[derive(Debug, Clone, PartialEq)]
struct Branch {
    service: String,
    url: Option<String>,
    action: String,
    payload: Value,
    vote: Option<Vote>,
    done: bool,
    prepare_attempt: u32,
    decision_attempt: u32,
    /// Its abort command is durably queued (presumed abort needs no more than that).
    abort_stored: bool,
}

/// One 2PC transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct TwoPc {
    txn_id: String,
    cfg: EngineConfig,
    reply_to: String,
    branches: Vec<Branch>,
    timeout_ms: u64,
    metadata: Option<Value>,
    submit_seq: Option<u64>,
    phase: Phase,
    reason: Option<Reason>,
    deadline_ms: u64,
    retry_round: u32,
    stuck: bool,
    /// When this engine sent its prepares (`None` when rebuilt from the log).
    started_ms: Option<u64>,
    /// How long the prepare round took when every vote came in: the first phase-2 resend
    /// waits at least twice that, so a slow store (fsync on every write) is not answered
    /// with resends that only add writes. Zero when unknown.
    observed_round_ms: u64,
    /// The log refused a record: every record from then on is compact.
    compact: bool,
    /// The rows of the table this transaction went through (a bit per [`Row`]).
    rows: u32,
    /// When every vote is ready, wait in `Prepared` for [`TwoPc::caller_decision`].
    caller_decides: bool,
    /// Records carry only what changes the state (see [`TwoPc::lean_records`]).
    lean: bool,
    /// The transaction's age for deadlock prevention (Unix ms), in every command.
    lock_ts: u64,
    /// The request's W3C trace context, in every command.
    traceparent: Option<String>,
    /// One step, committed in one phase: its participant decides (module doc).
    one_phase: bool,
}

impl TwoPc {
    /// Begins a new transaction: the accepted record is persisted before any prepare goes out.
    pub fn start(
        txn_id: String,
        request: &TransactionRequest,
        submit_seq: Option<u64>,
        reply_to: String,
        cfg: EngineConfig,
        now: u64,
        out: &mut Vec<Command>,
    ) -> TwoPc {
        let timeout_ms = request.timeout_ms.unwrap_or(cfg.default_timeout_ms);
        let branches = request
            .steps
            .iter()
            .map(|s| Branch {
                service: s.service.clone(),
                url: s.url.clone(),
                action: s.action.clone(),
                payload: s.payload.clone(),
                vote: None,
                done: false,
                prepare_attempt: 1,
                decision_attempt: 0,
                abort_stored: false,
            })
            .collect();
        let txn = TwoPc {
            txn_id,
            cfg,
            reply_to,
            branches,
            timeout_ms,
            metadata: request.metadata.clone(),
            submit_seq,
            phase: Phase::Preparing,
            reason: None,
            deadline_ms: now.saturating_add(timeout_ms),
            retry_round: 0,
            stuck: false,
            started_ms: Some(now),
            observed_round_ms: 0,
            compact: false,
            rows: 1 << Row::Start as u32,
            caller_decides: false,
            lean: false,
            lock_ts: request.lock_ts.unwrap_or(now),
            traceparent: request.traceparent.clone(),
            one_phase: cfg.one_phase && request.steps.len() == 1,
        };
        out.push(Command::Persist {
            msg_id: format!("{}.accepted", txn.txn_id),
            event: txn.event(TxnState::Accepted, now, true),
        });
        out.push(Command::Announce {
            msg_id: format!("{}.preparing.1", txn.txn_id),
            event: txn.event(TxnState::Preparing, now, false),
        });
        txn.send_prepares(out);
        txn.arm_prepare_timers(now, out);
        txn
    }

    /// Rebuilds a transaction from its log: the `accepted` record (for the payloads) and the
    /// last record written. Resumes it: prepares are resent if no decision was recorded,
    /// otherwise the decision is resent to every participant that has not confirmed it.
    pub fn recover(
        accepted: &TransactionEvent,
        last: &TransactionEvent,
        reply_to: String,
        cfg: EngineConfig,
        now: u64,
        out: &mut Vec<Command>,
    ) -> Result<TwoPc, RecoverError> {
        if last.state.is_terminal() {
            return Err(RecoverError::Finished(last.state));
        }
        if accepted.state != TxnState::Accepted {
            return Err(RecoverError::Inconsistent(format!(
                "first record is {:?}, not accepted",
                accepted.state
            )));
        }
        if accepted.txn_id != last.txn_id || accepted.steps.len() != last.steps.len() {
            return Err(RecoverError::Inconsistent(
                "first and last records describe different transactions".into(),
            ));
        }
        let branches = accepted
            .steps
            .iter()
            .zip(&last.steps)
            .map(|(a, l)| Branch {
                service: a.service.clone(),
                url: a.url.clone(),
                action: a.action.clone(),
                payload: a.payload.clone().unwrap_or(Value::Null),
                vote: l.vote,
                done: l.done,
                prepare_attempt: a.prepare_attempt.max(l.prepare_attempt),
                decision_attempt: l.decision_attempt,
                abort_stored: false,
            })
            .collect();
        let timeout_ms = accepted.timeout_ms.unwrap_or(cfg.default_timeout_ms);
        let mut txn = TwoPc {
            txn_id: accepted.txn_id.clone(),
            cfg,
            reply_to,
            branches,
            timeout_ms,
            metadata: accepted.metadata.clone(),
            submit_seq: accepted.submit_seq,
            phase: Phase::Preparing,
            reason: last.reason.clone(),
            deadline_ms: now.saturating_add(timeout_ms),
            retry_round: 0,
            stuck: last.stuck,
            started_ms: None,
            observed_round_ms: 0,
            compact: (last.metadata.is_none() && accepted.metadata.is_some())
                || matches!(last.reason, Some(Reason::LogRefused { .. })),
            rows: 0,
            caller_decides: false,
            lean: false,
            lock_ts: accepted.lock_ts.unwrap_or(accepted.timestamp_ms),
            traceparent: accepted.traceparent.clone(),
            one_phase: accepted.one_phase,
        };
        match last.state {
            TxnState::Accepted | TxnState::Preparing => {
                txn.hit(Row::RecoverUndecided);
                // Votes consumed before the crash were only in memory: ask again. Participants
                // answer a repeated prepare from their stored vote.
                for b in &mut txn.branches {
                    b.vote = None;
                    b.prepare_attempt += 1;
                }
                let round = txn.max_attempt(|b| b.prepare_attempt);
                out.push(Command::Persist {
                    msg_id: format!("{}.prepare.r{round}", txn.txn_id),
                    event: txn.event(TxnState::Preparing, now, false),
                });
                txn.send_prepares(out);
                txn.arm_prepare_timers(now, out);
            }
            TxnState::Committing | TxnState::Aborting => {
                txn.hit(Row::RecoverDecided);
                txn.phase = if last.state == TxnState::Committing {
                    Phase::Committing
                } else {
                    Phase::Aborting
                };
                if txn.phase == Phase::Committing
                    && txn
                        .branches
                        .iter()
                        .any(|b| !matches!(b.vote, Some(Vote::Ready | Vote::ReadOnly)))
                {
                    return Err(RecoverError::Inconsistent(
                        "commit recorded without every vote ready".into(),
                    ));
                }
                if txn.pending().next().is_none() {
                    txn.finish(now, out);
                } else {
                    txn.resend_round(now, out);
                    out.push(Command::SetTimer {
                        timer: Timer::Stuck,
                        at_ms: now.saturating_add(cfg.stuck_after_ms),
                    });
                }
            }
            other => {
                return Err(RecoverError::Inconsistent(format!(
                    "a 2PC transaction cannot be in state {other:?}"
                )));
            }
        }
        Ok(txn)
    }

    /// The transaction id.
    pub fn txn_id(&self) -> &str {
        &self.txn_id
    }

    /// From now on the caller decides: when every vote is ready or read-only the transaction
    /// waits in `Prepared` for [`TwoPc::caller_decision`] instead of deciding commit itself
    /// (the embedded coordinator's prepare/commit split). Call it right after `start`.
    pub fn caller_decides(&mut self) {
        self.caller_decides = true;
    }

    /// From now on the records the engine asks to persist carry only the state, the reason
    /// and the stuck flag (no steps, no metadata), for a runtime whose log keeps nothing
    /// else: the embedded coordinator, which reads the state of each and takes anything
    /// more from [`TwoPc::snapshot`] when it needs it. Recovery needs full records, so the
    /// server never sets this.
    pub fn lean_records(&mut self) {
        self.lean = true;
    }

    /// What a `Persist` or `Announce` carries: the full event, or a lean one.
    fn record(&self, state: TxnState, now: u64) -> TransactionEvent {
        if !self.lean {
            return self.event(state, now, false);
        }
        TransactionEvent {
            reason: self.reason.clone(),
            stuck: self.stuck,
            ..TransactionEvent::new(self.txn_id.clone(), state, Mode::TwoPc, now)
        }
    }

    /// The caller's decision: `commit` from `Prepared`, or roll back (with `reason`) any time
    /// before a commit decision. Anything else is refused and changes nothing: once commit
    /// is decided it is never turned into a rollback.
    pub fn caller_decision(
        &mut self,
        now: u64,
        commit: bool,
        reason: Reason,
        out: &mut Vec<Command>,
    ) -> Result<(), EngineError> {
        match (self.phase, commit) {
            (Phase::Prepared, true) => {
                self.hit(Row::CallerDecision);
                self.decide(Phase::Committing, None, now, out);
                Ok(())
            }
            (Phase::Preparing | Phase::Prepared, false) => {
                self.hit(Row::CallerDecision);
                self.decide(Phase::Aborting, Some(reason), now, out);
                Ok(())
            }
            (phase, commit) => Err(EngineError::NotDecidable {
                commit,
                state: phase.state(),
            }),
        }
    }

    /// The rows of the transition table this transaction went through so far.
    pub fn rows_hit(&self) -> impl Iterator<Item = Row> + '_ {
        Row::ALL
            .into_iter()
            .filter(|r| self.rows & (1 << *r as u32) != 0)
    }

    fn hit(&mut self, row: Row) {
        self.rows |= 1 << row as u32;
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The state shown in events.
    pub fn state(&self) -> TxnState {
        self.phase.state()
    }

    /// Whether the outcome is reached and confirmed by everyone.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Committed | Phase::Aborted)
    }

    /// The transaction as an event, for status queries.
    pub fn snapshot(&self, now: u64) -> TransactionEvent {
        self.event(self.phase.state(), now, false)
    }

    /// Applies one event. `Err` means the event was ignored, and says why.
    pub fn handle(
        &mut self,
        now: u64,
        event: Event,
        out: &mut Vec<Command>,
    ) -> Result<(), EngineError> {
        match event {
            Event::Reply(reply) => self.on_reply(now, reply, out),
            Event::Timer(timer) => {
                self.on_timer(now, timer, out);
                Ok(())
            }
            Event::Stored {
                step,
                kind: CommandKind::Abort,
                ..
            } if self.phase == Phase::Aborting => {
                let steps = self.branches.len();
                let branch = self
                    .branches
                    .get_mut(step)
                    .ok_or(EngineError::UnknownStep { step, steps })?;
                branch.abort_stored = true;
                if self.pending().next().is_none() {
                    self.finish(now, out);
                }
                Ok(())
            }
            // Commits need the participant's own confirmation; other acks change nothing.
            Event::Stored { .. } => Ok(()),
        }
    }

    /// See [`super::Machine::log_refused`]. Before the decision is durable (a prepare round's
    /// record, or the commit decision itself) the transaction aborts with reason
    /// `log_refused`: no participant has heard a decision, so abort is still free to choose.
    pub fn log_refused(
        &mut self,
        now: u64,
        msg_id: &str,
        message: &str,
        out: &mut Vec<Command>,
    ) -> Refusal {
        if self.compact {
            self.hit(Row::LogRefusedGiveUp);
            return Refusal::GiveUp;
        }
        self.compact = true;
        let decision = msg_id == format!("{}.decided", self.txn_id);
        // One phase: once its command may be out, only the participant decides; before
        // that (the accepted record itself) nothing was sent.
        let unsent = msg_id == format!("{}.accepted", self.txn_id);
        let undecided = (matches!(self.phase, Phase::Preparing | Phase::Prepared)
            && (!self.one_phase || unsent))
            || (self.phase == Phase::Committing && decision);
        if !undecided {
            self.hit(Row::LogRefusedRedo);
            return Refusal::Redo;
        }
        self.hit(Row::LogRefusedUndecided);
        self.phase = Phase::Preparing;
        for b in &mut self.branches {
            b.decision_attempt = 0;
        }
        self.decide(
            Phase::Aborting,
            Some(super::log_refused_reason(message)),
            now,
            out,
        );
        Refusal::Replanned
    }

    fn on_reply(
        &mut self,
        now: u64,
        reply: ParticipantReply,
        out: &mut Vec<Command>,
    ) -> Result<(), EngineError> {
        let service = self.branches.get(reply.step).map(|b| b.service.as_str());
        super::check_sender(&reply, service, self.branches.len())?;
        let vote = match (reply.kind, reply.outcome) {
            (CommandKind::Prepare, ReplyOutcome::Ready) => Some(Vote::Ready),
            (CommandKind::Prepare, ReplyOutcome::ReadOnly) => Some(Vote::ReadOnly),
            (CommandKind::Prepare, ReplyOutcome::Abort) => Some(Vote::Abort),
            (CommandKind::Commit | CommandKind::Abort, ReplyOutcome::Done) => None,
            // One phase: `done` is a commit, so the vote was ready.
            (CommandKind::CommitOnePhase, ReplyOutcome::Done) => Some(Vote::Ready),
            (CommandKind::CommitOnePhase, ReplyOutcome::ReadOnly) => Some(Vote::ReadOnly),
            (CommandKind::CommitOnePhase, ReplyOutcome::Abort) => Some(Vote::Abort),
            (kind, outcome) => return Err(EngineError::InvalidOutcome { kind, outcome }),
        };
        // A vote must answer the kind of command this transaction sends.
        let first_phase = if self.one_phase {
            CommandKind::CommitOnePhase
        } else {
            CommandKind::Prepare
        };
        if vote.is_some() && reply.kind != first_phase {
            return Err(EngineError::InvalidOutcome {
                kind: reply.kind,
                outcome: reply.outcome,
            });
        }
        match (self.phase, reply.kind, vote) {
            (Phase::Preparing, CommandKind::Prepare, Some(vote)) => {
                self.on_vote(now, reply.step, vote, reply.reason, reply.conflict, out)
            }
            (Phase::Preparing, CommandKind::CommitOnePhase, Some(vote)) => {
                self.hit(Row::OnePhaseOutcome);
                let step = reply.step;
                self.branches[step].vote = Some(vote);
                if vote == Vote::Abort {
                    self.reason = Some(self.abort_reason(step, reply.reason, reply.conflict));
                    self.phase = Phase::Aborting;
                } else {
                    self.branches[step].done = vote == Vote::Ready;
                    self.phase = Phase::Committing;
                }
                self.finish(now, out);
                Ok(())
            }
            (Phase::Committing, CommandKind::Commit, None)
            | (Phase::Aborting, CommandKind::Abort, None) => {
                self.branches[reply.step].done = true;
                if self.pending().next().is_none() {
                    self.finish(now, out);
                }
                Ok(())
            }
            (phase, kind, _) => {
                self.hit(Row::Late);
                Err(EngineError::Late {
                    kind,
                    state: phase.state(),
                })
            }
        }
    }

    fn on_vote(
        &mut self,
        now: u64,
        step: usize,
        vote: Vote,
        reason: Option<String>,
        conflict: Option<LockConflict>,
        out: &mut Vec<Command>,
    ) -> Result<(), EngineError> {
        let branch = &mut self.branches[step];
        match branch.vote {
            Some(first) if first == vote => return Ok(()),
            Some(first) => {
                return Err(EngineError::ConflictingVote {
                    step,
                    first,
                    second: vote,
                });
            }
            None => branch.vote = Some(vote),
        }
        if vote == Vote::Abort {
            self.hit(Row::VoteAbort);
            let reason = self.abort_reason(step, reason, conflict);
            self.decide(Phase::Aborting, Some(reason), now, out);
        } else if self.branches.iter().all(|b| b.vote.is_some()) {
            if self.caller_decides {
                self.hit(Row::AwaitDecision);
                self.phase = Phase::Prepared;
                out.push(Command::CancelTimer(Timer::PrepareTimeout));
                out.push(Command::CancelTimer(Timer::StepNudge));
                return Ok(());
            }
            self.hit(Row::AllVoted);
            self.decide(Phase::Committing, None, now, out);
        }
        Ok(())
    }

    /// Why a step's abort vote aborts the transaction: a refusal, or a lock conflict that
    /// deadlock prevention refused to wait on.
    fn abort_reason(
        &self,
        step: usize,
        reason: Option<String>,
        conflict: Option<LockConflict>,
    ) -> Reason {
        let service = self.branches[step].service.clone();
        let message = reason.unwrap_or_else(|| "no reason given".into());
        match conflict {
            // The participant's lock table refused a wait that could close a cycle.
            Some(c) if c.policy != DeadlockPolicy::Detect => Reason::Deadlock {
                how: "prevented".into(),
                txns: std::iter::once(self.txn_id.clone())
                    .chain(c.holders)
                    .collect(),
                services: vec![service],
                resources: vec![c.resource],
                message,
                formed_ms: None,
            },
            _ => Reason::VoteAbort {
                service,
                step,
                message,
            },
        }
    }

    fn on_timer(&mut self, now: u64, timer: Timer, out: &mut Vec<Command>) {
        match (self.phase, timer) {
            // One phase: the participant decides, so the deadline aborts nothing here. Ask
            // again (a participant that never saw the command refuses it now, being past
            // its deadline), with backoff, and flag it stuck if no answer comes.
            (Phase::Preparing, Timer::PrepareTimeout)
                if self.one_phase && now >= self.deadline_ms =>
            {
                self.hit(Row::OnePhaseOverdue);
                out.push(Command::CancelTimer(Timer::StepNudge));
                self.arm_retry_and_stuck(now, out);
                self.nudge_prepares(now, out);
            }
            (Phase::Preparing, Timer::Phase2Retry) if self.one_phase => {
                self.hit(Row::Phase2Retry);
                self.retry_round += 1;
                out.push(Command::SetTimer {
                    timer: Timer::Phase2Retry,
                    at_ms: now.saturating_add(self.retry_delay()),
                });
                self.nudge_prepares(now, out);
            }
            (Phase::Preparing, Timer::PrepareTimeout) if now >= self.deadline_ms => {
                self.hit(Row::PrepareTimeout);
                let silent: Vec<usize> = (0..self.branches.len())
                    .filter(|&i| self.branches[i].vote.is_none())
                    .collect();
                let reason = Reason::Timeout {
                    services: silent
                        .iter()
                        .map(|&i| self.branches[i].service.clone())
                        .collect(),
                    steps: silent,
                };
                self.decide(Phase::Aborting, Some(reason), now, out);
            }
            (Phase::Preparing, Timer::StepNudge) => {
                self.hit(Row::PrepareNudge);
                self.nudge_prepares(now, out);
                // Under a long deadline, again every `retry_cap_ms` while one is left.
                let next = now.saturating_add(self.nudge_cap());
                if next < self.deadline_ms {
                    out.push(Command::SetTimer {
                        timer: Timer::StepNudge,
                        at_ms: next,
                    });
                }
            }
            (Phase::Committing | Phase::Aborting, Timer::Phase2Retry) => {
                self.hit(Row::Phase2Retry);
                self.resend_round(now, out);
            }
            // Phase 2 unconfirmed, or a one-phase commit unanswered, for too long.
            (Phase::Committing | Phase::Aborting | Phase::Preparing, Timer::Stuck)
                if !self.stuck && (self.phase != Phase::Preparing || self.one_phase) =>
            {
                self.hit(Row::Stuck);
                self.stuck = true;
                out.push(Command::Announce {
                    msg_id: format!("{}.stuck", self.txn_id),
                    event: self.record(self.phase.state(), now),
                });
            }
            // A timer armed for a phase that is over: stale, nothing to do.
            _ => {}
        }
    }

    /// The deadlock detector chose this transaction as the victim of a cycle: abort it, as a
    /// timeout would, with `reason` (a `deadlock` reason naming the cycle). Only while votes
    /// are being collected: once anything is decided it is never a victim.
    pub fn deadlock_victim(
        &mut self,
        now: u64,
        reason: Reason,
        out: &mut Vec<Command>,
    ) -> Result<(), EngineError> {
        if self.phase != Phase::Preparing {
            return Err(EngineError::NotAVictim {
                state: self.phase.state(),
            });
        }
        if self.one_phase {
            return Err(EngineError::OnePhase);
        }
        self.hit(Row::DeadlockVictim);
        self.decide(Phase::Aborting, Some(reason), now, out);
        Ok(())
    }

    /// Whether an operator's action applies now (see [`super::Machine::resolve`]).
    pub fn check_resolve(&self, r: &Resolution) -> Result<(), ResolveRefused> {
        let refuse = |why: String| Err(ResolveRefused(why));
        let state = self.phase.state().as_str();
        if r.outcome.is_some() && !(r.action == ResolveAction::MarkDone && self.one_phase) {
            return refuse(
                "--outcome is only for mark-done of a one-phase transaction whose participant never answered".into(),
            );
        }
        match (r.action, self.phase) {
            (_, Phase::Committed | Phase::Aborted) => {
                refuse(format!("it is {state}: nothing is left to do"))
            }
            (ResolveAction::RetryNow, Phase::Preparing) => {
                if self.branches.iter().any(|b| b.vote.is_none()) {
                    Ok(())
                } else {
                    refuse("every step has voted; the decision follows".into())
                }
            }
            (ResolveAction::RetryNow, Phase::Prepared) => refuse(
                "every vote is in and its caller decides: there is nothing to resend".into(),
            ),
            (ResolveAction::RetryNow, _) => Ok(()),
            (ResolveAction::Abort, Phase::Preparing) if self.one_phase => refuse(
                "it commits in one phase: its participant decides and may have committed already, so the coordinator cannot abort it (retry-now asks it again)".into(),
            ),
            (ResolveAction::Abort, Phase::Preparing | Phase::Prepared) => Ok(()),
            (ResolveAction::Abort, Phase::Committing) => refuse(
                "the commit decision is durable and participants may have committed: an abort now would break atomicity (fix a step that cannot commit by hand, then mark-done --step N)".into(),
            ),
            (ResolveAction::Abort, _) => refuse(
                "it is aborting already (retry-now resends the abort; mark-done counts a step you aborted by hand)".into(),
            ),
            (ResolveAction::MarkDone, Phase::Preparing) if self.one_phase => {
                if let Some(step) = r.step.filter(|&s| s != 0) {
                    return refuse(format!(
                        "there is no step {step}: the transaction has 1 step"
                    ));
                }
                if r.outcome.is_none() {
                    return refuse(
                        "it commits in one phase and its participant decides: mark-done needs the outcome you confirmed at the service (--outcome committed or --outcome aborted)".into(),
                    );
                }
                if r.at_ms < self.deadline_ms {
                    return refuse(format!(
                        "its participant may still be deciding until the deadline, {} ms from now: wait for it, or retry-now",
                        self.deadline_ms - r.at_ms
                    ));
                }
                Ok(())
            }
            (ResolveAction::MarkDone, Phase::Preparing | Phase::Prepared) => refuse(format!(
                "it is {state}: nothing is decided, and mark-done is only for a step of a decided transaction (abort it, or retry-now)"
            )),
            (ResolveAction::MarkDone, _) => {
                let Some(step) = r.step else {
                    return refuse("mark-done needs the step (--step N)".into());
                };
                if step >= self.branches.len() {
                    return refuse(format!(
                        "there is no step {step}: the transaction has {} steps",
                        self.branches.len()
                    ));
                }
                if self.pending().any(|i| i == step) {
                    Ok(())
                } else {
                    let b = &self.branches[step];
                    let why = if b.done {
                        "it confirmed already".to_string()
                    } else {
                        match b.vote {
                            Some(Vote::ReadOnly) => "it voted read-only".into(),
                            Some(Vote::Abort) => "it refused, so it holds nothing".into(),
                            _ => "its abort is durably queued for it".into(),
                        }
                    };
                    refuse(format!("step {step} owes nothing: {why}"))
                }
            }
        }
    }

    /// Carries out an operator's action once [`TwoPc::check_resolve`] allowed it.
    pub(crate) fn resolve(&mut self, now: u64, r: &Resolution, out: &mut Vec<Command>) {
        self.hit(Row::Resolve);
        match (r.action, self.phase) {
            (ResolveAction::RetryNow, Phase::Preparing) => self.nudge_prepares(now, out),
            (ResolveAction::RetryNow, _) => {
                out.push(Command::CancelTimer(Timer::Phase2Retry));
                self.resend_round(now, out);
            }
            (ResolveAction::Abort, _) => {
                let reason = Reason::Operator {
                    by: r.by.clone(),
                    message: r.reason.clone(),
                };
                self.decide(Phase::Aborting, Some(reason), now, out);
            }
            (ResolveAction::MarkDone, Phase::Preparing) => {
                // One phase, checked: the operator's confirmed outcome is the participant's.
                let committed = r.outcome == Some(ConfirmedOutcome::Committed);
                if let Some(b) = self.branches.first_mut() {
                    b.vote = Some(if committed { Vote::Ready } else { Vote::Abort });
                    b.done = committed;
                }
                if committed {
                    self.phase = Phase::Committing;
                } else {
                    self.phase = Phase::Aborting;
                    self.reason = Some(Reason::Operator {
                        by: r.by.clone(),
                        message: r.reason.clone(),
                    });
                }
                self.finish(now, out);
            }
            (ResolveAction::MarkDone, _) => {
                if let Some(b) = r.step.and_then(|s| self.branches.get_mut(s)) {
                    b.done = true;
                }
                if self.pending().next().is_none() {
                    self.finish(now, out);
                } else {
                    out.push(Command::Persist {
                        msg_id: format!("{}.resolve.{}", self.txn_id, r.at_ms),
                        event: self.record(self.phase.state(), now),
                    });
                }
            }
        }
    }

    /// The transaction's age for deadlock prevention (Unix ms).
    pub fn lock_ts(&self) -> u64 {
        self.lock_ts
    }

    /// Records the decision durably, then tells the participants that need to hear it.
    fn decide(&mut self, phase: Phase, reason: Option<Reason>, now: u64, out: &mut Vec<Command>) {
        self.phase = phase;
        self.reason = reason;
        if phase == Phase::Committing
            && let Some(started) = self.started_ms
        {
            self.observed_round_ms = now.saturating_sub(started);
        }
        out.push(Command::CancelTimer(Timer::PrepareTimeout));
        out.push(Command::CancelTimer(Timer::StepNudge));
        let targets: Vec<usize> = self.pending().collect();
        if targets.is_empty() {
            // Nobody to tell (all read-only, or the only voter refused): decision and end are one.
            self.finish(now, out);
            return;
        }
        for &i in &targets {
            self.branches[i].decision_attempt = 1;
        }
        out.push(Command::Persist {
            msg_id: format!("{}.decided", self.txn_id),
            event: self.record(self.phase.state(), now),
        });
        for i in targets {
            out.push(Command::Send(self.command(i, self.phase2_kind())));
        }
        self.arm_retry_and_stuck(now, out);
    }

    /// The first resend after the retry delay, and the stuck flag after `stuck_after_ms`:
    /// what a decision (or a one-phase commit past its deadline) waits with.
    fn arm_retry_and_stuck(&mut self, now: u64, out: &mut Vec<Command>) {
        self.retry_round = 1;
        out.push(Command::SetTimer {
            timer: Timer::Phase2Retry,
            at_ms: now.saturating_add(self.retry_delay()),
        });
        out.push(Command::SetTimer {
            timer: Timer::Stuck,
            at_ms: now.saturating_add(self.cfg.stuck_after_ms),
        });
    }

    /// Resends the decision to every participant that has not confirmed it, after persisting
    /// the new attempt numbers.
    fn resend_round(&mut self, now: u64, out: &mut Vec<Command>) {
        let targets: Vec<usize> = self.pending().collect();
        for &i in &targets {
            self.branches[i].decision_attempt += 1;
        }
        let round = self.max_attempt(|b| b.decision_attempt);
        out.push(Command::Persist {
            msg_id: format!("{}.{}.r{round}", self.txn_id, self.phase2_kind().as_str()),
            event: self.record(self.phase.state(), now),
        });
        for i in targets {
            out.push(Command::Send(self.command(i, self.phase2_kind())));
        }
        self.retry_round += 1;
        out.push(Command::SetTimer {
            timer: Timer::Phase2Retry,
            at_ms: now.saturating_add(self.retry_delay()),
        });
    }

    fn finish(&mut self, now: u64, out: &mut Vec<Command>) {
        self.phase = match self.phase {
            Phase::Committing | Phase::Committed => Phase::Committed,
            _ => Phase::Aborted,
        };
        self.hit(if self.phase == Phase::Committed {
            Row::Committed
        } else {
            Row::Aborted
        });
        out.push(Command::Persist {
            msg_id: format!("{}.final", self.txn_id),
            event: self.record(self.phase.state(), now),
        });
        for timer in [
            Timer::PrepareTimeout,
            Timer::StepNudge,
            Timer::Phase2Retry,
            Timer::Stuck,
        ] {
            out.push(Command::CancelTimer(timer));
        }
        out.push(Command::Finished);
    }

    /// The prepare deadline, and halfway to it (at most `retry_cap_ms` from now) a resend
    /// to the silent steps.
    fn arm_prepare_timers(&self, now: u64, out: &mut Vec<Command>) {
        out.push(Command::SetTimer {
            timer: Timer::PrepareTimeout,
            at_ms: self.deadline_ms,
        });
        let half = self.deadline_ms.saturating_sub(now) / 2;
        out.push(Command::SetTimer {
            timer: Timer::StepNudge,
            at_ms: now.saturating_add(half.min(self.nudge_cap())),
        });
    }

    /// The longest a prepare goes unanswered before it is sent again: `retry_cap_ms`, so a
    /// prepare or vote lost under a long deadline (minutes) costs a retry delay, not half
    /// the deadline.
    fn nudge_cap(&self) -> u64 {
        self.cfg.retry_cap_ms.max(1)
    }

    /// Halfway to the deadline: sends prepare again, with a new attempt, to every step that has
    /// not voted. A participant that restarted has the first copy pending on its durable
    /// consumer until its ack wait runs out; the new message reaches it at once.
    fn nudge_prepares(&mut self, now: u64, out: &mut Vec<Command>) {
        let silent: Vec<usize> = (0..self.branches.len())
            .filter(|&i| self.branches[i].vote.is_none())
            .collect();
        if silent.is_empty() {
            return;
        }
        for &i in &silent {
            self.branches[i].prepare_attempt += 1;
        }
        let round = self.max_attempt(|b| b.prepare_attempt);
        out.push(Command::Persist {
            msg_id: format!("{}.prepare.r{round}", self.txn_id),
            event: self.record(TxnState::Preparing, now),
        });
        for i in silent {
            out.push(Command::Send(self.command(i, self.first_kind())));
        }
    }

    fn send_prepares(&self, out: &mut Vec<Command>) {
        for i in 0..self.branches.len() {
            out.push(Command::Send(self.command(i, self.first_kind())));
        }
    }

    /// What phase 1 sends: a prepare, or the one-phase commit.
    fn first_kind(&self) -> CommandKind {
        if self.one_phase {
            CommandKind::CommitOnePhase
        } else {
            CommandKind::Prepare
        }
    }

    /// Steps that still owe a phase-2 confirmation.
    fn pending(&self) -> impl Iterator<Item = usize> + '_ {
        let committing = self.phase == Phase::Committing;
        self.branches
            .iter()
            .enumerate()
            .filter(move |(_, b)| {
                !b.done
                    && if committing {
                        b.vote == Some(Vote::Ready)
                    } else {
                        // Silent steps may have prepared; refusers and read-only steps hold
                        // nothing. An abort durably queued for the step needs no more.
                        !b.abort_stored && matches!(b.vote, None | Some(Vote::Ready))
                    }
            })
            .map(|(i, _)| i)
    }

    fn phase2_kind(&self) -> CommandKind {
        if self.phase == Phase::Committing {
            CommandKind::Commit
        } else {
            CommandKind::Abort
        }
    }

    fn retry_delay(&self) -> u64 {
        backoff_ms(
            self.cfg
                .retry_base_ms
                .max(self.observed_round_ms.saturating_mul(2)),
            self.cfg.retry_cap_ms,
            self.retry_round,
            &self.txn_id,
        )
    }

    fn max_attempt(&self, f: impl Fn(&Branch) -> u32) -> u32 {
        self.branches.iter().map(f).max().unwrap_or(0)
    }

    fn command(&self, step: usize, kind: CommandKind) -> ParticipantCommand {
        let b = &self.branches[step];
        // An abort carries the payload too: a participant whose prepare applied its effect
        // and crashed before recording the vote has only the command to find the branch by.
        // A commit needs none: it only follows a recorded ready vote, which has it.
        let (payload, attempt, deadline_ms) = match kind {
            CommandKind::Prepare | CommandKind::CommitOnePhase => {
                (b.payload.clone(), b.prepare_attempt, self.deadline_ms)
            }
            CommandKind::Abort => (b.payload.clone(), b.decision_attempt, 0),
            _ => (Value::Null, b.decision_attempt, 0),
        };
        ParticipantCommand {
            txn_id: self.txn_id.clone(),
            service: b.service.clone(),
            step,
            kind,
            action: b.action.clone(),
            payload,
            reply_to: self.reply_to.clone(),
            attempt,
            deadline_ms,
            compensate_action: None,
            token: None,
            lock_ts: Some(self.lock_ts),
            deadlock: matches!(kind, CommandKind::Prepare | CommandKind::CommitOnePhase)
                .then_some(self.cfg.deadlock),
            url: b.url.clone(),
            traceparent: self.traceparent.clone(),
        }
    }

    fn event(&self, state: TxnState, now: u64, with_payload: bool) -> TransactionEvent {
        let mut event = TransactionEvent {
            txn_id: self.txn_id.clone(),
            state,
            mode: Mode::TwoPc,
            steps: self
                .branches
                .iter()
                .enumerate()
                .map(|(i, b)| StepStatus {
                    step: i,
                    service: b.service.clone(),
                    url: b.url.clone(),
                    action: b.action.clone(),
                    vote: b.vote,
                    done: b.done,
                    prepare_attempt: b.prepare_attempt,
                    decision_attempt: b.decision_attempt,
                    payload: with_payload.then(|| b.payload.clone()),
                    saga: None,
                    compensate: None,
                    timeout_ms: None,
                })
                .collect(),
            timestamp_ms: now,
            reason: self.reason.clone(),
            stuck: self.stuck,
            timeout_ms: Some(self.timeout_ms),
            metadata: self.metadata.clone(),
            submit_seq: self.submit_seq,
            current_step: None,
            cause: None,
            lock_ts: with_payload.then_some(self.lock_ts),
            traceparent: with_payload.then(|| self.traceparent.clone()).flatten(),
            resolved: None,
            one_phase: self.one_phase,
        };
        if self.compact {
            super::compact(&mut event);
        }
        event
    }
}

#[cfg(test)]
mod tests;
