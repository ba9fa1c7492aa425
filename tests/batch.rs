//! Batched commands and replies (`<prefix>.cmd.<service>.batch.<id>`,
//! `<prefix>.reply.<service>.batch.<id>`) with real processes: a batch mixing prepares of
//! several transactions, one of which aborts; SDK participants that read batches with a
//! raw-protocol (Python) one and an SDK one with batching off in the same transactions; a
//! reply batch lost and the commands resent; a participant killed with part of a batch
//! recorded; the coordinator killed right after batched transactions' decisions. Every
//! batch seen on the bus is checked against its schema.
//!
//! The coordinator runs with `batch_linger_us` so that transactions submitted together
//! share batches; which commands share one is not asserted beyond "some do", since that is
//! timing, and the outcomes are what the contract promises.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{System, check, request, step, validator};
use futures::StreamExt;
use serde_json::{Value, json};
use txcoord::participant::BranchState;
use txcoord::proto::{TransactionEvent, TxnState};

/// Batches gather for 20 ms after their first command.
const LINGER: (&str, &str) = ("TXCOORD_BATCH_LINGER_US", "20000");

/// Every command batch and reply batch on the bus, as (subject, body).
#[derive(Clone, Default)]
struct Tap(Arc<Mutex<Vec<(String, Value)>>>);

impl Tap {
    async fn start(sys: &System) -> Tap {
        let tap = Tap::default();
        let mut cmds = sys.nc.subscribe("txn.cmd.*.batch.>").await.unwrap();
        let mut replies = sys.nc.subscribe("txn.reply.*.batch.>").await.unwrap();
        sys.nc.flush().await.unwrap();
        let sink = tap.clone();
        tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    Some(m) = cmds.next() => m,
                    Some(m) = replies.next() => m,
                    else => return,
                };
                let body = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
                sink.0.lock().unwrap().push((m.subject.to_string(), body));
            }
        });
        tap
    }

    /// Checks every batch against its schema; the transactions of each command batch.
    fn command_batches(&self) -> Vec<(String, BTreeSet<String>)> {
        let (cmd, reply) = (validator("command-batch"), validator("reply-batch"));
        let mut out = Vec::new();
        for (subject, body) in self.0.lock().unwrap().iter() {
            if subject.starts_with("txn.cmd.") {
                check(&cmd, "command-batch", subject, body);
                let txns = body["commands"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["txn_id"].as_str().unwrap().to_string())
                    .collect();
                out.push((subject.clone(), txns));
            } else {
                check(&reply, "reply-batch", subject, body);
            }
        }
        out
    }

    fn reply_batches(&self) -> usize {
        let all = self.0.lock().unwrap();
        all.iter()
            .filter(|(s, _)| s.starts_with("txn.reply."))
            .count()
    }
}

/// Runs one transaction so every service's first reply is heard: from then on the
/// coordinator knows which of them read batches.
async fn warm_up(sys: &System, services: &[&str]) {
    let steps = services.iter().map(|s| step(s, json!({}))).collect();
    let ev = sys.run(request("warm-up", steps)).await;
    assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
}

async fn run_all(sys: &System, reqs: Vec<Value>) -> Vec<TransactionEvent> {
    sys.client
        .submit_and_wait(reqs, Duration::from_secs(60))
        .await
        .into_iter()
        .map(|r| r.expect("an outcome"))
        .collect()
}

/// How many times the scripted participant's service voted on each branch of `txn_prefix`.
fn votes(log: &str, txn_prefix: &str) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains("VOTED")) {
        if let Some(id) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("txn_id="))
            .filter(|id| id.starts_with(txn_prefix))
        {
            *n.entry(id.to_string()).or_default() += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_mixing_transactions_commits_each_and_aborts_the_one_refused() {
    let sys = System::start(&["a", "b"], &[LINGER]).await;
    warm_up(&sys, &["a", "b"]).await;
    let tap = Tap::start(&sys).await;
    let reqs = (0..12)
        .map(|i| {
            let b = if i == 5 {
                json!({"vote": "abort", "reason": "no stock for m-5"})
            } else {
                json!({})
            };
            request(&format!("m-{i}"), vec![step("a", json!({})), step("b", b)])
        })
        .collect();
    let outs = run_all(&sys, reqs).await;
    for (i, ev) in outs.iter().enumerate() {
        let want = if i == 5 {
            TxnState::Aborted
        } else {
            TxnState::Committed
        };
        assert_eq!(ev.state, want, "{ev:?}");
    }
    sys.wait_branch("a", "m-5", 0, BranchState::Aborted).await;
    for i in [0, 4, 6, 11] {
        sys.wait_branch("a", &format!("m-{i}"), 0, BranchState::Committed)
            .await;
        sys.wait_branch("b", &format!("m-{i}"), 1, BranchState::Committed)
            .await;
    }
    // The refused transaction's prepares went out in a batch with others' prepares.
    let batches = tap.command_batches();
    assert!(
        batches
            .iter()
            .any(|(_, txns)| txns.contains("m-5") && txns.len() > 1),
        "{batches:?}"
    );
    assert!(tap.reply_batches() > 0);
    let stats = sys.stats().await;
    assert!(stats["command_batches"].as_u64() > Some(0), "{stats}");
    assert!(
        stats["batched_commands"].as_u64() > stats["command_batches"].as_u64(),
        "{stats}"
    );
    // One service call per branch: a batch runs each command once.
    let a = votes(&sys.participant_log("a").log_text(), "m-");
    assert_eq!(a.len(), 12, "{a:?}");
    assert!(a.values().all(|&n| n == 1), "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_and_per_command_participants_share_transactions() {
    let mut sys = System::start(&["a"], &[LINGER]).await;
    // An SDK participant with batching off, and a raw-protocol one that never heard of it.
    sys.spawn_participant("plain", &["--no-batch"]).await;
    let ledger = sys.spawn_ledger().await;
    warm_up(&sys, &["a", "plain", "ledger"]).await;
    let tap = Tap::start(&sys).await;
    let reqs = (0..10)
        .map(|i| {
            request(
                &format!("x-{i}"),
                vec![
                    step("a", json!({})),
                    step("plain", json!({})),
                    step("ledger", json!({"line": format!("x-{i}")})),
                ],
            )
        })
        .collect();
    let outs = run_all(&sys, reqs).await;
    assert!(
        outs.iter().all(|e| e.state == TxnState::Committed),
        "{outs:?}\n{}",
        ledger.log_text()
    );
    for i in 0..10 {
        sys.wait_branch("a", &format!("x-{i}"), 0, BranchState::Committed)
            .await;
        sys.wait_branch("plain", &format!("x-{i}"), 1, BranchState::Committed)
            .await;
        sys.wait_record("ledger_data", &format!("x-{i}.2"), |r| {
            r.is_some_and(|r| r["state"] == "committed")
        })
        .await;
    }
    // Only `a` was sent batches.
    let batches = tap.command_batches();
    assert!(!batches.is_empty());
    assert!(
        batches
            .iter()
            .all(|(s, _)| s.starts_with("txn.cmd.a.batch.")),
        "{batches:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_reply_batch_is_made_good_by_the_resent_commands() {
    let mut sys = System::start(&["a", "b"], &[LINGER]).await;
    let url = sys.nats.url();
    sys.participant("b").restart_with(&[
        ("TXCOORD_NATS_URL", url.as_str()),
        ("TXCOORD_FAILPOINT", "participant-lose-reply-batch"),
    ]);
    sys.participant("b")
        .wait_for("participant ready", Duration::from_secs(30))
        .await;
    warm_up(&sys, &["a", "b"]).await;
    let tap = Tap::start(&sys).await;
    let reqs = (0..8)
        .map(|i| {
            let mut r = request(
                &format!("l-{i}"),
                vec![step("a", json!({})), step("b", json!({}))],
            );
            r["timeout_ms"] = json!(4000);
            r
        })
        .collect();
    let outs = run_all(&sys, reqs).await;
    let b_log = sys.participant_log("b").log_text();
    assert!(
        b_log.contains("participant-lose-reply-batch: this reply batch is lost"),
        "no batch reply was lost, so this test shows nothing:\n{b_log}"
    );
    assert!(
        outs.iter().all(|e| e.state == TxnState::Committed),
        "{outs:?}"
    );
    // The resent commands were answered from the records: b's service voted once each.
    let b = votes(&b_log, "l-");
    assert_eq!(b.len(), 8, "{b:?}");
    assert!(b.values().all(|&n| n == 1), "{b:?}");
    assert!(!tap.command_batches().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_killed_with_part_of_a_batch_recorded_finishes_it_once() {
    let mut sys = System::start(&["a", "b"], &[LINGER]).await;
    warm_up(&sys, &["a", "b"]).await;
    let tap = Tap::start(&sys).await;
    // b votes at once on the even ones and only after 3 s on the odd ones: it is killed
    // in between, with the even branches recorded and the odd ones not.
    let reqs: Vec<Value> = (0..8)
        .map(|i| {
            let b = if i % 2 == 0 {
                json!({})
            } else {
                json!({"delay_ms": 3000})
            };
            let mut r = request(&format!("k-{i}"), vec![step("a", json!({})), step("b", b)]);
            r["timeout_ms"] = json!(20000);
            r
        })
        .collect();
    let waiting = {
        let client = sys.client.clone();
        tokio::spawn(async move { client.submit_and_wait(reqs, Duration::from_secs(60)).await })
    };
    // The even ones are recorded (prepared, or committed already: each is its own
    // transaction and needs only a's vote besides).
    for i in [0, 2, 4, 6] {
        let id = format!("k-{i}");
        let mut tries = 0;
        while !sys
            .branch("b", &id, 1)
            .await
            .is_some_and(|r| matches!(r.state, BranchState::Prepared | BranchState::Committed))
        {
            tries += 1;
            assert!(tries < 600, "{id} never recorded at b");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for i in [1, 3, 5, 7] {
        assert!(
            sys.branch("b", &format!("k-{i}"), 1).await.is_none(),
            "k-{i} was recorded before the kill"
        );
    }
    sys.participant("b").kill9();
    sys.participant("b").restart();
    let outs = waiting.await.unwrap();
    assert!(
        outs.iter()
            .all(|o| o.as_ref().is_ok_and(|e| e.state == TxnState::Committed)),
        "{outs:?}"
    );
    for i in 0..8 {
        sys.wait_branch("b", &format!("k-{i}"), 1, BranchState::Committed)
            .await;
    }
    // The recorded ones were not voted again; the others were voted by the new process.
    let b = votes(&sys.participant_log("b").log_text(), "k-");
    for i in [0, 2, 4, 6] {
        assert_eq!(b.get(&format!("k-{i}")), Some(&1), "{b:?}");
    }
    assert!(
        tap.command_batches()
            .iter()
            .any(|(s, txns)| s.starts_with("txn.cmd.b.") && txns.len() > 1),
        "b's prepares did not share a batch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_killed_after_batched_decisions_commits_each_once() {
    let mut sys = System::start(
        &["a", "b"],
        &[LINGER, ("TXCOORD_FAILPOINT", "after-decision")],
    )
    .await;
    let url = sys.nats.url();
    // The warm-up stops at its decision too; the restarted coordinator finishes it.
    let warm = request("warm-up", vec![step("a", json!({})), step("b", json!({}))]);
    sys.submit(&warm, "warm-up").await;
    sys.coordinator
        .wait_for(
            "FAILPOINT after-decision txn_id=warm-up",
            Duration::from_secs(20),
        )
        .await;
    sys.coordinator.kill9();
    sys.coordinator.restart_with(&[
        ("TXCOORD_NATS_URL", url.as_str()),
        LINGER,
        ("TXCOORD_FAILPOINT", "after-decision"),
    ]);
    sys.wait_state("warm-up", |e| e.state == TxnState::Committed)
        .await;
    let tap = Tap::start(&sys).await;
    for i in 0..6 {
        let r = request(
            &format!("d-{i}"),
            vec![step("a", json!({})), step("b", json!({}))],
        );
        sys.submit(&r, &format!("d-{i}")).await;
    }
    for i in 0..6 {
        sys.coordinator
            .wait_for(
                &format!("FAILPOINT after-decision txn_id=d-{i}"),
                Duration::from_secs(20),
            )
            .await;
    }
    sys.coordinator.kill9();
    for i in 0..6 {
        assert_eq!(
            sys.client
                .last_event(&format!("d-{i}"))
                .await
                .map(|e| e.state),
            Some(TxnState::Committing)
        );
        assert_eq!(
            sys.branch("b", &format!("d-{i}"), 1).await.map(|r| r.state),
            Some(BranchState::Prepared)
        );
    }
    assert!(
        !tap.command_batches().is_empty(),
        "the prepares were not batched"
    );
    sys.coordinator
        .restart_with(&[("TXCOORD_NATS_URL", url.as_str()), LINGER]);
    for i in 0..6 {
        let ev = sys
            .wait_state(&format!("d-{i}"), |e| e.state.is_terminal())
            .await;
        assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
        sys.wait_branch("a", &format!("d-{i}"), 0, BranchState::Committed)
            .await;
        sys.wait_branch("b", &format!("d-{i}"), 1, BranchState::Committed)
            .await;
    }
    let a = votes(&sys.participant_log("a").log_text(), "d-");
    assert!(a.values().all(|&n| n == 1), "{a:?}");
}
