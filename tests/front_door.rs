//! The HTTP front door of `txcoord serve` (`http_listen`), with real processes and a real
//! HTTP client: submit (202, or the final event with `?wait=true` or `Prefer: wait`), the
//! status with every vote, a retry of the same request, and every error status: 400 with
//! the JSON path, 404, 409 for a txn_id reused with another body, 413, and 503 from a
//! standby that does not hold the lease (and its answers once it takes over), and 503
//! while NATS is down (a submission it could not store, a status it could not read).

mod common;

use std::time::Duration;

use common::System;
use serde_json::{Value, json};

fn free_port() -> u16 {
    txcoord::natsserver::free_port().expect("a free port")
}

async fn start() -> (System, String) {
    start_with(&[]).await
}

/// A coordinator with the front door, and `env` besides.
async fn start_with(env: &[(&str, &str)]) -> (System, String) {
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let mut all = vec![
        ("TXCOORD_HTTP_LISTEN", listen.as_str()),
        ("TXCOORD_MAX_REQUEST_BYTES", "4096"),
    ];
    all.extend_from_slice(env);
    let sys = System::start(&["a"], &all).await;
    (sys, format!("http://{listen}"))
}

fn one_step(id: &str) -> Value {
    json!({"txn_id": id, "mode": "2pc", "steps": [{"service": "a", "action": "act", "payload": {}}]})
}

async fn post(base: &str, query: &str, body: &Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/transactions{query}"))
        .json(body)
        .send()
        .await
        .expect("POST");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("a JSON body"))
}

async fn get(base: &str, id: &str) -> (u16, Value) {
    let resp = reqwest::get(format!("{base}/v1/transactions/{id}"))
        .await
        .expect("GET");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("a JSON body"))
}

fn assert_error(status: u16, body: &Value, want: u16, kind: &str) {
    common::check(
        &common::validator("api-error"),
        "api-error",
        "the front door",
        body,
    );
    assert_eq!(status, want, "{body}");
    assert_eq!(body["status"], want, "{body}");
    assert_eq!(body["kind"], kind, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_status_and_a_retry() {
    let (_sys, base) = start().await;
    let (status, body) = post(&base, "", &one_step("fd-1")).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["txn_id"], "fd-1");
    // The status, with every vote, once it has committed.
    let mut last = Value::Null;
    for _ in 0..100 {
        let (s, b) = get(&base, "fd-1").await;
        assert_eq!(s, 200, "{b}");
        last = b;
        if last["state"] == "committed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last["state"], "committed", "{last}");
    assert_eq!(last["steps"][0]["vote"], "ready", "{last}");
    // Waiting: the final event.
    let (status, ev) = post(&base, "?wait=true", &one_step("fd-2")).await;
    assert_eq!(status, 200, "{ev}");
    assert_eq!(ev["state"], "committed");
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/transactions"))
        .header("Prefer", "wait")
        .json(&json!({"steps": [{"service": "a", "action": "act", "payload": {}}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let ev: Value = resp.json().await.unwrap();
    assert_eq!(
        ev["state"], "committed",
        "an id is given when the request has none"
    );
    assert!(ev["txn_id"].as_str().is_some_and(|id| !id.is_empty()));
    // The same request again is its own outcome, not a second transaction.
    let (status, again) = post(&base, "?wait=true", &one_step("fd-2")).await;
    assert_eq!(status, 200);
    assert_eq!(again["state"], "committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_has_its_status_and_one_shape() {
    let (_sys, base) = start().await;
    // 400, with the JSON path.
    let bad = json!({"steps": [{"service": "no spaces allowed", "action": "act"}]});
    let (status, body) = post(&base, "", &bad).await;
    assert_error(status, &body, 400, "invalid_request");
    assert!(
        body["path"]
            .as_str()
            .is_some_and(|p| p.contains("steps[0]")),
        "{body}"
    );
    // A step named by a URL that no http_allow entry covers (this one has none).
    let by_url = json!({"steps": [{"url": "http://10.0.0.1/ship", "action": "ship"}]});
    let (status, body) = post(&base, "", &by_url).await;
    assert_error(status, &body, 400, "invalid_request");
    assert_eq!(body["path"], "steps[0].url", "{body}");
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/transactions"))
        .header("Content-Type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    assert_error(status, &resp.json().await.unwrap(), 400, "invalid_request");
    // 404: an unknown id, an unknown path.
    let (status, body) = get(&base, "never-submitted").await;
    assert_error(status, &body, 404, "not_found");
    let resp = reqwest::get(format!("{base}/v2/whatever")).await.unwrap();
    let status = resp.status().as_u16();
    assert_error(status, &resp.json().await.unwrap(), 404, "not_found");
    // 409: a txn_id reused with another body.
    let (status, _) = post(&base, "?wait=true", &one_step("fd-taken")).await;
    assert_eq!(status, 200);
    let mut other = one_step("fd-taken");
    other["steps"][0]["action"] = json!("something else");
    let (status, body) = post(&base, "", &other).await;
    assert_error(status, &body, 409, "txn_id_taken");
    // 413: over max_request_bytes (4096 here).
    let mut huge = one_step("fd-huge");
    huge["steps"][0]["payload"] = json!({"pad": "x".repeat(8192)});
    let (status, body) = post(&base, "", &huge).await;
    assert_error(status, &body, 413, "too_large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_answers_503_until_it_holds_the_lease() {
    let (sys, _base) = start().await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let standby = sys
        .spawn_standby(
            &[("TXCOORD_HTTP_LISTEN", listen.as_str())],
            "HTTP front door",
        )
        .await;
    let standby_base = format!("http://{listen}");
    let (status, body) = post(&standby_base, "", &one_step("fd-standby")).await;
    assert_error(status, &body, 503, "unavailable");
    let (status, body) = get(&standby_base, "fd-standby").await;
    assert_error(status, &body, 503, "unavailable");
    // The active one dies: once its lease runs out the standby takes over and answers.
    let mut sys = sys;
    sys.coordinator.kill9();
    standby
        .wait_for("coordinator ready", Duration::from_secs(30))
        .await;
    let (status, ev) = post(&standby_base, "?wait=true", &one_step("fd-standby")).await;
    assert_eq!(status, 200, "{ev}");
    assert_eq!(ev["state"], "committed", "{ev}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nats_down_the_front_door_answers_503_and_a_retry_later_runs_once() {
    // A lease that outlasts the outage: a coordinator cut off from NATS for longer than its
    // lease stops (a restart recovers from the log), and this test is about the front door.
    let (mut sys, base) = start_with(&[("TXCOORD_LEASE_TTL_MS", "60000")]).await;
    let (status, ev) = post(&base, "?wait=true", &one_step("fd-before")).await;
    assert_eq!(status, 200, "{ev}");
    sys.nats.stop();
    let (status, body) = post(&base, "?wait=true", &one_step("fd-down")).await;
    assert_error(status, &body, 503, "unavailable");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("not accepted by NATS")),
        "{body}"
    );
    // A known transaction whose log cannot be read is not "unknown".
    let (status, body) = get(&base, "fd-before").await;
    assert_error(status, &body, 503, "unavailable");
    sys.nats.restart().expect("nats-server back");
    // The client's retry of the refused request, once NATS is back, runs it once.
    let mut answer = (0, Value::Null);
    for _ in 0..60 {
        answer = post(&base, "?wait=true", &one_step("fd-down")).await;
        if answer.0 != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(answer.0, 200, "{}", answer.1);
    assert_eq!(answer.1["state"], "committed", "{}", answer.1);
    let history = sys.client.history("fd-down").await;
    assert_eq!(
        history
            .iter()
            .filter(|e| e.state == txcoord::proto::TxnState::Accepted)
            .count(),
        1,
        "{history:?}"
    );
    let (status, ev) = get(&base, "fd-before").await;
    assert_eq!(status, 200, "{ev}");
    assert_eq!(ev["state"], "committed");
}
