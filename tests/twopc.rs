//! 2PC end to end: a real nats-server, the real coordinator process, scripted participant
//! processes. Each test starts its own system.

mod common;

use std::time::Duration;

use common::{System, request, step};
use serde_json::json;
use txcoord::participant::BranchState;
use txcoord::proto::{Reason, TxnState, Vote};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_ready_commits_everywhere() {
    let sys = System::start(&["inventory", "payment"], &[]).await;
    let ev = sys
        .run(request(
            "commit-1",
            vec![
                step("inventory", json!({"sku": "apple"})),
                step("payment", json!({"amount": 3})),
            ],
        ))
        .await;
    assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
    assert!(
        ev.steps
            .iter()
            .all(|s| s.vote == Some(Vote::Ready) && s.done)
    );
    sys.wait_branch("inventory", "commit-1", 0, BranchState::Committed)
        .await;
    sys.wait_branch("payment", "commit-1", 1, BranchState::Committed)
        .await;
    // The log holds accepted, the decision and the end, in that order.
    let states: Vec<_> = sys
        .client
        .history("commit-1")
        .await
        .into_iter()
        .map(|e| e.state)
        .collect();
    let pos = |s| {
        states
            .iter()
            .position(|x| *x == s)
            .unwrap_or_else(|| panic!("{s:?} in {states:?}"))
    };
    assert!(pos(TxnState::Accepted) < pos(TxnState::Committing));
    assert!(pos(TxnState::Committing) < pos(TxnState::Committed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_abort_vote_aborts_everyone_else() {
    let sys = System::start(&["a", "b", "c"], &[]).await;
    let ev = sys
        .run(request(
            "abort-1",
            vec![
                step("a", json!({})),
                step(
                    "b",
                    json!({"vote": "abort", "reason": "out of stock", "delay_ms": 200}),
                ),
                step("c", json!({})),
            ],
        ))
        .await;
    assert_eq!(ev.state, TxnState::Aborted);
    assert_eq!(
        ev.reason,
        Some(Reason::VoteAbort {
            service: "b".into(),
            step: 1,
            message: "out of stock".into()
        })
    );
    sys.wait_branch("a", "abort-1", 0, BranchState::Aborted)
        .await;
    sys.wait_branch("c", "abort-1", 2, BranchState::Aborted)
        .await;
    assert_eq!(
        sys.branch("b", "abort-1", 1).await.map(|r| r.state),
        Some(BranchState::VotedAbort)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_never_answers_times_out_by_name() {
    let sys = System::start(&["a"], &[]).await;
    let mut req = request(
        "timeout-1",
        vec![step("a", json!({})), step("ghost", json!({}))],
    );
    req["timeout_ms"] = json!(700);
    let ev = sys.run(req).await;
    assert_eq!(ev.state, TxnState::Aborted);
    assert_eq!(
        ev.reason,
        Some(Reason::Timeout {
            services: vec!["ghost".into()],
            steps: vec![1]
        })
    );
    sys.wait_branch("a", "timeout-1", 0, BranchState::Aborted)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_steps_skip_phase_two() {
    let sys = System::start(&["a", "b"], &[]).await;
    let ev = sys
        .run(request(
            "ro-1",
            vec![
                step("a", json!({"vote": "read_only"})),
                step("b", json!({})),
            ],
        ))
        .await;
    assert_eq!(ev.state, TxnState::Committed);
    assert_eq!(ev.steps[0].vote, Some(Vote::ReadOnly));
    assert_eq!(
        ev.steps[0].decision_attempt, 0,
        "no commit was sent to the read-only step"
    );
    sys.wait_branch("b", "ro-1", 1, BranchState::Committed)
        .await;
    assert_eq!(
        sys.branch("a", "ro-1", 0).await.map(|r| r.state),
        Some(BranchState::ReadOnly)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubmitting_a_txn_id_returns_the_recorded_outcome_and_runs_nothing() {
    let sys = System::start(&["a"], &[]).await;
    let first = sys
        .run(request("dup-1", vec![step("a", json!({"vote": "abort"}))]))
        .await;
    assert_eq!(first.state, TxnState::Aborted);
    // Same id, different content that would commit: the recorded abort stands.
    let again = sys.run(request("dup-1", vec![step("a", json!({}))])).await;
    assert_eq!(again.state, TxnState::Aborted);
    assert_eq!(again, first);
    // Concurrent duplicates of a new id: one transaction runs.
    let reqs = vec![request("dup-2", vec![step("a", json!({"delay_ms": 100}))]); 5];
    let outs = sys
        .client
        .submit_and_wait(reqs, Duration::from_secs(30))
        .await;
    for o in &outs {
        assert_eq!(o.as_ref().map(|e| e.state).ok(), Some(TxnState::Committed));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let history = sys.client.history("dup-2").await;
    let accepted = history
        .iter()
        .filter(|e| e.state == TxnState::Accepted)
        .count();
    assert_eq!(accepted, 1, "{history:?}");
    assert!(history.iter().all(|e| e.steps[0].prepare_attempt == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_transactions_all_reach_their_outcome() {
    let sys = System::start(&["a", "b", "c"], &[]).await;
    let reqs: Vec<_> = (0..1000)
        .map(|i| {
            let vote = if i % 10 == 0 { "abort" } else { "ready" };
            request(
                &format!("many-{i}"),
                vec![
                    step("a", json!({})),
                    step("b", json!({"vote": vote})),
                    step("c", json!({})),
                ],
            )
        })
        .collect();
    let outs = sys
        .client
        .submit_and_wait(reqs, Duration::from_secs(240))
        .await;
    let mut committed = 0;
    for (i, o) in outs.iter().enumerate() {
        let ev = o.as_ref().unwrap_or_else(|e| panic!("many-{i}: {e}"));
        let want = if i % 10 == 0 {
            TxnState::Aborted
        } else {
            TxnState::Committed
        };
        assert_eq!(ev.state, want, "many-{i}");
        committed += (ev.state == TxnState::Committed) as usize;
    }
    assert_eq!(committed, 900);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_execute_and_status_answer_over_request_reply() {
    let sys = System::start(&["a"], &[]).await;
    let body = serde_json::to_vec(&request("api-1", vec![step("a", json!({}))])).unwrap();
    // Not the client's default 10 s: on a loaded machine the whole transaction can take
    // longer than that.
    let reply = sys
        .nc
        .send_request(
            "txn.api.execute",
            async_nats::Request::new()
                .payload(body.into())
                .timeout(Some(Duration::from_secs(60))),
        )
        .await
        .unwrap();
    let ev: txcoord::proto::TransactionEvent = serde_json::from_slice(&reply.payload)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&reply.payload)));
    assert_eq!(ev.state, TxnState::Committed);
    let status = sys.client.status("api-1").await.unwrap();
    assert_eq!(status.state, TxnState::Committed);
    assert_eq!(status.steps[0].vote, Some(Vote::Ready));
    let unknown = sys.client.status("nope").await.unwrap_err().to_string();
    assert!(unknown.contains("unknown txn_id nope"), "{unknown}");
    // In flight: status comes from the running transaction, with the votes so far.
    let mut req = request(
        "api-2",
        vec![step("a", json!({})), step("ghost", json!({}))],
    );
    req["timeout_ms"] = json!(3000);
    sys.client
        .submit_raw(serde_json::to_vec(&req).unwrap().into(), "api-2")
        .await
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        let s = sys.client.status("api-2").await;
        if let Ok(s) = s
            && s.state == TxnState::Preparing
            && s.steps[0].vote == Some(Vote::Ready)
        {
            assert_eq!(s.steps[1].vote, None);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "never saw the in-flight vote"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // $SRV.PING answers for the micro service.
    let ping = sys
        .nc
        .request("$SRV.PING.txcoord", "".into())
        .await
        .unwrap();
    let ping: serde_json::Value = serde_json::from_slice(&ping.payload).unwrap();
    assert_eq!(ping["name"], "txcoord");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_flight_limit_holds_submissions_back_and_all_finish() {
    let sys = System::start(&["a"], &[("TXCOORD_MAX_IN_FLIGHT", "4")]).await;
    let reqs: Vec<_> = (0..24)
        .map(|i| {
            request(
                &format!("bp-{i}"),
                vec![step("a", json!({"delay_ms": 150}))],
            )
        })
        .collect();
    let client = sys.client.clone();
    let run =
        tokio::spawn(async move { client.submit_and_wait(reqs, Duration::from_secs(60)).await });
    // Sample the coordinator's own count while the batch drains.
    let mut peak = 0;
    let mut samples = 0;
    while !run.is_finished() {
        let stats = sys
            .nc
            .request("$SRV.STATS.txcoord", "".into())
            .await
            .unwrap();
        let stats: serde_json::Value = serde_json::from_slice(&stats.payload).unwrap();
        let in_flight = stats["endpoints"][0]["data"]["in_flight"].as_u64().unwrap();
        peak = peak.max(in_flight);
        samples += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outs = run.await.unwrap();
    assert!(
        outs.iter()
            .all(|o| o.as_ref().map(|e| e.state).ok() == Some(TxnState::Committed))
    );
    assert!(samples > 10, "too few samples to judge ({samples})");
    assert!(peak <= 4, "in flight peaked at {peak}, over the limit of 4");
    assert!(
        peak >= 2,
        "the limit was never approached (peak {peak}); the test proves nothing"
    );
}

/// With `metrics_listen`, the coordinator serves its counters in the Prometheus text format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_metrics_count_outcomes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let sys = System::start(&["a"], &[("TXCOORD_METRICS_LISTEN", &addr)]).await;
    let ok = sys.run(request("m-ok", vec![step("a", json!({}))])).await;
    assert_eq!(ok.state, TxnState::Committed);
    let no = sys
        .run(request("m-no", vec![step("a", json!({"vote": "abort"}))]))
        .await;
    assert_eq!(no.state, TxnState::Aborted);
    let get = |path: &'static str| {
        let addr = addr.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
    };
    let want = [
        "txcoord_transactions_total{outcome=\"committed\"} 1",
        "txcoord_transactions_total{outcome=\"aborted\"} 1",
        "txcoord_accepted_total 2",
        "txcoord_in_flight 0",
        "txcoord_lease_held 1",
    ];
    // The counters move when a transaction's task ends, just after its final event.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let page = get("/metrics").await;
        assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
        let missing: Vec<_> = want
            .iter()
            .filter(|w| !page.lines().any(|l| l == **w))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{missing:?} missing in\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(get("/other").await.starts_with("HTTP/1.1 404"));
}
