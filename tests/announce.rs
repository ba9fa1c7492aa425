//! `announce_preparing = false`: the coordinator leaves out the `preparing` record that only
//! observers read, and nothing else changes. With real processes: by default the log goes
//! `accepted`, `preparing`, decision, end; with the option off it goes `accepted`, decision,
//! end; a coordinator SIGKILLed mid-prepare is succeeded by one that still writes its resend
//! round (a `preparing` record with the next attempt, which recovery needs) and commits.

mod common;

use common::{System, request, step};
use serde_json::json;
use txcoord::proto::TxnState;

/// The states of `txn_id`'s log, in order, as it is now.
async fn logged(sys: &System, txn_id: &str) -> Vec<TxnState> {
    sys.client
        .history(txn_id)
        .await
        .into_iter()
        .map(|e| e.state)
        .collect()
}

/// The states of `txn_id`'s log, in order, once it has an outcome.
async fn states(sys: &System, txn_id: &str) -> Vec<TxnState> {
    sys.wait_state(txn_id, |e| e.state.is_outcome()).await;
    logged(sys, txn_id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preparing_record_is_written_by_default_and_left_out_on_request() {
    use TxnState::{Accepted, Committed, Committing, Preparing};
    let two = |id: &str| request(id, vec![step("a", json!({})), step("b", json!({}))]);

    let sys = System::start(&["a", "b"], &[]).await;
    sys.submit(&two("an-default"), "an-default").await;
    assert_eq!(
        states(&sys, "an-default").await,
        [Accepted, Preparing, Committing, Committed]
    );
    drop(sys);

    let sys = System::start(&["a", "b"], &[("TXCOORD_ANNOUNCE_PREPARING", "false")]).await;
    sys.submit(&two("an-off"), "an-off").await;
    assert_eq!(
        states(&sys, "an-off").await,
        [Accepted, Committing, Committed]
    );
    // One step, committed in one phase once the service said it takes that: the same.
    let one = |id: &str| request(id, vec![step("a", json!({}))]);
    sys.submit(&one("an-one-1"), "an-one-1").await;
    assert_eq!(states(&sys, "an-one-1").await.last(), Some(&Committed));
    sys.submit(&one("an-one-2"), "an-one-2").await;
    assert_eq!(states(&sys, "an-one-2").await, [Accepted, Committed]);
    let log = sys.client.history("an-one-2").await;
    assert!(log.first().is_some_and(|e| e.one_phase), "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_it_a_successor_still_writes_its_resend_round_and_commits() {
    let mut sys = System::start(&["a", "b"], &[("TXCOORD_ANNOUNCE_PREPARING", "false")]).await;
    let req = request(
        "an-crash",
        vec![step("a", json!({})), step("b", json!({"delay_ms": 400}))],
    );
    sys.submit(&req, "an-crash").await;
    // Killed in the middle of the prepares: its log holds `accepted` alone.
    sys.wait_vote("an-crash", 0).await;
    sys.coordinator.kill9();
    assert_eq!(logged(&sys, "an-crash").await, [TxnState::Accepted]);
    sys.coordinator.restart();
    let log = {
        sys.wait_state("an-crash", |e| e.state.is_outcome()).await;
        sys.client.history("an-crash").await
    };
    let states: Vec<TxnState> = log.iter().map(|e| e.state).collect();
    assert_eq!(
        states,
        [
            TxnState::Accepted,
            TxnState::Preparing,
            TxnState::Committing,
            TxnState::Committed
        ],
        "{log:?}"
    );
    // The successor's round prepared again with the next attempt.
    assert!(
        log[1].steps.iter().all(|s| s.prepare_attempt == 2),
        "{:?}",
        log[1]
    );
}
