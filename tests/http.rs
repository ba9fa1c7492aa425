//! HTTP participants with real processes: the `shipping` service (Python, standard library
//! only, an SQLite store; `participants/http/shipping.py`) on a loopback port, joined to
//! transactions by `txcoord http-bridge`. Shown: a commit; a 409 refusal with its reason;
//! 503 twice then 200; a service slower than the prepare timeout (timeout names it);
//! malformed answers (not JSON, a huge body, a redirect, a wrong content type) each a clear
//! refusal, never a yes; the service killed after voting and restarted (its commit applied
//! exactly once); the bridge killed mid-commit and restarted (the commit completes, once);
//! HTTPS trusted through `tls_ca_file` only; the W3C `traceparent` on every call.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Proc, System, python};
use serde_json::{Value, json};
use txcoord::proto::{Reason, TransactionEvent, TxnState};

fn free_port() -> u16 {
    txcoord::natsserver::free_port().expect("a free port")
}

struct Http {
    sys: System,
    shipping: Proc,
    bridge: Proc,
    port: u16,
}

/// The shipping service on `port`, with `extra` arguments (`--tls-cert`...).
fn shipping(dir: &Path, port: u16, extra: &[&str]) -> Proc {
    let script = format!(
        "{}/participants/http/shipping.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let db = dir.join("shipping.sqlite").display().to_string();
    let port = port.to_string();
    let mut args = vec![script.as_str(), "--port", &port, "--db", &db];
    args.extend_from_slice(extra);
    Proc::spawn_bin(&python(), dir, "shipping", &args, &[])
}

fn bridge(sys: &System, config: &Path) -> Proc {
    let url = sys.nats.url();
    Proc::spawn(
        sys.dir.path(),
        "bridge",
        &["http-bridge", "--config", &config.display().to_string()],
        &[("TXCOORD_NATS_URL", url.as_str())],
    )
}

async fn start() -> Http {
    let sys = System::start(&["a"], &[]).await;
    let port = free_port();
    with_shipping(
        sys,
        port,
        &[],
        &format!(
            "[http_services.shipping]\nurl = \"http://127.0.0.1:{port}\"\ntimeout_ms = 3000\nretry_base_ms = 50\nretry_cap_ms = 500\n"
        ),
    )
    .await
}

/// Starts shipping on `port` (with `extra` arguments) and a bridge with the configuration
/// `bridge_toml`.
async fn with_shipping(sys: System, port: u16, extra: &[&str], bridge_toml: &str) -> Http {
    let shipping = shipping(sys.dir.path(), port, extra);
    shipping
        .wait_for("shipping ready", Duration::from_secs(20))
        .await;
    let config = sys.dir.path().join("bridge.toml");
    std::fs::write(&config, bridge_toml).unwrap();
    let bridge = bridge(&sys, &config);
    bridge
        .wait_for("participant ready", Duration::from_secs(30))
        .await;
    Http {
        sys,
        shipping,
        bridge,
        port,
    }
}

fn order(id: &str, shipping: Value) -> Value {
    json!({"txn_id": id, "mode": "2pc", "steps": [
        {"service": "a", "action": "act", "payload": {}},
        {"service": "shipping", "action": "ship", "payload": shipping},
    ]})
}

async fn shipments(port: u16) -> Vec<Value> {
    reqwest::get(format!("http://127.0.0.1:{port}/shipments"))
        .await
        .expect("GET /shipments")
        .json::<Vec<Value>>()
        .await
        .expect("JSON")
}

async fn shipment(port: u16, txn: &str) -> Option<Value> {
    shipments(port)
        .await
        .into_iter()
        .find(|s| s["branch"] == format!("{txn}:1"))
}

fn refusal(ev: &TransactionEvent) -> String {
    refusal_by(ev, "shipping")
}

/// The reason `by` gave for refusing.
fn refusal_by(ev: &TransactionEvent, by: &str) -> String {
    match &ev.reason {
        Some(Reason::VoteAbort {
            service, message, ..
        }) => {
            assert_eq!(service, by);
            message.clone()
        }
        other => panic!("{} ended {:?}: {other:?}", ev.txn_id, ev.state),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_a_refusal_and_a_service_that_answers_503_twice() {
    let h = start().await;
    let ok = h.sys.run(order("h-ok", json!({"order_id": "o1"}))).await;
    assert_eq!(ok.state, TxnState::Committed, "{ok:?}");
    let s = shipment(h.port, "h-ok").await.expect("booked");
    assert_eq!(s["state"], "shipped");
    assert_eq!(s["commits"], 1);

    let no = h
        .sys
        .run(order(
            "h-409",
            json!({"order_id": "o2", "refuse": "no courier for this address"}),
        ))
        .await;
    assert_eq!(no.state, TxnState::Aborted);
    assert_eq!(refusal(&no), "no courier for this address");

    let flaky = h
        .sys
        .run(order("h-503", json!({"order_id": "o3", "fail_times": 2})))
        .await;
    assert_eq!(flaky.state, TxnState::Committed, "{flaky:?}");
    assert_eq!(shipment(h.port, "h-503").await.unwrap()["commits"], 1);

    let ro = h
        .sys
        .run(order("h-ro", json!({"order_id": "o4", "read_only": true})))
        .await;
    assert_eq!(ro.state, TxnState::Committed);
    assert_eq!(ro.steps[1].vote, Some(txcoord::proto::Vote::ReadOnly));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_slower_than_the_prepare_timeout_is_named_by_the_timeout() {
    let h = start().await;
    let mut req = order("h-slow", json!({"order_id": "o5", "delay_ms": 4000}));
    req["timeout_ms"] = json!(1500);
    let ev = h.sys.run(req).await;
    assert_eq!(ev.state, TxnState::Aborted);
    match &ev.reason {
        Some(Reason::Timeout { services, .. }) => assert_eq!(services, &vec!["shipping"]),
        other => panic!("{other:?}"),
    }
    // The late prepare holds nothing: the bridge told the service to abort when it gave up
    // on the answer, and the service's abort-before-prepare rule refused the prepare.
    let start = Instant::now();
    loop {
        let s = shipment(h.port, "h-slow").await;
        if s.as_ref().is_some_and(|s| s["state"] == "released")
            && start.elapsed() > Duration::from_secs(3)
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the shipment is {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_answers_are_clear_refusals_never_a_yes() {
    let h = start().await;
    for (knob, says) in [
        ("not_json", "not JSON"),
        ("huge", "a body over 65536 bytes"),
        ("redirect", "redirects are not followed"),
        ("content_type", "not application/json"),
    ] {
        let id = format!("h-bad-{knob}");
        let ev = h
            .sys
            .run(order(&id, json!({"order_id": id, "malformed": knob})))
            .await;
        assert_eq!(ev.state, TxnState::Aborted, "{knob}: {ev:?}");
        let why = refusal(&ev);
        assert!(why.contains(says), "{knob}: {why}");
        assert!(
            why.starts_with("shipping: prepare answered"),
            "{knob}: {why}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_killed_after_voting_gets_its_commit_exactly_once_when_back() {
    let mut h = start().await;
    // The other step votes late, so the shipping vote is in before the decision.
    let req = json!({"txn_id": "h-kill-svc", "mode": "2pc", "steps": [
        {"service": "a", "action": "act", "payload": {"delay_ms": 1500}},
        {"service": "shipping", "action": "ship", "payload": {"order_id": "o6"}},
    ]});
    h.sys.submit(&req, "h-kill-svc").await;
    let start = Instant::now();
    while shipment(h.port, "h-kill-svc").await.is_none() {
        assert!(start.elapsed() < Duration::from_secs(10), "never prepared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.shipping.kill9();
    // The decision is commit; the bridge cannot reach the service and keeps trying.
    h.sys
        .wait_state("h-kill-svc", |e| e.state == TxnState::Committing)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    h.shipping.restart();
    let ev = h
        .sys
        .wait_state("h-kill-svc", |e| e.state.is_terminal())
        .await;
    assert_eq!(ev.state, TxnState::Committed);
    let s = shipment(h.port, "h-kill-svc").await.unwrap();
    assert_eq!(s["state"], "shipped");
    assert_eq!(s["commits"], 1, "applied exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_killed_mid_commit_finishes_it_after_a_restart() {
    let mut h = start().await;
    h.sys
        .submit(
            &order(
                "h-kill-br",
                json!({"order_id": "o7", "commit_delay_ms": 1500}),
            ),
            "h-kill-br",
        )
        .await;
    h.sys
        .wait_state("h-kill-br", |e| e.state == TxnState::Committing)
        .await;
    // The commit is on its way to the service (which takes 1.5 s to answer): kill the bridge.
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.bridge.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.bridge.restart();
    let ev = h
        .sys
        .wait_state("h-kill-br", |e| e.state.is_terminal())
        .await;
    assert_eq!(ev.state, TxnState::Committed);
    let s = shipment(h.port, "h-kill-br").await.unwrap();
    assert_eq!(s["commits"], 1, "the repeated commit answered from its key");
}

/// A coordinator and a bridge that allow URL steps under `http://127.0.0.1:{port}/eu` only.
async fn start_with_allow_list() -> Http {
    let port = free_port();
    let allow = format!("http://127.0.0.1:{port}/eu");
    let sys = System::start(&["a"], &[("TXCOORD_HTTP_ALLOW", allow.as_str())]).await;
    // No [http_services]: the bridge runs only the URL service.
    with_shipping(sys, port, &[], &format!("http_allow = [\"{allow}\"]\n")).await
}

fn by_url(id: &str, url: &str) -> Value {
    json!({"txn_id": id, "steps": [
        {"service": "a", "action": "act", "payload": {}},
        {"url": url, "action": "ship", "payload": {"order_id": id}},
    ]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_named_by_url_run_only_under_the_allow_list() {
    let h = start_with_allow_list().await;
    let port = h.port;
    // Under the entry (a path below it, a trailing slash): runs, by the URL service.
    let ok = h
        .sys
        .run(by_url(
            "u-ok",
            &format!("http://127.0.0.1:{port}/eu/central/"),
        ))
        .await;
    assert_eq!(ok.state, TxnState::Committed, "{ok:?}");
    assert_eq!(ok.steps[1].service, "http");
    assert_eq!(
        ok.steps[1].url.as_deref(),
        Some(format!("http://127.0.0.1:{port}/eu/central").as_str()),
        "the URL's normal form is what runs"
    );
    common::check(
        &common::validator("transaction-event"),
        "transaction-event",
        "a URL step's outcome",
        &serde_json::to_value(&ok).unwrap(),
    );
    let s = shipment(port, "u-ok")
        .await
        .expect("booked through the URL");
    assert_eq!(s["state"], "shipped");
    assert_eq!(s["commits"], 1);

    // Outside it: refused at submission, naming the step's url; nothing reaches a service.
    for (id, url) in [
        ("u-other", format!("http://127.0.0.1:{port}/us")),
        ("u-prefix", format!("http://127.0.0.1:{port}/europe")),
        ("u-dots", format!("http://127.0.0.1:{port}/eu/../us")),
        ("u-host", "http://localhost.evil.test/eu".to_string()),
        ("u-creds", format!("http://x:y@127.0.0.1:{port}/eu")),
    ] {
        h.sys.submit(&by_url(id, &url), id).await;
        let ev = h.sys.wait_state(id, |e| e.state.is_terminal()).await;
        assert_eq!(ev.state, TxnState::Rejected, "{id}: {ev:?}");
        let Some(Reason::InvalidRequest { message, path }) = &ev.reason else {
            panic!("{id}: {ev:?}")
        };
        assert_eq!(path.as_deref(), Some("steps[1].url"), "{id}: {message}");
        assert!(message.contains(&url), "{id}: {message}");
        assert!(
            shipment(port, id).await.is_none(),
            "{id} reached the service"
        );
    }

    // A command forged on the bus with a URL outside the list: the bridge checks again and
    // votes abort without sending anything.
    let js = async_nats::jetstream::new(h.sys.nc.clone());
    let forged = json!({
        "txn_id": "u-forged", "service": "http", "step": 0, "kind": "prepare",
        "action": "ship", "payload": {"order_id": "u-forged"},
        "reply_to": "txn.reply.http.u-forged", "attempt": 1,
        "deadline_ms": txcoord::proto::now_ms() + 10_000,
        "url": format!("http://127.0.0.1:{port}/us"),
    });
    common::check(
        &common::validator("participant-command"),
        "participant-command",
        "a command with a url",
        &forged,
    );
    js.publish("txn.cmd.http.u-forged", forged.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    h.sys
        .wait_branch(
            "http",
            "u-forged",
            0,
            txcoord::participant::BranchState::VotedAbort,
        )
        .await;
    let rec = h.sys.branch("http", "u-forged", 0).await.unwrap();
    let reason = rec.reason.unwrap_or_default();
    assert!(
        reason.contains("not under any entry of http_allow"),
        "{reason}"
    );
    assert!(
        shipments(port)
            .await
            .iter()
            .all(|s| s["branch"] != "u-forged:0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_without_an_allow_list_refuses_every_url_step() {
    let sys = System::start(&["a"], &[]).await;
    let id = "u-none";
    sys.submit(&by_url(id, "http://127.0.0.1:9/eu"), id).await;
    let ev = sys.wait_state(id, |e| e.state.is_terminal()).await;
    let Some(Reason::InvalidRequest { message, path }) = &ev.reason else {
        panic!("{ev:?}")
    };
    assert_eq!(path.as_deref(), Some("steps[1].url"));
    assert!(message.contains("http_allow is empty"), "{message}");
}

async fn traces(port: u16) -> Vec<(String, String)> {
    reqwest::get(format!("http://127.0.0.1:{port}/traces"))
        .await
        .expect("GET /traces")
        .json::<Vec<Value>>()
        .await
        .expect("JSON")
        .into_iter()
        .map(|t| {
            (
                t["key"].as_str().unwrap_or_default().to_string(),
                t["traceparent"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The trace contexts shipping saw for `txn`'s branch, by command kind.
async fn traced(port: u16, txn: &str) -> Vec<(String, String)> {
    let prefix = format!("{txn}:1:");
    traces(port)
        .await
        .into_iter()
        .filter_map(|(k, t)| Some((k.strip_prefix(&prefix)?.to_string(), t)))
        .collect()
}

fn pair(kind: &str, t: &str) -> (String, String) {
    (kind.to_string(), t.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_reaches_every_http_call_and_survives_a_coordinator_restart() {
    let listen = format!("127.0.0.1:{}", free_port());
    let sys = System::start(
        &["a"],
        &[
            ("TXCOORD_FAILPOINT", "after-decision"),
            ("TXCOORD_HTTP_LISTEN", listen.as_str()),
        ],
    )
    .await;
    let port = free_port();
    let mut h = with_shipping(
        sys,
        port,
        &[],
        &format!("[http_services.shipping]\nurl = \"http://127.0.0.1:{port}\"\n"),
    )
    .await;
    let url = h.sys.nats.url();

    // Submitted on NATS with the header; the coordinator stops right after deciding, so
    // the commit comes from the one that recovers the transaction from its log.
    let t1 = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("traceparent", t1);
    let js = async_nats::jetstream::new(h.sys.nc.clone());
    js.publish_with_headers(
        "txn.submit",
        headers,
        serde_json::to_vec(&order("tp-nats", json!({"order_id": "t1"})))
            .unwrap()
            .into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
    h.sys
        .coordinator
        .wait_for(
            "FAILPOINT after-decision txn_id=tp-nats",
            Duration::from_secs(20),
        )
        .await;
    h.sys.coordinator.kill9();
    assert_eq!(traced(port, "tp-nats").await, vec![pair("prepare", t1)]);
    h.sys.coordinator.restart_with(&[
        ("TXCOORD_NATS_URL", url.as_str()),
        ("TXCOORD_HTTP_LISTEN", listen.as_str()),
    ]);
    let ev = h.sys.wait_state("tp-nats", |e| e.state.is_terminal()).await;
    assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
    let accepted = h.sys.client.history("tp-nats").await.remove(0);
    assert_eq!(accepted.state, TxnState::Accepted);
    assert_eq!(accepted.traceparent.as_deref(), Some(t1));
    common::check(
        &common::validator("transaction-event"),
        "transaction-event",
        "txn.events.tp-nats",
        &serde_json::to_value(&accepted).unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while traced(port, "tp-nats").await.len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        traced(port, "tp-nats").await,
        vec![pair("commit", t1), pair("prepare", t1)]
    );

    // The front door's header; an invalid header is ignored (W3C), an invalid body field
    // is a 400 naming it.
    h.sys
        .coordinator
        .wait_for("coordinator ready", Duration::from_secs(30))
        .await;
    let t2 = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let http = reqwest::Client::new();
    let front = format!("http://{listen}/v1/transactions?wait=true");
    for (id, header) in [("tp-http", t2), ("tp-bad-header", "00-not-a-trace")] {
        let resp = http
            .post(&front)
            .header("traceparent", header)
            .json(&order(id, json!({"order_id": id})))
            .send()
            .await
            .expect("POST");
        assert_eq!(resp.status().as_u16(), 200);
        let ev: Value = resp.json().await.expect("the final event");
        assert_eq!(ev["state"], "committed", "{ev}");
    }
    assert_eq!(
        traced(port, "tp-http").await,
        vec![pair("commit", t2), pair("prepare", t2)]
    );
    assert_eq!(traced(port, "tp-bad-header").await, vec![]);
    let mut bad = order("tp-bad-body", json!({}));
    bad["traceparent"] = json!("00-not-a-trace");
    let resp = http.post(&front).json(&bad).send().await.expect("POST");
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.expect("the error");
    assert_eq!(body["path"], "traceparent", "{body}");
}

/// A test CA and a certificate it issued for 127.0.0.1, as PEM files in `dir`: the CA's,
/// the server's chain and its key.
fn test_pki(dir: &Path) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "txcoord test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path.display().to_string()
    };
    (
        write("ca.pem", ca.pem()),
        write("cert.pem", cert.pem()),
        write("key.pem", key.serialize_pem()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_service_is_trusted_through_its_tls_ca_file_and_only_so() {
    let sys = System::start(&["a"], &[]).await;
    let (ca, cert, key) = test_pki(sys.dir.path());
    let port = free_port();
    // One HTTPS service under two names: with its CA, and with only the system's roots.
    let h = with_shipping(
        sys,
        port,
        &["--tls-cert", &cert, "--tls-key", &key],
        &format!(
            "[http_services.shipping]\nurl = \"https://127.0.0.1:{port}\"\ntls_ca_file = \"{ca}\"\n\
             [http_services.stranger]\nurl = \"https://127.0.0.1:{port}\"\nretry_base_ms = 50\nretry_cap_ms = 200\n"
        ),
    )
    .await;
    let ok = h.sys.run(order("tls-ok", json!({"order_id": "t"}))).await;
    assert_eq!(ok.state, TxnState::Committed, "{ok:?}");

    let mut req = order("tls-unknown-ca", json!({"order_id": "u"}));
    req["steps"][1]["service"] = json!("stranger");
    req["timeout_ms"] = json!(1500);
    let no = h.sys.run(req).await;
    assert_eq!(no.state, TxnState::Aborted, "{no:?}");
    // Refused at once, saying why: retrying does not change a certificate.
    let why = refusal_by(&no, "stranger");
    assert!(
        why.contains("certificate the bridge does not trust") && why.contains("UnknownIssuer"),
        "{why}"
    );

    // What the service recorded, over HTTPS with the CA: the trusted call only.
    let pem = std::fs::read(&ca).unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .build()
        .unwrap();
    let booked: Vec<Value> = client
        .get(format!("https://127.0.0.1:{port}/shipments"))
        .send()
        .await
        .expect("GET over HTTPS")
        .json()
        .await
        .unwrap();
    let branches: Vec<&str> = booked.iter().filter_map(|s| s["branch"].as_str()).collect();
    assert_eq!(branches, vec!["tls-ok:1"], "{booked:?}");

    // A CA file that cannot be read stops the bridge at start, naming the setting.
    let bad = h.sys.dir.path().join("bad-bridge.toml");
    std::fs::write(
        &bad,
        format!("[http_services.shipping]\nurl = \"https://127.0.0.1:{port}\"\ntls_ca_file = \"/nonexistent/ca.pem\"\n"),
    )
    .unwrap();
    let mut broken = bridge(&h.sys, &bad);
    let status = broken.wait_exit(Duration::from_secs(30)).await;
    assert!(!status.success());
    let log = broken.log_text();
    assert!(
        log.contains("http_services.shipping.tls_ca_file") && log.contains("/nonexistent/ca.pem"),
        "{log}"
    );
}
