//! The protocol is language-neutral: a participant in Python (nats-py, raw protocol, no SDK)
//! joins transactions with the Rust participants and commits and aborts correctly.

mod common;

use std::time::Duration;

use common::{Proc, System, request, step};
use serde_json::json;
use txcoord::participant::BranchState;
use txcoord::proto::{Reason, TxnState};

async fn with_ledger() -> (System, Proc) {
    let sys = System::start(&["a"], &[]).await;
    let ledger = sys.spawn_ledger().await;
    (sys, ledger)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_participant_commits_and_aborts_with_the_rust_ones() {
    let (sys, ledger) = with_ledger().await;

    // Commit: both sides apply.
    let ev = sys
        .run(request(
            "py-1",
            vec![
                step("a", json!({})),
                step("ledger", json!({"line": "sold 2 apples"})),
            ],
        ))
        .await;
    assert_eq!(
        ev.state,
        TxnState::Committed,
        "{ev:?}\n{}",
        ledger.log_text()
    );
    sys.wait_branch("a", "py-1", 0, BranchState::Committed)
        .await;
    let rec = sys
        .wait_record("ledger_data", "py-1.1", |r| {
            r.is_some_and(|r| r["state"] == "committed")
        })
        .await
        .unwrap();
    assert_eq!(rec["line"], "sold 2 apples");

    // Python refuses: the Rust participant aborts.
    let ev = sys
        .run(request(
            "py-2",
            vec![
                step("a", json!({})),
                step(
                    "ledger",
                    json!({"vote": "abort", "reason": "ledger closed"}),
                ),
            ],
        ))
        .await;
    assert_eq!(ev.state, TxnState::Aborted);
    assert_eq!(
        ev.reason,
        Some(Reason::VoteAbort {
            service: "ledger".into(),
            step: 1,
            message: "ledger closed".into()
        })
    );
    sys.wait_branch("a", "py-2", 0, BranchState::Aborted).await;

    // Rust refuses: the Python participant releases its prepared branch.
    let ev = sys
        .run(request(
            "py-3",
            vec![
                step("a", json!({"vote": "abort", "delay_ms": 300})),
                step("ledger", json!({"line": "never"})),
            ],
        ))
        .await;
    assert_eq!(ev.state, TxnState::Aborted);
    sys.wait_record("ledger_data", "py-3.1", |r| {
        r.is_some_and(|r| r["state"] == "aborted")
    })
    .await;

    // Read-only from Python: no phase 2 for it.
    let ev = sys
        .run(request(
            "py-4",
            vec![
                step("a", json!({})),
                step("ledger", json!({"vote": "read_only"})),
            ],
        ))
        .await;
    assert_eq!(ev.state, TxnState::Committed);
    assert_eq!(ev.steps[1].decision_attempt, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_participant_refuses_an_abort_for_a_committed_branch() {
    let (sys, ledger) = with_ledger().await;
    let ev = sys
        .run(request(
            "py-forged",
            vec![
                step("a", json!({})),
                step("ledger", json!({"line": "kept"})),
            ],
        ))
        .await;
    assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
    // Anyone who may publish on the command subject can forge an abort.
    let forged = json!({
        "txn_id": "py-forged", "service": "ledger", "step": 1, "kind": "abort",
        "action": "act", "payload": null, "reply_to": "txn.reply.forged", "attempt": 9,
        "deadline_ms": 0,
    });
    sys.publish_stored(
        "txn.cmd.ledger.py-forged".into(),
        serde_json::to_vec(&forged).unwrap(),
    )
    .await;
    ledger
        .wait_for("PROTOCOL VIOLATION", Duration::from_secs(10))
        .await;
    let rec = sys.record("ledger_data", "py-forged.1").await.unwrap();
    assert_eq!(rec["state"], "committed", "{rec}");
}
