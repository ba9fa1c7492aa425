//! Waiting only for the decision (`Until::Decided`): through `txn.api.execute` with the
//! `Txcoord-Wait: decided` header, a submission naming an inbox in `Txcoord-Decided-To`
//! (and `txcoord submit --until decided`, which submits that way), the front door's
//! `?wait=decided`, with real processes. The answer is `committing` once the decision is
//! durable although a participant that must confirm is dead, and the outcome follows when
//! it comes back; an abort vote answers `aborting` (or `aborted`); a one-phase transaction
//! has no earlier decision than its outcome; a bad wait value is a clear error; a decision
//! or outcome header naming anything but an inbox is ignored, so nobody can make the
//! coordinator publish on a subject of their choosing.

mod common;

use std::time::Duration;

use common::{System, request, step};
use serde_json::{Value, json};
use txcoord::proto::{TxnState, Until, WAIT_HEADER};

async fn start() -> (System, String) {
    let port = txcoord::natsserver::free_port().expect("a free port");
    let listen = format!("127.0.0.1:{port}");
    let sys = System::start(&["a", "b"], &[("TXCOORD_HTTP_LISTEN", listen.as_str())]).await;
    (sys, format!("http://{listen}"))
}

/// `a` votes at once, `b` a little later: time enough to kill `a` after its vote and before
/// the decision, so the decision is made but nobody can confirm it until `a` is back.
fn slow_second(id: &str) -> Value {
    request(
        id,
        vec![step("a", json!({})), step("b", json!({"delay_ms": 400}))],
    )
}

/// Runs `wait` while `a` is killed after its vote; answers what `wait` answered, with `a`
/// still down.
async fn with_a_killed_after_its_vote<F>(sys: &mut System, id: &str, wait: F) -> Value
where
    F: std::future::Future<Output = Value> + Send + 'static,
{
    let answer = tokio::spawn(wait);
    sys.wait_vote(id, 0).await;
    sys.participant("a").kill9();
    tokio::time::timeout(Duration::from_secs(30), answer)
        .await
        .expect("an answer at the decision, while a participant is down")
        .expect("the waiting task")
}

/// `a` comes back and confirms: the outcome the decision promised.
async fn the_outcome_follows(sys: &mut System, id: &str) {
    sys.participant("a").restart();
    let ev = sys.wait_state(id, |e| e.state.is_outcome()).await;
    assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
}

/// [`slow_second`] through `txn.api.execute`, waiting for the decision.
async fn decided_through_the_api(
    client: &txcoord::client::Client,
    id: &str,
) -> txcoord::proto::TransactionEvent {
    client
        .execute(slow_second(id), Until::Decided, Duration::from_secs(60))
        .await
        .expect("an answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_at_the_durable_decision_and_the_outcome_follows() {
    let (mut sys, _base) = start().await;
    let client = sys.client.clone();
    let wait = async move {
        serde_json::to_value(decided_through_the_api(&client, "dc-api").await).expect("an event")
    };
    let ev = with_a_killed_after_its_vote(&mut sys, "dc-api", wait).await;
    assert_eq!(ev["state"], "committing", "{ev}");
    // The answer is what the log holds: the decision is durable, not merely announced.
    let last = sys.client.last_event("dc-api").await.expect("a record");
    assert_eq!(last.state, TxnState::Committing, "{last:?}");
    the_outcome_follows(&mut sys, "dc-api").await;
    // Asked again once it is over: the outcome at once (a decided wait ends at any
    // outcome, the recorded one included).
    let again = decided_through_the_api(&sys.client, "dc-api").await;
    assert_eq!(again.state, TxnState::Committed, "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_naming_an_inbox_hears_the_durable_decision() {
    let (mut sys, _base) = start().await;
    // What the coordinator sends to the client's inbox, seen by a second subscriber.
    let inbox = sys.client.outcomes().decided_to().to_string();
    let mut notices = sys.nc.subscribe(inbox).await.expect("subscribe");
    let client = sys.client.clone();
    let wait = async move {
        let mut got = client
            .submit_until(
                vec![slow_second("dc-sub")],
                Until::Decided,
                Duration::from_secs(60),
                |_, _| {},
            )
            .await;
        serde_json::to_value(got.remove(0).expect("an answer")).expect("an event")
    };
    let ev = with_a_killed_after_its_vote(&mut sys, "dc-sub", wait).await;
    assert_eq!(ev["state"], "committing", "{ev}");
    let last = sys.client.last_event("dc-sub").await.expect("a record");
    assert_eq!(last.state, TxnState::Committing, "{last:?}");
    // The coordinator sent the decision, once, as a transaction event.
    let notice = tokio::time::timeout(
        Duration::from_secs(10),
        futures::StreamExt::next(&mut notices),
    )
    .await
    .expect("a decision notice")
    .expect("the subscription");
    let notice: Value = serde_json::from_slice(&notice.payload).expect("JSON");
    common::check(
        &common::validator("transaction-event"),
        "transaction-event",
        "the decision notice",
        &notice,
    );
    assert_eq!(notice["txn_id"], "dc-sub", "{notice}");
    assert_eq!(notice["state"], "committing", "{notice}");
    the_outcome_follows(&mut sys, "dc-sub").await;
    let again = tokio::time::timeout(
        Duration::from_millis(300),
        futures::StreamExt::next(&mut notices),
    )
    .await;
    assert!(again.is_err(), "a second notice: {again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_header_that_is_no_inbox_is_ignored_and_the_transaction_runs() {
    let (sys, _base) = start().await;
    // Someone names a subject of the coordinator's own, hoping it publishes there for them.
    let target = "txn.cmd.b.forged";
    let mut watch = sys
        .nc
        .subscribe(target.to_string())
        .await
        .expect("subscribe");
    let js = async_nats::jetstream::new(sys.nc.clone());
    let (decided, outcome) = (
        txcoord::proto::DECIDED_TO_HEADER,
        txcoord::proto::OUTCOME_TO_HEADER,
    );
    let forged = [
        ("dc-evil", decided, target),
        ("dc-wild", decided, "_INBOX.*"),
        ("oc-evil", outcome, target),
        ("oc-wild", outcome, "_INBOX.>"),
    ];
    for (id, header, to) in forged {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        headers.insert(header, to);
        let body = request(id, vec![step("a", json!({})), step("b", json!({}))]);
        js.publish_with_headers(
            "txn.submit".to_string(),
            headers,
            serde_json::to_vec(&body).expect("JSON").into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
        let ev = sys.wait_state(id, |e| e.state.is_outcome()).await;
        assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
    }
    // Nothing reached the subject, and the coordinator said why it ignored both.
    let quiet = tokio::time::timeout(
        Duration::from_millis(300),
        futures::StreamExt::next(&mut watch),
    )
    .await;
    assert!(
        quiet.is_err(),
        "the coordinator published on {target}: {quiet:?}"
    );
    let log = sys.coordinator.log_text();
    for (id, why) in [
        ("dc-evil", "is not an inbox"),
        ("dc-wild", "not a subject one can publish on"),
        ("oc-evil", "is not an inbox"),
        ("oc-wild", "not a subject one can publish on"),
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("header ignored") && l.contains(id) && l.contains(why)),
            "{id}: {log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_door_answers_at_the_decision_with_wait_decided() {
    let (mut sys, base) = start().await;
    let url = format!("{base}/v1/transactions?wait=decided");
    let wait = async move {
        let resp = reqwest::Client::new()
            .post(url)
            .json(&slow_second("dc-http"))
            .send()
            .await
            .expect("POST");
        assert_eq!(resp.status().as_u16(), 200);
        resp.json::<Value>().await.expect("a JSON body")
    };
    let ev = with_a_killed_after_its_vote(&mut sys, "dc-http", wait).await;
    assert_eq!(ev["state"], "committing", "{ev}");
    assert_eq!(ev["steps"][0]["vote"], "ready", "{ev}");
    assert_eq!(ev["steps"][1]["vote"], "ready", "{ev}");
    the_outcome_follows(&mut sys, "dc-http").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_and_a_one_phase_commit_answer_their_decision() {
    let (sys, base) = start().await;
    // An abort vote: the decision is `aborting` (or already `aborted`), and it does not
    // take effect.
    let ev = sys
        .client
        .execute(
            request(
                "dc-no",
                vec![step("a", json!({})), step("b", json!({"vote": "abort"}))],
            ),
            Until::Decided,
            Duration::from_secs(60),
        )
        .await
        .expect("an answer");
    assert!(
        matches!(ev.state, TxnState::Aborting | TxnState::Aborted),
        "{ev:?}"
    );
    assert!(!ev.state.takes_effect());
    let ev = sys.wait_state("dc-no", |e| e.state.is_outcome()).await;
    assert_eq!(ev.state, TxnState::Aborted);
    // One step: committed in one phase, the decision and the outcome are one record.
    let one = request("dc-one", vec![step("a", json!({}))]);
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/transactions?wait=decided"))
        .json(&one)
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status().as_u16(), 200);
    let ev: Value = resp.json().await.expect("a JSON body");
    assert_eq!(ev["state"], "committed", "{ev}");
    // A saga has no decision before its outcome.
    let saga = json!({"txn_id": "dc-saga", "mode": "saga",
        "steps": [{"service": "a", "action": "act", "payload": {}}]});
    let ev = sys
        .client
        .execute(saga, Until::Decided, Duration::from_secs(60))
        .await
        .expect("an answer");
    assert_eq!(ev.state, TxnState::Completed, "{ev:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_wait_value_is_a_clear_error_and_runs_nothing() {
    let (sys, base) = start().await;
    // The front door: 400, naming the parameter and what it takes.
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/transactions?wait=soon"))
        .json(&request("dc-bad-http", vec![step("a", json!({}))]))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.expect("a JSON body");
    common::check(
        &common::validator("api-error"),
        "api-error",
        "the front door",
        &body,
    );
    assert_eq!(body["kind"], "invalid_request", "{body}");
    let text = body["error"].as_str().unwrap_or_default();
    assert!(
        text.contains("wait") && text.contains("soon") && text.contains("decided"),
        "{body}"
    );
    // The API: an error answer naming the header.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(WAIT_HEADER, "soon");
    let reply = sys
        .nc
        .send_request(
            "txn.api.execute".to_string(),
            async_nats::Request::new()
                .payload(
                    serde_json::to_vec(&request("dc-bad-api", vec![step("a", json!({}))]))
                        .expect("JSON")
                        .into(),
                )
                .headers(headers)
                .timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("an answer");
    let body: Value = serde_json::from_slice(&reply.payload).expect("a JSON answer");
    let text = body["error"].as_str().unwrap_or_default();
    assert!(
        text.contains(WAIT_HEADER) && text.contains("soon"),
        "{body}"
    );
    // Neither ran: no record of either.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sys.client.last_event("dc-bad-http").await.is_none());
    assert!(sys.client.last_event("dc-bad-api").await.is_none());
    // The CLI refuses it before connecting.
    let out = sys.cli(&["submit", "--until", "soon", "-"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expected \"outcome\" or \"decided\""),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_submits_until_decided() {
    let (mut sys, _base) = start().await;
    let file = sys.dir.path().join("requests.jsonl");
    let lines = [
        request("dc-cli-1", vec![step("a", json!({})), step("b", json!({}))]),
        request(
            "dc-cli-2",
            vec![step("a", json!({})), step("b", json!({"vote": "abort"}))],
        ),
    ]
    .iter()
    .map(Value::to_string)
    .collect::<Vec<_>>()
    .join("\n");
    std::fs::write(&file, lines).expect("write");
    let path = file.to_str().expect("a UTF-8 path").to_string();
    let out = sys.cli(&["submit", "--until", "decided", &path]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let events: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("an event per line"))
        .collect();
    assert_eq!(events.len(), 2, "{stdout}");
    assert_eq!(events[0]["txn_id"], "dc-cli-1", "in input order: {stdout}");
    assert!(
        ["committing", "committed"].contains(&events[0]["state"].as_str().unwrap_or("")),
        "{stdout}"
    );
    assert!(
        ["aborting", "aborted"].contains(&events[1]["state"].as_str().unwrap_or("")),
        "{stdout}"
    );
    // One did not take effect: exit 1, as for outcomes.
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // Exit 0 once the decision is `committing`, though `a` is down and the outcome cannot
    // come yet.
    let one = sys.dir.path().join("one.json");
    std::fs::write(&one, slow_second("dc-cli-3").to_string()).expect("write");
    let path = one.to_str().expect("a UTF-8 path").to_string();
    let url = sys.nats.url();
    let cli = async move {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_txcoord"))
            .args(["submit", "--until", "decided", &path])
            .env("TXCOORD_NATS_URL", url)
            .env("TXCOORD_LOG", "error")
            .output()
            .await
            .expect("txcoord runs");
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        serde_json::from_slice::<Value>(&out.stdout).expect("one event")
    };
    let ev = with_a_killed_after_its_vote(&mut sys, "dc-cli-3", cli).await;
    assert_eq!(ev["state"], "committing", "{ev}");
    the_outcome_follows(&mut sys, "dc-cli-3").await;
}
