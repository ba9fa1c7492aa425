//! A record the log refuses for good (here: an operator lowers the events stream's
//! `max_msg_size` under a running transaction whose client metadata no longer fits) never
//! leaves the transaction open. Before a decision it ends without one: a 2PC aborts and a
//! saga compensates, with reason `log_refused`, in compact records (no metadata). After a
//! decision the decision stands and the records go on compacted.

mod common;

use std::time::Duration;

use common::{System, check, request, step, validator};
use serde_json::{Value, json};
use txcoord::participant::BranchState;
use txcoord::proto::{Reason, TransactionEvent, TxnState};

/// Client metadata of about 20 KB: every record of the transaction carries it.
fn with_big_metadata(mut req: Value) -> Value {
    req["metadata"] = json!({"note": "m".repeat(20_000)});
    req
}

/// Lowers the events stream's largest message to `bytes`.
async fn shrink_log(sys: &System, bytes: i32) {
    let js = async_nats::jetstream::new(sys.nc.clone());
    let mut stream = js.get_stream("TXN_EVENTS").await.expect("events stream");
    let mut config = stream.info().await.expect("stream info").config.clone();
    config.max_message_size = bytes;
    js.update_stream(config).await.expect("stream updated");
}

fn assert_log_refused(ev: &TransactionEvent, reason: Option<&Reason>) {
    match reason {
        Some(Reason::LogRefused { message }) => assert!(
            message.contains("maximum"),
            "the reason says what the log said: {message}"
        ),
        other => panic!("reason {other:?} in {ev:?}"),
    }
    assert_eq!(ev.metadata, None, "compact records leave out the metadata");
    let record = serde_json::to_value(ev).unwrap();
    check(
        &validator("transaction-event"),
        "transaction-event",
        &ev.txn_id,
        &record,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_refused_before_the_decision_aborts_with_that_reason() {
    let sys = System::start(&["a", "b"], &[]).await;
    let id = "refused-2pc";
    let req = with_big_metadata(request(
        id,
        vec![step("a", json!({})), step("b", json!({"delay_ms": 1500}))],
    ));
    sys.submit(&req, id).await;
    sys.participant_log("a")
        .wait_for(&format!("VOTED Ready txn_id={id}"), Duration::from_secs(10))
        .await;
    // The accepted record (and the prepare round) were written; the decision will not fit.
    shrink_log(&sys, 8 * 1024).await;
    let ev = sys.wait_state(id, |e| e.state.is_terminal()).await;
    assert_eq!(ev.state, TxnState::Aborted, "{ev:?}");
    assert_log_refused(&ev, ev.reason.as_ref());
    // a prepared, so it was told to abort; b's late ready vote changed nothing.
    sys.wait_branch("a", id, 0, BranchState::Aborted).await;
    sys.wait_branch("b", id, 1, BranchState::Aborted).await;
    let history = sys.client.history(id).await;
    assert!(
        !history.iter().any(|e| e.state == TxnState::Committing),
        "no commit decision reached the log: {history:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_record_refused_going_forward_compensates_with_that_reason() {
    let sys = System::start(&["a", "b", "c"], &[]).await;
    let id = "refused-saga";
    let mut req = with_big_metadata(request(
        id,
        vec![
            step("a", json!({})),
            step("b", json!({"delay_ms": 1500})),
            step("c", json!({})),
        ],
    ));
    req["mode"] = json!("saga");
    sys.submit(&req, id).await;
    sys.participant_log("a")
        .wait_for(
            &format!("EXECUTED Done txn_id={id} step=0"),
            Duration::from_secs(10),
        )
        .await;
    // While b executes: the record that moves the saga on to c will not fit.
    shrink_log(&sys, 8 * 1024).await;
    let ev = sys.wait_state(id, |e| e.state.is_terminal()).await;
    assert_eq!(ev.state, TxnState::Compensated, "{ev:?}");
    assert_log_refused(&ev, ev.reason.as_ref());
    sys.wait_branch("a", id, 0, BranchState::Compensated).await;
    sys.wait_branch("b", id, 1, BranchState::Compensated).await;
    assert!(sys.branch("c", id, 2).await.is_none(), "c never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_refused_after_the_decision_is_written_compacted_and_the_decision_stands() {
    let mut sys = System::start(&["a", "b"], &[("TXCOORD_FAILPOINT", "after-decision")]).await;
    let url = sys.nats.url();
    let id = "refused-after";
    let req = with_big_metadata(request(
        id,
        vec![step("a", json!({})), step("b", json!({"delay_ms": 100}))],
    ));
    sys.submit(&req, id).await;
    sys.coordinator
        .wait_for(
            &format!("FAILPOINT after-decision txn_id={id}"),
            Duration::from_secs(10),
        )
        .await;
    sys.coordinator.kill9();
    assert_eq!(
        sys.client.last_event(id).await.map(|e| e.state),
        Some(TxnState::Committing)
    );
    // The commit is decided and durable; the resumed coordinator's next record will not fit.
    shrink_log(&sys, 8 * 1024).await;
    sys.coordinator.restart_with(&[("TXCOORD_NATS_URL", &url)]);
    let ev = sys.wait_state(id, |e| e.state.is_terminal()).await;
    assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
    assert_eq!(ev.metadata, None, "written compacted");
    sys.wait_branch("a", id, 0, BranchState::Committed).await;
    sys.wait_branch("b", id, 1, BranchState::Committed).await;
}
