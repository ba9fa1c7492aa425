//! Hostile parties on the bus, against real processes: forged votes (ahead of the real one,
//! with the message id the real one would have had, with a made-up attempt, on another
//! transaction's subject, on the old subject, from another service that knows its own
//! tokens), the API used as a confused deputy, and a reason too large for any record.
//! Outcomes must be the ones the real votes dictate.

mod common;

use std::time::Duration;

use common::{System, request, step};
use futures::StreamExt;
use serde_json::{Value, json};
use txcoord::participant::BranchState;
use txcoord::proto::{CommandKind, ParticipantCommand, Reason, TxnState};

async fn stats(sys: &System) -> Value {
    sys.stats().await
}

/// Waits (up to 10 s) until the coordinator's counter `key` is at least `at_least`.
async fn wait_stat(sys: &System, key: &str, at_least: u64) {
    let start = std::time::Instant::now();
    while stats(sys).await[key].as_u64() < Some(at_least) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{key} never reached {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `ready` vote from `service` for step `step` of `txn_id`.
fn ready(txn_id: &str, service: &str, step: usize, attempt: u32, token: Option<&str>) -> Value {
    let mut r = json!({"txn_id": txn_id, "service": service, "step": step, "kind": "prepare",
        "outcome": "ready", "attempt": attempt});
    if let Some(t) = token {
        r["token"] = json!(t);
    }
    r
}

async fn publish(sys: &System, subject: &str, msg_id: &str, body: &Value) {
    let js = async_nats::jetstream::new(sys.nc.clone());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id);
    js.publish_with_headers(subject.to_string(), headers, body.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_votes_do_not_change_an_outcome() {
    let sys = System::start(&["a", "b"], &[]).await;
    let id = "forged-1";
    // Service `a` reads its own commands (it may): it learns its own token.
    let mut a_cmds = sys.nc.subscribe("txn.cmd.a.>").await.unwrap();
    // b votes abort, slowly: every forgery is in the reply stream before the real vote.
    sys.submit(
        &request(
            id,
            vec![
                step("a", json!({})),
                step(
                    "b",
                    json!({"vote": "abort", "reason": "real refusal", "delay_ms": 1500}),
                ),
            ],
        ),
        id,
    )
    .await;
    let a_prepare: ParticipantCommand = loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), a_cmds.next())
            .await
            .expect("a's prepare")
            .unwrap();
        let cmd: ParticipantCommand = serde_json::from_slice(&msg.payload).unwrap();
        if cmd.kind == CommandKind::Prepare {
            break cmd;
        }
    };
    let a_token = a_prepare.token.clone().expect("commands carry a token");
    assert_eq!(a_prepare.reply_to, format!("txn.reply.a.{id}"));

    let attacks = [
        // Ahead of the real vote, on b's own reply subject, without a token.
        ("txn.reply.b.forged-1", "x1", ready(id, "b", 1, 1, None)),
        // With the message id the real vote would have had before tokens.
        (
            "txn.reply.b.forged-1",
            "forged-1.b.1.prepare.1",
            ready(id, "b", 1, 1, None),
        ),
        // A made-up attempt and token.
        (
            "txn.reply.b.forged-1",
            "x3",
            ready(id, "b", 1, 999, Some("0123456789abcdef0123456789abcdef")),
        ),
        // On the old, shared reply subject.
        ("txn.reply.forged-1", "x4", ready(id, "b", 1, 1, None)),
        // On another transaction's reply subject.
        ("txn.reply.b.other-txn", "x5", ready(id, "b", 1, 1, None)),
        // From service a, which knows a real token (its own) and votes for b with it.
        (
            "txn.reply.b.forged-1",
            "x6",
            ready(id, "b", 1, 1, Some(&a_token)),
        ),
        // And a's own token on b's behalf, on a's subject.
        (
            "txn.reply.a.forged-1",
            "x7",
            ready(id, "b", 1, 1, Some(&a_token)),
        ),
    ];
    for (subject, msg_id, body) in &attacks {
        publish(&sys, subject, msg_id, body).await;
    }

    let ev = sys.wait_state(id, |e| e.state.is_terminal()).await;
    assert_eq!(ev.state, TxnState::Aborted, "{ev:?}");
    assert_eq!(
        ev.reason,
        Some(Reason::VoteAbort {
            service: "b".into(),
            step: 1,
            message: "real refusal".into()
        })
    );
    sys.wait_branch("a", id, 0, BranchState::Aborted).await;
    let rejected = stats(&sys).await["rejected_replies"].as_u64().unwrap();
    assert!(
        rejected >= attacks.len() as u64,
        "{rejected} rejected; coordinator log:\n{}",
        sys.coordinator.log_text()
    );
    // Each rejection says who could have sent it (the subject's owner) and who it claimed.
    let log = sys.coordinator.log_text();
    let rejections: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("participant reply rejected"))
        .collect();
    assert!(
        rejections.iter().any(|l| l.contains("txn.reply.a.forged-1")
            && l.contains(r#"sent_by=the identity of service "a""#)
            && l.contains("claimed_service=b")
            && l.contains("msg_id=x7")),
        "{rejections:#?}"
    );
    assert!(
        rejections
            .iter()
            .any(|l| l.contains("sent_by=anyone who may publish on the shared reply subject")),
        "{rejections:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_only_to_inboxes() {
    let sys = System::start(&["a"], &[]).await;
    let ev = sys.run(request("victim", vec![step("a", json!({}))])).await;
    assert_eq!(ev.state, TxnState::Committed);
    // Ask for status with the victim's log, and a service's command subject, as reply.
    let query = json!({"txn_id": "victim"}).to_string();
    for reply in ["txn.events.victim", "txn.cmd.a.victim"] {
        sys.nc
            .publish_with_reply("txn.api.status", reply, query.clone().into())
            .await
            .unwrap();
    }
    sys.nc.flush().await.unwrap();
    wait_stat(&sys, "refused_api_requests", 2).await;
    // The victim's last record is still its own outcome, and the service got no command.
    let last = sys.client.last_event("victim").await.expect("log");
    assert_eq!(last.state, TxnState::Committed);
    assert_eq!(
        sys.client.status("victim").await.unwrap().state,
        TxnState::Committed
    );
    assert!(
        !sys.participant_log("a").log_text().contains("malformed"),
        "{}",
        sys.participant_log("a").log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_abort_reason_is_cut_and_the_transaction_ends() {
    let sys = System::start(&["a", "b"], &[]).await;
    // Close to the test server's 8 MiB max_payload, and metadata besides: the decision record
    // could not be written if it carried the reason whole.
    let mut req = request(
        "huge-reason",
        vec![
            step("a", json!({})),
            step(
                "b",
                json!({"vote": "abort", "reason": "no! ", "reason_repeat": 2_000_000}),
            ),
        ],
    );
    req["metadata"] = json!({"note": "x".repeat(100_000)});
    let ev = sys.run(req).await;
    assert_eq!(ev.state, TxnState::Aborted, "{ev:?}");
    let Some(Reason::VoteAbort { message, .. }) = &ev.reason else {
        panic!("{ev:?}")
    };
    assert!(message.len() <= 1024, "{} bytes", message.len());
    assert!(message.starts_with("no! no! "), "{message}");
    assert!(
        message.ends_with("[cut: 8000000 bytes in all]"),
        "{message}"
    );
    sys.wait_branch("a", "huge-reason", 0, BranchState::Aborted)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_txn_id_is_an_error_and_no_phantom_record() {
    let sys = System::start(&["a", "b"], &[]).await;
    let first = request("reuse-1", vec![step("a", json!({}))]);
    assert_eq!(sys.run(first.clone()).await.state, TxnState::Committed);
    let mut watch = sys.nc.subscribe("txn.events.reuse-1").await.unwrap();
    sys.nc.flush().await.unwrap();

    // Another request under the same id: a SubmitError naming the existing outcome.
    let other = request(
        "reuse-1",
        vec![step("a", json!({"x": 1})), step("b", json!({}))],
    );
    sys.submit(&other, "reuse-1-other").await;
    let start = std::time::Instant::now();
    let err = loop {
        if let Some(e) = sys
            .client
            .errors()
            .await
            .into_iter()
            .find(|e| e.txn_id.as_deref() == Some("reuse-1"))
        {
            break e;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no SubmitError");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(err.kind, "duplicate_txn_id");
    assert_eq!(err.path.as_deref(), Some("txn_id"));
    assert!(err.message.contains("committed"), "{}", err.message);
    // Core subscribers of the transaction's subject saw nothing: no phantom `accepted`.
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), watch.next()).await {
        panic!(
            "phantom record on {}: {}",
            m.subject,
            String::from_utf8_lossy(&m.payload)
        );
    }

    // The same request again is a retry, not an error.
    let dups = stats(&sys).await["duplicates"].as_u64().unwrap();
    sys.submit(&first, "reuse-1-retry").await;
    let start = std::time::Instant::now();
    while stats(&sys).await["duplicates"].as_u64().unwrap() == dups {
        assert!(start.elapsed() < Duration::from_secs(10), "retry not seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let errors = sys.client.errors().await;
    assert_eq!(
        errors
            .iter()
            .filter(|e| e.txn_id.as_deref() == Some("reuse-1"))
            .count(),
        1,
        "{errors:?}"
    );

    // The API: another request under the id is an error that names the outcome; the same
    // request gets its outcome.
    let ask = |body: &Value| {
        let nc = sys.nc.clone();
        let body = body.to_string();
        async move {
            let r = nc
                .request("txn.api.execute", body.into())
                .await
                .expect("answer");
            serde_json::from_slice::<Value>(&r.payload).unwrap()
        }
    };
    let answer = ask(&other).await;
    let text = answer["error"].as_str().unwrap_or_default();
    assert!(
        text.contains("taken by another request") && text.contains("committed"),
        "{answer}"
    );
    let answer = ask(&first).await;
    assert_eq!(answer["state"], "committed", "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_to_one_service_does_not_starve_the_others() {
    let sys = System::start(
        &["a"],
        &[
            ("TXCOORD_MAX_IN_FLIGHT", "20"),
            ("TXCOORD_MAX_IN_FLIGHT_PER_SERVICE", "10"),
        ],
    )
    .await;
    // 30 transactions an hour long, to a service that does not exist: more than the
    // coordinator's every slot.
    for i in 0..30 {
        let mut r = request(&format!("flood-{i}"), vec![step("ghost", json!({}))]);
        r["timeout_ms"] = json!(3_600_000);
        sys.submit(&r, &format!("flood-{i}")).await;
    }
    wait_stat(&sys, "held_back", 1).await;
    // A good transaction still gets a slot.
    let ev = sys
        .run(request("good-after-flood", vec![step("a", json!({}))]))
        .await;
    assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
    let s = stats(&sys).await;
    assert!(s["in_flight"].as_u64() <= Some(10), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_client_does_not_starve_the_others() {
    let sys = System::start(
        &["a"],
        &[
            ("TXCOORD_MAX_IN_FLIGHT", "20"),
            ("TXCOORD_MAX_IN_FLIGHT_PER_SERVICE", "0"),
            ("TXCOORD_MAX_IN_FLIGHT_PER_CLIENT", "10"),
        ],
    )
    .await;
    // One client sends 30 hour-long transactions (to a service that never answers).
    let flooder = txcoord::client::Client::new(sys.nc.clone(), "txn")
        .await
        .unwrap()
        .as_client("flooder");
    for i in 0..30 {
        let mut r = request(&format!("cflood-{i}"), vec![step("ghost", json!({}))]);
        r["timeout_ms"] = json!(3_600_000);
        flooder
            .submit_raw(r.to_string().into(), &format!("cflood-{i}"))
            .await
            .unwrap();
    }
    wait_stat(&sys, "held_back", 1).await;
    // Another client still gets a slot.
    let other = txcoord::client::Client::new(sys.nc.clone(), "txn")
        .await
        .unwrap()
        .as_client("shop");
    let ev = other
        .submit_and_wait(
            vec![request("shop-after-flood", vec![step("a", json!({}))])],
            Duration::from_secs(30),
        )
        .await
        .remove(0)
        .expect("an outcome");
    assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_stream_from_an_older_txcoord_gets_the_named_subjects() {
    let nats = txcoord::natsserver::NatsServer::start().unwrap();
    {
        let nc = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(nc);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "TXN_SUBMIT".into(),
            subjects: vec!["txn.submit".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let sys = System::start_on(nats, &["a"], &[]).await;
    let named = txcoord::client::Client::new(sys.nc.clone(), "txn")
        .await
        .unwrap()
        .as_client("shop");
    let ev = named
        .submit_and_wait(
            vec![request("named-1", vec![step("a", json!({}))])],
            Duration::from_secs(30),
        )
        .await
        .remove(0)
        .expect("an outcome");
    assert_eq!(ev.state, TxnState::Committed);
    let js = async_nats::jetstream::new(sys.nc.clone());
    let mut stream = js.get_stream("TXN_SUBMIT").await.unwrap();
    let subjects = stream.info().await.unwrap().config.subjects.clone();
    assert_eq!(subjects, ["txn.submit", "txn.submit.*"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_message_in_a_log_does_not_hide_its_outcome() {
    let sys = System::start(&["a"], &[]).await;
    let ev = sys
        .run(request("victim-2", vec![step("a", json!({}))]))
        .await;
    assert_eq!(ev.state, TxnState::Committed);
    // The micro-service endpoints are a deputy too: their answers go only to inboxes.
    let refused = stats(&sys).await["refused_api_requests"].as_u64().unwrap();
    for verb in ["PING", "INFO", "STATS"] {
        sys.nc
            .publish_with_reply(
                format!("$SRV.{verb}.txcoord"),
                "txn.events.victim-2",
                "".into(),
            )
            .await
            .unwrap();
    }
    sys.nc.flush().await.unwrap();
    wait_stat(&sys, "refused_api_requests", refused + 3).await;
    let js = async_nats::jetstream::new(sys.nc.clone());
    let stream = js.get_stream("TXN_EVENTS").await.unwrap();
    let last = stream
        .direct_get_last_for_subject("txn.events.victim-2")
        .await
        .unwrap();
    assert!(
        serde_json::from_slice::<txcoord::proto::TransactionEvent>(&last.payload).is_ok(),
        "something foreign landed in the log"
    );
    // Someone with publish rights on the log stores a foreign message anyway: the outcome
    // still reads as the log's last real record.
    sys.publish_stored("txn.log.victim-2".into(), br#"{"not":"an event"}"#.to_vec())
        .await;
    assert_eq!(
        sys.client.last_event("victim-2").await.map(|e| e.state),
        Some(TxnState::Committed)
    );
    assert_eq!(
        sys.client.status("victim-2").await.unwrap().state,
        TxnState::Committed
    );
}

/// Without per-user permissions anyone may store anything on a log's subject. A foreign
/// message there is skipped by every reader and writer: it fences nobody, hides no record,
/// and a coordinator that restarts after it still resumes the transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_messages_in_a_running_log_are_written_after_and_recovered_past() {
    let mut sys = System::start(&["a", "b"], &[]).await;
    let url = sys.nats.url();
    let junk = || br#"{"not":"an event"}"#.to_vec();
    // A log squatted before its transaction exists.
    sys.publish_stored("txn.log.squat-1".into(), junk()).await;
    let ev = sys
        .run(request("squat-1", vec![step("a", json!({}))]))
        .await;
    assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
    // Junk stored while the coordinator waits for b's vote: its next record goes after it.
    for (id, kill) in [("junk-run", false), ("junk-kill", true)] {
        sys.submit(
            &request(
                id,
                vec![step("a", json!({})), step("b", json!({"delay_ms": 2000}))],
            ),
            id,
        )
        .await;
        sys.participant("a")
            .wait_for(&format!("VOTED Ready txn_id={id}"), Duration::from_secs(10))
            .await;
        sys.publish_stored(format!("txn.log.{id}"), junk()).await;
        if !kill {
            let ev = sys.wait_state(id, |e| e.state.is_terminal()).await;
            assert_eq!(ev.state, TxnState::Committed, "{id}: {ev:?}");
            wait_stat(&sys, "foreign_log_messages", 1).await;
        } else {
            // The log now ends in junk; the restarted coordinator must find the record before.
            sys.coordinator.kill9();
            sys.coordinator.restart_with(&[("TXCOORD_NATS_URL", &url)]);
        }
        let ev = sys.wait_state(id, |e| e.state.is_terminal()).await;
        assert_eq!(ev.state, TxnState::Committed, "{id}: {ev:?}");
        sys.wait_branch("b", id, 1, BranchState::Committed).await;
    }
    // The restarted coordinator saw the junk that ends junk-kill's log as it recovered.
    wait_stat(&sys, "foreign_log_messages", 1).await;
}
