//! Sagas end to end with a real nats-server, the real coordinator and scripted participant
//! processes: success, compensation newest first, timeouts, failing compensations, and
//! SIGKILLs of the coordinator and of a participant.

mod common;

use std::time::Duration;

use common::System;
use serde_json::{Value, json};
use txcoord::participant::BranchState;
use txcoord::proto::{Reason, SagaStepState, TransactionEvent, TxnState};

fn saga(txn: &str, steps: Vec<Value>) -> Value {
    json!({"txn_id": txn, "mode": "saga", "steps": steps})
}

fn step(service: &str, payload: Value) -> Value {
    json!({"service": service, "action": "act", "payload": payload})
}

/// The order in which compensation started for each step, from the log.
fn compensation_order(history: &[TransactionEvent]) -> Vec<usize> {
    let mut order = Vec::new();
    for ev in history
        .iter()
        .filter(|e| matches!(e.state, TxnState::Compensating | TxnState::Failed))
    {
        if let Some(c) = ev.current_step
            && order.last() != Some(&c)
            && !order.contains(&c)
        {
            order.push(c);
        }
    }
    order
}

fn saga_state(ev: &TransactionEvent, step: usize) -> Option<SagaStepState> {
    ev.steps[step].saga.as_ref().map(|s| s.state)
}

const FAST: [(&str, &str); 2] = [
    ("TXCOORD_RETRY_BASE_MS", "100"),
    ("TXCOORD_RETRY_CAP_MS", "400"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_steps_succeed() {
    let sys = System::start(&["a", "b", "c"], &FAST).await;
    let ev = sys
        .run(saga(
            "s-ok",
            vec![
                step("a", json!({})),
                step("b", json!({})),
                step("c", json!({})),
            ],
        ))
        .await;
    assert_eq!(ev.state, TxnState::Completed, "{ev:?}");
    for (i, s) in ["a", "b", "c"].iter().enumerate() {
        sys.wait_branch(s, "s-ok", i, BranchState::Executed).await;
        assert_eq!(saga_state(&ev, i), Some(SagaStepState::Done));
    }
    // Each step's progress was recorded before the next one started.
    let executing: Vec<_> = sys
        .client
        .history("s-ok")
        .await
        .iter()
        .filter_map(|e| e.current_step)
        .collect();
    assert!(executing.windows(2).all(|w| w[0] <= w[1]), "{executing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_three_of_three_fails_and_two_then_one_are_compensated() {
    let sys = System::start(&["a", "b", "c"], &FAST).await;
    let ev = sys
        .run(saga(
            "s-fail",
            vec![
                step("a", json!({})),
                step("b", json!({})),
                step("c", json!({"execute": "fail", "reason": "card declined"})),
            ],
        ))
        .await;
    assert_eq!(ev.state, TxnState::Compensated, "{ev:?}");
    assert_eq!(
        ev.reason,
        Some(Reason::StepFailed {
            service: "c".into(),
            step: 2,
            message: "card declined".into()
        })
    );
    assert_eq!(
        compensation_order(&sys.client.history("s-fail").await),
        vec![1, 0],
        "newest first"
    );
    sys.wait_branch("a", "s-fail", 0, BranchState::Compensated)
        .await;
    sys.wait_branch("b", "s-fail", 1, BranchState::Compensated)
        .await;
    assert_eq!(
        sys.branch("c", "s-fail", 2).await.map(|r| r.state),
        Some(BranchState::ExecuteFailed)
    );
    // The participants saw them in that order too.
    let b = sys.branch("b", "s-fail", 1).await.unwrap();
    let a = sys.branch("a", "s-fail", 0).await.unwrap();
    assert!(b.updated_ms <= a.updated_ms, "b compensated before a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_times_out_is_compensated_too() {
    let sys = System::start(&["a", "b"], &FAST).await;
    let mut slow = step("b", json!({"delay_ms": 1500}));
    slow["timeout_ms"] = json!(400);
    let ev = sys
        .run(saga("s-slow", vec![step("a", json!({})), slow]))
        .await;
    assert_eq!(ev.state, TxnState::Compensated, "{ev:?}");
    assert_eq!(
        ev.reason,
        Some(Reason::Timeout {
            services: vec!["b".into()],
            steps: vec![1]
        })
    );
    assert_eq!(saga_state(&ev, 1), Some(SagaStepState::Compensated));
    assert_eq!(
        compensation_order(&sys.client.history("s-slow").await),
        vec![1, 0]
    );
    // Whichever reached b first, nothing of the step remains: either the execute finished and
    // was undone, or the compensation came first (a null compensation) and the late execute
    // was refused.
    let b = sys
        .wait_record("txp_b", "s-slow.1", |r| {
            r.is_some_and(|r| {
                r["state"] == "compensated" || r["state"] == "compensated_before_execute"
            })
        })
        .await
        .unwrap();
    let log = sys.participant_log("b").log_text();
    if b["state"] == "compensated" {
        assert!(
            log.contains("EXECUTED Done txn_id=s-slow")
                && log.contains("COMPENSATED txn_id=s-slow step=1"),
            "{log}"
        );
    } else {
        assert!(
            !log.contains("COMPENSATED txn_id=s-slow"),
            "nothing to undo: {log}"
        );
    }
    sys.wait_branch("a", "s-slow", 0, BranchState::Compensated)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_that_fails_twice_then_succeeds() {
    let sys = System::start(&["a", "b"], &FAST).await;
    let ev = sys
        .run(saga(
            "s-twice",
            vec![
                step("a", json!({"compensate_fail_times": 2})),
                step("b", json!({"execute": "fail"})),
            ],
        ))
        .await;
    assert_eq!(ev.state, TxnState::Compensated, "{ev:?}");
    let a = ev.steps[0].saga.clone().unwrap();
    assert_eq!(a.compensate_attempt, 3, "{a:?}");
    sys.wait_branch("a", "s-twice", 0, BranchState::Compensated)
        .await;
    let log = sys.participant_log("a").log_text();
    assert_eq!(log.matches("COMPENSATION FAILED txn_id=s-twice").count(), 2);
    assert_eq!(log.matches("COMPENSATED txn_id=s-twice").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_that_never_succeeds_ends_failed_and_is_still_retried() {
    let env = [
        ("TXCOORD_RETRY_BASE_MS", "50"),
        ("TXCOORD_RETRY_CAP_MS", "200"),
        ("TXCOORD_SAGA_COMPENSATION_ATTEMPTS", "3"),
    ];
    let sys = System::start(&["a", "b"], &env).await;
    let mut alerts = sys.nc.subscribe("txn.alerts").await.unwrap();
    let ev = sys
        .run(saga(
            "s-never",
            vec![
                step("a", json!({"compensate": "never"})),
                step("b", json!({"execute": "fail"})),
            ],
        ))
        .await;
    assert_eq!(
        ev.state,
        TxnState::Failed,
        "the client hears failed: {ev:?}"
    );
    assert!(
        matches!(ev.reason, Some(Reason::CompensationFailed { step: 0, .. })),
        "{ev:?}"
    );
    assert!(
        matches!(ev.cause, Some(Reason::StepFailed { step: 1, .. })),
        "{ev:?}"
    );
    // A saga that ended failed needs a person: an alert on txn.alerts.
    common::next_alert(&mut alerts, "failed", "s-never").await;
    let first = sys.client.status("s-never").await.unwrap();
    assert_eq!(first.state, TxnState::Failed);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let later = sys.client.status("s-never").await.unwrap();
    assert_eq!(later.state, TxnState::Failed, "still visible");
    let attempts = |e: &TransactionEvent| e.steps[0].saga.as_ref().unwrap().compensate_attempt;
    assert!(
        attempts(&later) > attempts(&first),
        "still retried: {} then {}",
        attempts(&first),
        attempts(&later)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_during_execution_continues_forward() {
    let mut sys = System::start(&["a", "b", "c"], &FAST).await;
    let url = sys.nats.url();
    let req = saga(
        "s-kill-fwd",
        vec![
            step("a", json!({})),
            step("b", json!({"delay_ms": 800})),
            step("c", json!({})),
        ],
    );
    sys.client
        .submit_raw(serde_json::to_vec(&req).unwrap().into(), "s-kill-fwd")
        .await
        .unwrap();
    sys.participant("a")
        .wait_for("EXECUTED Done txn_id=s-kill-fwd", Duration::from_secs(10))
        .await;
    sys.coordinator.kill9();
    sys.coordinator
        .restart_with(&[("TXCOORD_NATS_URL", &url), FAST[0], FAST[1]]);
    let ev = sys.wait_state("s-kill-fwd", |e| e.state.is_outcome()).await;
    assert_eq!(ev.state, TxnState::Completed, "{ev:?}");
    for (i, s) in ["a", "b", "c"].iter().enumerate() {
        let n = sys
            .participant(s)
            .log_text()
            .matches("EXECUTED Done txn_id=s-kill-fwd")
            .count();
        assert_eq!(n, 1, "step {i} ran its service exactly once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_during_compensation_continues_backward() {
    let env = [
        ("TXCOORD_RETRY_BASE_MS", "400"),
        ("TXCOORD_RETRY_CAP_MS", "800"),
    ];
    let mut sys = System::start(&["a", "b", "c"], &env).await;
    let url = sys.nats.url();
    let req = saga(
        "s-kill-back",
        vec![
            step("a", json!({})),
            step("b", json!({"compensate_fail_times": 1})),
            step("c", json!({"execute": "fail"})),
        ],
    );
    sys.client
        .submit_raw(serde_json::to_vec(&req).unwrap().into(), "s-kill-back")
        .await
        .unwrap();
    sys.participant("b")
        .wait_for(
            "COMPENSATION FAILED txn_id=s-kill-back",
            Duration::from_secs(10),
        )
        .await;
    sys.coordinator.kill9();
    let mid = sys.client.last_event("s-kill-back").await.unwrap();
    assert_eq!(mid.state, TxnState::Compensating);
    sys.coordinator.restart_with(&[("TXCOORD_NATS_URL", &url)]);
    let ev = sys
        .wait_state("s-kill-back", |e| e.state.is_outcome())
        .await;
    assert_eq!(ev.state, TxnState::Compensated, "{ev:?}");
    assert_eq!(
        compensation_order(&sys.client.history("s-kill-back").await),
        vec![1, 0]
    );
    sys.wait_branch("a", "s-kill-back", 0, BranchState::Compensated)
        .await;
    sys.wait_branch("b", "s-kill-back", 1, BranchState::Compensated)
        .await;
    // Nothing ran forward again once compensation had begun.
    assert_eq!(
        sys.participant("b")
            .log_text()
            .matches("EXECUTED Done txn_id=s-kill-back")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_killed_mid_step_completes_after_restart() {
    let mut sys = System::start(&["a", "b"], &FAST).await;
    let req = saga(
        "s-kill-part",
        vec![step("a", json!({})), step("b", json!({"delay_ms": 700}))],
    );
    sys.client
        .submit_raw(serde_json::to_vec(&req).unwrap().into(), "s-kill-part")
        .await
        .unwrap();
    sys.wait_state("s-kill-part", |e| e.current_step == Some(1))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    sys.participant("b").kill9();
    assert!(
        sys.branch("b", "s-kill-part", 1).await.is_none(),
        "b died before recording anything"
    );
    sys.participant("b").restart();
    let ev = sys
        .wait_state("s-kill-part", |e| e.state.is_outcome())
        .await;
    assert_eq!(ev.state, TxnState::Completed, "{ev:?}");
    sys.wait_branch("b", "s-kill-part", 1, BranchState::Executed)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_step_is_retried_with_backoff_and_succeeds() {
    let sys = System::start(&["a", "b"], &FAST).await;
    let ev = sys
        .run(saga(
            "s-flaky",
            vec![
                step("a", json!({})),
                step("b", json!({"execute": "flaky", "fail_times": 2})),
            ],
        ))
        .await;
    assert_eq!(ev.state, TxnState::Completed, "{ev:?}");
    assert_eq!(ev.steps[1].saga.as_ref().unwrap().execute_attempt, 3);
}
