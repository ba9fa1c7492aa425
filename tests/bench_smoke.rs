//! A short run of `txcoord bench` so it cannot rot: it must run both modes, count
//! JetStream writes, measure the ceiling and print its JSON. No thresholds: timing goals
//! belong in BENCHMARKS.md, not in tests.

fn bench(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_txcoord"))
        .arg("bench")
        .args(args)
        .env("TXCOORD_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[test]
fn a_short_2pc_bench_with_the_ceiling_reports_everything() {
    let r = bench(&[
        "--duration-secs",
        "2",
        "--concurrency",
        "8",
        "--participants",
        "2",
        "--abort-fraction",
        "0.25",
        "--ceiling",
        "--ceiling-messages",
        "2000",
        "--json",
    ]);
    assert!(r["transactions"].as_u64().unwrap() > 0, "{r}");
    assert!(
        r["aborted"].as_u64().unwrap() > 0,
        "the abort fraction shows: {r}"
    );
    // 2 participants: at least the submission, accepted, decision, end, and per participant
    // a command, a vote and a branch record.
    assert!(r["js_messages_per_tx"].as_f64().unwrap() >= 10.0, "{r}");
    assert!(r["js_bytes_per_tx"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["latency_ms"]["p99"].as_f64().unwrap() > 0.0, "{r}");
    let c = &r["ceiling"];
    assert!(
        c["publish_per_sec"].as_f64().unwrap() > 0.0 && c["efficiency"].as_f64().unwrap() > 0.0,
        "{r}"
    );
}

#[test]
fn a_short_saga_bench_runs() {
    let r = bench(&[
        "--mode",
        "saga",
        "--count",
        "200",
        "--concurrency",
        "8",
        "--participants",
        "2",
        "--json",
    ]);
    assert_eq!(r["transactions"].as_u64().unwrap(), 200, "{r}");
    assert_eq!(r["committed"].as_u64().unwrap(), 200, "{r}");
    assert!(r["ceiling"].is_null());
}

#[test]
fn a_short_bench_on_a_three_node_cluster_runs_with_r3_streams() {
    let r = bench(&[
        "--cluster",
        "--count",
        "100",
        "--concurrency",
        "8",
        "--participants",
        "2",
        "--json",
    ]);
    assert_eq!(r["committed"].as_u64(), Some(100), "{r}");
    assert_eq!(r["stream_replicas"].as_u64(), Some(3), "{r}");
}

#[test]
fn a_short_bench_with_http_participants_commits_and_aborts_through_the_bridge() {
    let r = bench(&[
        "--http",
        "--count",
        "200",
        "--concurrency",
        "8",
        "--participants",
        "3",
        "--abort-fraction",
        "0.25",
        "--json",
    ]);
    assert_eq!(r["http"], true, "{r}");
    assert_eq!(r["transactions"].as_u64().unwrap(), 200, "{r}");
    let (ok, bad) = (
        r["committed"].as_u64().unwrap(),
        r["aborted"].as_u64().unwrap(),
    );
    assert!(ok > 0 && bad > 0, "409 refusals abort, 200s commit: {r}");
    assert_eq!(ok + bad, 200, "{r}");
}
