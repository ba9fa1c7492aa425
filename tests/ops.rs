//! The operator's read side with real processes: `txcoord list` (every filter, pages that
//! never repeat or show an old state, with the coordinator down), `txcoord show` (the
//! timeline) and `txcoord watch` (a live tail with filters); bad flags are clear errors.

mod common;

use std::collections::BTreeSet;
use std::process::Output;
use std::time::Duration;

use common::{Proc, System, request, step};
use serde_json::{Value, json};
use txcoord::proto::TxnState;

fn cli(sys: &System, args: &[&str]) -> Output {
    sys.cli(args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `txcoord list --json` with `args`: (txn_id, state) newest first, and the next page.
fn list(sys: &System, args: &[&str]) -> (Vec<(String, String)>, Option<u64>) {
    let mut all = vec!["list", "--json"];
    all.extend_from_slice(args);
    let out = cli(sys, &all);
    assert!(
        out.status.success(),
        "list {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&stdout(&out)).expect("one JSON object");
    let items = v["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["event"]["txn_id"].as_str().unwrap().to_string(),
                t["event"]["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (items, v["next_before"].as_u64())
}

fn ids(items: &[(String, String)]) -> Vec<&str> {
    items.iter().map(|(id, _)| id.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_show_and_watch_read_the_log() {
    let env = [
        ("TXCOORD_STUCK_AFTER_MS", "300"),
        ("TXCOORD_RETRY_BASE_MS", "100"),
    ];
    let mut sys = System::start(&["a", "b"], &env).await;
    for id in ["o-1", "o-2"] {
        let ev = sys
            .run(request(
                id,
                vec![step("a", json!({})), step("b", json!({}))],
            ))
            .await;
        assert_eq!(ev.state, TxnState::Committed);
    }
    let no = sys
        .run(request(
            "o-no",
            vec![
                step("a", json!({})),
                step("b", json!({"vote": "abort", "reason": "card declined"})),
            ],
        ))
        .await;
    assert_eq!(no.state, TxnState::Aborted);
    let saga = sys
        .run(json!({"txn_id": "o-saga", "mode": "saga", "steps": [step("a", json!({}))]}))
        .await;
    assert_eq!(saga.state, TxnState::Completed);
    let only_a = sys.run(request("o-a", vec![step("a", json!({}))])).await;
    assert_eq!(only_a.state, TxnState::Committed);
    // Stuck (last: its retries may write more records until the coordinator stops): b votes and dies before it hears the commit.
    sys.stuck_commit("o-stuck", "a", "b").await;
    // From here on no coordinator runs: everything below reads the log alone.
    sys.coordinator.kill9();

    let (all, next) = list(&sys, &[]);
    assert_eq!(
        ids(&all),
        ["o-stuck", "o-a", "o-saga", "o-no", "o-2", "o-1"],
        "newest first, each once"
    );
    assert_eq!(next, None);
    let state_of = |id: &str| all.iter().find(|(i, _)| i == id).unwrap().1.clone();
    assert_eq!(state_of("o-stuck"), "committing");
    assert_eq!(state_of("o-no"), "aborted");
    assert_eq!(state_of("o-saga"), "completed");

    assert_eq!(ids(&list(&sys, &["--state", "aborted"]).0), ["o-no"]);
    assert_eq!(
        ids(&list(&sys, &["--state", "aborted,completed"]).0),
        ["o-saga", "o-no"]
    );
    assert_eq!(ids(&list(&sys, &["--stuck"]).0), ["o-stuck"]);
    assert_eq!(ids(&list(&sys, &["--mode", "saga"]).0), ["o-saga"]);
    assert_eq!(
        ids(&list(&sys, &["--service", "b"]).0),
        ["o-stuck", "o-no", "o-2", "o-1"]
    );
    assert_eq!(
        ids(&list(
            &sys,
            &["--stuck", "--service", "a", "--state", "committing"]
        )
        .0),
        ["o-stuck"]
    );
    assert!(list(&sys, &["--older-than", "1h"]).0.is_empty());
    assert_eq!(list(&sys, &["--since", "1h"]).0.len(), 6);
    assert!(list(&sys, &["--until", "2000-01-01"]).0.is_empty());
    assert_eq!(list(&sys, &["--until", "1m", "--since", "1d"]).0.len(), 0);

    // Pages: together they are the whole list, each transaction once, at its latest state.
    let (first, next) = list(&sys, &["--limit", "2"]);
    assert_eq!(ids(&first), ["o-stuck", "o-a"]);
    let before = next.expect("a next page").to_string();
    let (second, next) = list(&sys, &["--limit", "3", "--before", &before]);
    assert_eq!(ids(&second), ["o-saga", "o-no", "o-2"]);
    let before = next.expect("a third page").to_string();
    let (third, _) = list(&sys, &["--limit", "3", "--before", &before]);
    assert_eq!(ids(&third), ["o-1"]);
    let every: BTreeSet<_> = [first, second, third].concat().into_iter().collect();
    assert_eq!(every.len(), 6);

    // The table form.
    let table = stdout(&cli(&sys, &["list", "--stuck"]));
    assert!(
        table.contains("o-stuck") && table.contains("committing STUCK"),
        "{table}"
    );

    // show: the timeline.
    let out = cli(&sys, &["show", "o-no"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.starts_with("transaction o-no (2pc, 2 steps): aborted"),
        "{text}"
    );
    assert!(text.contains("step 1 b voted abort"), "{text}");
    assert!(text.contains("card declined"), "{text}");
    assert!(text.contains("finished after"), "{text}");
    let stuck_text = stdout(&cli(&sys, &["show", "o-stuck"]));
    assert!(stuck_text.contains("flagged stuck"), "{stuck_text}");
    assert!(stuck_text.contains("not finished"), "{stuck_text}");
    let json: Value =
        serde_json::from_str(&stdout(&cli(&sys, &["show", "o-no", "--json"]))).unwrap();
    assert_eq!(json[0]["state"], "accepted");
    assert_eq!(json.as_array().unwrap().last().unwrap()["state"], "aborted");
    let missing = cli(&sys, &["show", "o-none"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no transaction o-none"));

    // Bad flags say which and why.
    for (args, says) in [
        (vec!["list", "--state", "done"], "--state"),
        (vec!["list", "--older-than", "5"], "--older-than"),
        (vec!["list", "--since", "yesterday"], "--since"),
        (vec!["show", "bad id"], "not a valid txn_id"),
    ] {
        let out = cli(&sys, &args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }

    // watch: a live tail with filters, while a coordinator runs again.
    let url = sys.nats.url();
    let watch = Proc::spawn(
        sys.dir.path(),
        "watch",
        &["watch", "--state", "committed", "--service", "a"],
        &[("TXCOORD_NATS_URL", url.as_str())],
    );
    watch.wait_for("watching", Duration::from_secs(20)).await;
    sys.coordinator.restart();
    sys.coordinator
        .wait_for("coordinator ready", Duration::from_secs(30))
        .await;
    let ev = sys.run(request("o-live", vec![step("a", json!({}))])).await;
    assert_eq!(ev.state, TxnState::Committed);
    watch.wait_for("o-live ", Duration::from_secs(20)).await;
    let seen = watch.log_text();
    assert!(
        seen.lines().filter(|l| l.contains("o-live")).count() == 1,
        "only the committed record: {seen}"
    );
}
