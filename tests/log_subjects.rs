//! Where the log is written and where it is read, with a real nats-server: records are
//! written on `txn.log.<id>`, stored and read as `txn.events.<id>`, and republished there
//! only once stored. So a write the log refuses reaches no subscriber (no phantom), a
//! publish straight on `txn.events.<id>` is never stored, and an events stream made by an
//! older txcoord (records written on `txn.events.<id>`) is moved over in place with its
//! history readable as before.

mod common;

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use common::{System, request, step};
use futures::StreamExt;
use serde_json::json;
use txcoord::natsserver::NatsServer;
use txcoord::proto::{TransactionEvent, TxnState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_events_stream_is_moved_over_and_a_refused_write_reaches_nobody() {
    let nats = NatsServer::start().expect("nats-server (run ./dev setup)");
    // The events stream as an older txcoord made it, with a finished transaction in it.
    let nc = async_nats::connect(nats.url()).await.expect("connect");
    let js = jetstream::new(nc.clone());
    js.create_stream(stream::Config {
        name: "TXN_EVENTS".into(),
        subjects: vec!["txn.events.>".into(), "txn.errors".into()],
        allow_direct: true,
        ..Default::default()
    })
    .await
    .expect("the old stream");
    let old = TransactionEvent::new(
        "old-1".into(),
        TxnState::Committed,
        txcoord::proto::Mode::TwoPc,
        1,
    );
    js.publish("txn.events.old-1", serde_json::to_vec(&old).unwrap().into())
        .await
        .expect("publish")
        .await
        .expect("stored");

    let sys = System::start_on(nats, &["a"], &[]).await;
    // Moved over: the old record reads as before, and new transactions run.
    let info = js
        .get_stream("TXN_EVENTS")
        .await
        .expect("the stream")
        .cached_info()
        .config
        .clone();
    assert_eq!(info.subjects, ["txn.log.*", "txn.errors"], "{info:?}");
    assert!(info.republish.is_some() && info.subject_transform.is_some());
    assert_eq!(
        sys.client.last_event("old-1").await.map(|e| e.state),
        Some(TxnState::Committed)
    );
    let mut events = nc.subscribe("txn.events.*").await.expect("subscribe");
    nc.flush().await.expect("flush");
    let ev = sys.run(request("new-1", vec![step("a", json!({}))])).await;
    assert_eq!(ev.state, TxnState::Committed);
    // Every record of new-1 reached the subscriber, as stored, in log order.
    let history: Vec<TxnState> = sys
        .client
        .history("new-1")
        .await
        .iter()
        .map(|e| e.state)
        .collect();
    let mut heard = Vec::new();
    while heard.len() < history.len() {
        let msg = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("every record republished")
            .expect("the subscription");
        let ev: TransactionEvent = serde_json::from_slice(&msg.payload).expect("an event");
        assert_eq!(ev.txn_id, "new-1");
        heard.push(ev.state);
    }
    assert_eq!(heard, history);

    // A second `accepted` for new-1 (what a reused txn_id or a fenced coordinator writes):
    // refused, and heard by nobody.
    let phantom = TransactionEvent::new(
        "new-1".into(),
        TxnState::Accepted,
        txcoord::proto::Mode::TwoPc,
        2,
    );
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
    let refused = js
        .publish_with_headers(
            "txn.log.new-1",
            headers,
            serde_json::to_vec(&phantom).unwrap().into(),
        )
        .await
        .expect("publish")
        .await;
    assert!(refused.is_err(), "a second first record was stored");
    // A publish straight on the events subject is not stored either.
    let forged = js
        .publish(
            "txn.events.new-1",
            serde_json::to_vec(&phantom).unwrap().into(),
        )
        .await
        .expect("publish")
        .await;
    assert!(forged.is_err(), "a publish on txn.events was stored");
    // The subscriber hears the core forgery (anyone may publish where the server lets
    // them) but never the refused write. A marker published after both answers comes after
    // anything either could have sent the subscriber.
    nc.publish("txn.events.new-1", "end".into())
        .await
        .expect("publish the marker");
    let mut after = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("the marker")
            .expect("the subscription");
        if msg.payload.as_ref() == b"end" {
            break;
        }
        after.push(String::from_utf8_lossy(&msg.payload).into_owned());
    }
    assert_eq!(
        after.len(),
        1,
        "only the core forgery, not the refused write: {after:?}"
    );
    assert_eq!(
        sys.client.last_event("new-1").await.map(|e| e.state),
        Some(TxnState::Committed)
    );
}
