//! Unit tests of each transition, and a seeded simulation of whole transactions over a
//! faulty network with coordinator crashes, run as property tests.

use std::collections::{BTreeMap, HashMap, HashSet};

use proptest::prelude::*;
use serde_json::json;

use super::*;
use txcoord_proto::StepRequest;

const CFG: EngineConfig = EngineConfig {
    default_timeout_ms: 1_000,
    retry_base_ms: 100,
    retry_cap_ms: 1_000,
    stuck_after_ms: 5_000,
    execute_attempts: 3,
    compensation_attempts: 5,
};

fn request(services: &[&str]) -> TransactionRequest {
    TransactionRequest {
        txn_id: Some("t1".into()),
        mode: Mode::TwoPc,
        steps: services
            .iter()
            .map(|s| StepRequest {
                service: (*s).into(),
                action: "act".into(),
                payload: json!({"for": s}),
                compensate: None,
                timeout_ms: None,
            })
            .collect(),
        timeout_ms: None,
        metadata: Some(json!({"k": 1})),
    }
}

fn start(services: &[&str]) -> (TwoPc, Vec<Command>) {
    let mut out = Vec::new();
    let txn = TwoPc::start(
        "t1".into(),
        &request(services),
        Some(7),
        "txn.reply.t1".into(),
        CFG,
        0,
        &mut out,
    );
    (txn, out)
}

fn reply(step: usize, service: &str, kind: CommandKind, outcome: ReplyOutcome) -> Event {
    Event::Reply(ParticipantReply {
        txn_id: "t1".into(),
        service: service.into(),
        step,
        kind,
        outcome,
        reason: (outcome == ReplyOutcome::Abort).then(|| "no stock".into()),
        attempt: 1,
        retryable: None,
        token: None,
    })
}

fn vote(step: usize, service: &str, outcome: ReplyOutcome) -> Event {
    reply(step, service, CommandKind::Prepare, outcome)
}

fn done(step: usize, service: &str, kind: CommandKind) -> Event {
    reply(step, service, kind, ReplyOutcome::Done)
}

fn sends(out: &[Command]) -> Vec<(usize, CommandKind, u32)> {
    out.iter()
        .filter_map(|c| match c {
            Command::Send(p) => Some((p.step, p.kind, p.attempt)),
            _ => None,
        })
        .collect()
}

fn persisted(out: &[Command]) -> Vec<TxnState> {
    out.iter()
        .filter_map(|c| match c {
            Command::Persist { event, .. } => Some(event.state),
            _ => None,
        })
        .collect()
}

fn position(out: &[Command], f: impl Fn(&Command) -> bool) -> usize {
    out.iter().position(f).expect("command present")
}

#[test]
fn start_persists_before_any_prepare() {
    let (txn, out) = start(&["a", "b"]);
    assert_eq!(txn.phase(), Phase::Preparing);
    assert!(matches!(&out[0], Command::Persist { event, msg_id }
        if event.state == TxnState::Accepted && msg_id == "t1.accepted"
        && event.steps[1].payload == Some(json!({"for": "b"})) && event.submit_seq == Some(7)));
    assert_eq!(
        sends(&out),
        vec![(0, CommandKind::Prepare, 1), (1, CommandKind::Prepare, 1)]
    );
    assert!(out.contains(&Command::SetTimer {
        timer: Timer::PrepareTimeout,
        at_ms: 1_000
    }));
    let Command::Send(cmd) = &out[2] else {
        panic!("{:?}", out[2])
    };
    assert_eq!(cmd.payload, json!({"for": "a"}));
    assert_eq!(cmd.reply_to, "txn.reply.t1");
    assert_eq!(cmd.deadline_ms, 1_000);
}

/// The record a batch persisted, by state.
fn record(out: &[Command], state: TxnState) -> &TransactionEvent {
    out.iter()
        .find_map(|c| match c {
            Command::Persist { event, .. } if event.state == state => Some(event),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no {state:?} record in {out:?}"))
}

#[test]
fn a_refused_commit_decision_becomes_an_abort_with_compact_records() {
    let (mut txn, _) = start(&["a", "b"]);
    let mut out = Vec::new();
    txn.handle(10, vote(0, "a", ReplyOutcome::Ready), &mut out)
        .unwrap();
    txn.handle(11, vote(1, "b", ReplyOutcome::Ready), &mut out)
        .unwrap();
    assert_eq!(txn.phase(), Phase::Committing);
    // The runtime could not write the commit decision: nobody heard it, so it is undone.
    let mut out = Vec::new();
    let refusal = txn.log_refused(12, "t1.decided", "message size exceeds maximum", &mut out);
    assert_eq!(refusal, Refusal::Replanned);
    assert_eq!(txn.phase(), Phase::Aborting);
    let decision = record(&out, TxnState::Aborting);
    assert_eq!(decision.metadata, None, "compact");
    assert!(
        matches!(&decision.reason, Some(Reason::LogRefused { message })
        if message.contains("message size exceeds maximum"))
    );
    assert_eq!(
        sends(&out),
        vec![(0, CommandKind::Abort, 1), (1, CommandKind::Abort, 1)]
    );
    // Every later record is compact too.
    assert_eq!(txn.snapshot(13).metadata, None);
    // A compact record refused as well: nothing smaller exists.
    assert_eq!(
        txn.log_refused(14, "t1.decided", "still too big", &mut Vec::new()),
        Refusal::GiveUp
    );
}

#[test]
fn a_refused_prepare_round_aborts_and_the_silent_steps_hear_it() {
    let (mut txn, _) = start(&["a", "b"]);
    let mut out = Vec::new();
    txn.handle(10, vote(0, "a", ReplyOutcome::Ready), &mut out)
        .unwrap();
    txn.handle(500, Event::Timer(Timer::StepNudge), &mut out)
        .unwrap();
    let mut out = Vec::new();
    assert_eq!(
        txn.log_refused(501, "t1.prepare.r2", "sealed", &mut out),
        Refusal::Replanned
    );
    assert_eq!(txn.phase(), Phase::Aborting);
    assert_eq!(
        sends(&out),
        vec![(0, CommandKind::Abort, 1), (1, CommandKind::Abort, 1)]
    );
}

#[test]
fn a_refused_record_after_a_durable_decision_is_redone_and_the_decision_stands() {
    let (mut txn, _) = start(&["a", "b"]);
    let mut out = Vec::new();
    txn.handle(10, vote(0, "a", ReplyOutcome::Ready), &mut out)
        .unwrap();
    txn.handle(11, vote(1, "b", ReplyOutcome::Ready), &mut out)
        .unwrap();
    // The decision is durable; a resend round's record is refused.
    let mut out = Vec::new();
    txn.handle(1_000, Event::Timer(Timer::Phase2Retry), &mut out)
        .unwrap();
    let mut again = Vec::new();
    assert_eq!(
        txn.log_refused(1_001, "t1.commit.r2", "too big", &mut again),
        Refusal::Redo
    );
    assert!(again.is_empty(), "the runtime redoes the dropped commands");
    assert_eq!(txn.phase(), Phase::Committing);
    // The dropped round, compacted as the runtime writes it again.
    let mut round = record(&out, TxnState::Committing).clone();
    assert!(round.metadata.is_some());
    crate::compact(&mut round);
    assert_eq!(round.metadata, None);
    assert_eq!(txn.snapshot(1_002).metadata, None);
}

#[test]
fn all_ready_commits_with_the_decision_durable_first() {
    let (mut txn, _) = start(&["a", "b"]);
    let mut out = Vec::new();
    txn.handle(10, vote(0, "a", ReplyOutcome::Ready), &mut out)
        .unwrap();
    assert!(out.is_empty(), "no decision before the last vote: {out:?}");
    txn.handle(11, vote(1, "b", ReplyOutcome::Ready), &mut out)
        .unwrap();
    assert_eq!(txn.phase(), Phase::Committing);
    let decision = position(
        &out,
        |c| matches!(c, Command::Persist { event, .. } if event.state == TxnState::Committing),
    );
    let first_send = position(&out, |c| matches!(c, Command::Send(_)));
    assert!(decision < first_send, "{out:?}");
    assert_eq!(
        sends(&out),
        vec![(0, CommandKind::Commit, 1), (1, CommandKind::Commit, 1)]
    );

    let mut out = Vec::new();
    txn.handle(20, done(0, "a", CommandKind::Commit), &mut out)
        .unwrap();
    assert!(out.is_empty());
    txn.handle(21, done(1, "b", CommandKind::Commit), &mut out)
        .unwrap();
    assert_eq!(txn.phase(), Phase::Committed);
    assert_eq!(persisted(&out), vec![TxnState::Committed]);
    assert_eq!(out.last(), Some(&Command::Finished));
}

#[test]
fn one_abort_vote_aborts_the_others_but_not_the_refuser() {
    let (mut txn, _) = start(&["a", "b", "c"]);
    let mut out = Vec::new();
    txn.handle(5, vote(0, "a", ReplyOutcome::Ready), &mut out)
        .unwrap();
    txn.handle(6, vote(1, "b", ReplyOutcome::Abort), &mut out)
        .unwrap();
    assert_eq!(txn.phase(), Phase::Aborting);
    let Some(Command::Persist { event, .. }) =
        out.iter().find(|c| matches!(c, Command::Persist { .. }))
    else {
        panic!("{out:?}")
    };
    assert_eq!(event.state, TxnState::Aborting);
    assert_eq!(
        event.reason,
        Some(Reason::VoteAbort {
            service: "b".into(),
            step: 1,
            message: "no stock".into()
        })
    );
    // a prepared, c silent (may have prepared): both get abort; b refused and holds nothing.
    assert_eq!(
        sends(&out),
        vec![(0, CommandKind::Abort, 1), (2, CommandKind::Abort, 1)]
    );
    // A late vote changes nothing.
    let mut late = Vec::new();
    assert!(matches!(
        txn.handle(7, vote(2, "c", ReplyOutcome::Ready), &mut late),
        Err(EngineError::Late { .. })
    ));
    assert!(late.is_empty());
}

#[test]
fn single_refusal_finishes_at_once() {
    let (mut txn, _) = start(&["a"]);
    let mut out = Vec::new();
    txn.handle(5, vote(0, "a", ReplyOutcome::Abort), &mut out)
        .unwrap();
    assert_eq!(txn.phase(), Phase::Aborted);
    assert_eq!(persisted(&out), vec![TxnState::Aborted]);
    assert!(sends(&out).is_empty());
}

#[test]
fn halfway_to_the_deadline_prepare_is_sent_again_to_the_silent_steps_only() {
    let (mut txn, out) = start(&["a", "b"]);
    assert!(out.contains(&Command::SetTimer {
        timer: Timer::StepNudge,
        at_ms: 500
    }));
    let mut out = Vec::new();
    txn.handle(10, vote(0, "a", ReplyOutcome::Ready), &mut out)
        .unwrap();
    txn.handle(500, Event::Timer(Timer::StepNudge), &mut out)
        .unwrap();
    assert!(
        matches!(&out[0], Command::Persist { event, .. } if event.steps[1].prepare_attempt == 2)
    );
    assert_eq!(sends(&out), vec![(1, CommandKind::Prepare, 2)]);
    // The deadline stays where it was.
    assert!(!out.iter().any(|c| matches!(
        c,
        Command::SetTimer {
            timer: Timer::PrepareTimeout,
            ..
        }
    )));
    let mut out = Vec::new();
    txn.handle(501, vote(1, "b", ReplyOutcome::Ready), &mut out)
        .unwrap();
    assert_eq!(txn.phase(), Phase::Committing);
}

#[test]
fn timeout_names_the_silent_services() {
    let (mut txn, _) = start(&["a", "b", "c"]);
    let mut out = Vec::new();
    txn.handle(5, vote(1, "b", ReplyOutcome::Ready), &mut out)
        .unwrap();
    // A timer that fires early (stale) does nothing.
    txn.handle(999, Event::Timer(Timer::PrepareTimeout), &mut out)
        .unwrap();
    assert_eq!(txn.phase(), Phase::Preparing);
    txn.handle(1_000, Event::Timer(Timer::PrepareTimeout), &mut out)
        .unwrap();
    assert_eq!(txn.phase(), Phase::Aborting);
    let snap = txn.snapshot(1_000);
    assert_eq!(
        snap.reason,
        Some(Reason::Timeout {
            services: vec!["a".into(), "c".into()],
            steps: vec![0, 2]
        })
    );
    assert_eq!(
        sends(&out),
        vec![
            (0, CommandKind::Abort, 1),
            (1, CommandKind::Abort, 1),
            (2, CommandKind::Abort, 1)
        ]
    );
}

#[test]
fn an_abort_queued_for_a_dead_service_finishes_the_transaction() {
    let (mut txn, _) = start(&["a", "ghost"]);
    let mut out = Vec::new();
    txn.handle(5, vote(0, "a", ReplyOutcome::Ready), &mut out)
        .unwrap();
    txn.handle(1_000, Event::Timer(Timer::PrepareTimeout), &mut out)
        .unwrap();
    assert_eq!(txn.phase(), Phase::Aborting);
    let mut out = Vec::new();
    let stored = |step| Event::Stored {
        step,
        kind: CommandKind::Abort,
        attempt: 1,
    };
    txn.handle(1_001, stored(1), &mut out).unwrap();
    assert_eq!(txn.phase(), Phase::Aborting, "a still owes its abort");
    txn.handle(1_002, done(0, "a", CommandKind::Abort), &mut out)
        .unwrap();
    assert_eq!(txn.phase(), Phase::Aborted);
    assert_eq!(persisted(&out), vec![TxnState::Aborted]);
}

#[test]
fn a_stored_commit_is_not_a_confirmation() {
    let (mut txn, _) = start(&["a"]);
    let mut out = Vec::new();
    txn.handle(1, vote(0, "a", ReplyOutcome::Ready), &mut out)
        .unwrap();
    let stored = Event::Stored {
        step: 0,
        kind: CommandKind::Commit,
        attempt: 1,
    };
    let mut out = Vec::new();
    txn.handle(2, stored, &mut out).unwrap();
    assert!(out.is_empty());
    assert_eq!(txn.phase(), Phase::Committing);
}

#[test]
fn read_only_steps_get_no_phase_two() {
    let (mut txn, _) = start(&["a", "b"]);
    let mut out = Vec::new();
    txn.handle(1, vote(0, "a", ReplyOutcome::ReadOnly), &mut out)
        .unwrap();
    txn.handle(2, vote(1, "b", ReplyOutcome::Ready), &mut out)
        .unwrap();
    assert_eq!(sends(&out), vec![(1, CommandKind::Commit, 1)]);
    let mut out = Vec::new();
    txn.handle(3, done(1, "b", CommandKind::Commit), &mut out)
        .unwrap();
    assert_eq!(txn.phase(), Phase::Committed);
}

#[test]
fn all_read_only_commits_without_phase_two() {
    let (mut txn, _) = start(&["a", "b"]);
    let mut out = Vec::new();
    txn.handle(1, vote(0, "a", ReplyOutcome::ReadOnly), &mut out)
        .unwrap();
    txn.handle(2, vote(1, "b", ReplyOutcome::ReadOnly), &mut out)
        .unwrap();
    assert_eq!(txn.phase(), Phase::Committed);
    assert_eq!(persisted(&out), vec![TxnState::Committed]);
    assert!(sends(&out).is_empty());
}

#[test]
fn duplicate_and_conflicting_votes_do_not_change_the_first() {
    let (mut txn, _) = start(&["a", "b"]);
    let mut out = Vec::new();
    txn.handle(1, vote(0, "a", ReplyOutcome::Ready), &mut out)
        .unwrap();
    txn.handle(1, vote(0, "a", ReplyOutcome::Ready), &mut out)
        .unwrap();
    assert!(matches!(
        txn.handle(1, vote(0, "a", ReplyOutcome::Abort), &mut out),
        Err(EngineError::ConflictingVote { step: 0, .. })
    ));
    assert!(out.is_empty());
    assert_eq!(txn.phase(), Phase::Preparing);
}

#[test]
fn malformed_replies_are_refused_with_a_reason() {
    let (mut txn, _) = start(&["a"]);
    let mut out = Vec::new();
    assert!(matches!(
        txn.handle(1, vote(3, "a", ReplyOutcome::Ready), &mut out),
        Err(EngineError::UnknownStep { step: 3, steps: 1 })
    ));
    assert!(matches!(
        txn.handle(1, vote(0, "zzz", ReplyOutcome::Ready), &mut out),
        Err(EngineError::ServiceMismatch { .. })
    ));
    assert!(matches!(
        txn.handle(1, vote(0, "a", ReplyOutcome::Done), &mut out),
        Err(EngineError::InvalidOutcome { .. })
    ));
    assert!(matches!(
        txn.handle(1, done(0, "a", CommandKind::Commit), &mut out),
        Err(EngineError::Late { .. })
    ));
    assert!(out.is_empty());
}

#[test]
fn phase_two_is_resent_with_backoff_and_higher_attempts_then_flagged_stuck() {
    let (mut txn, _) = start(&["a", "b"]);
    let mut out = Vec::new();
    txn.handle(1, vote(0, "a", ReplyOutcome::Ready), &mut out)
        .unwrap();
    txn.handle(1, vote(1, "b", ReplyOutcome::Ready), &mut out)
        .unwrap();
    txn.handle(2, done(0, "a", CommandKind::Commit), &mut out)
        .unwrap();
    let mut delays = Vec::new();
    let mut now = 1;
    for round in 2..=6 {
        let mut out = Vec::new();
        txn.handle(now, Event::Timer(Timer::Phase2Retry), &mut out)
            .unwrap();
        // The round is persisted before it is sent, and only b is still owed.
        assert!(matches!(&out[0], Command::Persist { event, msg_id }
            if event.steps[1].decision_attempt == round && msg_id == &format!("t1.commit.r{round}")));
        assert_eq!(sends(&out), vec![(1, CommandKind::Commit, round)]);
        let at = phase2_retry_at(&out);
        delays.push(at - now);
        now = at;
    }
    assert!(delays[3] > delays[0], "backoff grows: {delays:?}");
    assert!(delays.iter().all(|&d| d <= 1_250), "capped: {delays:?}");
    let mut out = Vec::new();
    txn.handle(now, Event::Timer(Timer::Stuck), &mut out)
        .unwrap();
    assert!(
        matches!(&out[..], [Command::Announce { event, .. }] if event.stuck && event.state == TxnState::Committing)
    );
    assert!(txn.snapshot(now).stuck);
    // A decided commit never turns into an abort, however long it takes.
    txn.handle(now + 1, Event::Timer(Timer::PrepareTimeout), &mut out)
        .unwrap();
    assert_eq!(txn.phase(), Phase::Committing);
    txn.handle(now + 2, done(1, "b", CommandKind::Commit), &mut out)
        .unwrap();
    assert_eq!(txn.phase(), Phase::Committed);
}

fn phase2_retry_at(out: &[Command]) -> u64 {
    out.iter()
        .find_map(|c| match c {
            Command::SetTimer {
                timer: Timer::Phase2Retry,
                at_ms,
            } => Some(*at_ms),
            _ => None,
        })
        .unwrap()
}

/// How long after a single step's vote (arriving `vote_at` ms after the start) the first
/// phase-2 resend is armed.
fn first_resend_delay(vote_at: u64) -> u64 {
    let (mut txn, _) = start(&["a"]);
    let mut out = Vec::new();
    txn.handle(vote_at, vote(0, "a", ReplyOutcome::Ready), &mut out)
        .unwrap();
    phase2_retry_at(&out) - vote_at
}

#[test]
fn a_slow_prepare_round_delays_the_first_phase_two_resend() {
    // Fast votes: the configured base (100 ms, jittered by a quarter) holds.
    let fast = first_resend_delay(10);
    assert!((75..=125).contains(&fast), "{fast}");
    // Votes that took 400 ms: phase 2 is given at least twice that before a resend.
    let slow = first_resend_delay(400);
    assert!((600..=1_000).contains(&slow), "{slow}");
    // Still capped by retry_cap_ms (1 s here, plus jitter).
    let slower = first_resend_delay(900);
    assert!((750..=1_250).contains(&slower), "{slower}");
}

#[test]
fn recovery_before_the_decision_reprepares_with_a_higher_attempt() {
    let (_, out) = start(&["a", "b"]);
    let Command::Persist {
        event: accepted, ..
    } = &out[0]
    else {
        panic!()
    };
    let mut out = Vec::new();
    let txn = TwoPc::recover(accepted, accepted, "r".into(), CFG, 500, &mut out).unwrap();
    assert_eq!(txn.phase(), Phase::Preparing);
    assert!(
        matches!(&out[0], Command::Persist { event, .. } if event.steps.iter().all(|s| s.prepare_attempt == 2))
    );
    assert_eq!(
        sends(&out),
        vec![(0, CommandKind::Prepare, 2), (1, CommandKind::Prepare, 2)]
    );
    let Command::Send(cmd) = &out[1] else {
        panic!()
    };
    assert_eq!(cmd.payload, json!({"for": "a"}));
}

#[test]
fn recovery_after_the_decision_resends_it_to_the_unconfirmed() {
    let (mut txn, out) = start(&["a", "b", "c"]);
    let Command::Persist {
        event: accepted, ..
    } = out[0].clone()
    else {
        panic!()
    };
    let mut out = Vec::new();
    txn.handle(1, vote(0, "a", ReplyOutcome::Ready), &mut out)
        .unwrap();
    txn.handle(1, vote(1, "b", ReplyOutcome::ReadOnly), &mut out)
        .unwrap();
    txn.handle(1, vote(2, "c", ReplyOutcome::Ready), &mut out)
        .unwrap();
    let decision = out
        .iter()
        .find_map(|c| match c {
            Command::Persist { event, .. } => Some(event.clone()),
            _ => None,
        })
        .unwrap();
    let mut out = Vec::new();
    let recovered = TwoPc::recover(&accepted, &decision, "r".into(), CFG, 50, &mut out).unwrap();
    assert_eq!(recovered.phase(), Phase::Committing);
    assert_eq!(
        sends(&out),
        vec![(0, CommandKind::Commit, 2), (2, CommandKind::Commit, 2)]
    );
    let last = TwoPc::recover(
        &accepted,
        &recovered.snapshot(60),
        "r".into(),
        CFG,
        60,
        &mut Vec::new(),
    )
    .unwrap();
    assert_eq!(last.phase(), Phase::Committing);
}

#[test]
fn recovery_refuses_finished_and_inconsistent_logs() {
    let (mut txn, out) = start(&["a"]);
    let Command::Persist {
        event: accepted, ..
    } = out[0].clone()
    else {
        panic!()
    };
    let mut out = Vec::new();
    txn.handle(1, vote(0, "a", ReplyOutcome::Abort), &mut out)
        .unwrap();
    let fin = txn.snapshot(2);
    assert_eq!(
        TwoPc::recover(&accepted, &fin, "r".into(), CFG, 3, &mut Vec::new()),
        Err(RecoverError::Finished(TxnState::Aborted))
    );
    let mut bad = accepted.clone();
    bad.state = TxnState::Committing;
    assert!(matches!(
        TwoPc::recover(&accepted, &bad, "r".into(), CFG, 3, &mut Vec::new()),
        Err(RecoverError::Inconsistent(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Simulation: one transaction, N participants that behave like the SDK, a network that
// duplicates and reorders, lost sends, a log that survives crashes, and a coordinator that
// crashes between any two commands of a batch.

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rec {
    None,
    Prepared,
    VotedAbort,
    ReadOnly,
    Committed,
    Aborted,
    AbortedEarly,
}

#[derive(Debug)]
struct Part {
    name: String,
    vote: Vote,
    /// Down until the network heals: its commands wait in the stream.
    down: bool,
    rec: Rec,
}

impl Part {
    /// What the SDK does with one command: durable record first, then the reply.
    fn apply(&mut self, cmd: &ParticipantCommand) -> ParticipantReply {
        let outcome = match cmd.kind {
            CommandKind::Prepare => {
                if self.rec == Rec::None {
                    self.rec = match self.vote {
                        Vote::Ready => Rec::Prepared,
                        Vote::ReadOnly => Rec::ReadOnly,
                        Vote::Abort => Rec::VotedAbort,
                    };
                }
                match self.rec {
                    Rec::Prepared | Rec::Committed => ReplyOutcome::Ready,
                    Rec::ReadOnly => ReplyOutcome::ReadOnly,
                    _ => ReplyOutcome::Abort,
                }
            }
            CommandKind::Commit => {
                assert!(
                    matches!(self.rec, Rec::Prepared | Rec::Committed),
                    "{} told to commit in state {:?}",
                    self.name,
                    self.rec
                );
                self.rec = Rec::Committed;
                ReplyOutcome::Done
            }
            CommandKind::Abort => {
                assert_ne!(
                    self.rec,
                    Rec::Committed,
                    "{} told to abort after commit",
                    self.name
                );
                self.rec = match self.rec {
                    Rec::None => Rec::AbortedEarly,
                    Rec::Prepared | Rec::VotedAbort => Rec::Aborted,
                    other => other,
                };
                ReplyOutcome::Done
            }
            CommandKind::Execute | CommandKind::Compensate => {
                panic!("a 2PC transaction sent {:?}", cmd.kind)
            }
        };
        ParticipantReply {
            txn_id: cmd.txn_id.clone(),
            service: self.name.clone(),
            step: cmd.step,
            kind: cmd.kind,
            outcome,
            reason: (outcome == ReplyOutcome::Abort).then(|| "refused".into()),
            attempt: cmd.attempt,
            retryable: None,
            token: None,
        }
    }
}

/// One coordinator's driver of the transaction, as the runtime runs it: the engine, its
/// timers, and the fence (how many records it knows the log has: its next write expects
/// exactly that many, as `Nats-Expected-Last-Subject-Sequence` does).
struct Drv {
    id: usize,
    engine: TwoPc,
    known: usize,
    timers: BTreeMap<Timer, u64>,
    /// Acknowledgements of stored commands on their way back to this driver.
    stored: Vec<(usize, CommandKind, u32)>,
    /// The records this driver wrote itself, in this run.
    wrote: Vec<TransactionEvent>,
}

struct Sim {
    rng: txcoord_testkit::rng::XorShift,
    now: u64,
    request: TransactionRequest,
    /// The durable log, with the id of the driver that wrote each record.
    log: Vec<(usize, TransactionEvent)>,
    /// Every coordinator driving the transaction right now: usually one, but also a stale
    /// one that lost its lease without knowing, or one started by a redelivered submission.
    drivers: Vec<Drv>,
    next_id: usize,
    /// Commands in the stream, not yet acked by their participant.
    commands: Vec<ParticipantCommand>,
    /// Replies in the stream, not yet acked by the coordinator.
    replies: Vec<ParticipantReply>,
    /// Reply ids JetStream has stored: a second publish with one of these is dropped.
    reply_ids: HashSet<String>,
    /// Which driver sent each (step, kind, attempt): no attempt may be used by two.
    attempts: HashMap<(usize, CommandKind, u32), usize>,
    parts: Vec<Part>,
    crashes: usize,
    /// Writes refused because another driver had written first.
    fenced: usize,
    /// Drivers started by a redelivered submission, and stale twins.
    redelivered: usize,
    stale: usize,
    chaos: bool,
}

impl Sim {
    fn new(seed: u64, votes: &[Vote], down: &[bool]) -> Sim {
        let names: Vec<String> = (0..votes.len()).map(|i| format!("s{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        Sim {
            rng: txcoord_testkit::rng::XorShift::new(seed),
            now: 0,
            request: request(&refs),
            log: Vec::new(),
            drivers: Vec::new(),
            next_id: 0,
            commands: Vec::new(),
            replies: Vec::new(),
            reply_ids: HashSet::new(),
            attempts: HashMap::new(),
            parts: votes
                .iter()
                .zip(down)
                .enumerate()
                .map(|(i, (&vote, &down))| Part {
                    name: names[i].clone(),
                    vote,
                    down,
                    rec: Rec::None,
                })
                .collect(),
            crashes: 0,
            fenced: 0,
            redelivered: 0,
            stale: 0,
            chaos: true,
        }
    }

    fn events(&self) -> Vec<TransactionEvent> {
        self.log.iter().map(|(_, e)| e.clone()).collect()
    }

    fn states(&self) -> Vec<TxnState> {
        self.log.iter().map(|(_, e)| e.state).collect()
    }

    /// Starts a driver as the runtime does: from the submission (`fresh`: its accepted
    /// record must be the first), or from the log (recovery). None if the log is finished.
    fn spawn(&mut self, fresh: bool) -> Option<usize> {
        let mut out = Vec::new();
        let (engine, known) = match (fresh, self.log.first(), self.log.last()) {
            (true, _, _) | (false, None, _) => (
                TwoPc::start(
                    "t1".into(),
                    &self.request,
                    Some(1),
                    "r".into(),
                    CFG,
                    self.now,
                    &mut out,
                ),
                0,
            ),
            (false, Some((_, first)), Some((_, last))) => {
                match TwoPc::recover(first, last, "r".into(), CFG, self.now, &mut out) {
                    Ok(e) => (e, self.log.len()),
                    Err(RecoverError::Finished(_)) => return None,
                    Err(e) => panic!("recovery failed: {e}"),
                }
            }
            (false, Some(_), None) => unreachable!("a log with a first record has a last one"),
        };
        let id = self.next_id;
        self.next_id += 1;
        self.drivers.push(Drv {
            id,
            engine,
            known,
            timers: BTreeMap::new(),
            stored: Vec::new(),
            wrote: Vec::new(),
        });
        self.run(id, out);
        Some(id)
    }

    fn index(&self, id: usize) -> Option<usize> {
        self.drivers.iter().position(|d| d.id == id)
    }

    /// A fenced write, as the runtime makes it: appended only if the log still has exactly
    /// the records this driver knows; otherwise the driver stops (false).
    fn write(&mut self, i: usize, event: TransactionEvent) -> bool {
        if self.log.len() != self.drivers[i].known {
            self.fenced += 1;
            self.drivers.swap_remove(i);
            return false;
        }
        assert!(
            !self.log.last().is_some_and(|(_, e)| e.state.is_terminal()),
            "a record after a terminal record: {:?} after {:?}",
            event.state,
            self.states()
        );
        let commit = |s| matches!(s, TxnState::Committing | TxnState::Committed);
        let abort = |s| matches!(s, TxnState::Aborting | TxnState::Aborted);
        assert!(
            !self
                .log
                .iter()
                .any(|(_, e)| commit(e.state) && abort(event.state)
                    || abort(e.state) && commit(event.state)),
            "log would hold both decisions: {:?} after {:?}",
            event.state,
            self.states()
        );
        let d = &mut self.drivers[i];
        self.log.push((d.id, event.clone()));
        d.known = self.log.len();
        d.wrote.push(event);
        true
    }

    /// Performs one driver's commands in order; in chaos, it may crash between any two.
    fn run(&mut self, id: usize, out: Vec<Command>) {
        for cmd in out {
            let Some(i) = self.index(id) else { return };
            if self.chaos && self.rng.chance(3) {
                self.crash(i);
                return;
            }
            match cmd {
                Command::Persist { event, .. } => {
                    if !self.write(i, event) {
                        return;
                    }
                }
                Command::Announce { event, .. } => {
                    // Lost now and then (refused: the transaction goes on without it).
                    if (!self.chaos || self.rng.chance(50)) && !self.write(i, event) {
                        return;
                    }
                }
                Command::Send(c) => {
                    self.check_announced(i, &c);
                    // A publish may be lost in chaos (the runtime gives up after its retries).
                    if !(self.chaos && self.rng.chance(5)) {
                        self.drivers[i].stored.push((c.step, c.kind, c.attempt));
                        self.commands.push(c);
                    }
                }
                Command::SetTimer { timer, at_ms } => {
                    self.drivers[i].timers.insert(timer, at_ms);
                }
                Command::CancelTimer(t) => {
                    self.drivers[i].timers.remove(&t);
                }
                Command::Finished => {
                    self.drivers.swap_remove(i);
                    return;
                }
            }
        }
    }

    /// No command without its record: the round it belongs to is in a record this very
    /// driver wrote, and no other driver ever used its attempt number.
    fn check_announced(&mut self, i: usize, c: &ParticipantCommand) {
        let d = &self.drivers[i];
        let announced = d.wrote.iter().any(|e| {
            let s = &e.steps[c.step];
            match c.kind {
                CommandKind::Prepare => s.prepare_attempt == c.attempt,
                CommandKind::Commit => {
                    e.state == TxnState::Committing && s.decision_attempt == c.attempt
                }
                CommandKind::Abort => {
                    e.state == TxnState::Aborting && s.decision_attempt == c.attempt
                }
                _ => false,
            }
        });
        assert!(
            announced,
            "driver {} sent {:?} attempt {} to step {} without a record of its own announcing it; log {:?}",
            d.id,
            c.kind,
            c.attempt,
            c.step,
            self.states()
        );
        let first = *self
            .attempts
            .entry((c.step, c.kind, c.attempt))
            .or_insert(d.id);
        assert_eq!(
            first, d.id,
            "attempt {} of {:?} to step {} used by drivers {first} and {}",
            c.attempt, c.kind, c.step, d.id
        );
    }

    fn crash(&mut self, i: usize) {
        self.drivers.swap_remove(i);
        self.crashes += 1;
    }

    fn feed(&mut self, i: usize, event: Event) {
        let mut out = Vec::new();
        let _ = self.drivers[i].engine.handle(self.now, event, &mut out);
        let id = self.drivers[i].id;
        self.run(id, out);
    }

    /// One random step. Returns false when nothing at all could happen.
    fn step(&mut self) -> bool {
        // Recovery: with no coordinator driving it, an unfinished transaction is resumed.
        if self.drivers.is_empty() && !self.finished_in_log() {
            self.spawn(false);
            return true;
        }
        let deliverable: Vec<usize> = (0..self.commands.len())
            .filter(|&i| !self.parts[self.commands[i].step].down)
            .collect();
        let mut choices = Vec::new();
        if !deliverable.is_empty() {
            choices.push(0);
        }
        // With no coordinator running (finished and forgotten), replies are acked and dropped.
        if !self.replies.is_empty() {
            choices.push(1);
        }
        // Out of chaos, participants answer before any timer fires.
        // In chaos, timers fire now and then, so some transactions still get to commit.
        let timer_now = if self.chaos {
            self.rng.chance(15)
        } else {
            choices.is_empty()
        };
        let timed: Vec<usize> = (0..self.drivers.len())
            .filter(|&i| !self.drivers[i].timers.is_empty())
            .collect();
        if !timed.is_empty() && timer_now {
            choices.push(2);
        }
        if self.drivers.iter().any(|d| !d.stored.is_empty()) {
            choices.push(4);
        }
        if self.chaos {
            choices.push(3);
        }
        if choices.is_empty() {
            return false;
        }
        match choices[self.rng.index(choices.len())] {
            0 => {
                let i = deliverable[self.rng.index(deliverable.len())];
                // Redelivery: sometimes the participant sees it again later.
                let cmd = if self.chaos && self.rng.chance(20) {
                    self.commands[i].clone()
                } else {
                    self.commands.swap_remove(i)
                };
                let reply = self.parts[cmd.step].apply(&cmd);
                if self.reply_ids.insert(reply.msg_id()) {
                    self.replies.push(reply);
                }
            }
            1 => {
                let i = self.rng.index(self.replies.len());
                let r = if self.chaos && self.rng.chance(20) {
                    self.replies[i].clone()
                } else {
                    self.replies.swap_remove(i)
                };
                self.now += self.rng.below(20);
                // Whichever coordinator reads the reply consumer gets it.
                if !self.drivers.is_empty() {
                    let d = self.rng.index(self.drivers.len());
                    self.feed(d, Event::Reply(r));
                }
            }
            2 => {
                let i = timed[self.rng.index(timed.len())];
                let (&timer, &at) = self.drivers[i]
                    .timers
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .unwrap();
                self.drivers[i].timers.remove(&timer);
                self.now = self.now.max(at);
                self.feed(i, Event::Timer(timer));
            }
            4 => {
                let with: Vec<usize> = (0..self.drivers.len())
                    .filter(|&i| !self.drivers[i].stored.is_empty())
                    .collect();
                let i = with[self.rng.index(with.len())];
                let n = self.rng.index(self.drivers[i].stored.len());
                let (step, kind, attempt) = self.drivers[i].stored.swap_remove(n);
                self.feed(
                    i,
                    Event::Stored {
                        step,
                        kind,
                        attempt,
                    },
                );
            }
            _ => match self.rng.below(100) {
                // The submission is delivered again: a fresh driver starts from it.
                0..6 => {
                    self.redelivered += 1;
                    self.spawn(true);
                }
                // A coordinator loses its lease without knowing and goes on, while another
                // resumes the transaction from the log.
                6..10 if !self.drivers.is_empty() => {
                    self.stale += 1;
                    self.spawn(false);
                }
                10..40 if !self.drivers.is_empty() => {
                    let i = self.rng.index(self.drivers.len());
                    self.crash(i);
                }
                _ => self.now += self.rng.below(300),
            },
        }
        true
    }

    fn finished_in_log(&self) -> bool {
        self.log.last().is_some_and(|(_, e)| e.state.is_terminal())
    }

    fn check_atomic(&self) {
        let committed = self.parts.iter().any(|p| p.rec == Rec::Committed);
        let aborted = self
            .parts
            .iter()
            .any(|p| matches!(p.rec, Rec::Aborted | Rec::AbortedEarly));
        assert!(
            !(committed && aborted),
            "commit at one participant and abort at another: {:?}",
            self.parts
        );
        if committed {
            assert!(
                self.parts.iter().all(|p| p.vote != Vote::Abort),
                "commit although a step voted abort: {:?}",
                self.parts
            );
        }
    }
}

fn simulate(seed: u64, votes: Vec<Vote>, down: Vec<bool>, chaos_steps: usize) -> Sim {
    let mut sim = Sim::new(seed, &votes, &down);
    for _ in 0..chaos_steps {
        sim.step();
        sim.check_atomic();
    }
    // Heal: no more crashes, losses or duplicates; every service is up.
    sim.chaos = false;
    for p in &mut sim.parts {
        p.down = false;
    }
    let mut budget = 20_000;
    while sim.step() {
        sim.check_atomic();
        budget -= 1;
        assert!(budget > 0, "no termination: {:?}", sim.parts);
    }
    sim
}

fn vote_strategy() -> impl Strategy<Value = Vote> {
    prop_oneof![
        6 => Just(Vote::Ready),
        2 => Just(Vote::ReadOnly),
        1 => Just(Vote::Abort),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3_000))]

    #[test]
    fn every_transaction_terminates_atomically(
        seed in any::<u64>(),
        parts in prop::collection::vec((vote_strategy(), prop::bool::weighted(0.15)), 1..6),
        chaos_steps in 0usize..120,
    ) {
        let (votes, down): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
        let sim = simulate(seed, votes.clone(), down, chaos_steps);
        let last = sim.log.last().map(|(_, e)| e).expect("something was logged");
        prop_assert!(last.state.is_terminal(), "ended {:?}", last.state);
        prop_assert!(sim.commands.is_empty() && sim.replies.is_empty());
        match last.state {
            TxnState::Committed => {
                prop_assert!(votes.iter().all(|v| *v != Vote::Abort));
                for p in &sim.parts {
                    let want = if p.vote == Vote::Ready { Rec::Committed } else { Rec::ReadOnly };
                    prop_assert_eq!(p.rec, want, "{:?}", sim.parts);
                }
            }
            TxnState::Aborted => {
                for p in &sim.parts {
                    prop_assert!(
                        !matches!(p.rec, Rec::Prepared | Rec::Committed),
                        "left {:?} after abort: {:?} (crashes {})", p.rec, sim.parts, sim.crashes
                    );
                }
            }
            other => prop_assert!(false, "unexpected end {:?}", other),
        }
    }

    #[test]
    fn without_faults_all_ready_always_commits(
        seed in any::<u64>(),
        n in 1usize..8,
    ) {
        let sim = simulate(seed, vec![Vote::Ready; n], vec![false; n], 0);
        prop_assert_eq!(sim.log.last().map(|(_, e)| e.state), Some(TxnState::Committed));
        prop_assert_eq!(sim.crashes, 0);
    }
}

/// Guards the simulation itself: over fixed seeds it must really crash coordinators, reach
/// both outcomes and recover across a decision, or the property tests above prove little.
#[test]
fn simulation_exercises_crashes_and_both_outcomes() {
    let (mut crashes, mut commits, mut aborts, mut recovered_decisions) = (0, 0, 0, 0);
    let (mut fenced, mut redelivered, mut stale) = (0, 0, 0);
    for seed in 1..400u64 {
        let votes = vec![Vote::Ready, Vote::Ready, Vote::ReadOnly];
        let sim = simulate(seed * 7919, votes, vec![false, seed % 5 == 0, false], 80);
        crashes += sim.crashes;
        fenced += sim.fenced;
        redelivered += sim.redelivered;
        stale += sim.stale;
        match sim.log.last().map(|(_, e)| e.state) {
            Some(TxnState::Committed) => commits += 1,
            Some(TxnState::Aborted) => aborts += 1,
            other => panic!("{other:?}"),
        }
        if sim.events().iter().any(|e| {
            matches!(e.state, TxnState::Committing | TxnState::Aborting)
                && e.steps.iter().any(|s| s.decision_attempt > 1)
        }) {
            recovered_decisions += 1;
        }
    }
    eprintln!(
        "crashes {crashes} commits {commits} aborts {aborts} resent {recovered_decisions} \
         fenced {fenced} redelivered {redelivered} stale {stale}"
    );
    assert!(crashes > 100, "crashes {crashes}");
    assert!(
        fenced > 50 && redelivered > 20 && stale > 20,
        "fenced {fenced} redelivered {redelivered} stale {stale}"
    );
    assert!(
        commits > 20 && aborts > 20,
        "commits {commits} aborts {aborts}"
    );
    assert!(
        recovered_decisions > 10,
        "resent decisions {recovered_decisions}"
    );
}
