//! Waiting for outcomes through one subscription (`client::Outcomes`): every waiter of an id
//! gets its outcome, an outcome recorded before anyone waited is found in the log, and a
//! wait that ends (answered, timed out or dropped) leaves nothing registered.

mod common;

use std::time::Duration;

use common::{System, request, step};
use serde_json::json;
use txcoord::proto::TxnState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_waiter_gets_the_outcome_and_nothing_is_left_waiting() {
    let sys = System::start(&["a"], &[]).await;
    let outcomes = sys.client.outcomes().clone();
    // Two waits for one id, registered before the submission.
    let first = sys.client.watch("o-1");
    let second = sys.client.watch("o-1");
    assert_eq!(outcomes.waiting(), 2);
    sys.submit(&request("o-1", vec![step("a", json!({}))]), "o-1")
        .await;
    let (a, b) = tokio::join!(
        first.outcome(Duration::from_secs(30)),
        second.outcome(Duration::from_secs(30))
    );
    assert_eq!(a.unwrap().state, TxnState::Committed);
    assert_eq!(b.unwrap().state, TxnState::Committed);
    assert_eq!(outcomes.waiting(), 0);

    // Finished before anyone waited: the log has it.
    let late = sys.client.watch("o-1");
    let ev = late.outcome(Duration::from_secs(10)).await.unwrap();
    assert_eq!(ev.state, TxnState::Committed);

    // A wait that times out, or is dropped, is forgotten.
    let never = sys.client.watch("o-never");
    let err = never.outcome(Duration::from_millis(300)).await.unwrap_err();
    assert!(err.to_string().contains("o-never"), "{err}");
    drop(sys.client.watch("o-dropped"));
    assert_eq!(outcomes.waiting(), 0);
}
