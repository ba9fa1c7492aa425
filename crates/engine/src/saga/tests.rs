//! Unit tests of the saga transitions. Whole sagas under faults are simulated, for both
//! engines, in `crates/engine/tests/simulation.rs`.

use serde_json::json;

use super::*;
use txcoord_proto::StepRequest;

const CFG: EngineConfig = EngineConfig {
    deadlock: txcoord_proto::DeadlockPolicy::Detect,
    one_phase: false,
    default_timeout_ms: 1_000,
    retry_base_ms: 100,
    retry_cap_ms: 800,
    stuck_after_ms: 5_000,
    execute_attempts: 3,
    compensation_attempts: 3,
};

fn request(n: usize) -> TransactionRequest {
    TransactionRequest {
        lock_ts: None,
        txn_id: Some("s1".into()),
        mode: Mode::Saga,
        steps: (0..n)
            .map(|i| StepRequest {
                url: None,
                service: format!("s{i}"),
                action: "do".into(),
                payload: json!({"i": i}),
                compensate: (i == 1).then(|| "undo".into()),
                timeout_ms: None,
            })
            .collect(),
        timeout_ms: None,
        metadata: None,
        traceparent: None,
    }
}

fn start(n: usize) -> (Saga, Vec<Command>) {
    let mut out = Vec::new();
    let s = Saga::start("s1".into(), &request(n), None, "r".into(), CFG, 0, &mut out);
    (s, out)
}

fn reply(step: usize, kind: CommandKind, outcome: ReplyOutcome, retryable: Option<bool>) -> Event {
    Event::Reply(ParticipantReply {
        conflict: None,
        txn_id: "s1".into(),
        service: format!("s{step}"),
        step,
        kind,
        outcome,
        reason: (outcome == ReplyOutcome::Failed).then(|| "card declined".into()),
        attempt: 1,
        retryable,
        token: None,
    })
}

fn done(step: usize, kind: CommandKind) -> Event {
    reply(step, kind, ReplyOutcome::Done, None)
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

fn h(s: &mut Saga, now: u64, e: Event) -> Vec<Command> {
    let mut out = Vec::new();
    let _ = s.handle(now, e, &mut out);
    out
}

#[test]
fn all_steps_succeed_in_order_each_persisted_before_the_next() {
    let (mut s, out) = start(3);
    assert_eq!(persisted(&out), vec![TxnState::Accepted]);
    assert_eq!(sends(&out), vec![(0, CommandKind::Execute, 1)]);
    let out = h(&mut s, 1, done(0, CommandKind::Execute));
    assert!(
        matches!(&out[0], Command::Persist { event, .. } if event.current_step == Some(1)
        && event.steps[0].saga.as_ref().map(|x| x.state) == Some(SagaStepState::Done))
    );
    assert_eq!(sends(&out), vec![(1, CommandKind::Execute, 1)]);
    let _ = h(&mut s, 2, done(1, CommandKind::Execute));
    let out = h(&mut s, 3, done(2, CommandKind::Execute));
    assert_eq!(persisted(&out), vec![TxnState::Completed]);
    assert_eq!(out.last(), Some(&Command::Finished));
    assert!(s.is_finished());
}

fn step_state(s: &Saga, i: usize) -> Option<SagaStepState> {
    s.snapshot(0).steps[i].saga.as_ref().map(|x| x.state)
}

#[test]
fn a_refused_record_going_forward_compensates_what_ran_and_not_what_never_started() {
    let (mut s, _) = start(3);
    let _ = h(&mut s, 1, done(0, CommandKind::Execute));
    // Step 1's first execute waits behind the refused progress record: it never went out.
    let mut out = Vec::new();
    assert_eq!(
        s.log_refused(
            2,
            "s1.execute.1.1",
            "message size exceeds maximum",
            &mut out
        ),
        Refusal::Replanned
    );
    assert_eq!(s.state(), TxnState::Compensating);
    assert_eq!(step_state(&s, 1), Some(SagaStepState::Pending));
    assert_eq!(sends(&out), vec![(0, CommandKind::Compensate, 1)]);
    let rec = out
        .iter()
        .find_map(|c| match c {
            Command::Persist { event, .. } => Some(event),
            _ => None,
        })
        .expect("the compensation is recorded first");
    assert!(
        matches!(&rec.reason, Some(Reason::LogRefused { message }) if message.contains("exceeds"))
    );
    // Compensating: a refused record is redone; a refused compact one ends the attempts.
    assert_eq!(
        s.log_refused(3, "s1.compensate.0.1", "again", &mut Vec::new()),
        Refusal::GiveUp
    );
}

#[test]
fn a_refused_nudge_record_compensates_the_step_that_may_have_run() {
    let (mut s, _) = start(2);
    let _ = h(&mut s, 1, done(0, CommandKind::Execute));
    let _ = h(&mut s, 600, Event::Timer(Timer::StepNudge));
    // Execute 1 went out once already; the record of its second attempt is refused.
    let mut out = Vec::new();
    assert_eq!(
        s.log_refused(601, "s1.execute.1.2", "sealed", &mut out),
        Refusal::Replanned
    );
    assert_eq!(
        sends(&out),
        vec![(1, CommandKind::Compensate, 1)],
        "the newest step that may have run is undone first"
    );
}

#[test]
fn a_refused_record_while_compensating_or_finishing_is_redone() {
    let (mut s, _) = start(2);
    let _ = h(&mut s, 1, done(0, CommandKind::Execute));
    let out = h(&mut s, 2, done(1, CommandKind::Execute));
    assert_eq!(persisted(&out), vec![TxnState::Completed]);
    assert_eq!(
        s.log_refused(3, "s1.final", "too big", &mut Vec::new()),
        Refusal::Redo
    );
    assert_eq!(s.state(), TxnState::Completed, "the outcome stands");
}

#[test]
fn step_three_fails_and_two_then_one_are_compensated() {
    let (mut s, _) = start(3);
    let _ = h(&mut s, 1, done(0, CommandKind::Execute));
    let _ = h(&mut s, 2, done(1, CommandKind::Execute));
    let out = h(
        &mut s,
        3,
        reply(2, CommandKind::Execute, ReplyOutcome::Failed, Some(false)),
    );
    assert_eq!(s.state(), TxnState::Compensating);
    let Command::Send(cmd) = out.iter().find(|c| matches!(c, Command::Send(_))).unwrap() else {
        panic!()
    };
    assert_eq!((cmd.step, cmd.kind), (1, CommandKind::Compensate));
    assert_eq!(cmd.action, "do", "the original action");
    assert_eq!(cmd.payload, json!({"i": 1}), "the original payload");
    assert_eq!(cmd.compensate_action.as_deref(), Some("undo"));
    let out = h(&mut s, 4, done(1, CommandKind::Compensate));
    assert_eq!(sends(&out), vec![(0, CommandKind::Compensate, 1)]);
    let out = h(&mut s, 5, done(0, CommandKind::Compensate));
    assert_eq!(persisted(&out), vec![TxnState::Compensated]);
    let ev = s.snapshot(5);
    assert_eq!(
        ev.reason,
        Some(Reason::StepFailed {
            service: "s2".into(),
            step: 2,
            message: "card declined".into()
        })
    );
}

#[test]
fn a_timed_out_step_is_compensated_too() {
    let (mut s, _) = start(3);
    let _ = h(&mut s, 1, done(0, CommandKind::Execute));
    let out = h(&mut s, 1_001, Event::Timer(Timer::StepTimeout));
    assert_eq!(
        sends(&out),
        vec![(1, CommandKind::Compensate, 1)],
        "step 1 may have executed"
    );
    assert_eq!(
        s.snapshot(0).reason,
        Some(Reason::Timeout {
            services: vec!["s1".into()],
            steps: vec![1]
        })
    );
    // Its late success changes nothing, and it is never executed again.
    let out = h(&mut s, 1_002, done(1, CommandKind::Execute));
    assert!(out.is_empty());
    let _ = h(&mut s, 1_003, done(1, CommandKind::Compensate));
    let out = h(&mut s, 1_004, done(0, CommandKind::Compensate));
    assert_eq!(persisted(&out), vec![TxnState::Compensated]);
}

#[test]
fn a_retryable_failure_is_retried_with_backoff_then_gives_up() {
    let (mut s, _) = start(2);
    let out = h(
        &mut s,
        1,
        reply(0, CommandKind::Execute, ReplyOutcome::Failed, Some(true)),
    );
    assert!(sends(&out).is_empty());
    let at = out.iter().find_map(|c| match c {
        Command::SetTimer {
            timer: Timer::StepRetry,
            at_ms,
        } => Some(*at_ms),
        _ => None,
    });
    let at = at.expect("retry armed");
    let out = h(&mut s, at, Event::Timer(Timer::StepRetry));
    assert_eq!(sends(&out), vec![(0, CommandKind::Execute, 2)]);
    assert!(
        matches!(&out[0], Command::Persist { .. }),
        "attempt persisted first"
    );
    let _ = h(
        &mut s,
        at + 1,
        reply(0, CommandKind::Execute, ReplyOutcome::Failed, Some(true)),
    );
    let _ = h(&mut s, at + 500, Event::Timer(Timer::StepRetry));
    // Third failure reaches the limit of 3. An earlier attempt may still land, so the step
    // itself is compensated (the participant records it, and refuses any late execute).
    let out = h(
        &mut s,
        at + 501,
        reply(0, CommandKind::Execute, ReplyOutcome::Failed, Some(true)),
    );
    assert_eq!(sends(&out), vec![(0, CommandKind::Compensate, 1)]);
    let out = h(&mut s, at + 502, done(0, CommandKind::Compensate));
    assert_eq!(persisted(&out), vec![TxnState::Compensated]);
}

#[test]
fn a_compensation_that_keeps_failing_shows_failed_and_is_still_retried() {
    let (mut s, _) = start(2);
    let _ = h(&mut s, 1, done(0, CommandKind::Execute));
    let _ = h(
        &mut s,
        2,
        reply(1, CommandKind::Execute, ReplyOutcome::Failed, Some(false)),
    );
    let mut now = 2;
    let mut delays = Vec::new();
    for attempt in 1..=6 {
        let out = h(
            &mut s,
            now,
            reply(0, CommandKind::Compensate, ReplyOutcome::Failed, Some(true)),
        );
        if attempt == 3 {
            assert_eq!(
                persisted(&out),
                vec![TxnState::Failed],
                "shown failed at the limit"
            );
        } else {
            assert!(persisted(&out).is_empty());
        }
        let at = out
            .iter()
            .find_map(|c| match c {
                Command::SetTimer {
                    timer: Timer::StepRetry,
                    at_ms,
                } => Some(*at_ms),
                _ => None,
            })
            .expect("still retried");
        delays.push(at - now);
        now = at;
        let out = h(&mut s, now, Event::Timer(Timer::StepRetry));
        assert_eq!(sends(&out), vec![(0, CommandKind::Compensate, attempt + 1)]);
    }
    assert_eq!(s.state(), TxnState::Failed);
    assert!(delays.iter().all(|d| *d <= 1_000), "capped: {delays:?}");
    let ev = s.snapshot(now);
    assert!(matches!(
        ev.reason,
        Some(Reason::CompensationFailed { step: 0, .. })
    ));
    assert!(matches!(ev.cause, Some(Reason::StepFailed { step: 1, .. })));
    // It finally works: compensated, with the original cause.
    let out = h(&mut s, now + 1, done(0, CommandKind::Compensate));
    assert_eq!(persisted(&out), vec![TxnState::Compensated]);
    assert!(matches!(
        s.snapshot(now).reason,
        Some(Reason::StepFailed { .. })
    ));
}

#[test]
fn recovery_continues_forward_or_backward_from_the_log() {
    let (mut s, out) = start(3);
    let Command::Persist {
        event: accepted, ..
    } = out[0].clone()
    else {
        panic!()
    };
    let _ = h(&mut s, 1, done(0, CommandKind::Execute));
    let forward = s.snapshot(1);
    let mut out = Vec::new();
    let r = Saga::recover(&accepted, &forward, "r".into(), CFG, 5, &mut out).unwrap();
    assert_eq!(r.phase(), Phase::Executing);
    assert_eq!(sends(&out), vec![(1, CommandKind::Execute, 2)]);

    let _ = h(
        &mut s,
        2,
        reply(1, CommandKind::Execute, ReplyOutcome::Failed, Some(false)),
    );
    let backward = s.snapshot(2);
    let mut out = Vec::new();
    let r = Saga::recover(&accepted, &backward, "r".into(), CFG, 5, &mut out).unwrap();
    assert_eq!(r.phase(), Phase::Compensating);
    assert_eq!(sends(&out), vec![(0, CommandKind::Compensate, 2)]);
}

#[test]
fn a_silent_execute_is_sent_again_halfway_to_its_deadline() {
    let (mut s, out) = start(2);
    assert!(
        out.contains(&Command::SetTimer {
            timer: Timer::StepNudge,
            at_ms: 500
        }),
        "{out:?}"
    );
    let out = h(&mut s, 500, Event::Timer(Timer::StepNudge));
    assert_eq!(sends(&out), vec![(0, CommandKind::Execute, 2)]);
    assert!(
        matches!(&out[0], Command::Persist { .. }),
        "the attempt is persisted first"
    );
    // The deadline is not moved by the nudge.
    assert!(!out.iter().any(|c| matches!(
        c,
        Command::SetTimer {
            timer: Timer::StepTimeout,
            ..
        }
    )));
    let out = h(&mut s, 501, done(0, CommandKind::Execute));
    assert_eq!(sends(&out), vec![(1, CommandKind::Execute, 1)]);
}

#[test]
fn a_silent_execute_of_a_long_step_is_sent_again_every_retry_cap() {
    // A ten-minute step: a lost command or reply costs `retry_cap_ms` (800 here), not
    // five minutes.
    let mut req = request(2);
    req.steps[0].timeout_ms = Some(600_000);
    let mut out = Vec::new();
    let mut s = Saga::start("s1".into(), &req, None, "r".into(), CFG, 0, &mut out);
    let nudge_at = |out: &[Command]| crate::armed_at(out, Timer::StepNudge);
    assert_eq!(nudge_at(&out), Some(800), "{out:?}");
    let out = h(&mut s, 800, Event::Timer(Timer::StepNudge));
    assert_eq!(sends(&out), vec![(0, CommandKind::Execute, 2)]);
    assert_eq!(nudge_at(&out), Some(1_600));
    let out = h(&mut s, 1_600, Event::Timer(Timer::StepNudge));
    assert_eq!(sends(&out), vec![(0, CommandKind::Execute, 3)]);
    // The answer to any attempt moves the saga on; the next step's own deadline (the
    // default, 1 s) keeps its halfway nudge.
    let out = h(&mut s, 1_700, done(0, CommandKind::Execute));
    assert_eq!(sends(&out), vec![(1, CommandKind::Execute, 1)]);
    assert_eq!(nudge_at(&out), Some(2_200));
}

#[test]
fn a_saga_refuses_an_operator_outcome() {
    let (saga, _) = start(2);
    let r = txcoord_proto::Resolution {
        action: txcoord_proto::ResolveAction::MarkDone,
        step: Some(0),
        outcome: Some(txcoord_proto::ConfirmedOutcome::Committed),
        reason: "ticket 7".into(),
        by: "ana".into(),
        at_ms: 1_000_000,
    };
    let e = saga.check_resolve(&r).unwrap_err();
    assert!(e.0.contains("only for mark-done of a one-phase"), "{e}");
}
