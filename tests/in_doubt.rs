//! The participant side of "a finished transaction stays finished": a prepared branch that
//! hears nothing reads its decision from the log (so a decided transaction completes with
//! no coordinator running, and an undecided one keeps waiting), and a command that
//! contradicts a branch's final state is refused and never applied.

mod common;

use std::time::Duration;

use common::{Proc, System, request, step};
use serde_json::json;
use txcoord::participant::BranchState;
use txcoord::proto::{CommandKind, ParticipantCommand, TxnState};

/// A scripted participant that looks for its decision in the log after 1 s of silence.
fn participant(sys: &System, service: &str) -> Proc {
    let url = sys.nats.url();
    Proc::spawn(
        sys.dir.path(),
        service,
        &["participant", "--service", service],
        &[
            ("TXCOORD_NATS_URL", url.as_str()),
            ("TXCOORD_IN_DOUBT_AFTER_MS", "1000"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_doubt_branches_apply_the_decision_in_the_log_with_no_coordinator_running() {
    let mut sys = System::start(&[], &[("TXCOORD_FAILPOINT", "after-decision")]).await;
    let a = participant(&sys, "a");
    let b = participant(&sys, "b");
    for p in [&a, &b] {
        p.wait_for("participant ready", Duration::from_secs(30))
            .await;
    }
    for (id, vote) in [("doubt-c", "ready"), ("doubt-a", "abort")] {
        sys.decide_unheard(id, vote).await;
    }
    // The decisions are durable, nobody was told, and no coordinator will ever run again.
    sys.coordinator.kill9();
    sys.wait_branch("a", "doubt-c", 0, BranchState::Committed)
        .await;
    sys.wait_branch("b", "doubt-c", 1, BranchState::Committed)
        .await;
    sys.wait_branch("a", "doubt-a", 0, BranchState::Aborted)
        .await;
    a.wait_for(
        "in-doubt branch resolved from the coordinator's log",
        Duration::from_secs(5),
    )
    .await;
    // The log is not touched by participants: the last records are still the decisions.
    let c = sys.client.last_event("doubt-c").await.unwrap();
    assert_eq!(c.state, TxnState::Committing);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecided_branch_keeps_waiting_and_never_decides_alone() {
    let mut sys = System::start(&[], &[]).await;
    let a = participant(&sys, "a");
    let b = participant(&sys, "b");
    for p in [&a, &b] {
        p.wait_for("participant ready", Duration::from_secs(30))
            .await;
    }
    let id = "doubt-open";
    // b votes late; the coordinator dies between the two votes, so no decision exists.
    let req = request(
        id,
        vec![step("a", json!({})), step("b", json!({"delay_ms": 3000}))],
    );
    sys.submit(&req, id).await;
    sys.wait_vote(id, 0).await;
    sys.coordinator.kill9();
    // Three in-doubt intervals with no decision in the log: a still holds its branch. (A
    // negative check on real processes: only waiting shows that nothing happens.)
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        sys.branch("a", id, 0).await.map(|r| r.state),
        Some(BranchState::Prepared),
        "a participant must never decide on its own"
    );
}

/// Publishes a command as a coordinator would.
async fn forge(sys: &System, id: &str, kind: CommandKind) {
    let cmd = ParticipantCommand {
        action: "act".into(),
        reply_to: format!("txn.reply.{id}"),
        attempt: 7,
        ..ParticipantCommand::new(id.into(), "a".into(), 0, kind)
    };
    sys.publish_stored(format!("txn.cmd.a.{id}"), serde_json::to_vec(&cmd).unwrap())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_contradicts_the_branch_is_refused_and_not_applied() {
    let sys = System::start(&["a"], &[]).await;
    let committed = sys
        .run(request("contra-c", vec![step("a", json!({}))]))
        .await;
    assert_eq!(committed.state, TxnState::Committed);
    let refused = sys
        .run(request(
            "contra-a",
            vec![step("a", json!({"vote": "abort"}))],
        ))
        .await;
    assert_eq!(refused.state, TxnState::Aborted);

    forge(&sys, "contra-c", CommandKind::Abort).await;
    forge(&sys, "contra-a", CommandKind::Commit).await;
    let log = sys.participant_log("a");
    for needle in [
        "abort for a committed branch",
        "commit for a branch in state VotedAbort",
    ] {
        log.wait_for(needle, Duration::from_secs(10)).await;
    }
    assert_eq!(
        log.log_text().matches("PROTOCOL VIOLATION").count(),
        2,
        "each refused once, not redelivered"
    );
    assert_eq!(
        sys.branch("a", "contra-c", 0).await.map(|r| r.state),
        Some(BranchState::Committed)
    );
    assert_eq!(
        sys.branch("a", "contra-a", 0).await.map(|r| r.state),
        Some(BranchState::VotedAbort)
    );
}
