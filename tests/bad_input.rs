//! Bad input never crashes the coordinator, is never silently dropped, and says what was
//! wrong and where, while valid traffic keeps flowing around it.

mod common;

use std::time::Duration;

use common::{System, request, step};
use serde_json::json;
use txcoord::proto::{Reason, TxnState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_bad_input_gets_its_clear_error_and_valid_traffic_flows() {
    let sys = System::start(&["a"], &[]).await;
    let ok = |i: usize| request(&format!("ok-{i}"), vec![step("a", json!({}))]);
    assert_eq!(sys.run(ok(0)).await.state, TxnState::Committed);

    let many_steps: Vec<_> = (0..101).map(|_| step("a", json!({}))).collect();
    let big = "x".repeat(300 * 1024);
    // (raw body, where its error should show up, expected kind, expected path or text)
    let bad: Vec<(String, Option<&str>, &str, &str)> = vec![
        ("this is not json".into(), None, "malformed_json", "line 1 column 2"),
        (r#"{"txn_id": "trunc", "steps": ["#.into(), None, "malformed_json", "EOF"),
        (json!({"txn_id": "bad-svc", "steps": [{"service": "a.b", "action": "x"}]}).to_string(), Some("bad-svc"), "invalid_request", "steps[0].service"),
        (json!({"txn_id": "no-steps", "steps": []}).to_string(), Some("no-steps"), "invalid_request", "steps"),
        (json!({"txn_id": "too-many", "steps": many_steps}).to_string(), Some("too-many"), "invalid_request", "steps"),
        (json!({"txn_id": "no-action", "steps": [{"service": "a"}]}).to_string(), Some("no-action"), "invalid_request", "steps[0]"),
        (json!({"txn_id": "wrong-type", "steps": "all of them"}).to_string(), Some("wrong-type"), "invalid_request", "steps"),
        (json!({"txn_id": "bad-mode", "mode": "3pc", "steps": [{"service": "a", "action": "x"}]}).to_string(), Some("bad-mode"), "invalid_request", "mode"),
        (json!({"txn_id": "a.b", "steps": [{"service": "a", "action": "x"}]}).to_string(), None, "invalid_request", "txn_id"),
        (json!([1, 2, 3]).to_string(), None, "invalid_request", "$"),
        (json!({"txn_id": "big", "steps": [{"service": "a", "action": "x", "payload": big}]}).to_string(), None, "too_large", "over the limit"),
        // A taken txn_id with bad content: the recorded outcome of ok-0 stands.
        (json!({"txn_id": "ok-0", "steps": []}).to_string(), None, "invalid_request", "steps"),
    ];
    let mut seqs = Vec::new();
    for (i, (body, _, _, _)) in bad.iter().enumerate() {
        let seq = sys
            .client
            .submit_raw(body.clone().into_bytes().into(), &format!("bad-{i}"))
            .await
            .unwrap();
        seqs.push(seq);
        // Valid traffic in between.
        sys.client
            .submit_raw(
                serde_json::to_vec(&ok(i + 1)).unwrap().into(),
                &format!("ok-{}", i + 1),
            )
            .await
            .unwrap();
    }
    for i in 1..=bad.len() {
        let ev = sys
            .wait_state(&format!("ok-{i}"), |e| e.state.is_terminal())
            .await;
        assert_eq!(ev.state, TxnState::Committed, "ok-{i}");
    }
    // A reply that is not JSON, and one for an unknown transaction: logged and ignored.
    sys.nc
        .publish("txn.reply.nobody", "garbage".into())
        .await
        .unwrap();
    let stray = json!({"txn_id": "nobody", "service": "a", "step": 0, "kind": "prepare", "outcome": "ready"});
    sys.nc
        .publish("txn.reply.nobody", stray.to_string().into())
        .await
        .unwrap();
    sys.nc.flush().await.unwrap();
    assert_eq!(
        sys.run(ok(100)).await.state,
        TxnState::Committed,
        "still serving"
    );

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for ((body, txn, kind, needle), seq) in bad.iter().zip(&seqs) {
        // Kept for inspection, byte for byte.
        let kept = sys.client.submission(*seq).await.expect("submission kept");
        assert_eq!(kept.as_ref(), body.as_bytes());
        match txn {
            Some(id) => {
                let ev = sys.wait_state(id, |e| e.state == TxnState::Rejected).await;
                assert_eq!(ev.submit_seq, Some(*seq));
                let Some(Reason::InvalidRequest { message, path }) = ev.reason else {
                    panic!("{id}: {ev:?}")
                };
                assert_eq!(path.as_deref(), Some(*needle), "{id}: {message}");
                assert!(!message.is_empty());
            }
            None => loop {
                let errors = sys.client.errors().await;
                if let Some(e) = errors.iter().find(|e| e.submit_seq == Some(*seq)) {
                    assert_eq!(e.kind, *kind, "{e:?}");
                    let text = format!("{} {}", e.message, e.path.clone().unwrap_or_default());
                    assert!(
                        text.contains(needle),
                        "seq {seq}: {needle:?} not in {text:?}"
                    );
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "no error for submission {seq}: {errors:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            },
        }
    }
    let ok0 = sys.client.last_event("ok-0").await.unwrap();
    assert_eq!(
        ok0.state,
        TxnState::Committed,
        "a bad duplicate cannot overwrite a recorded outcome"
    );
    assert!(sys.coordinator.log_text().contains("submission rejected"));
    assert!(!sys.coordinator.log_text().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reports_outcomes_with_its_exit_code() {
    let sys = System::start(&["a"], &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, body: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_txcoord"))
            .args([
                "submit",
                path.to_str().unwrap(),
                "--nats-url",
                &sys.nats.url(),
            ])
            .env("TXCOORD_LOG", "error")
            .output()
            .unwrap()
    };
    let one = run(
        "one.json",
        serde_json::to_string_pretty(&request("cli-1", vec![step("a", json!({}))])).unwrap(),
    );
    assert_eq!(
        one.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&one.stdout).unwrap();
    assert_eq!(line["state"], "committed");

    let lines = [
        request("cli-2", vec![step("a", json!({}))]),
        request("cli-3", vec![step("a", json!({"vote": "abort"}))]),
    ]
    .iter()
    .map(|r| r.to_string())
    .collect::<Vec<_>>()
    .join("\n");
    let two = run("two.jsonl", lines);
    assert_eq!(two.status.code(), Some(1));
    let out = String::from_utf8(two.stdout).unwrap();
    let states: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["state"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(states, ["committed", "aborted"]);

    let broken = run(
        "broken.jsonl",
        format!(
            "{}\nnot json\n",
            request("cli-4", vec![step("a", json!({}))])
        ),
    );
    assert_eq!(broken.status.code(), Some(2));
    let out = String::from_utf8(broken.stdout).unwrap();
    assert!(out.contains("line 2: not valid JSON"), "{out}");
    assert!(
        out.contains("\"committed\""),
        "the valid line still ran: {out}"
    );

    let status = std::process::Command::new(env!("CARGO_BIN_EXE_txcoord"))
        .args(["status", "cli-3", "--nats-url", &sys.nats.url()])
        .env("TXCOORD_LOG", "error")
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(0));
    let ev: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(ev["reason"]["kind"], "vote_abort");

    let bad_cfg = std::process::Command::new(env!("CARGO_BIN_EXE_txcoord"))
        .args(["serve", "--nats-url", &sys.nats.url()])
        .env("TXCOORD_STREAM_REPLICAS", "2")
        .output()
        .unwrap();
    assert_eq!(bad_cfg.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad_cfg.stderr);
    assert!(
        err.contains("stream_replicas") && err.contains("must be 1 or 3"),
        "{err}"
    );
}

/// A request the coordinator accepts but the server cannot store as a log record (the
/// `accepted` record adds to the request's size) is rejected visibly, never dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_too_big_for_the_log_is_refused_up_front_with_the_limit_named() {
    let sys = System::start(&["a"], &[("TXCOORD_MAX_REQUEST_BYTES", "8388608")]).await;
    // Under the configured limit and the server's max_payload (8 MB) as a submission, but
    // too big for an accepted record: the coordinator caps the limit to what it can log.
    let big = "x".repeat(8_388_608 - 300);
    let req = request("huge", vec![step("a", json!(big))]);
    let body = serde_json::to_vec(&req).unwrap();
    assert!(body.len() < 8 * 1024 * 1024, "{}", body.len());
    let seq = sys.client.submit_raw(body.into(), "huge").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let err = loop {
        let errors = sys.client.errors().await;
        if let Some(e) = errors.into_iter().find(|e| e.submit_seq == Some(seq)) {
            break e;
        }
        assert!(std::time::Instant::now() < deadline, "no error for {seq}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(err.kind, "too_large", "{err:?}");
    // 8 MiB less the 64 KiB kept for the record's envelope.
    assert!(err.message.contains("limit of 8323072 bytes"), "{err:?}");
    assert!(
        sys.coordinator
            .log_text()
            .contains("max_request_bytes is more than the NATS server can log"),
        "the cap is logged at start-up"
    );
    assert_eq!(
        sys.run(request("after-huge", vec![step("a", json!({}))]))
            .await
            .state,
        TxnState::Committed
    );
}
