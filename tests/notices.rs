//! A client hears of its own transactions only: each submission names the client's inbox in
//! `Txcoord-Outcome-To`, and the coordinator publishes the durable outcome there once, so no
//! client receives every transaction's events. With real processes: the notice is the log's
//! final record and comes once; a transaction submitted elsewhere sends this client nothing
//! and is still waited for through its own events; a rejected submission is told its
//! rejection, once even when one inbox is named for both the decision and the outcome; a
//! wait whose notice cannot come (the coordinator SIGKILLed, its successor
//! resuming the transaction from the log) still ends at the outcome.

mod common;

use std::time::Duration;

use common::{System, request, step};
use futures::StreamExt;
use serde_json::{Value, json};
use txcoord::proto::{TxnState, Until};

/// The next message on `sub` within `within`, as JSON; `None` if nothing came.
async fn next_json(sub: &mut async_nats::Subscriber, within: Duration) -> Option<Value> {
    let msg = tokio::time::timeout(within, sub.next()).await.ok()??;
    Some(serde_json::from_slice(&msg.payload).expect("a notice is JSON"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hears_its_own_outcomes_once_and_nothing_of_the_others() {
    let sys = System::start(&["a", "b"], &[]).await;
    // What the coordinator sends to the client's inbox, seen by a second subscriber.
    let inbox = sys.client.outcomes().decided_to().to_string();
    let mut notices = sys.nc.subscribe(inbox).await.expect("subscribe");
    let got = sys
        .client
        .submit_until(
            vec![
                request("on-1", vec![step("a", json!({})), step("b", json!({}))]),
                request(
                    "on-2",
                    vec![step("a", json!({})), step("b", json!({"vote": "abort"}))],
                ),
            ],
            Until::Outcome,
            Duration::from_secs(60),
            |_, _| {},
        )
        .await;
    let states: Vec<TxnState> = got
        .into_iter()
        .map(|r| r.expect("an outcome").state)
        .collect();
    assert_eq!(states, [TxnState::Committed, TxnState::Aborted]);
    // One notice per transaction: its final record, as the log holds it.
    let validator = common::validator("transaction-event");
    let mut seen = Vec::new();
    for _ in 0..2 {
        let notice = next_json(&mut notices, Duration::from_secs(10))
            .await
            .expect("an outcome notice");
        common::check(
            &validator,
            "transaction-event",
            "the outcome notice",
            &notice,
        );
        let id = notice["txn_id"].as_str().expect("a txn_id").to_string();
        let last = sys.client.last_event(&id).await.expect("a record");
        assert_eq!(
            notice,
            serde_json::to_value(&last).expect("JSON"),
            "the notice is the log's final record"
        );
        seen.push(id);
    }
    seen.sort();
    assert_eq!(seen, ["on-1", "on-2"]);

    // A transaction submitted without the header (by someone else) sends nothing here, and
    // a wait for it follows its own events.
    let other = request("on-other", vec![step("a", json!({})), step("b", json!({}))]);
    let watch = sys.client.watch("on-other");
    sys.submit(&other, "on-other").await;
    let ev = watch
        .outcome(Duration::from_secs(30))
        .await
        .expect("the other transaction's outcome");
    assert_eq!(ev.state, TxnState::Committed);
    let quiet = next_json(&mut notices, Duration::from_millis(300)).await;
    assert!(
        quiet.is_none(),
        "a notice of nothing we submitted: {quiet:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_submission_is_told_its_rejection() {
    let sys = System::start(&["a"], &[]).await;
    let inbox = sys.client.outcomes().decided_to().to_string();
    let mut notices = sys.nc.subscribe(inbox).await.expect("subscribe");
    // A step without a service: the coordinator rejects it.
    let bad = json!({"txn_id": "on-bad", "mode": "2pc", "steps": [{"action": "x", "payload": {}}]});
    let got = sys
        .client
        .submit_until(
            vec![bad],
            Until::Outcome,
            Duration::from_secs(30),
            |_, _| {},
        )
        .await;
    let ev = got
        .into_iter()
        .next()
        .expect("a result")
        .expect("an answer");
    assert_eq!(ev.state, TxnState::Rejected, "{ev:?}");
    let notice = next_json(&mut notices, Duration::from_secs(10))
        .await
        .expect("a rejection notice");
    assert_eq!(notice["txn_id"], "on-bad", "{notice}");
    assert_eq!(notice["state"], "rejected", "{notice}");
    assert!(
        notice["reason"].to_string().contains("service"),
        "the notice says what was wrong: {notice}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_inbox_named_for_the_decision_and_the_outcome_hears_an_early_outcome_once() {
    let sys = System::start(&["a"], &[]).await;
    let inbox = sys.nc.new_inbox();
    let mut notices = sys.nc.subscribe(inbox.clone()).await.expect("subscribe");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "on-both");
    headers.insert(txcoord::proto::DECIDED_TO_HEADER, inbox.as_str());
    headers.insert(txcoord::proto::OUTCOME_TO_HEADER, inbox.as_str());
    // Rejected: the outcome is the first decided state.
    let bad =
        json!({"txn_id": "on-both", "mode": "2pc", "steps": [{"action": "x", "payload": {}}]});
    async_nats::jetstream::new(sys.nc.clone())
        .publish_with_headers(
            "txn.submit".to_string(),
            headers,
            serde_json::to_vec(&bad).expect("JSON").into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    let notice = next_json(&mut notices, Duration::from_secs(10))
        .await
        .expect("a notice");
    assert_eq!(notice["state"], "rejected", "{notice}");
    let again = next_json(&mut notices, Duration::from_millis(300)).await;
    assert!(again.is_none(), "a second notice: {again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_ends_at_the_outcome_when_a_successor_finishes_the_transaction() {
    let mut sys = System::start(&["a", "b"], &[]).await;
    let client = sys.client.clone();
    let wait = tokio::spawn(async move {
        client
            .submit_until(
                vec![request(
                    "on-failover",
                    vec![step("a", json!({})), step("b", json!({"delay_ms": 400}))],
                )],
                Until::Outcome,
                Duration::from_secs(90),
                |_, _| {},
            )
            .await
    });
    // The coordinator that was told the inbox dies mid-transaction; the one that finishes
    // it resumes from the log and knows no inbox.
    sys.wait_vote("on-failover", 0).await;
    sys.coordinator.kill9();
    sys.coordinator.restart();
    let got = tokio::time::timeout(Duration::from_secs(90), wait)
        .await
        .expect("the wait ends")
        .expect("the waiting task");
    let ev = got
        .into_iter()
        .next()
        .expect("a result")
        .expect("an outcome");
    assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
    let last = sys
        .client
        .last_event("on-failover")
        .await
        .expect("a record");
    assert_eq!(last.state, TxnState::Committed);
}
