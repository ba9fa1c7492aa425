//! Unit tests of each 2PC transition. Whole transactions under faults are simulated, for
//! both engines, in `crates/engine/tests/simulation.rs`.

use serde_json::json;

use super::*;
use txcoord_proto::StepRequest;

const CFG: EngineConfig = EngineConfig {
    deadlock: txcoord_proto::DeadlockPolicy::Detect,
    one_phase: false,
    default_timeout_ms: 1_000,
    retry_base_ms: 100,
    retry_cap_ms: 1_000,
    stuck_after_ms: 5_000,
    execute_attempts: 3,
    compensation_attempts: 5,
};

fn request(services: &[&str]) -> TransactionRequest {
    TransactionRequest {
        lock_ts: None,
        txn_id: Some("t1".into()),
        mode: Mode::TwoPc,
        steps: services
            .iter()
            .map(|s| StepRequest {
                url: None,
                service: (*s).into(),
                action: "act".into(),
                payload: json!({"for": s}),
                compensate: None,
                timeout_ms: None,
            })
            .collect(),
        timeout_ms: None,
        metadata: Some(json!({"k": 1})),
        traceparent: None,
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
        conflict: None,
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
fn under_a_long_deadline_prepare_is_sent_again_every_retry_cap_until_the_deadline() {
    // A 4.5 s deadline with `retry_cap_ms` 1 s: nudges at 1, 2, 3 and 4 s, none after
    // (the next would come after the deadline), where before the one nudge came at 2.25 s.
    let mut req = request(&["a", "b"]);
    req.timeout_ms = Some(4_500);
    let mut out = Vec::new();
    let mut txn = TwoPc::start("t1".into(), &req, Some(7), "r".into(), CFG, 0, &mut out);
    let nudge_at = |out: &[Command]| crate::armed_at(out, Timer::StepNudge);
    assert_eq!(nudge_at(&out), Some(1_000), "{out:?}");
    let mut out = Vec::new();
    txn.handle(10, vote(0, "a", ReplyOutcome::Ready), &mut out)
        .unwrap();
    for (at, attempt) in [(1_000, 2), (2_000, 3), (3_000, 4)] {
        let mut out = Vec::new();
        txn.handle(at, Event::Timer(Timer::StepNudge), &mut out)
            .unwrap();
        assert_eq!(
            sends(&out),
            vec![(1, CommandKind::Prepare, attempt)],
            "at {at}"
        );
        assert_eq!(nudge_at(&out), Some(at + 1_000), "at {at}");
    }
    let mut out = Vec::new();
    txn.handle(4_000, Event::Timer(Timer::StepNudge), &mut out)
        .unwrap();
    assert_eq!(sends(&out), vec![(1, CommandKind::Prepare, 5)]);
    assert_eq!(nudge_at(&out), None, "no nudge after the deadline: {out:?}");
    let mut out = Vec::new();
    txn.handle(4_500, Event::Timer(Timer::PrepareTimeout), &mut out)
        .unwrap();
    assert_eq!(txn.phase(), Phase::Aborting);
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

fn rolled_back() -> Reason {
    Reason::RolledBack {
        message: "by the caller".into(),
    }
}

#[test]
fn with_the_caller_deciding_all_ready_waits_in_prepared_until_commit() {
    let (mut txn, _) = start(&["a", "b"]);
    txn.caller_decides();
    let mut out = Vec::new();
    txn.handle(10, vote(0, "a", ReplyOutcome::Ready), &mut out)
        .unwrap();
    txn.handle(11, vote(1, "b", ReplyOutcome::ReadOnly), &mut out)
        .unwrap();
    assert_eq!(txn.state(), TxnState::Prepared);
    assert!(persisted(&out).is_empty(), "no decision yet: {out:?}");
    assert!(sends(&out).is_empty());
    // Commit before... nothing: the caller commits now.
    let mut out = Vec::new();
    txn.caller_decision(20, true, rolled_back(), &mut out)
        .unwrap();
    assert_eq!(txn.phase(), Phase::Committing);
    assert_eq!(persisted(&out), vec![TxnState::Committing]);
    assert_eq!(
        sends(&out),
        vec![(0, CommandKind::Commit, 1)],
        "read-only b hears nothing"
    );
    // A decided commit is never rolled back.
    assert_eq!(
        txn.caller_decision(21, false, rolled_back(), &mut Vec::new()),
        Err(EngineError::NotDecidable {
            commit: false,
            state: TxnState::Committing
        })
    );
}

#[test]
fn the_caller_may_roll_back_while_preparing_but_not_commit() {
    let (mut txn, _) = start(&["a", "b"]);
    txn.caller_decides();
    assert!(matches!(
        txn.caller_decision(5, true, rolled_back(), &mut Vec::new()),
        Err(EngineError::NotDecidable { commit: true, .. })
    ));
    let mut out = Vec::new();
    txn.caller_decision(6, false, rolled_back(), &mut out)
        .unwrap();
    assert_eq!(txn.phase(), Phase::Aborting);
    assert_eq!(
        sends(&out),
        vec![(0, CommandKind::Abort, 1), (1, CommandKind::Abort, 1)]
    );
    assert_eq!(txn.snapshot(7).reason, Some(rolled_back()));
}

#[test]
fn lean_records_carry_the_state_and_the_snapshot_stays_whole() {
    let (mut txn, _) = start(&["a", "b"]);
    txn.lean_records();
    let mut out = Vec::new();
    txn.handle(10, vote(0, "a", ReplyOutcome::Abort), &mut out)
        .unwrap();
    let decision = record(&out, TxnState::Aborting);
    assert!(decision.steps.is_empty() && decision.metadata.is_none());
    assert!(matches!(decision.reason, Some(Reason::VoteAbort { .. })));
    // Status and anything else that needs the steps reads the snapshot.
    assert_eq!(txn.snapshot(11).steps.len(), 2);
}

#[test]
fn a_deadlock_victim_aborts_with_the_cycle_and_a_decided_one_is_never_a_victim() {
    let (mut txn, out) = start(&["a", "b"]);
    let Command::Send(cmd) = &out[2] else {
        panic!("{:?}", out[2])
    };
    assert_eq!(cmd.lock_ts, Some(0), "the accepted time, in every command");
    assert_eq!(cmd.deadlock, Some(txcoord_proto::DeadlockPolicy::Detect));
    assert_eq!(record(&out, TxnState::Accepted).lock_ts, Some(0));
    let mut out = Vec::new();
    txn.handle(10, vote(0, "a", ReplyOutcome::Ready), &mut out)
        .unwrap();
    let cycle = Reason::Deadlock {
        how: "detected".into(),
        txns: vec!["t1".into(), "t2".into()],
        services: vec!["b".into(), "a".into()],
        resources: vec!["bob".into(), "alice".into()],
        message: "cycle".into(),
        formed_ms: None,
    };
    let mut out = Vec::new();
    txn.deadlock_victim(20, cycle.clone(), &mut out).unwrap();
    assert_eq!(txn.phase(), Phase::Aborting);
    assert_eq!(record(&out, TxnState::Aborting).reason, Some(cycle.clone()));
    // The abort goes to both: the one that voted ready, and the one still waiting.
    assert_eq!(
        sends(&out),
        vec![(0, CommandKind::Abort, 1), (1, CommandKind::Abort, 1)]
    );
    assert!(txn.rows_hit().any(|r| r == Row::DeadlockVictim));
    // Once decided, never a victim (again, or for the first time).
    let mut out = Vec::new();
    assert!(matches!(
        txn.deadlock_victim(30, cycle.clone(), &mut out),
        Err(EngineError::NotAVictim { .. })
    ));
    assert!(out.is_empty());
    let (mut txn, _) = start(&["a"]);
    txn.handle(10, vote(0, "a", ReplyOutcome::Ready), &mut Vec::new())
        .unwrap();
    assert_eq!(txn.phase(), Phase::Committing);
    assert!(txn.deadlock_victim(20, cycle, &mut out).is_err());
    assert!(out.is_empty(), "a committing transaction is left alone");
}

#[test]
fn a_prevented_wait_aborts_with_reason_deadlock_prevented() {
    let (mut txn, _) = start(&["a", "b"]);
    let mut refusal = match vote(1, "b", ReplyOutcome::Abort) {
        Event::Reply(r) => r,
        _ => unreachable!(),
    };
    refusal.reason = Some("deadlock prevented (wait-die): bob is held by t0".into());
    refusal.conflict = Some(txcoord_proto::LockConflict {
        resource: "bob".into(),
        holders: vec!["t0".into()],
        policy: txcoord_proto::DeadlockPolicy::WaitDie,
    });
    let mut out = Vec::new();
    txn.handle(10, Event::Reply(refusal.clone()), &mut out)
        .unwrap();
    match &txn.snapshot(10).reason {
        Some(Reason::Deadlock {
            how,
            txns,
            resources,
            services,
            ..
        }) => {
            assert_eq!(how, "prevented");
            assert_eq!(txns, &vec!["t1".to_string(), "t0".to_string()]);
            assert_eq!(resources, &vec!["bob".to_string()]);
            assert_eq!(services, &vec!["b".to_string()]);
        }
        other => panic!("{other:?}"),
    }
    // A lock wait that only ran out (detect) is a plain refusal.
    let (mut txn, _) = start(&["a", "b"]);
    refusal.conflict = Some(txcoord_proto::LockConflict {
        policy: txcoord_proto::DeadlockPolicy::Detect,
        ..refusal.conflict.clone().unwrap()
    });
    txn.handle(10, Event::Reply(refusal), &mut Vec::new())
        .unwrap();
    assert!(matches!(
        txn.snapshot(10).reason,
        Some(Reason::VoteAbort { .. })
    ));
}

#[test]
fn a_request_lock_ts_is_kept_and_survives_recovery() {
    let mut req = request(&["a"]);
    req.lock_ts = Some(42);
    let mut out = Vec::new();
    let txn = TwoPc::start("t1".into(), &req, None, "r".into(), CFG, 500, &mut out);
    assert_eq!(txn.lock_ts(), 42);
    let accepted = record(&out, TxnState::Accepted).clone();
    let back = TwoPc::recover(&accepted, &accepted, "r".into(), CFG, 900, &mut Vec::new()).unwrap();
    assert_eq!(back.lock_ts(), 42);
}

#[test]
fn a_traceparent_rides_in_every_command_and_survives_recovery() {
    let t = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut req = request(&["a", "b"]);
    req.traceparent = Some(t.into());
    let mut out = Vec::new();
    let mut txn = TwoPc::start("t1".into(), &req, None, "r".into(), CFG, 0, &mut out);
    let accepted = record(&out, TxnState::Accepted).clone();
    assert_eq!(accepted.traceparent.as_deref(), Some(t));
    txn.handle(1, vote(0, "a", ReplyOutcome::Ready), &mut out)
        .unwrap();
    txn.handle(1, vote(1, "b", ReplyOutcome::Ready), &mut out)
        .unwrap();
    // Only the accepted record keeps it: the later ones are not made bigger by it.
    assert!(out.iter().all(|c| match c {
        Command::Persist { event, .. } | Command::Announce { event, .. } =>
            (event.state == TxnState::Accepted) == event.traceparent.is_some(),
        _ => true,
    }));
    let decision = record(&out, TxnState::Committing).clone();
    let mut after = Vec::new();
    TwoPc::recover(&accepted, &decision, "r".into(), CFG, 50, &mut after).unwrap();
    let commands: Vec<_> = out
        .iter()
        .chain(&after)
        .filter_map(|c| match c {
            Command::Send(command) => Some(command),
            _ => None,
        })
        .collect();
    assert!(commands.iter().any(|c| c.kind == CommandKind::Prepare));
    assert!(
        after
            .iter()
            .any(|c| matches!(c, Command::Send(command) if command.kind == CommandKind::Commit))
    );
    for c in commands {
        assert_eq!(c.traceparent.as_deref(), Some(t), "{c:?}");
    }
}

fn operator(
    action: txcoord_proto::ResolveAction,
    step: Option<usize>,
) -> txcoord_proto::Resolution {
    txcoord_proto::Resolution {
        action,
        step,
        outcome: None,
        reason: "ticket 42".into(),
        by: "ana".into(),
        at_ms: 77,
    }
}

#[test]
fn an_operator_aborts_only_before_the_decision_and_the_record_says_who() {
    use txcoord_proto::ResolveAction::{Abort, MarkDone, RetryNow};
    let (txn, _) = start(&["a", "b"]);
    let mut m = crate::Machine::TwoPc(txn);
    // Undecided: mark-done has nothing to count.
    let e = m.check_resolve(&operator(MarkDone, Some(0))).unwrap_err();
    assert!(e.0.contains("nothing is decided"), "{e}");
    let mut out = Vec::new();
    m.resolve(5, &operator(Abort, None), &mut out).unwrap();
    assert_eq!(m.state(), TxnState::Aborting);
    let decided = record(&out, TxnState::Aborting);
    assert_eq!(
        decided.reason,
        Some(Reason::Operator {
            by: "ana".into(),
            message: "ticket 42".into()
        })
    );
    assert_eq!(decided.resolved, Some(operator(Abort, None)));
    assert_eq!(
        sends(&out),
        vec![(0, CommandKind::Abort, 1), (1, CommandKind::Abort, 1)]
    );
    // Aborting already: a second abort is refused; retry-now resends.
    let mut none = Vec::new();
    let e = m.resolve(6, &operator(Abort, None), &mut none).unwrap_err();
    assert!(e.0.contains("aborting already"), "{e}");
    assert!(none.is_empty(), "a refusal changes nothing");
    let mut out = Vec::new();
    m.resolve(7, &operator(RetryNow, None), &mut out).unwrap();
    assert_eq!(
        sends(&out),
        vec![(0, CommandKind::Abort, 2), (1, CommandKind::Abort, 2)]
    );
}

#[test]
fn once_commit_is_decided_no_abort_and_mark_done_counts_a_step_fixed_by_hand() {
    use txcoord_proto::ResolveAction::{Abort, MarkDone};
    let (mut txn, _) = start(&["a", "b", "c"]);
    let mut out = Vec::new();
    txn.handle(1, vote(0, "a", ReplyOutcome::Ready), &mut out)
        .unwrap();
    txn.handle(1, vote(1, "b", ReplyOutcome::ReadOnly), &mut out)
        .unwrap();
    txn.handle(1, vote(2, "c", ReplyOutcome::Ready), &mut out)
        .unwrap();
    let mut m = crate::Machine::TwoPc(txn);
    assert_eq!(m.state(), TxnState::Committing);
    let e = m.check_resolve(&operator(Abort, None)).unwrap_err();
    assert!(e.0.contains("break atomicity"), "{e}");
    let e = m.check_resolve(&operator(MarkDone, Some(1))).unwrap_err();
    assert!(
        e.0.contains("step 1 owes nothing: it voted read-only"),
        "{e}"
    );
    let e = m.check_resolve(&operator(MarkDone, None)).unwrap_err();
    assert!(e.0.contains("--step"), "{e}");
    let e = m.check_resolve(&operator(MarkDone, Some(9))).unwrap_err();
    assert!(e.0.contains("no step 9"), "{e}");
    // a confirms; c's service was fixed by hand.
    let mut out = Vec::new();
    m.handle(2, done(0, "a", CommandKind::Commit), &mut out)
        .unwrap();
    let mut out = Vec::new();
    m.resolve(3, &operator(MarkDone, Some(2)), &mut out)
        .unwrap();
    assert_eq!(m.state(), TxnState::Committed);
    let fin = record(&out, TxnState::Committed);
    assert_eq!(fin.resolved, Some(operator(MarkDone, Some(2))));
    assert!(fin.steps[2].done);
    assert!(out.contains(&Command::Finished));
    let e = m.check_resolve(&operator(MarkDone, Some(2))).unwrap_err();
    assert!(e.0.contains("committed: nothing is left"), "{e}");
}

/// A one-step transaction started with `one_phase` on, as the runtime starts one whose
/// service takes `commit_one_phase`.
fn start_one_phase() -> (TwoPc, Vec<Command>) {
    let mut out = Vec::new();
    let txn = TwoPc::start(
        "t1".into(),
        &request(&["a"]),
        Some(7),
        "txn.reply.t1".into(),
        EngineConfig {
            one_phase: true,
            ..CFG
        },
        0,
        &mut out,
    );
    (txn, out)
}

fn one_phase(outcome: ReplyOutcome) -> Event {
    reply(0, "a", CommandKind::CommitOnePhase, outcome)
}

#[test]
fn one_phase_sends_one_command_after_the_accepted_record_and_done_commits_with_no_decision_record()
{
    let (mut txn, out) = start_one_phase();
    let accepted = record(&out, TxnState::Accepted);
    assert!(accepted.one_phase, "recovery must know: {accepted:?}");
    assert_eq!(sends(&out), vec![(0, CommandKind::CommitOnePhase, 1)]);
    let Command::Send(cmd) = &out[position(&out, |c| matches!(c, Command::Send(_)))] else {
        unreachable!()
    };
    assert_eq!(
        cmd.payload,
        json!({"for": "a"}),
        "it prepares, so it needs the payload"
    );
    assert_eq!(cmd.deadline_ms, 1_000);
    assert_eq!(cmd.deadlock, Some(DeadlockPolicy::Detect));
    assert!(
        position(&out, |c| matches!(c, Command::Persist { .. }))
            < position(&out, |c| matches!(c, Command::Send(_)))
    );
    let mut out = Vec::new();
    txn.handle(10, one_phase(ReplyOutcome::Done), &mut out)
        .unwrap();
    assert_eq!(txn.phase(), Phase::Committed);
    assert_eq!(
        persisted(&out),
        vec![TxnState::Committed],
        "no committing record"
    );
    assert!(sends(&out).is_empty(), "no commit command");
    assert!(out.contains(&Command::Finished));
    let end = record(&out, TxnState::Committed);
    assert!(end.one_phase && end.steps[0].done && end.steps[0].vote == Some(Vote::Ready));
    // A duplicate of the answer, or a late one, changes nothing.
    let mut late = Vec::new();
    assert!(matches!(
        txn.handle(11, one_phase(ReplyOutcome::Done), &mut late),
        Err(EngineError::Late { .. })
    ));
    assert!(late.is_empty());
}

#[test]
fn one_phase_read_only_commits_and_abort_aborts_with_the_participants_reason() {
    let (mut txn, _) = start_one_phase();
    let mut out = Vec::new();
    txn.handle(10, one_phase(ReplyOutcome::ReadOnly), &mut out)
        .unwrap();
    assert_eq!(persisted(&out), vec![TxnState::Committed]);

    let (mut txn, _) = start_one_phase();
    let mut out = Vec::new();
    txn.handle(10, one_phase(ReplyOutcome::Abort), &mut out)
        .unwrap();
    assert_eq!(txn.phase(), Phase::Aborted);
    assert_eq!(
        persisted(&out),
        vec![TxnState::Aborted],
        "no aborting record"
    );
    assert!(
        sends(&out).is_empty(),
        "nothing to abort: the participant refused"
    );
    assert!(matches!(
        &record(&out, TxnState::Aborted).reason,
        Some(Reason::VoteAbort { service, step: 0, message }) if service == "a" && message == "no stock"
    ));
}

#[test]
fn one_phase_takes_only_answers_to_its_own_command() {
    let (mut txn, _) = start_one_phase();
    let mut out = Vec::new();
    // A prepare's vote does not answer a one-phase commit (nor `ready` a commit).
    assert!(matches!(
        txn.handle(10, vote(0, "a", ReplyOutcome::Ready), &mut out),
        Err(EngineError::InvalidOutcome { .. })
    ));
    assert!(matches!(
        txn.handle(10, one_phase(ReplyOutcome::Ready), &mut out),
        Err(EngineError::InvalidOutcome { .. })
    ));
    assert!(out.is_empty());
    assert_eq!(txn.phase(), Phase::Preparing);
    // And a two-phase transaction takes no one-phase answer.
    let (mut two, _) = start(&["a"]);
    assert!(matches!(
        two.handle(10, one_phase(ReplyOutcome::Done), &mut out),
        Err(EngineError::InvalidOutcome { .. })
    ));
    assert!(out.is_empty());
}

#[test]
fn one_phase_is_only_for_a_single_step() {
    let mut out = Vec::new();
    let txn = TwoPc::start(
        "t1".into(),
        &request(&["a", "b"]),
        None,
        "r".into(),
        EngineConfig {
            one_phase: true,
            ..CFG
        },
        0,
        &mut out,
    );
    assert!(!txn.snapshot(0).one_phase);
    assert_eq!(
        sends(&out),
        vec![(0, CommandKind::Prepare, 1), (1, CommandKind::Prepare, 1)]
    );
}

#[test]
fn one_phase_past_its_deadline_asks_again_never_aborts_and_is_flagged_stuck() {
    let (mut txn, _) = start_one_phase();
    let mut out = Vec::new();
    txn.handle(500, Event::Timer(Timer::StepNudge), &mut out)
        .unwrap();
    assert_eq!(sends(&out), vec![(0, CommandKind::CommitOnePhase, 2)]);
    let mut out = Vec::new();
    txn.handle(1_000, Event::Timer(Timer::PrepareTimeout), &mut out)
        .unwrap();
    assert_eq!(txn.phase(), Phase::Preparing, "the participant decides");
    assert!(!persisted(&out).contains(&TxnState::Aborting), "{out:?}");
    assert_eq!(sends(&out), vec![(0, CommandKind::CommitOnePhase, 3)]);
    // The round is recorded before it goes out.
    assert!(
        position(&out, |c| matches!(c, Command::Persist { .. }))
            < position(&out, |c| matches!(c, Command::Send(_)))
    );
    assert!(out.iter().any(|c| matches!(
        c,
        Command::SetTimer {
            timer: Timer::Phase2Retry,
            ..
        }
    )));
    assert!(out.contains(&Command::SetTimer {
        timer: Timer::Stuck,
        at_ms: 6_000
    }));
    // The resends go on, with backoff, with the same deadline in the command (so a
    // participant that never saw it refuses it now).
    let mut out = Vec::new();
    txn.handle(1_300, Event::Timer(Timer::Phase2Retry), &mut out)
        .unwrap();
    let Command::Send(cmd) = &out[position(&out, |c| matches!(c, Command::Send(_)))] else {
        unreachable!()
    };
    assert_eq!(
        (cmd.kind, cmd.attempt, cmd.deadline_ms),
        (CommandKind::CommitOnePhase, 4, 1_000)
    );
    let mut out = Vec::new();
    txn.handle(6_000, Event::Timer(Timer::Stuck), &mut out)
        .unwrap();
    assert!(txn.snapshot(6_000).stuck);
    assert!(matches!(&out[..], [Command::Announce { event, .. }] if event.stuck));
    // The late answer still ends it.
    let mut out = Vec::new();
    txn.handle(7_000, one_phase(ReplyOutcome::Abort), &mut out)
        .unwrap();
    assert_eq!(persisted(&out), vec![TxnState::Aborted]);
}

#[test]
fn one_phase_is_no_deadlock_victim_and_no_operator_aborts_it() {
    let (mut txn, _) = start_one_phase();
    let mut out = Vec::new();
    let reason = Reason::Deadlock {
        how: "detected".into(),
        txns: vec!["t1".into(), "t2".into()],
        services: vec!["a".into()],
        resources: vec!["r".into()],
        message: "cycle".into(),
        formed_ms: None,
    };
    assert_eq!(
        txn.deadlock_victim(10, reason, &mut out),
        Err(EngineError::OnePhase)
    );
    let abort = Resolution {
        action: ResolveAction::Abort,
        step: None,
        outcome: None,
        reason: "stuck".into(),
        by: "ops".into(),
        at_ms: 10,
    };
    let refused = txn.check_resolve(&abort).unwrap_err();
    assert!(refused.0.contains("one phase"), "{refused}");
    let retry = Resolution {
        action: ResolveAction::RetryNow,
        ..abort
    };
    txn.check_resolve(&retry).unwrap();
    txn.resolve(10, &retry, &mut out);
    assert_eq!(sends(&out), vec![(0, CommandKind::CommitOnePhase, 2)]);
    assert_eq!(txn.phase(), Phase::Preparing);
}

#[test]
fn one_phase_recovers_by_asking_again_and_a_refused_round_record_is_redone() {
    let (_, out) = start_one_phase();
    let accepted = record(&out, TxnState::Accepted).clone();
    let mut out = Vec::new();
    let mut txn = TwoPc::recover(&accepted, &accepted, "r".into(), CFG, 100, &mut out).unwrap();
    assert_eq!(sends(&out), vec![(0, CommandKind::CommitOnePhase, 2)]);
    assert!(persisted(&out) == vec![TxnState::Preparing]);
    // The round's record refused: the command may be out, so no abort; written again.
    assert_eq!(
        txn.log_refused(101, "t1.prepare.r2", "too big", &mut Vec::new()),
        Refusal::Redo
    );
    // The accepted record itself refused: nothing was sent, so it may abort.
    let (mut fresh, _) = start_one_phase();
    let mut out = Vec::new();
    assert_eq!(
        fresh.log_refused(1, "t1.accepted", "too big", &mut out),
        Refusal::Replanned
    );
    assert_eq!(fresh.phase(), Phase::Aborting);
    assert_eq!(sends(&out), vec![(0, CommandKind::Abort, 1)]);
}

/// An operator's resolution naming the outcome of a one-phase transaction.
fn confirmed(outcome: ConfirmedOutcome, at_ms: u64) -> txcoord_proto::Resolution {
    txcoord_proto::Resolution {
        outcome: Some(outcome),
        at_ms,
        ..operator(txcoord_proto::ResolveAction::MarkDone, Some(0))
    }
}

#[test]
fn a_silent_one_phase_participant_is_settled_by_hand_only_past_the_deadline_and_with_its_outcome() {
    use txcoord_proto::ResolveAction::MarkDone;
    let (txn, _) = start_one_phase();
    let mut m = crate::Machine::TwoPc(txn);
    // Before the deadline (1,000 ms) the participant may still be deciding.
    let e = m
        .check_resolve(&confirmed(ConfirmedOutcome::Aborted, 999))
        .unwrap_err();
    assert!(e.0.contains("may still be deciding"), "{e}");
    // Past it: the outcome is required, and there is only step 0.
    let e = m.check_resolve(&operator(MarkDone, Some(0))).unwrap_err();
    assert!(e.0.contains("--outcome committed"), "{e}");
    let e = m
        .check_resolve(&txcoord_proto::Resolution {
            step: Some(1),
            ..confirmed(ConfirmedOutcome::Aborted, 1_000)
        })
        .unwrap_err();
    assert!(e.0.contains("no step 1"), "{e}");
    // The operator confirmed at the service that it never committed.
    let r = confirmed(ConfirmedOutcome::Aborted, 1_500);
    let mut out = Vec::new();
    m.resolve(1_500, &r, &mut out).unwrap();
    assert_eq!(m.state(), TxnState::Aborted);
    assert!(sends(&out).is_empty(), "nothing is sent: {out:?}");
    assert_eq!(persisted(&out), vec![TxnState::Aborted]);
    let fin = record(&out, TxnState::Aborted);
    assert_eq!(fin.resolved, Some(r));
    assert!(fin.one_phase);
    assert_eq!(
        fin.reason,
        Some(Reason::Operator {
            by: "ana".into(),
            message: "ticket 42".into()
        })
    );
    assert!(out.contains(&Command::Finished));
    // It committed at the service: the transaction ends committed, its step done.
    let (txn, _) = start_one_phase();
    let mut m = crate::Machine::TwoPc(txn);
    let mut out = Vec::new();
    m.resolve(
        2_000,
        &confirmed(ConfirmedOutcome::Committed, 2_000),
        &mut out,
    )
    .unwrap();
    assert_eq!(m.state(), TxnState::Committed);
    let fin = record(&out, TxnState::Committed);
    assert!(fin.steps[0].done);
    assert_eq!(fin.reason, None);
    // A late answer from the participant changes nothing.
    assert!(
        m.handle(2_100, one_phase(ReplyOutcome::Abort), &mut Vec::new())
            .is_err()
    );
    assert_eq!(m.state(), TxnState::Committed);
}

#[test]
fn an_outcome_is_refused_on_anything_but_a_one_phase_transaction_waiting_for_its_participant() {
    use txcoord_proto::ResolveAction::Abort;
    // Two phases, committing: mark-done counts a step, it does not take an outcome.
    let (mut txn, _) = start(&["a", "b"]);
    let mut out = Vec::new();
    txn.handle(1, vote(0, "a", ReplyOutcome::Ready), &mut out)
        .unwrap();
    txn.handle(1, vote(1, "b", ReplyOutcome::Ready), &mut out)
        .unwrap();
    let m = crate::Machine::TwoPc(txn);
    let e = m
        .check_resolve(&confirmed(ConfirmedOutcome::Committed, 5_000))
        .unwrap_err();
    assert!(e.0.contains("only for mark-done of a one-phase"), "{e}");
    // One phase, but an abort with an outcome: refused too (abort itself is refused).
    let (txn, _) = start_one_phase();
    let m = crate::Machine::TwoPc(txn);
    let e = m
        .check_resolve(&txcoord_proto::Resolution {
            action: Abort,
            ..confirmed(ConfirmedOutcome::Aborted, 5_000)
        })
        .unwrap_err();
    assert!(e.0.contains("only for mark-done of a one-phase"), "{e}");
    // One phase, answered already: nothing is left to do.
    let (mut txn, _) = start_one_phase();
    txn.handle(10, one_phase(ReplyOutcome::Done), &mut Vec::new())
        .unwrap();
    let m = crate::Machine::TwoPc(txn);
    let e = m
        .check_resolve(&confirmed(ConfirmedOutcome::Aborted, 5_000))
        .unwrap_err();
    assert!(e.0.contains("nothing is left"), "{e}");
}
