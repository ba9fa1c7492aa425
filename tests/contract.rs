//! The wire contract: every message the running system emits (commands, replies, events in
//! every state, submission errors, API replies) validates against its schema in `schemas/`.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{System, check, request, step, validator};
use futures::StreamExt;
use serde_json::{Value, json};
use txcoord::proto::TxnState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_emitted_message_matches_its_schema() {
    let env = [
        ("TXCOORD_STUCK_AFTER_MS", "300"),
        ("TXCOORD_RETRY_BASE_MS", "100"),
    ];
    let mut sys = System::start(&["a", "b"], &env).await;
    type Captured = Arc<Mutex<Vec<(String, Vec<u8>)>>>;
    let captured: Captured = Arc::default();
    let mut tap = sys.nc.subscribe("txn.>").await.unwrap();
    let sink = captured.clone();
    let tap_task = tokio::spawn(async move {
        while let Some(m) = tap.next().await {
            sink.lock()
                .unwrap()
                .push((m.subject.to_string(), m.payload.to_vec()));
        }
    });
    sys.nc.flush().await.unwrap();

    // Every path: commit, read-only, vote abort, timeout, rejection, submission error.
    let mut timeout = request(
        "c-timeout",
        vec![step("a", json!({})), step("ghost", json!({}))],
    );
    timeout["timeout_ms"] = json!(400);
    let reqs = vec![
        request("c-commit", vec![step("a", json!({})), step("b", json!({}))]),
        request(
            "c-ro",
            vec![
                step("a", json!({"vote": "read_only"})),
                step("b", json!({})),
            ],
        ),
        request(
            "c-abort",
            vec![
                step("a", json!({})),
                step("b", json!({"vote": "abort", "reason": "no"})),
            ],
        ),
        timeout,
        json!({"txn_id": "c-rejected", "steps": []}),
    ];
    let outs = sys
        .client
        .submit_and_wait(reqs, Duration::from_secs(30))
        .await;
    assert!(outs.iter().all(|o| o.is_ok()), "{outs:?}");
    sys.client
        .submit_raw("{nope".into(), "c-error")
        .await
        .unwrap();

    // A stuck commit: b votes and dies before the decision.
    let req = request(
        "c-stuck",
        vec![step("a", json!({"delay_ms": 500})), step("b", json!({}))],
    );
    sys.client
        .submit_raw(serde_json::to_vec(&req).unwrap().into(), "c-stuck")
        .await
        .unwrap();
    sys.wait_vote("c-stuck", 1).await;
    sys.participant("b").kill9();
    sys.wait_state("c-stuck", |e| e.stuck).await;
    sys.participant("b").restart();
    sys.wait_state("c-stuck", |e| e.state == TxnState::Committed)
        .await;

    // Sagas: success, a failure with compensation, and a compensation that stays failed.
    let saga = |id: &str, steps: Vec<Value>| json!({"txn_id": id, "mode": "saga", "steps": steps});
    let sagas = vec![
        saga(
            "c-saga-ok",
            vec![step("a", json!({})), step("b", json!({}))],
        ),
        saga(
            "c-saga-undo",
            vec![step("a", json!({})), step("b", json!({"execute": "fail"}))],
        ),
        saga(
            "c-saga-failed",
            vec![
                step("a", json!({"compensate": "never"})),
                step("b", json!({"execute": "fail"})),
            ],
        ),
    ];
    let outs = sys
        .client
        .submit_and_wait(sagas, Duration::from_secs(30))
        .await;
    let states: Vec<_> = outs
        .iter()
        .map(|o| o.as_ref().map(|e| e.state).ok())
        .collect();
    assert_eq!(
        states,
        [
            Some(TxnState::Completed),
            Some(TxnState::Compensated),
            Some(TxnState::Failed)
        ]
    );

    // API replies.
    let api = |subject: &'static str, body: Value| {
        let nc = sys.nc.clone();
        async move {
            let reply = nc.request(subject, body.to_string().into()).await.unwrap();
            serde_json::from_slice::<Value>(&reply.payload).unwrap()
        }
    };
    let executed = api(
        "txn.api.execute",
        request("c-api", vec![step("a", json!({}))]),
    )
    .await;
    let status = api("txn.api.status", json!({"txn_id": "c-abort"})).await;
    let unknown = api("txn.api.status", json!({"txn_id": "c-none"})).await;
    let garbled = api("txn.api.status", json!({"id": 1})).await;
    let bad_exec = api("txn.api.execute", json!("nope")).await;

    tokio::time::sleep(Duration::from_millis(300)).await;
    tap_task.abort();

    let event = validator("transaction-event");
    let command = validator("participant-command");
    let reply = validator("participant-reply");
    let command_batch = validator("command-batch");
    let reply_batch = validator("reply-batch");
    let error = validator("submit-error");
    let req_schema = validator("transaction-request");
    let api_error = validator("api-error");
    check(&event, "transaction-event", "txn.api.execute", &executed);
    check(&event, "transaction-event", "txn.api.status", &status);
    check(&api_error, "api-error", "txn.api.status", &unknown);
    check(&api_error, "api-error", "txn.api.status", &garbled);
    check(&api_error, "api-error", "txn.api.execute", &bad_exec);
    check(
        &validator("status-request"),
        "status-request",
        "-",
        &json!({"txn_id": "x"}),
    );

    let mut seen = BTreeSet::new();
    for (subject, payload) in captured.lock().unwrap().iter() {
        let Ok(msg) = serde_json::from_slice::<Value>(payload) else {
            assert!(subject == "txn.submit", "{subject} carried non-JSON");
            continue;
        };
        let parts: Vec<&str> = subject.split('.').collect();
        match parts.get(1).copied() {
            Some("events") => {
                check(&event, "transaction-event", subject, &msg);
                seen.insert(format!("state:{}", msg["state"].as_str().unwrap()));
                if msg["stuck"] == json!(true) {
                    seen.insert("stuck".into());
                }
            }
            Some("cmd") if parts.get(3) == Some(&"batch") => {
                check(&command_batch, "command-batch", subject, &msg);
                for c in msg["commands"].as_array().unwrap() {
                    seen.insert(format!("cmd:{}", c["kind"].as_str().unwrap()));
                }
                seen.insert("command-batch".into());
            }
            Some("cmd") => {
                check(&command, "participant-command", subject, &msg);
                seen.insert(format!("cmd:{}", msg["kind"].as_str().unwrap()));
            }
            Some("reply") if parts.get(3) == Some(&"batch") => {
                check(&reply_batch, "reply-batch", subject, &msg);
                for r in msg["replies"].as_array().unwrap() {
                    seen.insert(format!("reply:{}", r["outcome"].as_str().unwrap()));
                }
                seen.insert("reply-batch".into());
            }
            Some("reply") => {
                check(&reply, "participant-reply", subject, &msg);
                seen.insert(format!("reply:{}", msg["outcome"].as_str().unwrap()));
            }
            Some("errors") => {
                check(&error, "submit-error", subject, &msg);
                seen.insert("error".into());
            }
            Some("submit") if msg["txn_id"] != json!("c-rejected") => {
                check(&req_schema, "transaction-request", subject, &msg);
                seen.insert("submit".into());
            }
            _ => {}
        }
    }
    let want = [
        "state:accepted",
        "state:preparing",
        "state:committing",
        "state:aborting",
        "state:committed",
        "state:aborted",
        "state:rejected",
        "stuck",
        "cmd:prepare",
        "cmd:commit",
        "cmd:abort",
        "reply:ready",
        "reply:read_only",
        "reply:abort",
        "reply:done",
        "error",
        "submit",
    ];
    for w in want {
        assert!(
            seen.contains(w),
            "the scenario never produced {w}; saw {seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_unconfirmed_too_long_is_flagged_stuck_and_still_retried() {
    let env = [
        ("TXCOORD_STUCK_AFTER_MS", "300"),
        ("TXCOORD_RETRY_BASE_MS", "50"),
        ("TXCOORD_RETRY_CAP_MS", "200"),
    ];
    let mut sys = System::start(&["a", "b"], &env).await;
    let req = request(
        "stuck-1",
        vec![step("a", json!({"delay_ms": 300})), step("b", json!({}))],
    );
    sys.client
        .submit_raw(serde_json::to_vec(&req).unwrap().into(), "stuck-1")
        .await
        .unwrap();
    sys.wait_vote("stuck-1", 1).await;
    sys.participant("b").kill9();
    sys.wait_state("stuck-1", |e| e.stuck && e.state == TxnState::Committing)
        .await;
    let status = sys.client.status("stuck-1").await.unwrap();
    assert!(status.stuck, "status shows the flag: {status:?}");
    assert!(status.steps[0].done && !status.steps[1].done);
    // Still retried, each round with a higher attempt.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let later = sys.client.status("stuck-1").await.unwrap();
    assert!(later.steps[1].decision_attempt >= 3, "{later:?}");
    assert_eq!(
        later.state,
        TxnState::Committing,
        "a decided commit never turns into an abort"
    );
    sys.participant("b").restart();
    let ev = sys
        .wait_state("stuck-1", |e| e.state == TxnState::Committed)
        .await;
    assert!(ev.steps.iter().all(|s| s.done));
}
