//! `txcoord resolve` with real processes: the rules that keep atomicity (no abort once
//! commit is decided, no mark-done before a decision), each refusal naming its rule; an
//! abort of an undecided transaction, a mark-done of a stuck one's step that the operator
//! fixed by hand, a retry-now, the bulk form over every stuck transaction with a dry run;
//! and every action's audit record in the log (who, what, why); the alerts on txn.alerts;
//! the metrics the Grafana dashboard (docs/grafana-dashboard.json) queries.

mod common;

use common::{System, check, request, step, validator};
use futures::StreamExt;
use serde_json::{Value, json};
use txcoord::participant::BranchState;
use txcoord::proto::{Reason, ResolveAction, TxnState};

/// `txcoord resolve ...`: exit code, standard output, standard error.
fn resolve(sys: &System, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["resolve", "--by", "ana"];
    all.extend_from_slice(args);
    let out = sys.cli(&all);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_resolve_within_the_rules_and_the_log_says_who() {
    let metrics = format!("127.0.0.1:{}", txcoord::natsserver::free_port().unwrap());
    let env = [
        ("TXCOORD_STUCK_AFTER_MS", "300"),
        ("TXCOORD_RETRY_BASE_MS", "100"),
        ("TXCOORD_METRICS_LISTEN", metrics.as_str()),
    ];
    let mut sys = System::start(&["a", "b"], &env).await;
    let mut alerts = sys.nc.subscribe("txn.alerts").await.unwrap();
    sys.nc.flush().await.unwrap();

    // Undecided: b is down, so its vote never comes (the prepare timeout is a minute).
    sys.participant("b").kill9();
    let mut waiting = request("r-wait", vec![step("a", json!({})), step("b", json!({}))]);
    waiting["timeout_ms"] = json!(60_000);
    sys.submit(&waiting, "r-wait").await;
    sys.wait_vote("r-wait", 0).await;
    let (code, out, _) = resolve(
        &sys,
        &["r-wait", "mark-done", "--step", "1", "--reason", "x"],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("refused") && out.contains("nothing is decided"),
        "{out}"
    );
    let (code, out, _) = resolve(
        &sys,
        &[
            "r-wait",
            "abort",
            "--reason",
            "customer cancelled",
            "--dry-run",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("would be carried out"), "{out}");
    assert_eq!(
        sys.client.last_event("r-wait").await.map(|e| e.state),
        Some(TxnState::Preparing),
        "a dry run changes nothing"
    );
    let (code, out, _) = resolve(
        &sys,
        &[
            "r-wait",
            "abort",
            "--reason",
            "customer cancelled",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let reply: Value = serde_json::from_str(out.trim()).expect("one JSON answer");
    check(
        &validator("resolve-reply"),
        "resolve-reply",
        "txn.api.resolve",
        &reply,
    );
    let ev = sys.wait_state("r-wait", |e| e.state.is_terminal()).await;
    assert_eq!(ev.state, TxnState::Aborted);
    assert_eq!(
        ev.reason,
        Some(Reason::Operator {
            by: "ana".into(),
            message: "customer cancelled".into()
        })
    );
    sys.wait_branch("a", "r-wait", 0, BranchState::Aborted)
        .await;
    let history = sys.client.history("r-wait").await;
    let audit = history
        .iter()
        .find_map(|e| e.resolved.clone())
        .expect("an audit record");
    assert_eq!(audit.action, ResolveAction::Abort);
    assert_eq!(
        (audit.by.as_str(), audit.reason.as_str()),
        ("ana", "customer cancelled")
    );
    let event_schema = validator("transaction-event");
    for e in &history {
        check(
            &event_schema,
            "transaction-event",
            "txn.events.r-wait",
            &serde_json::to_value(e).unwrap(),
        );
    }

    // Stuck in commit: b voted and died before it heard the commit.
    sys.participant("b").restart();
    sys.participant("b")
        .wait_for("participant ready", std::time::Duration::from_secs(30))
        .await;
    sys.stuck_commit("r-stuck", "a", "b").await;
    sys.wait_branch("a", "r-stuck", 0, BranchState::Committed)
        .await;
    let (code, out, _) = resolve(&sys, &["r-stuck", "abort", "--reason", "give up"]);
    assert_eq!(code, 1);
    assert!(out.contains("break atomicity"), "{out}");
    let (code, out, _) = resolve(
        &sys,
        &["r-stuck", "mark-done", "--step", "0", "--reason", "x"],
    );
    assert_eq!(code, 1);
    assert!(
        out.contains("step 0 owes nothing: it confirmed already"),
        "{out}"
    );
    let (code, out, _) = resolve(&sys, &["r-stuck", "retry-now", "--reason", "nudge"]);
    assert_eq!(code, 0, "{out}");
    // Bulk, dry run: every stuck transaction, nothing changed.
    let (code, out, _) = resolve(
        &sys,
        &[
            "--all-stuck",
            "mark-done",
            "--step",
            "1",
            "--reason",
            "b fixed by hand",
            "--dry-run",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.starts_with("r-stuck: mark-done would be carried out"),
        "{out}"
    );
    assert_eq!(
        sys.client.last_event("r-stuck").await.map(|e| e.state),
        Some(TxnState::Committing)
    );
    // The operator applied b's part by hand: mark-done finishes the transaction.
    let (code, out, _) = resolve(
        &sys,
        &[
            "--all-stuck",
            "mark-done",
            "--step",
            "1",
            "--reason",
            "b fixed by hand",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("r-stuck: mark-done carried out; it is committed"),
        "{out}"
    );
    let history = sys.client.history("r-stuck").await;
    let last = history.last().unwrap();
    assert_eq!(last.state, TxnState::Committed);
    let actions: Vec<_> = history
        .iter()
        .filter_map(|e| e.resolved.as_ref().map(|r| (r.action, r.step)))
        .collect();
    assert_eq!(
        actions,
        [
            (ResolveAction::RetryNow, None),
            (ResolveAction::MarkDone, Some(1))
        ]
    );

    // Finished, unknown, malformed.
    let (code, out, _) = resolve(&sys, &["r-stuck", "retry-now", "--reason", "again"]);
    assert_eq!(code, 1);
    assert!(out.contains("committed: nothing is left to do"), "{out}");
    let (code, out, _) = resolve(&sys, &["r-none", "abort", "--reason", "x"]);
    assert_eq!(code, 1);
    assert!(out.contains("unknown txn_id r-none"), "{out}");
    let (code, _, err) = resolve(&sys, &["r-stuck", "undo", "--reason", "x"]);
    assert_eq!(code, 2);
    assert!(err.contains("not an action"), "{err}");
    let (code, _, err) = resolve(&sys, &["r-stuck", "abort"]);
    assert_eq!(code, 2);
    assert!(err.contains("--reason"), "{err}");
    let (code, out, _) = resolve(&sys, &["r-stuck", "abort", "--reason", " "]);
    assert_eq!(code, 1);
    assert!(out.contains("reason must say something"), "{out}");

    // Alerts: the stuck one, and each operator action; each matches its schema.
    let schema = validator("alert");
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let msg = tokio::time::timeout(std::time::Duration::from_secs(10), alerts.next())
            .await
            .unwrap_or_else(|_| panic!("alerts so far: {seen:?}"))
            .unwrap();
        let v: Value = serde_json::from_slice(&msg.payload).unwrap();
        check(&schema, "alert", "txn.alerts", &v);
        seen.push((
            v["kind"].as_str().unwrap().to_string(),
            v["txn_id"].as_str().unwrap().to_string(),
        ));
    }
    let pair = |k: &str, t: &str| (k.to_string(), t.to_string());
    assert_eq!(
        seen,
        [
            pair("resolved", "r-wait"),
            pair("stuck", "r-stuck"),
            pair("resolved", "r-stuck"),
            pair("resolved", "r-stuck"),
        ]
    );

    // The metrics the Grafana dashboard queries all exist, and counted what happened.
    let page = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/grafana-dashboard.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut names = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("txcoord_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                names.insert(name);
            }
        }
    }
    assert!(names.len() >= 10, "{names:?}");
    for name in &names {
        assert!(
            page.lines()
                .any(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{"))),
            "the dashboard queries {name}, which /metrics does not have:\n{page}"
        );
    }
    let line = |prefix: &str| {
        page.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{page}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse::<f64>()
            .unwrap()
    };
    assert_eq!(
        line("txcoord_ended_by_reason_total{reason=\"operator\"}"),
        1.0
    );
    assert_eq!(
        line("txcoord_transaction_duration_seconds_count{outcome=\"aborted\"}"),
        1.0
    );
    assert_eq!(
        line("txcoord_transaction_duration_seconds_count{outcome=\"committed\"}"),
        1.0
    );
    assert_eq!(line("txcoord_alerts_total"), 4.0);
}
