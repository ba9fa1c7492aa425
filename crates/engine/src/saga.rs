//! The saga state machine of one transaction: do each step for real, in order; when one
//! fails or times out, undo every step that executed (or may have) with its compensation,
//! newest first.
//!
//! Transition table (every other pair is ignored with a typed [`EngineError`]):
//!
//! | phase        | event                                       | next          | commands |
//! |--------------|---------------------------------------------|---------------|----------|
//! | (start)      | `start`                                     | Executing(0)  | Persist(accepted), Send(execute 0), SetTimer(step) |
//! | Executing(i) | `done` for i                                | Executing(i+1) / Completed | Persist(progress), Send(execute i+1) / Persist(completed), Finished |
//! | Executing(i) | retryable `failed`, tries left              | same          | SetTimer(retry); on it: Persist(round), Send(execute i, attempt+1) |
//! | Executing(i) | `failed` (or out of tries)                  | Compensating  | compensate i-1 .. 0 that are done |
//! | Executing(i) | no answer for half the deadline (at most `retry_cap_ms`) | same | Persist(round), Send(execute i, attempt+1), again after as long |
//! | Executing(i) | step timeout                                | Compensating  | compensate i (it may have executed), then i-1 .. 0 |
//! | Compensating(j) | `done` for j                             | Compensating(next) / Compensated | Persist(progress), Send(compensate next) / Persist(compensated), Finished |
//! | Compensating(j) | `failed` or timeout                      | same (shown `failed` after the limit) | SetTimer(retry, backoff capped); on it: Persist(round), Send(compensate j, attempt+1) |
//! | (recover)    | log says executing / compensating / failed  | same          | Persist(round), resend the current command with attempt+1 |
//! | Completed/Compensated | anything                           | same          | none |
//! | Executing(i) | log refused a record                        | Compensating  | compact from now on; compensate what executed (or may have), reason `log_refused` |
//! | any other    | log refused a record                        | same          | compact from now on; the runtime writes the record again compacted |
//! | any          | log refused a compact record                | same          | none: the runtime stops; a restart resumes |
//! | Executing/Compensating | operator: retry-now (a command out) | same          | as the retry timer, at once |
//! | Executing    | operator: abort                             | Compensating  | the current step counts as maybe executed; reason `operator` |
//! | Compensating | operator: mark-done (the step being compensated) | Compensating or Compensated | the step counts as compensated; the next one |
//!
//! Every command is preceded by a persisted record of the progress so far, so a restarted
//! coordinator continues from where the log says: forward if compensation has not started,
//! backward otherwise. Once a step's compensation began, no execute is ever sent for it.

use serde_json::Value;

use super::twopc::{EngineError, RecoverError};
use super::{Command, EngineConfig, Event, Refusal, ResolveRefused, Timer, backoff_ms};
use txcoord_proto::{
    CommandKind, Mode, ParticipantCommand, ParticipantReply, Reason, ReplyOutcome, Resolution,
    ResolveAction, SagaStep, SagaStepState, StepStatus, TransactionEvent, TransactionRequest,
    TxnState,
};

/// The rows of the transition table above, as the engine records them when they fire (see
/// [`Saga::rows_hit`]): the simulations check that every row is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Row {
    /// `start`: accepted record, the first execute.
    Start,
    /// Executing, `done`: the next step, or completed.
    StepDone,
    /// Executing, a retryable failure with tries left: retry timer.
    RetryableFailure,
    /// The retry timer: the current command again, with the next attempt.
    Retry,
    /// Executing, `failed` (or out of tries): compensation begins.
    StepFailed,
    /// Executing, no answer for half the deadline (at most `retry_cap_ms`): execute again.
    ExecuteNudge,
    /// Executing, the step timeout: compensation begins.
    StepTimeout,
    /// Compensating, `done`: the next compensation, or compensated.
    CompensateDone,
    /// Compensating, `failed` or timeout: retried (shown `failed` past the limit).
    CompensationFailing,
    /// Recovered from the log.
    Recover,
    /// A reply for a step or phase that is over (late, duplicated): ignored.
    Late,
    /// The log refused a record going forward: compensation begins.
    LogRefusedForward,
    /// The log refused a record compensating or finishing: written again compacted.
    LogRefusedRedo,
    /// The log refused a compact record: stop.
    LogRefusedGiveUp,
    /// An operator's action (`txcoord resolve`) carried out.
    Resolve,
}

impl Row {
    /// Every row.
    pub const ALL: [Row; 15] = [
        Row::Start,
        Row::StepDone,
        Row::RetryableFailure,
        Row::Retry,
        Row::StepFailed,
        Row::ExecuteNudge,
        Row::StepTimeout,
        Row::CompensateDone,
        Row::CompensationFailing,
        Row::Recover,
        Row::Late,
        Row::LogRefusedForward,
        Row::LogRefusedRedo,
        Row::LogRefusedGiveUp,
        Row::Resolve,
    ];
}

/// Where a saga stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Running step `cursor` forward.
    Executing,
    /// Undoing step `cursor`.
    Compensating,
    /// Every step done.
    Completed,
    /// Every step that executed (or may have) undone.
    Compensated,
}

#[derive(Debug, Clone, PartialEq)]
struct Step {
    service: String,
    url: Option<String>,
    action: String,
    payload: Value,
    compensate: Option<String>,
    timeout_ms: Option<u64>,
    state: SagaStepState,
    execute_attempt: u32,
    compensate_attempt: u32,
    failures: u32,
}

/// One saga.
#[derive(Debug, Clone, PartialEq)]
pub struct Saga {
    txn_id: String,
    cfg: EngineConfig,
    reply_to: String,
    steps: Vec<Step>,
    timeout_ms: u64,
    metadata: Option<Value>,
    submit_seq: Option<u64>,
    phase: Phase,
    cursor: usize,
    /// Why compensation started.
    cause: Option<Reason>,
    /// Set while the current compensation has failed past its limit (state `failed`).
    failing: Option<Reason>,
    /// The log refused a record: every record from then on is compact.
    compact: bool,
    /// The rows of the table this saga went through (a bit per [`Row`]).
    rows: u32,
    /// The request's W3C trace context, in every command.
    traceparent: Option<String>,
}

impl Saga {
    /// Begins a saga: the accepted record is persisted before the first execute goes out.
    pub fn start(
        txn_id: String,
        request: &TransactionRequest,
        submit_seq: Option<u64>,
        reply_to: String,
        cfg: EngineConfig,
        now: u64,
        out: &mut Vec<Command>,
    ) -> Saga {
        let steps = request
            .steps
            .iter()
            .map(|s| Step {
                service: s.service.clone(),
                url: s.url.clone(),
                action: s.action.clone(),
                payload: s.payload.clone(),
                compensate: s.compensate.clone(),
                timeout_ms: s.timeout_ms,
                state: SagaStepState::Pending,
                execute_attempt: 0,
                compensate_attempt: 0,
                failures: 0,
            })
            .collect();
        let mut saga = Saga {
            txn_id,
            cfg,
            reply_to,
            steps,
            timeout_ms: request.timeout_ms.unwrap_or(cfg.default_timeout_ms),
            metadata: request.metadata.clone(),
            submit_seq,
            phase: Phase::Executing,
            cursor: 0,
            cause: None,
            failing: None,
            compact: false,
            rows: 1 << Row::Start as u32,
            traceparent: request.traceparent.clone(),
        };
        saga.steps[0].state = SagaStepState::Executing;
        saga.steps[0].execute_attempt = 1;
        out.push(Command::Persist {
            msg_id: format!("{}.accepted", saga.txn_id),
            event: saga.event(TxnState::Accepted, now, true),
        });
        saga.send_current(now, out);
        saga
    }

    /// Rebuilds a saga from its `accepted` record and its last record, and resumes it by
    /// resending the current command with a higher attempt.
    pub fn recover(
        accepted: &TransactionEvent,
        last: &TransactionEvent,
        reply_to: String,
        cfg: EngineConfig,
        now: u64,
        out: &mut Vec<Command>,
    ) -> Result<Saga, RecoverError> {
        if last.state.is_terminal() {
            return Err(RecoverError::Finished(last.state));
        }
        if accepted.state != TxnState::Accepted
            || accepted.txn_id != last.txn_id
            || accepted.steps.len() != last.steps.len()
            || accepted.steps.is_empty()
        {
            return Err(RecoverError::Inconsistent(
                "first and last records do not describe one saga".into(),
            ));
        }
        let steps = accepted
            .steps
            .iter()
            .zip(&last.steps)
            .map(|(a, l)| {
                let s = l.saga.clone().unwrap_or(SagaStep {
                    state: SagaStepState::Pending,
                    execute_attempt: 0,
                    compensate_attempt: 0,
                    failures: 0,
                });
                Step {
                    service: a.service.clone(),
                    url: a.url.clone(),
                    action: a.action.clone(),
                    payload: a.payload.clone().unwrap_or(Value::Null),
                    compensate: a.compensate.clone(),
                    timeout_ms: a.timeout_ms,
                    state: s.state,
                    execute_attempt: s.execute_attempt,
                    compensate_attempt: s.compensate_attempt,
                    failures: s.failures,
                }
            })
            .collect();
        let phase = match last.state {
            TxnState::Accepted | TxnState::Executing => Phase::Executing,
            TxnState::Compensating | TxnState::Failed => Phase::Compensating,
            other => {
                return Err(RecoverError::Inconsistent(format!(
                    "a saga cannot be in state {other:?}"
                )));
            }
        };
        let mut saga = Saga {
            txn_id: accepted.txn_id.clone(),
            cfg,
            reply_to,
            steps,
            timeout_ms: accepted.timeout_ms.unwrap_or(cfg.default_timeout_ms),
            metadata: accepted.metadata.clone(),
            submit_seq: accepted.submit_seq,
            phase,
            cursor: last.current_step.unwrap_or(0),
            cause: last.cause.clone().or_else(|| last.reason.clone()),
            failing: (last.state == TxnState::Failed)
                .then(|| last.reason.clone())
                .flatten(),
            compact: (last.metadata.is_none() && accepted.metadata.is_some())
                || matches!(
                    last.cause.as_ref().or(last.reason.as_ref()),
                    Some(Reason::LogRefused { .. })
                ),
            rows: 1 << Row::Recover as u32,
            traceparent: accepted.traceparent.clone(),
        };
        if saga.cursor >= saga.steps.len() {
            return Err(RecoverError::Inconsistent(format!(
                "current step {} of {} steps",
                saga.cursor,
                saga.steps.len()
            )));
        }
        match (saga.phase, saga.steps[saga.cursor].state) {
            (Phase::Executing, SagaStepState::Executing | SagaStepState::Pending) => {
                saga.steps[saga.cursor].state = SagaStepState::Executing;
                saga.resend(now, out);
            }
            (Phase::Executing, SagaStepState::Done) => saga.advance(now, out),
            (Phase::Compensating, SagaStepState::Compensating) => saga.resend(now, out),
            (Phase::Compensating, SagaStepState::Compensated) => saga.next_compensation(now, out),
            (phase, state) => {
                return Err(RecoverError::Inconsistent(format!(
                    "{phase:?} with current step {state:?}"
                )));
            }
        }
        Ok(saga)
    }

    /// The rows of the transition table this saga went through so far.
    pub fn rows_hit(&self) -> impl Iterator<Item = Row> + '_ {
        Row::ALL
            .into_iter()
            .filter(|r| self.rows & (1 << *r as u32) != 0)
    }

    fn hit(&mut self, row: Row) {
        self.rows |= 1 << row as u32;
    }

    /// The transaction id.
    pub fn txn_id(&self) -> &str {
        &self.txn_id
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the saga reached `completed` or `compensated`.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Completed | Phase::Compensated)
    }

    /// The state shown in events.
    pub fn state(&self) -> TxnState {
        match self.phase {
            Phase::Executing => TxnState::Executing,
            Phase::Compensating if self.failing.is_some() => TxnState::Failed,
            Phase::Compensating => TxnState::Compensating,
            Phase::Completed => TxnState::Completed,
            Phase::Compensated => TxnState::Compensated,
        }
    }

    /// The saga as an event, for status queries.
    pub fn snapshot(&self, now: u64) -> TransactionEvent {
        self.event(self.state(), now, false)
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
            Event::Stored { .. } => Ok(()),
        }
    }

    fn on_reply(
        &mut self,
        now: u64,
        r: ParticipantReply,
        out: &mut Vec<Command>,
    ) -> Result<(), EngineError> {
        let service = self.steps.get(r.step).map(|s| s.service.as_str());
        super::check_sender(&r, service, self.steps.len())?;
        let step = &self.steps[r.step];
        if !matches!(r.outcome, ReplyOutcome::Done | ReplyOutcome::Failed)
            || !matches!(r.kind, CommandKind::Execute | CommandKind::Compensate)
        {
            return Err(EngineError::InvalidOutcome {
                kind: r.kind,
                outcome: r.outcome,
            });
        }
        let current = r.step == self.cursor;
        let message = r.reason.clone().unwrap_or_else(|| "no reason given".into());
        match (self.phase, r.kind, r.outcome, step.state) {
            (
                Phase::Executing,
                CommandKind::Execute,
                ReplyOutcome::Done,
                SagaStepState::Executing,
            ) if current => {
                self.hit(Row::StepDone);
                self.steps[self.cursor].state = SagaStepState::Done;
                self.advance(now, out);
            }
            (
                Phase::Executing,
                CommandKind::Execute,
                ReplyOutcome::Failed,
                SagaStepState::Executing,
            ) if current => {
                out.push(Command::CancelTimer(Timer::StepTimeout));
                let s = &mut self.steps[self.cursor];
                s.failures += 1;
                let retryable = r.retryable == Some(true);
                if retryable && s.failures < self.cfg.execute_attempts {
                    self.rows |= 1 << Row::RetryableFailure as u32;
                    let delay = backoff_ms(
                        self.cfg.retry_base_ms,
                        self.cfg.retry_cap_ms,
                        s.failures,
                        &self.txn_id,
                    );
                    out.push(Command::SetTimer {
                        timer: Timer::StepRetry,
                        at_ms: now.saturating_add(delay),
                    });
                } else {
                    // A final failure is recorded by the participant (nothing to undo); after
                    // retryable failures an earlier attempt may still land, so undo it too.
                    s.state = if retryable {
                        SagaStepState::Uncertain
                    } else {
                        SagaStepState::Failed
                    };
                    let cause = Reason::StepFailed {
                        service: s.service.clone(),
                        step: self.cursor,
                        message,
                    };
                    self.hit(Row::StepFailed);
                    self.begin_compensation(cause, now, out);
                }
            }
            (
                Phase::Compensating,
                CommandKind::Compensate,
                ReplyOutcome::Done,
                SagaStepState::Compensating,
            ) if current => {
                self.hit(Row::CompensateDone);
                self.steps[self.cursor].state = SagaStepState::Compensated;
                self.failing = None;
                self.next_compensation(now, out);
            }
            (
                Phase::Compensating,
                CommandKind::Compensate,
                ReplyOutcome::Failed,
                SagaStepState::Compensating,
            ) if current => {
                self.hit(Row::CompensationFailing);
                self.compensation_failed(message, now, out);
            }
            (_, kind, _, _) => {
                self.hit(Row::Late);
                return Err(EngineError::Late {
                    kind,
                    state: self.state(),
                });
            }
        }
        Ok(())
    }

    fn on_timer(&mut self, now: u64, timer: Timer, out: &mut Vec<Command>) {
        let state = self.steps[self.cursor].state;
        match (self.phase, timer, state) {
            (Phase::Executing, Timer::StepTimeout, SagaStepState::Executing) => {
                // No answer: the step may have executed, so it is compensated too.
                let s = &mut self.steps[self.cursor];
                s.state = SagaStepState::TimedOut;
                let cause = Reason::Timeout {
                    services: vec![s.service.clone()],
                    steps: vec![self.cursor],
                };
                self.hit(Row::StepTimeout);
                self.begin_compensation(cause, now, out);
            }
            (Phase::Compensating, Timer::StepTimeout, SagaStepState::Compensating) => {
                self.hit(Row::CompensationFailing);
                let ms = self.step_timeout(self.cursor);
                self.compensation_failed(format!("no answer within {ms} ms"), now, out);
            }
            (Phase::Executing, Timer::StepRetry, SagaStepState::Executing)
            | (Phase::Compensating, Timer::StepRetry, SagaStepState::Compensating) => {
                self.hit(Row::Retry);
                self.resend(now, out)
            }
            (Phase::Executing, Timer::StepNudge, SagaStepState::Executing) => {
                self.hit(Row::ExecuteNudge);
                // Same deadline; a fresh attempt for a participant that may have restarted.
                let s = &mut self.steps[self.cursor];
                s.execute_attempt += 1;
                let attempt = s.execute_attempt;
                out.push(Command::Persist {
                    msg_id: format!("{}.execute.{}.{attempt}", self.txn_id, self.cursor),
                    event: self.snapshot(now),
                });
                out.push(Command::Send(self.command(
                    self.cursor,
                    CommandKind::Execute,
                    attempt,
                    now,
                )));
                out.push(Command::SetTimer {
                    timer: Timer::StepNudge,
                    at_ms: now.saturating_add(self.nudge_every(self.cursor)),
                });
            }
            // A timer armed for a step or phase that is over: stale.
            _ => {}
        }
    }

    /// Whether an operator's action applies now (see [`super::Machine::resolve`]): retry-now
    /// while a step's command is out; abort while executing (it compensates); mark-done for
    /// the step being compensated (the operator undid it by hand).
    pub fn check_resolve(&self, r: &Resolution) -> Result<(), ResolveRefused> {
        let refuse = |why: String| Err(ResolveRefused(why));
        let state = self.state().as_str();
        let current = self.steps[self.cursor].state;
        if r.outcome.is_some() {
            return refuse(
                "--outcome is only for mark-done of a one-phase transaction whose participant never answered; a saga's steps are marked done without one".into(),
            );
        }
        match (r.action, self.phase) {
            (_, Phase::Completed | Phase::Compensated) => {
                refuse(format!("it is {state}: nothing is left to do"))
            }
            (ResolveAction::RetryNow, _)
                if matches!(
                    current,
                    SagaStepState::Executing | SagaStepState::Compensating
                ) =>
            {
                Ok(())
            }
            (ResolveAction::RetryNow, _) => refuse(format!(
                "step {} has no command out; the saga moves on by itself",
                self.cursor
            )),
            (ResolveAction::Abort, Phase::Executing) => Ok(()),
            (ResolveAction::Abort, _) => refuse(format!(
                "it is {state}: compensation has begun already (retry-now resends it; mark-done --step {} counts a compensation you did by hand)",
                self.cursor
            )),
            (ResolveAction::MarkDone, Phase::Executing) => refuse(
                "it is executing: mark-done in a saga is for the step being compensated, after you undid it by hand (abort starts the compensation)".into(),
            ),
            (ResolveAction::MarkDone, _) => match r.step {
                None => refuse("mark-done needs the step (--step N)".into()),
                Some(s) if s == self.cursor && current == SagaStepState::Compensating => Ok(()),
                Some(s) => refuse(format!(
                    "step {s} is not the one being compensated (that is step {})",
                    self.cursor
                )),
            },
        }
    }

    /// Carries out an operator's action once [`Saga::check_resolve`] allowed it.
    pub(crate) fn resolve(&mut self, now: u64, r: &Resolution, out: &mut Vec<Command>) {
        self.hit(Row::Resolve);
        match r.action {
            ResolveAction::RetryNow => {
                out.push(Command::CancelTimer(Timer::StepRetry));
                self.resend(now, out);
            }
            ResolveAction::Abort => {
                // The step being executed may have run: it is compensated too.
                let s = &mut self.steps[self.cursor];
                if s.state == SagaStepState::Executing {
                    s.state = SagaStepState::Uncertain;
                }
                let reason = Reason::Operator {
                    by: r.by.clone(),
                    message: r.reason.clone(),
                };
                self.begin_compensation(reason, now, out);
            }
            ResolveAction::MarkDone => {
                self.steps[self.cursor].state = SagaStepState::Compensated;
                self.failing = None;
                out.push(Command::CancelTimer(Timer::StepTimeout));
                out.push(Command::CancelTimer(Timer::StepRetry));
                self.next_compensation(now, out);
            }
        }
    }

    fn compensation_failed(&mut self, message: String, now: u64, out: &mut Vec<Command>) {
        out.push(Command::CancelTimer(Timer::StepTimeout));
        let s = &mut self.steps[self.cursor];
        s.failures += 1;
        let failures = s.failures;
        if failures >= self.cfg.compensation_attempts {
            let newly = self.failing.is_none();
            self.failing = Some(Reason::CompensationFailed {
                service: s.service.clone(),
                step: self.cursor,
                message,
            });
            if newly {
                out.push(Command::Persist {
                    msg_id: format!(
                        "{}.failed.{}.{}",
                        self.txn_id, self.cursor, s.compensate_attempt
                    ),
                    event: self.snapshot(now),
                });
            }
        }
        // Past the limit the delay stays at the cap: still retried, never dropped.
        let delay = backoff_ms(
            self.cfg.retry_base_ms,
            self.cfg.retry_cap_ms,
            failures,
            &self.txn_id,
        );
        out.push(Command::SetTimer {
            timer: Timer::StepRetry,
            at_ms: now.saturating_add(delay),
        });
    }

    /// The current step is done: persist that and start the next, or complete.
    fn advance(&mut self, now: u64, out: &mut Vec<Command>) {
        let next = self.cursor + 1;
        if next == self.steps.len() {
            self.phase = Phase::Completed;
            self.finish(now, out);
            return;
        }
        self.cursor = next;
        let s = &mut self.steps[next];
        s.state = SagaStepState::Executing;
        s.execute_attempt += 1;
        s.failures = 0;
        self.send_current(now, out);
    }

    fn begin_compensation(&mut self, cause: Reason, now: u64, out: &mut Vec<Command>) {
        self.phase = Phase::Compensating;
        self.cause = Some(cause);
        out.push(Command::CancelTimer(Timer::StepTimeout));
        out.push(Command::CancelTimer(Timer::StepRetry));
        out.push(Command::CancelTimer(Timer::StepNudge));
        self.next_compensation(now, out);
    }

    /// Starts compensating the newest step that executed or may have, or ends compensated.
    fn next_compensation(&mut self, now: u64, out: &mut Vec<Command>) {
        let next = (0..self.steps.len()).rev().find(|&i| {
            matches!(
                self.steps[i].state,
                SagaStepState::Done | SagaStepState::TimedOut | SagaStepState::Uncertain
            )
        });
        match next {
            Some(j) => {
                self.cursor = j;
                let s = &mut self.steps[j];
                s.state = SagaStepState::Compensating;
                s.compensate_attempt += 1;
                s.failures = 0;
                self.send_current(now, out);
            }
            None => {
                self.phase = Phase::Compensated;
                self.finish(now, out);
            }
        }
    }

    /// Resends the current command with the next attempt (after persisting it).
    fn resend(&mut self, now: u64, out: &mut Vec<Command>) {
        let s = &mut self.steps[self.cursor];
        match self.phase {
            Phase::Executing => s.execute_attempt += 1,
            _ => s.compensate_attempt += 1,
        }
        self.send_current(now, out);
    }

    /// Persists the progress, then sends the current step's command and arms its timeout.
    fn send_current(&mut self, now: u64, out: &mut Vec<Command>) {
        let (kind, attempt) = match self.phase {
            Phase::Executing => (
                CommandKind::Execute,
                self.steps[self.cursor].execute_attempt,
            ),
            _ => (
                CommandKind::Compensate,
                self.steps[self.cursor].compensate_attempt,
            ),
        };
        // The accepted record already covers the very first execute.
        if !(self.cursor == 0 && kind == CommandKind::Execute && attempt == 1) {
            out.push(Command::Persist {
                msg_id: format!(
                    "{}.{}.{}.{attempt}",
                    self.txn_id,
                    kind.as_str(),
                    self.cursor
                ),
                event: self.snapshot(now),
            });
        }
        out.push(Command::Send(self.command(self.cursor, kind, attempt, now)));
        out.push(Command::SetTimer {
            timer: Timer::StepTimeout,
            at_ms: now.saturating_add(self.step_timeout(self.cursor)),
        });
        if kind == CommandKind::Execute {
            out.push(Command::SetTimer {
                timer: Timer::StepNudge,
                at_ms: now.saturating_add(self.nudge_every(self.cursor)),
            });
        }
    }

    fn finish(&mut self, now: u64, out: &mut Vec<Command>) {
        self.failing = None;
        out.push(Command::Persist {
            msg_id: format!("{}.final", self.txn_id),
            event: self.snapshot(now),
        });
        for timer in [Timer::StepTimeout, Timer::StepRetry, Timer::StepNudge] {
            out.push(Command::CancelTimer(timer));
        }
        out.push(Command::Finished);
    }

    fn step_timeout(&self, i: usize) -> u64 {
        self.steps[i].timeout_ms.unwrap_or(self.timeout_ms)
    }

    /// How long an execute goes unanswered before it is sent again: half the step's
    /// timeout, but never more than `retry_cap_ms`, so that a command or reply lost on a
    /// long step (minutes) costs a retry delay, not half the step's time.
    fn nudge_every(&self, i: usize) -> u64 {
        (self.step_timeout(i) / 2).min(self.cfg.retry_cap_ms.max(1))
    }

    fn command(&self, i: usize, kind: CommandKind, attempt: u32, now: u64) -> ParticipantCommand {
        let s = &self.steps[i];
        ParticipantCommand {
            action: s.action.clone(),
            payload: s.payload.clone(),
            reply_to: self.reply_to.clone(),
            attempt,
            deadline_ms: if kind == CommandKind::Execute {
                now.saturating_add(self.step_timeout(i))
            } else {
                0
            },
            compensate_action: if kind == CommandKind::Compensate {
                s.compensate.clone()
            } else {
                None
            },
            url: s.url.clone(),
            traceparent: self.traceparent.clone(),
            ..ParticipantCommand::new(self.txn_id.clone(), s.service.clone(), i, kind)
        }
    }

    /// See [`super::Machine::log_refused`]. Going forward nothing is decided: the saga
    /// compensates what executed or may have (the current step too, unless the refused
    /// record was the one before its first execute), with reason `log_refused`.
    pub fn log_refused(
        &mut self,
        now: u64,
        _msg_id: &str,
        message: &str,
        out: &mut Vec<Command>,
    ) -> Refusal {
        if self.compact {
            self.hit(Row::LogRefusedGiveUp);
            return Refusal::GiveUp;
        }
        self.compact = true;
        if self.phase != Phase::Executing {
            self.hit(Row::LogRefusedRedo);
            return Refusal::Redo;
        }
        self.hit(Row::LogRefusedForward);
        let first_record_of_step = self.cursor > 0;
        let s = &mut self.steps[self.cursor];
        if s.state == SagaStepState::Executing {
            if s.execute_attempt <= 1 && first_record_of_step {
                // Refused before its first execute went out: it never ran.
                s.state = SagaStepState::Pending;
                s.execute_attempt = 0;
            } else {
                s.state = SagaStepState::Uncertain;
            }
        }
        self.begin_compensation(super::log_refused_reason(message), now, out);
        Refusal::Replanned
    }

    fn event(&self, state: TxnState, now: u64, with_payload: bool) -> TransactionEvent {
        let mut event = TransactionEvent {
            txn_id: self.txn_id.clone(),
            state,
            mode: Mode::Saga,
            steps: self
                .steps
                .iter()
                .enumerate()
                .map(|(i, s)| StepStatus {
                    step: i,
                    service: s.service.clone(),
                    url: s.url.clone(),
                    action: s.action.clone(),
                    vote: None,
                    done: matches!(s.state, SagaStepState::Done | SagaStepState::Compensated),
                    prepare_attempt: 0,
                    decision_attempt: 0,
                    payload: with_payload.then(|| s.payload.clone()),
                    saga: Some(SagaStep {
                        state: s.state,
                        execute_attempt: s.execute_attempt,
                        compensate_attempt: s.compensate_attempt,
                        failures: s.failures,
                    }),
                    compensate: s.compensate.clone(),
                    timeout_ms: s.timeout_ms,
                })
                .collect(),
            timestamp_ms: now,
            reason: self.failing.clone().or_else(|| self.cause.clone()),
            lock_ts: None,
            stuck: false,
            timeout_ms: Some(self.timeout_ms),
            metadata: self.metadata.clone(),
            submit_seq: self.submit_seq,
            current_step: (!self.is_finished()).then_some(self.cursor),
            cause: self.failing.as_ref().and(self.cause.clone()),
            traceparent: with_payload.then(|| self.traceparent.clone()).flatten(),
            resolved: None,
            one_phase: false,
        };
        if self.compact {
            super::compact(&mut event);
        }
        event
    }
}

#[cfg(test)]
mod tests;
