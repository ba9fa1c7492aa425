//! Unit tests of the saga transitions, and a seeded simulation with duplicates, reordering,
//! timeouts, failing compensations and coordinator crashes, run as property tests.

use std::collections::{BTreeMap, HashSet};

use proptest::prelude::*;
use serde_json::json;

use super::*;
use txcoord_proto::StepRequest;

const CFG: EngineConfig = EngineConfig {
    default_timeout_ms: 1_000,
    retry_base_ms: 100,
    retry_cap_ms: 800,
    stuck_after_ms: 5_000,
    execute_attempts: 3,
    compensation_attempts: 3,
};

fn request(n: usize) -> TransactionRequest {
    TransactionRequest {
        txn_id: Some("s1".into()),
        mode: Mode::Saga,
        steps: (0..n)
            .map(|i| StepRequest {
                service: format!("s{i}"),
                action: "do".into(),
                payload: json!({"i": i}),
                compensate: (i == 1).then(|| "undo".into()),
                timeout_ms: None,
            })
            .collect(),
        timeout_ms: None,
        metadata: None,
    }
}

fn start(n: usize) -> (Saga, Vec<Command>) {
    let mut out = Vec::new();
    let s = Saga::start("s1".into(), &request(n), None, "r".into(), CFG, 0, &mut out);
    (s, out)
}

fn reply(step: usize, kind: CommandKind, outcome: ReplyOutcome, retryable: Option<bool>) -> Event {
    Event::Reply(ParticipantReply {
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

// ---------------------------------------------------------------------------------------------
// Simulation.

#[derive(Debug, Clone, Copy, PartialEq)]
enum Exec {
    Done,
    Fail,
    /// Fails retryably this many times, then succeeds.
    Flaky(u32),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rec {
    None,
    Executed,
    ExecFailed,
    Compensated,
    NullComp,
}

#[derive(Debug)]
struct Part {
    exec: Exec,
    /// Compensations that fail before one succeeds.
    comp_fails: u32,
    down: bool,
    rec: Rec,
    flaky_seen: u32,
    comp_seen: u32,
    service_executed: bool,
}

impl Part {
    fn apply(&mut self, cmd: &ParticipantCommand) -> ParticipantReply {
        let (outcome, retryable) = match (cmd.kind, self.rec) {
            (CommandKind::Execute, Rec::Executed) => (ReplyOutcome::Done, None),
            (CommandKind::Execute, Rec::None) => match self.exec {
                Exec::Flaky(k) if self.flaky_seen < k => {
                    self.flaky_seen += 1;
                    (ReplyOutcome::Failed, Some(true))
                }
                Exec::Fail => {
                    self.rec = Rec::ExecFailed;
                    (ReplyOutcome::Failed, Some(false))
                }
                _ => {
                    self.rec = Rec::Executed;
                    self.service_executed = true;
                    (ReplyOutcome::Done, None)
                }
            },
            // Hanging prevention and repeats of a failure.
            (CommandKind::Execute, _) => (ReplyOutcome::Failed, Some(false)),
            (CommandKind::Compensate, Rec::None) => {
                self.rec = Rec::NullComp;
                (ReplyOutcome::Done, None)
            }
            (CommandKind::Compensate, Rec::Executed) => {
                if self.comp_seen < self.comp_fails {
                    self.comp_seen += 1;
                    (ReplyOutcome::Failed, Some(true))
                } else {
                    self.rec = Rec::Compensated;
                    (ReplyOutcome::Done, None)
                }
            }
            (CommandKind::Compensate, Rec::ExecFailed) => {
                self.rec = Rec::Compensated;
                (ReplyOutcome::Done, None)
            }
            (CommandKind::Compensate, _) => (ReplyOutcome::Done, None),
            (kind, _) => panic!("a saga sent {kind:?}"),
        };
        ParticipantReply {
            txn_id: cmd.txn_id.clone(),
            service: cmd.service.clone(),
            step: cmd.step,
            kind: cmd.kind,
            outcome,
            reason: (outcome == ReplyOutcome::Failed).then(|| "no".into()),
            attempt: cmd.attempt,
            retryable,
            token: None,
        }
    }
}

struct Sim {
    rng: txcoord_testkit::rng::XorShift,
    now: u64,
    request: TransactionRequest,
    log: Vec<TransactionEvent>,
    engine: Option<Saga>,
    timers: BTreeMap<Timer, u64>,
    commands: Vec<ParticipantCommand>,
    replies: Vec<ParticipantReply>,
    reply_ids: HashSet<String>,
    parts: Vec<Part>,
    exec_sent: Vec<bool>,
    comp_sent: Vec<bool>,
    comp_order: Vec<usize>,
    crashes: usize,
    chaos: bool,
}

impl Sim {
    fn boot(&mut self) {
        let mut out = Vec::new();
        self.timers.clear();
        self.engine = match (self.log.first(), self.log.last()) {
            (Some(first), Some(last)) => {
                match Saga::recover(first, last, "r".into(), CFG, self.now, &mut out) {
                    Ok(s) => Some(s),
                    Err(RecoverError::Finished(_)) => None,
                    Err(e) => panic!("recovery failed: {e}"),
                }
            }
            _ => Some(Saga::start(
                "s1".into(),
                &self.request,
                None,
                "r".into(),
                CFG,
                self.now,
                &mut out,
            )),
        };
        self.run(out);
    }

    fn run(&mut self, out: Vec<Command>) {
        for cmd in out {
            if self.chaos && self.rng.chance(3) {
                self.crash();
                return;
            }
            match cmd {
                Command::Persist { event, .. } => self.log.push(event),
                Command::Announce { event, .. } => self.log.push(event),
                Command::Send(c) => {
                    let j = c.step;
                    match c.kind {
                        CommandKind::Execute => {
                            assert!(
                                !self.comp_sent[j],
                                "execute sent for step {j} after its compensation began"
                            );
                            self.exec_sent[j] = true;
                        }
                        CommandKind::Compensate => {
                            assert!(
                                self.exec_sent[j],
                                "compensate for step {j}, which never ran"
                            );
                            if !self.comp_sent[j] {
                                if let Some(&prev) = self.comp_order.last() {
                                    assert!(
                                        j < prev,
                                        "compensated {j} after {prev}: not newest first"
                                    );
                                }
                                self.comp_order.push(j);
                            }
                            self.comp_sent[j] = true;
                        }
                        other => panic!("a saga sent {other:?}"),
                    }
                    if !(self.chaos && self.rng.chance(5)) {
                        self.commands.push(c);
                    }
                }
                Command::SetTimer { timer, at_ms } => {
                    self.timers.insert(timer, at_ms);
                }
                Command::CancelTimer(t) => {
                    self.timers.remove(&t);
                }
                Command::Finished => {}
            }
        }
    }

    fn crash(&mut self) {
        self.engine = None;
        self.timers.clear();
        self.crashes += 1;
    }

    fn feed(&mut self, e: Event) {
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        let mut out = Vec::new();
        let _ = engine.handle(self.now, e, &mut out);
        self.run(out);
    }

    fn finished_in_log(&self) -> bool {
        self.log.last().is_some_and(|e| e.state.is_terminal())
    }

    fn step(&mut self) -> bool {
        if self.engine.is_none() && !self.finished_in_log() {
            self.boot();
            return true;
        }
        let deliverable: Vec<usize> = (0..self.commands.len())
            .filter(|&i| !self.parts[self.commands[i].step].down)
            .collect();
        let mut choices = Vec::new();
        if !deliverable.is_empty() {
            choices.push(0);
        }
        if !self.replies.is_empty() {
            choices.push(1);
        }
        let timer_now = if self.chaos {
            self.rng.chance(15)
        } else {
            choices.is_empty()
        };
        if !self.timers.is_empty() && self.engine.is_some() && timer_now {
            choices.push(2);
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
                let cmd = if self.chaos && self.rng.chance(20) {
                    self.commands[i].clone()
                } else {
                    self.commands.swap_remove(i)
                };
                let r = self.parts[cmd.step].apply(&cmd);
                if self.reply_ids.insert(r.msg_id()) {
                    self.replies.push(r);
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
                self.feed(Event::Reply(r));
            }
            2 => {
                let (&t, &at) = self.timers.iter().min_by_key(|(_, at)| **at).unwrap();
                self.timers.remove(&t);
                self.now = self.now.max(at);
                self.feed(Event::Timer(t));
            }
            _ => {
                if self.rng.chance(30) {
                    self.crash();
                } else {
                    self.now += self.rng.below(300);
                }
            }
        }
        true
    }
}

fn simulate(seed: u64, parts: Vec<(Exec, u32, bool)>, chaos_steps: usize) -> Sim {
    let n = parts.len();
    let mut sim = Sim {
        rng: txcoord_testkit::rng::XorShift::new(seed),
        now: 0,
        request: request(n),
        log: Vec::new(),
        engine: None,
        timers: BTreeMap::new(),
        commands: Vec::new(),
        replies: Vec::new(),
        reply_ids: HashSet::new(),
        parts: parts
            .into_iter()
            .map(|(exec, comp_fails, down)| Part {
                exec,
                comp_fails,
                down,
                rec: Rec::None,
                flaky_seen: 0,
                comp_seen: 0,
                service_executed: false,
            })
            .collect(),
        exec_sent: vec![false; n],
        comp_sent: vec![false; n],
        comp_order: Vec::new(),
        crashes: 0,
        chaos: true,
    };
    for _ in 0..chaos_steps {
        sim.step();
    }
    sim.chaos = false;
    for p in &mut sim.parts {
        p.down = false;
    }
    let mut budget = 50_000;
    while sim.step() {
        budget -= 1;
        assert!(budget > 0, "no termination: {:?}", sim.parts);
    }
    sim
}

fn part_strategy() -> impl Strategy<Value = (Exec, u32, bool)> {
    (
        prop_oneof![6 => Just(Exec::Done), 1 => Just(Exec::Fail), 1 => (1u32..4).prop_map(Exec::Flaky)],
        prop_oneof![4 => Just(0u32), 1 => 1u32..6],
        prop::bool::weighted(0.1),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn every_saga_ends_completed_or_compensated_with_exactly_the_right_undos(
        seed in any::<u64>(),
        parts in prop::collection::vec(part_strategy(), 1..6),
        chaos_steps in 0usize..150,
    ) {
        let sim = simulate(seed, parts, chaos_steps);
        let last = sim.log.last().expect("logged");
        prop_assert!(sim.commands.is_empty() && sim.replies.is_empty());
        match last.state {
            TxnState::Completed => {
                for p in &sim.parts {
                    prop_assert_eq!(p.rec, Rec::Executed, "{:?}", sim.parts);
                }
                prop_assert!(sim.comp_order.is_empty());
            }
            TxnState::Compensated => {
                for (j, p) in sim.parts.iter().enumerate() {
                    prop_assert!(p.rec != Rec::Executed, "step {} left executed: {:?}", j, sim.parts);
                    if p.service_executed {
                        prop_assert_eq!(p.rec, Rec::Compensated, "step {} executed but not undone", j);
                    }
                }
            }
            other => prop_assert!(false, "ended {:?}", other),
        }
    }

    #[test]
    fn without_faults_a_saga_of_good_steps_completes(seed in any::<u64>(), n in 1usize..8) {
        let sim = simulate(seed, vec![(Exec::Done, 0, false); n], 0);
        prop_assert_eq!(sim.log.last().map(|e| e.state), Some(TxnState::Completed));
    }
}

/// Guards the simulation: it must really crash, compensate, and pass through `failed`.
#[test]
fn simulation_exercises_crashes_compensation_and_failed() {
    let (mut crashes, mut completed, mut compensated, mut failed) = (0, 0, 0, 0);
    for seed in 1..300u64 {
        let parts = vec![
            (Exec::Done, 0, false),
            (Exec::Done, 4, false),
            (
                if seed % 3 == 0 {
                    Exec::Fail
                } else {
                    Exec::Done
                },
                0,
                seed % 4 == 0,
            ),
        ];
        let sim = simulate(seed * 7919, parts, 100);
        crashes += sim.crashes;
        match sim.log.last().map(|e| e.state) {
            Some(TxnState::Completed) => completed += 1,
            Some(TxnState::Compensated) => compensated += 1,
            other => panic!("{other:?}"),
        }
        if sim.log.iter().any(|e| e.state == TxnState::Failed) {
            failed += 1;
        }
    }
    eprintln!("crashes {crashes} completed {completed} compensated {compensated} failed {failed}");
    assert!(crashes > 100 && completed > 20 && compensated > 20 && failed > 5);
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
