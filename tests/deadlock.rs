//! Deadlocks across services, with real processes: bank services that lock each account
//! from prepare to commit (`--lock-records`), a coordinator with a long prepare timeout,
//! and cycles of waits built step by step (a "gate" lock, held by a transaction whose other
//! step waits for a service that is not running yet, decides when a wait begins).
//!
//! Shown: a two-service cycle broken by aborting the youngest (reason `deadlock` naming
//! both) while the other commits, long before the timeout; a three-service cycle; a
//! service killed while it waits (its edge expires: no phantom deadlock, and once it is
//! back it still holds its prepared branch's lock); a cycle that forms while no coordinator
//! runs (broken by the restarted one); wait-die and no-wait.

mod common;

use std::time::{Duration, Instant};

use common::{Proc, System, check, validator};
use futures::StreamExt;
use serde_json::{Value, json};
use txcoord::participant::BranchState;
use txcoord::proto::{Reason, TransactionEvent, TxnState};

/// Thirty seconds: a deadlock left to the timeout would take this long.
const TIMEOUT_MS: &str = "30000";

fn debit(service: &str, account: &str) -> Value {
    json!({"service": service, "action": "debit", "payload": {"account": account, "amount": 1}})
}

fn credit(service: &str, account: &str) -> Value {
    json!({"service": service, "action": "credit", "payload": {"account": account, "amount": 1}})
}

/// A credit that must also hold `gate` at its service before it takes its account.
fn gated_credit(service: &str, account: &str) -> Value {
    json!({"service": service, "action": "credit",
        "payload": {"account": account, "amount": 1, "locks": ["_gate"]}})
}

fn txn(id: &str, steps: Vec<Value>) -> Value {
    json!({"txn_id": id, "mode": "2pc", "steps": steps})
}

async fn bank(sys: &mut System, name: &str, accounts: &[&str], env: &[(&str, &str)]) {
    // Waits as long as the prepare timeout: here only a deadlock's victim ends one early.
    let mut args = vec![
        "--service",
        name,
        "--lock-records",
        "--lock-wait-ms",
        TIMEOUT_MS,
    ];
    let seeds: Vec<String> = accounts.iter().map(|a| format!("{a}=100")).collect();
    for s in &seeds {
        args.extend(["--seed", s.as_str()]);
    }
    sys.spawn_service_env(name, "bank", &args, env).await;
}

async fn start(policy: &str) -> System {
    System::start(
        &[],
        &[
            ("TXCOORD_PREPARE_TIMEOUT_MS", TIMEOUT_MS),
            ("TXCOORD_DEADLOCK", policy),
            // The shortest edge TTL allowed: a dead waiter's edge is gone in 2 s.
            ("TXCOORD_DEADLOCK_EDGE_TTL_MS", "2000"),
        ],
    )
    .await
}

/// The gate holder: `gate` at each of `services`, and a step at `gatekeeper`, which is not
/// running, so it stays prepared (holding the gates) until [`open_gates`].
async fn hold_gates(sys: &System, id: &str, services: &[&str]) {
    let mut steps: Vec<Value> = services
        .iter()
        .map(|s| gated_credit(s, "gatehouse"))
        .collect();
    steps.push(json!({"service": "gatekeeper", "action": "act", "payload": {}}));
    sys.submit(&txn(id, steps), id).await;
    for (i, s) in services.iter().enumerate() {
        sys.wait_branch(s, id, i, BranchState::Prepared).await;
    }
}

fn open_gates(sys: &System) -> Proc {
    let url = sys.nats.url();
    Proc::spawn(
        sys.dir.path(),
        "gatekeeper",
        &["participant", "--service", "gatekeeper"],
        &[("TXCOORD_NATS_URL", url.as_str())],
    )
}

async fn outcome(sys: &System, id: &str) -> TransactionEvent {
    sys.wait_state(id, |e| e.state.is_terminal()).await
}

fn deadlock_of(ev: &TransactionEvent) -> (String, Vec<String>, Vec<String>, Vec<String>) {
    match &ev.reason {
        Some(Reason::Deadlock {
            how,
            txns,
            services,
            resources,
            ..
        }) => (
            how.clone(),
            txns.clone(),
            services.clone(),
            resources.clone(),
        ),
        other => panic!(
            "{} ended {:?} with {other:?}, not a deadlock",
            ev.txn_id, ev.state
        ),
    }
}

async fn metric(sys: &System, name: &str) -> u64 {
    sys.stats().await[name].as_u64().unwrap_or(0)
}

/// t1 holds alice at bank-a and waits for bob at bank-b; t2 holds bob and waits for alice.
/// Returns when both hold their first lock and t2 waits (the gate still closes the cycle).
async fn two_way(sys: &System, t1: &str, t2: &str) {
    hold_gates(sys, &format!("{t1}-gate"), &["bank-b"]).await;
    sys.submit(
        &txn(
            t1,
            vec![debit("bank-a", "alice"), gated_credit("bank-b", "bob")],
        ),
        t1,
    )
    .await;
    sys.wait_branch("bank-a", t1, 0, BranchState::Prepared)
        .await;
    sys.submit(
        &txn(t2, vec![debit("bank-b", "bob"), credit("bank-a", "alice")]),
        t2,
    )
    .await;
    sys.wait_branch("bank-b", t2, 0, BranchState::Prepared)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_service_deadlock_aborts_the_youngest_and_the_other_commits_long_before_the_timeout()
{
    let mut sys = start("detect").await;
    bank(&mut sys, "bank-a", &["alice", "gatehouse"], &[]).await;
    bank(&mut sys, "bank-b", &["bob", "gatehouse"], &[]).await;
    let schema = validator("wait-edge");
    let mut edges = sys.nc.subscribe("txn.waits").await.unwrap();
    let mut alerts = sys.nc.subscribe("txn.alerts").await.unwrap();
    let began = Instant::now();
    two_way(&sys, "dl-t1", "dl-t2").await;
    let _gatekeeper = open_gates(&sys);
    let t2 = outcome(&sys, "dl-t2").await;
    let t1 = outcome(&sys, "dl-t1").await;
    let took = began.elapsed();
    if t1.state != TxnState::Committed {
        sys.dump_logs();
    }
    assert_eq!(t1.state, TxnState::Committed, "{t1:?}");
    assert_eq!(t2.state, TxnState::Aborted);
    let (how, txns, services, resources) = deadlock_of(&t2);
    assert_eq!(how, "detected");
    assert_eq!(
        txns,
        vec!["dl-t2".to_string(), "dl-t1".to_string()],
        "the victim first"
    );
    // The victim's abort is also an alert on txn.alerts.
    common::next_alert(&mut alerts, "deadlock", "dl-t2").await;
    assert_eq!(services, vec!["bank-a".to_string(), "bank-b".to_string()]);
    assert_eq!(
        resources,
        vec!["bank-a:alice".to_string(), "bank-b:bob".to_string()]
    );
    assert!(
        took < Duration::from_secs(10),
        "both ended in {took:?}, a third of the 30 s timeout"
    );
    // From the cycle forming to the victim's abort: the reason says when it formed.
    if let Some(Reason::Deadlock {
        formed_ms: Some(formed),
        ..
    }) = &t2.reason
    {
        let aborted = sys
            .wait_state("dl-t2", |e| e.state == TxnState::Aborting)
            .await
            .timestamp_ms;
        assert!(
            aborted.saturating_sub(*formed) < 3_000,
            "{} ms from cycle to abort",
            aborted - formed
        );
    } else {
        panic!("no formed_ms in {:?}", t2.reason);
    }
    assert_eq!(metric(&sys, "deadlocks").await, 1);
    // The money moved once: alice paid 1 and got nothing back; bob got 1.
    let alice = sys.record("bank-a_data", "alice").await.unwrap();
    let bob = sys.record("bank-b_data", "bob").await.unwrap();
    assert_eq!(alice["balance"], 99, "{alice}");
    assert_eq!(bob["balance"], 101, "{bob}");
    // Every edge the lock tables sent matches its schema.
    let mut seen = 0;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(200), edges.next()).await {
        let v: Value = serde_json::from_slice(&msg.payload).unwrap();
        check(&schema, "wait-edge", "txn.waits", &v);
        seen += 1;
    }
    assert!(seen >= 2, "edges seen: {seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_service_cycle_is_broken_and_the_other_two_commit() {
    let mut sys = start("detect").await;
    bank(&mut sys, "bank-a", &["a1"], &[]).await;
    bank(&mut sys, "bank-b", &["b1", "gatehouse"], &[]).await;
    bank(&mut sys, "bank-c", &["c1", "gatehouse"], &[]).await;
    hold_gates(&sys, "three-gate", &["bank-b", "bank-c"]).await;
    // t1 holds a1, will want b1; t2 holds b1, will want c1; t3 holds c1 and wants a1.
    sys.submit(
        &txn(
            "three-t1",
            vec![debit("bank-a", "a1"), gated_credit("bank-b", "b1")],
        ),
        "three-t1",
    )
    .await;
    sys.wait_branch("bank-a", "three-t1", 0, BranchState::Prepared)
        .await;
    sys.submit(
        &txn(
            "three-t2",
            vec![debit("bank-b", "b1"), gated_credit("bank-c", "c1")],
        ),
        "three-t2",
    )
    .await;
    sys.wait_branch("bank-b", "three-t2", 0, BranchState::Prepared)
        .await;
    sys.submit(
        &txn(
            "three-t3",
            vec![debit("bank-c", "c1"), credit("bank-a", "a1")],
        ),
        "three-t3",
    )
    .await;
    sys.wait_branch("bank-c", "three-t3", 0, BranchState::Prepared)
        .await;
    let began = Instant::now();
    let _gatekeeper = open_gates(&sys);
    let t3 = outcome(&sys, "three-t3").await;
    let t2 = outcome(&sys, "three-t2").await;
    let t1 = outcome(&sys, "three-t1").await;
    assert!(began.elapsed() < Duration::from_secs(10));
    assert_eq!(t1.state, TxnState::Committed);
    assert_eq!(t2.state, TxnState::Committed);
    assert_eq!(t3.state, TxnState::Aborted);
    let (how, txns, services, _) = deadlock_of(&t3);
    assert_eq!(how, "detected");
    assert_eq!(
        txns,
        vec!["three-t3", "three-t1", "three-t2"],
        "the cycle in wait order, the youngest first"
    );
    assert_eq!(services, vec!["bank-a", "bank-b", "bank-c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_killed_while_it_waits_leaves_no_phantom_deadlock_and_keeps_its_locks() {
    let mut sys = start("detect").await;
    bank(&mut sys, "bank-a", &["alice"], &[]).await;
    bank(&mut sys, "bank-b", &["bob", "gatehouse"], &[]).await;
    two_way(&sys, "kw-t1", "kw-t2").await;
    // t2 waits at bank-a for alice; its edge t2 -> t1 is at the coordinator. bank-a dies.
    sys.participant("bank-a").kill9();
    // Longer than the edge TTL (2 s here): the dead waiter's edge expires.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // t1 now waits for bob, held by t2: with the ghost edge this would look like a cycle.
    let _gatekeeper = open_gates(&sys);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(metric(&sys, "deadlocks").await, 0, "no phantom deadlock");
    for id in ["kw-t1", "kw-t2"] {
        let last = sys.client.last_event(id).await.unwrap();
        assert!(!last.state.is_terminal(), "{id} is {:?}", last.state);
    }
    // bank-a comes back: t1's prepared branch holds alice again (from its record), t2's
    // prepare is delivered again and waits for it: now the cycle is real, and it is broken.
    sys.participant("bank-a").restart();
    let t2 = outcome(&sys, "kw-t2").await;
    let t1 = outcome(&sys, "kw-t1").await;
    assert_eq!(t1.state, TxnState::Committed, "{t1:?}");
    assert_eq!(deadlock_of(&t2).0, "detected");
    assert_eq!(metric(&sys, "deadlocks").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_that_forms_while_no_coordinator_runs_is_broken_after_its_restart() {
    let mut sys = System::start(
        &[],
        &[
            ("TXCOORD_PREPARE_TIMEOUT_MS", TIMEOUT_MS),
            ("TXCOORD_FAILPOINT", "after-decision"),
        ],
    )
    .await;
    bank(&mut sys, "bank-a", &["alice"], &[]).await;
    // bank-b settles in-doubt branches from the log after 1 s: that is how the gate opens
    // while no coordinator runs.
    bank(
        &mut sys,
        "bank-b",
        &["bob", "gatehouse"],
        &[("TXCOORD_IN_DOUBT_AFTER_MS", "1000")],
    )
    .await;
    two_way(&sys, "kc-t1", "kc-t2").await;
    let _gatekeeper = open_gates(&sys);
    // The gate holder's commit is durable; the coordinator stops there, and is killed.
    sys.coordinator
        .wait_for(
            "FAILPOINT after-decision txn_id=kc-t1-gate",
            Duration::from_secs(30),
        )
        .await;
    sys.coordinator.kill9();
    // bank-b commits the gate holder from the log and lets go of the gate: t1 now waits for
    // bob, held by t2, which waits for alice, held by t1. Nobody can break it yet.
    let mut edges = sys.nc.subscribe("txn.waits").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut closing = false;
    while !closing && Instant::now() < deadline {
        if let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(2), edges.next()).await {
            let v: Value = serde_json::from_slice(&msg.payload).unwrap();
            closing = v["waiter"] == "kc-t1" && v["holder"] == "kc-t2";
        }
    }
    assert!(closing, "t1 waits for t2 while no coordinator runs");
    for id in ["kc-t1", "kc-t2"] {
        let last = sys.client.last_event(id).await.unwrap();
        assert!(!last.state.is_terminal(), "{id} is {:?}", last.state);
    }
    // The coordinator comes back (without the failpoint): it prepares again with new
    // tokens, the lock tables report their waits with them, and the cycle is broken.
    let url = sys.nats.url();
    sys.coordinator.restart_with(&[
        ("TXCOORD_NATS_URL", url.as_str()),
        ("TXCOORD_LEASE_TTL_MS", "2000"),
        ("TXCOORD_PREPARE_TIMEOUT_MS", TIMEOUT_MS),
    ]);
    let t2 = outcome(&sys, "kc-t2").await;
    let t1 = outcome(&sys, "kc-t1").await;
    if t1.state != TxnState::Committed {
        sys.dump_logs();
    }
    assert_eq!(t1.state, TxnState::Committed, "{t1:?}");
    assert_eq!(deadlock_of(&t2).0, "detected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_die_lets_the_older_wait_and_refuses_the_younger_at_once() {
    let mut sys = start("wait-die").await;
    bank(&mut sys, "bank-a", &["alice", "gatehouse"], &[]).await;
    // old holds alice until the gatekeeper comes.
    sys.submit(
        &txn(
            "wd-old",
            vec![
                debit("bank-a", "alice"),
                json!({"service": "gatekeeper", "action": "act", "payload": {}}),
            ],
        ),
        "wd-old",
    )
    .await;
    sys.wait_branch("bank-a", "wd-old", 0, BranchState::Prepared)
        .await;
    // A younger one wants alice: refused at once, no waiting for the 30 s timeout.
    let began = Instant::now();
    sys.submit(&txn("wd-young", vec![debit("bank-a", "alice")]), "wd-young")
        .await;
    let young = outcome(&sys, "wd-young").await;
    assert!(began.elapsed() < Duration::from_secs(5));
    assert_eq!(young.state, TxnState::Aborted);
    let (how, txns, _, resources) = deadlock_of(&young);
    assert_eq!(how, "prevented");
    assert_eq!(txns, vec!["wd-young", "wd-old"]);
    assert_eq!(resources, vec!["bank-a:alice"]);
    // An older one (its lock_ts, from a resubmission, before wd-old's) waits instead.
    let old_ts = sys
        .client
        .history("wd-old")
        .await
        .first()
        .and_then(|e| e.lock_ts)
        .expect("the accepted record has lock_ts");
    let mut elder = txn("wd-elder", vec![debit("bank-a", "alice")]);
    elder["lock_ts"] = json!(old_ts - 1000);
    sys.submit(&elder, "wd-elder").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let waiting = sys.client.last_event("wd-elder").await.unwrap();
    assert!(!waiting.state.is_terminal(), "the elder waits: {waiting:?}");
    let _gatekeeper = open_gates(&sys);
    assert_eq!(outcome(&sys, "wd-old").await.state, TxnState::Committed);
    assert_eq!(outcome(&sys, "wd-elder").await.state, TxnState::Committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_wait_refuses_any_conflict_at_once() {
    let mut sys = start("no-wait").await;
    bank(&mut sys, "bank-a", &["alice"], &[]).await;
    sys.submit(
        &txn(
            "nw-first",
            vec![
                debit("bank-a", "alice"),
                json!({"service": "gatekeeper", "action": "act", "payload": {}}),
            ],
        ),
        "nw-first",
    )
    .await;
    sys.wait_branch("bank-a", "nw-first", 0, BranchState::Prepared)
        .await;
    // Even an older transaction does not wait under no-wait.
    let mut second = txn("nw-second", vec![debit("bank-a", "alice")]);
    second["lock_ts"] = json!(1);
    sys.submit(&second, "nw-second").await;
    let refused = outcome(&sys, "nw-second").await;
    assert_eq!(refused.state, TxnState::Aborted);
    let (how, txns, _, _) = deadlock_of(&refused);
    assert_eq!(how, "prevented");
    assert_eq!(txns, vec!["nw-second", "nw-first"]);
    let _gatekeeper = open_gates(&sys);
    assert_eq!(outcome(&sys, "nw-first").await.state, TxnState::Committed);
}

/// `txcoord demo --scenario deadlock`: the three runs, and its verdict.
#[test]
fn the_deadlock_demo_shows_detection_prevention_and_timeouts_and_keeps_its_invariants() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_txcoord"))
        .args(["demo", "--scenario", "deadlock", "--transfers", "60"])
        .env("TXCOORD_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("invariants OK"), "{stdout}");
    let row = |label: &str| -> Vec<String> {
        stdout
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no {label} row in {stdout}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    // policy, transfers, committed, deadlock, prevented, timeout, ...
    let detect = row("detect");
    assert_eq!(detect[1], detect[2], "every transfer committed: {detect:?}");
    assert!(detect[3].parse::<u64>().unwrap() > 0, "{detect:?}");
    assert_eq!(detect[5], "0", "no timeouts with detection: {detect:?}");
    let wait_die = row("wait-die");
    assert!(wait_die[4].parse::<u64>().unwrap() > 0, "{wait_die:?}");
    let off = row("timeouts");
    // "timeouts only": the label is two words.
    assert!(
        off[6].parse::<u64>().unwrap() > 0,
        "timeouts without detection: {off:?}"
    );
}

/// A branch whose commit fails (and is retried) is still prepared: it keeps its locks
/// until the commit goes through, then lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_keeps_its_locks_while_its_commit_is_retried() {
    let sys = System::start(&["s"], &[("TXCOORD_DEADLOCK", "no-wait")]).await;
    let holder = json!({"service": "s", "action": "act",
        "payload": {"locks": ["r"], "commit_fail_times": 3}});
    sys.submit(&txn("kl-holder", vec![holder]), "kl-holder")
        .await;
    sys.participant_log("s")
        .wait_for("COMMIT FAILED txn_id=kl-holder", Duration::from_secs(20))
        .await;
    let contender = json!({"service": "s", "action": "act", "payload": {"locks": ["r"]}});
    sys.submit(
        &txn("kl-contender", vec![contender.clone()]),
        "kl-contender",
    )
    .await;
    let refused = outcome(&sys, "kl-contender").await;
    let (how, txns, _, resources) = deadlock_of(&refused);
    assert_eq!(how, "prevented");
    assert_eq!(txns, vec!["kl-contender", "kl-holder"], "r is still held");
    assert_eq!(resources, vec!["r"]);
    assert_eq!(outcome(&sys, "kl-holder").await.state, TxnState::Committed);
    // Committed: r is free.
    sys.submit(&txn("kl-after", vec![contender]), "kl-after")
        .await;
    assert_eq!(outcome(&sys, "kl-after").await.state, TxnState::Committed);
}
