//! The sans-IO core: transaction state machines that take events and emit commands.
//!
//! ```text
//!   Start / Recover / Reply / Timer          Persist / Announce / Send / SetTimer / Finished
//!   ─────────────────────────────▶  Engine  ─────────────────────────────────────────────▶
//!        (time is an input)        (pure)        (the runtime performs them, in order)
//! ```
//!
//! Nothing here does I/O, sleeps or reads the clock: time comes in with every event, so tests
//! are synchronous and deterministic. The runtime (`txcoord`'s coordinator) drains the commands
//! and performs them **in order**; a [`Command::Persist`] is a barrier, so no later command
//! of the same batch runs before the record is durable. That order is how the engine states
//! the durability rule: the decision is on disk before any participant hears it.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod deadlock;
pub mod saga;
pub mod twopc;

use txcoord_proto::{
    CommandKind, Mode, ParticipantCommand, ParticipantReply, Reason, Resolution, TransactionEvent,
    TransactionRequest, TxnState,
};

/// Checks that a reply names a step this transaction has, and comes from that step's
/// service. `service_of` is the step's service, if the step exists.
pub(crate) fn check_sender(
    reply: &ParticipantReply,
    service_of: Option<&str>,
    steps: usize,
) -> Result<(), twopc::EngineError> {
    let service = service_of.ok_or(twopc::EngineError::UnknownStep {
        step: reply.step,
        steps,
    })?;
    if service != reply.service {
        return Err(twopc::EngineError::ServiceMismatch {
            step: reply.step,
            expected: service.to_string(),
            got: reply.service.clone(),
        });
    }
    Ok(())
}

/// One transaction's machine, whichever its mode: what the runtime drives.
#[derive(Debug, Clone, PartialEq)]
pub enum Machine {
    /// Two-phase commit.
    TwoPc(twopc::TwoPc),
    /// A saga.
    Saga(saga::Saga),
}

impl Machine {
    /// Begins a transaction in the request's mode.
    pub fn start(
        txn_id: String,
        request: &TransactionRequest,
        submit_seq: Option<u64>,
        reply_to: String,
        cfg: EngineConfig,
        now: u64,
        out: &mut Vec<Command>,
    ) -> Machine {
        match request.mode {
            Mode::TwoPc => Machine::TwoPc(twopc::TwoPc::start(
                txn_id, request, submit_seq, reply_to, cfg, now, out,
            )),
            Mode::Saga => Machine::Saga(saga::Saga::start(
                txn_id, request, submit_seq, reply_to, cfg, now, out,
            )),
        }
    }

    /// Rebuilds a transaction from its log, in the mode its accepted record names.
    pub fn recover(
        accepted: &TransactionEvent,
        last: &TransactionEvent,
        reply_to: String,
        cfg: EngineConfig,
        now: u64,
        out: &mut Vec<Command>,
    ) -> Result<Machine, twopc::RecoverError> {
        match accepted.mode {
            Mode::TwoPc => {
                twopc::TwoPc::recover(accepted, last, reply_to, cfg, now, out).map(Machine::TwoPc)
            }
            Mode::Saga => {
                saga::Saga::recover(accepted, last, reply_to, cfg, now, out).map(Machine::Saga)
            }
        }
    }

    /// Applies one event.
    pub fn handle(
        &mut self,
        now: u64,
        event: Event,
        out: &mut Vec<Command>,
    ) -> Result<(), twopc::EngineError> {
        match self {
            Machine::TwoPc(m) => m.handle(now, event, out),
            Machine::Saga(m) => m.handle(now, event, out),
        }
    }

    /// The transaction as an event.
    pub fn snapshot(&self, now: u64) -> TransactionEvent {
        match self {
            Machine::TwoPc(m) => m.snapshot(now),
            Machine::Saga(m) => m.snapshot(now),
        }
    }

    /// The current state.
    pub fn state(&self) -> TxnState {
        match self {
            Machine::TwoPc(m) => m.state(),
            Machine::Saga(m) => m.state(),
        }
    }

    /// The transaction id.
    pub fn txn_id(&self) -> &str {
        match self {
            Machine::TwoPc(m) => m.txn_id(),
            Machine::Saga(m) => m.txn_id(),
        }
    }

    /// The rows of its engine's transition table this transaction went through so far.
    pub fn rows_hit(&self) -> Vec<Row> {
        match self {
            Machine::TwoPc(m) => m.rows_hit().map(Row::TwoPc).collect(),
            Machine::Saga(m) => m.rows_hit().map(Row::Saga).collect(),
        }
    }

    /// The log refused for good the record of the last `Persist` the runtime carried out
    /// (`msg_id`), with `message`; the runtime dropped every command after it. Every record
    /// from now on is compact ([`compact`]). What the runtime does next is the answer.
    pub fn log_refused(
        &mut self,
        now: u64,
        msg_id: &str,
        message: &str,
        out: &mut Vec<Command>,
    ) -> Refusal {
        match self {
            Machine::TwoPc(m) => m.log_refused(now, msg_id, message, out),
            Machine::Saga(m) => m.log_refused(now, msg_id, message, out),
        }
    }

    /// Whether an operator's action would be carried out now, or the rule that refuses it
    /// (the dry run of [`Machine::resolve`]).
    pub fn check_resolve(&self, r: &Resolution) -> Result<(), ResolveRefused> {
        match self {
            Machine::TwoPc(m) => m.check_resolve(r),
            Machine::Saga(m) => m.check_resolve(r),
        }
    }

    /// Carries out an operator's action (`txcoord resolve`), or refuses it naming the rule
    /// (refused, it changes nothing). The record that carries it out has `resolved` set: the
    /// audit of who asked, what and why. The rules keep atomicity: an abort only while
    /// nothing is decided; never a commit the votes did not decide; `mark-done` only for a
    /// step of a decided transaction (which the operator applied by hand), or, with an
    /// outcome, for a one-phase transaction past its deadline whose participant never
    /// answered (the operator names what that participant did: a heuristic decision).
    pub fn resolve(
        &mut self,
        now: u64,
        r: &Resolution,
        out: &mut Vec<Command>,
    ) -> Result<(), ResolveRefused> {
        self.check_resolve(r)?;
        let start = out.len();
        match self {
            Machine::TwoPc(m) => m.resolve(now, r, out),
            Machine::Saga(m) => m.resolve(now, r, out),
        }
        let audit = out[start..].iter_mut().find_map(|c| match c {
            Command::Persist { event, .. } => Some(event),
            _ => None,
        });
        match audit {
            Some(event) => event.resolved = Some(r.clone()),
            None => {
                let mut event = self.snapshot(now);
                event.resolved = Some(r.clone());
                out.insert(
                    start,
                    Command::Persist {
                        msg_id: format!("{}.resolve.{}", self.txn_id(), r.at_ms),
                        event,
                    },
                );
            }
        }
        Ok(())
    }

    /// The deadlock detector chose this transaction as a victim (see
    /// [`twopc::TwoPc::deadlock_victim`]). Sagas hold no locks between steps and are never
    /// victims.
    pub fn deadlock_victim(
        &mut self,
        now: u64,
        reason: txcoord_proto::Reason,
        out: &mut Vec<Command>,
    ) -> Result<(), twopc::EngineError> {
        match self {
            Machine::TwoPc(m) => m.deadlock_victim(now, reason, out),
            Machine::Saga(m) => Err(twopc::EngineError::NotAVictim { state: m.state() }),
        }
    }
}

/// Why an operator's action was refused: the rule that applies, in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ResolveRefused(pub String);

/// One row of either engine's transition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Row {
    /// A row of [`twopc`]'s table.
    TwoPc(twopc::Row),
    /// A row of [`saga`]'s table.
    Saga(saga::Row),
}

impl Row {
    /// Every row of the engine of `mode`.
    pub fn all(mode: Mode) -> Vec<Row> {
        match mode {
            Mode::TwoPc => twopc::Row::ALL.into_iter().map(Row::TwoPc).collect(),
            Mode::Saga => saga::Row::ALL.into_iter().map(Row::Saga).collect(),
        }
    }
}

/// What the runtime does after the log refused a record for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The record announced nothing decided: the machine decided anew (a 2PC aborts, a
    /// saga compensates, with reason `log_refused`). Carry out its new commands instead of
    /// the dropped ones.
    Replanned,
    /// The record follows a durable decision, which stands: write it again compacted
    /// ([`compact`]), then carry out the dropped commands after it (compacted too).
    Redo,
    /// The record was compact already: nothing smaller can be written. The transaction
    /// stops here; a restart resumes it from its log.
    GiveUp,
}

/// The most bytes of a participant's or the log's text in a compact record.
pub const COMPACT_REASON_BYTES: usize = 256;

/// Makes a record as small as it can be without losing what recovery needs: no client
/// metadata, reasons cut to [`COMPACT_REASON_BYTES`]. Written once the log has refused a
/// record of the transaction.
pub fn compact(event: &mut TransactionEvent) {
    event.metadata = None;
    for reason in [&mut event.reason, &mut event.cause].into_iter().flatten() {
        reason.cut(COMPACT_REASON_BYTES);
    }
}

/// The reason a transaction ends with when the log refused a record before a decision.
pub(crate) fn log_refused_reason(message: &str) -> Reason {
    let mut r = Reason::LogRefused {
        message: format!("the coordinator's log refused a record: {message}"),
    };
    r.cut(COMPACT_REASON_BYTES);
    r
}

/// An input to a transaction's machine.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A participant's reply.
    Reply(ParticipantReply),
    /// A timer fired.
    Timer(Timer),
    /// JetStream acknowledged a command the runtime sent: it is durably queued for the
    /// participant's durable consumer, which will deliver it even if the service is down now.
    Stored {
        /// The step.
        step: usize,
        /// The command's kind.
        kind: CommandKind,
        /// The command's attempt.
        attempt: u32,
    },
}

/// Timers a transaction can arm; at most one of each is armed at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Timer {
    /// The prepare phase's deadline.
    PrepareTimeout,
    /// The next resend of unconfirmed phase-2 commands.
    Phase2Retry,
    /// When phase 2 counts as stuck.
    Stuck,
    /// Saga: the current step's deadline.
    StepTimeout,
    /// Saga: the next try of the current step's execute or compensate.
    StepRetry,
    /// Halfway to a deadline (at most `retry_cap_ms` after the send, and as often again)
    /// with no answer (a saga step's execute, or 2PC votes), send the command again: a
    /// participant that restarted has the old copy pending on its consumer until the ack
    /// wait expires, and a new attempt reaches it at once; a lost reply is made again.
    StepNudge,
}

/// What the runtime must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Write this record to the log (the events stream) under the deterministic message id,
    /// and wait until it is durable before running any later command.
    Persist {
        /// The `Nats-Msg-Id` of the write: retries of it are idempotent.
        msg_id: String,
        /// The record.
        event: TransactionEvent,
    },
    /// Publish this event for observers; it needs no barrier.
    Announce {
        /// The `Nats-Msg-Id` of the write.
        msg_id: String,
        /// The event.
        event: TransactionEvent,
    },
    /// Send a command to a participant.
    Send(ParticipantCommand),
    /// Arm (or re-arm) a timer for the given Unix millisecond.
    SetTimer {
        /// Which timer.
        timer: Timer,
        /// When it fires.
        at_ms: u64,
    },
    /// Disarm a timer.
    CancelTimer(Timer),
    /// The transaction reached its outcome; the runtime may forget it.
    Finished,
}

/// When `out` arms `timer`, if it does (for tests of both engines).
#[cfg(test)]
pub(crate) fn armed_at(out: &[Command], timer: Timer) -> Option<u64> {
    out.iter().find_map(|c| match c {
        Command::SetTimer { timer: t, at_ms } if *t == timer => Some(*at_ms),
        _ => None,
    })
}

/// Engine settings that come from configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineConfig {
    /// Prepare timeout when the request names none.
    pub default_timeout_ms: u64,
    /// First phase-2 resend delay.
    pub retry_base_ms: u64,
    /// Largest phase-2 resend delay.
    pub retry_cap_ms: u64,
    /// After this long in phase 2 without every confirmation, the transaction is flagged stuck.
    pub stuck_after_ms: u64,
    /// Saga: tries of an execute that fails retryably, before the step counts as failed.
    pub execute_attempts: u32,
    /// Saga: failed tries of a compensation before the saga is `failed` (it is still retried,
    /// at the longest backoff).
    pub compensation_attempts: u32,
    /// How distributed deadlocks are dealt with (carried in every prepare).
    pub deadlock: txcoord_proto::DeadlockPolicy,
    /// A 2PC transaction of one step is committed in one phase
    /// ([`txcoord_proto::CommandKind::CommitOnePhase`]): the runtime sets this per
    /// transaction, only when the step's service said it takes that command.
    pub one_phase: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            default_timeout_ms: 5_000,
            retry_base_ms: 500,
            retry_cap_ms: 30_000,
            stuck_after_ms: 60_000,
            execute_attempts: 3,
            compensation_attempts: 5,
            deadlock: txcoord_proto::DeadlockPolicy::Detect,
            one_phase: false,
        }
    }
}

/// Exponential backoff with deterministic jitter: attempt `n` (1-based) waits about
/// `base * 2^(n-1)`, capped, and spread by up to a quarter from a hash of `seed` so that many
/// transactions retrying at once do not move in lockstep.
pub fn backoff_ms(base: u64, cap: u64, n: u32, seed: &str) -> u64 {
    let exp = base.saturating_mul(1u64 << n.saturating_sub(1).min(30));
    let delay = exp.min(cap).max(1);
    let mut h: u64 = 0xcbf29ce484222325;
    for b in seed.bytes().chain(n.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    let spread = delay / 4;
    if spread == 0 {
        delay
    } else {
        delay - spread + h % (spread * 2 + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::backoff_ms;

    #[test]
    fn backoff_grows_then_caps_with_bounded_jitter() {
        let b = |n| backoff_ms(100, 1_000, n, "t");
        assert!((75..=125).contains(&b(1)), "{}", b(1));
        assert!((150..=250).contains(&b(2)), "{}", b(2));
        for n in 5..40 {
            assert!((750..=1_250).contains(&b(n)), "{n}: {}", b(n));
        }
        assert_ne!(
            backoff_ms(1000, 10_000, 3, "a"),
            backoff_ms(1000, 10_000, 3, "b")
        );
    }
}
