//! The example services (inventory, payment, order) as real processes with the real
//! coordinator: commit and abort paths, a service SIGKILLed after voting, concurrent orders
//! on one SKU with two inventory instances, optimistic concurrency, a service that dies
//! between applying a prepare (or a saga step) and recording it, and the whole demo with the
//! coordinator killed mid-run.

mod common;

use std::time::Duration;

use common::System;
use serde_json::{Value, json};
use txcoord::participant::BranchState;
use txcoord::proto::{Reason, TxnState};

async fn shop() -> System {
    let mut sys = System::start(&[], &[]).await;
    sys.spawn_service(
        "inventory",
        "inventory",
        &["--seed", "apple=10", "--seed", "pear=3", "--seed", "hot=10"],
    )
    .await;
    sys.spawn_service(
        "payment",
        "payment",
        &["--seed", "alice=1000", "--seed", "bob=50"],
    )
    .await;
    sys.spawn_service("order", "order", &[]).await;
    sys
}

fn order(txn: &str, order_id: &str, sku: &str, qty: u64, account: &str, amount: u64) -> Value {
    json!({"txn_id": txn, "steps": [
        {"service": "inventory", "action": "reserve", "payload": {"sku": sku, "qty": qty}},
        {"service": "payment", "action": "charge", "payload": {"account": account, "amount": amount}},
        {"service": "order", "action": "create", "payload": {"order_id": order_id, "account": account, "items": [{"sku": sku, "qty": qty}]}},
    ]})
}

fn n(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {v}"))
}

fn no_holds(v: Option<&Value>) -> bool {
    v.is_some_and(|v| v["holds"].as_object().is_none_or(|h| h.is_empty()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_and_abort_paths_of_every_service() {
    let sys = shop().await;
    // Commit: every service applies its part.
    let ev = sys
        .run(order("t-ok", "o-1", "apple", 2, "alice", 300))
        .await;
    assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
    let apple = sys
        .wait_record("inventory_data", "apple", no_holds)
        .await
        .unwrap();
    assert_eq!(
        (
            n(&apple, "available"),
            n(&apple, "sold"),
            n(&apple, "version")
        ),
        (8, 2, 1)
    );
    let alice = sys
        .wait_record("payment_data", "alice", no_holds)
        .await
        .unwrap();
    assert_eq!((n(&alice, "balance"), n(&alice, "charged")), (700, 300));
    let o1 = sys
        .wait_record("order_data", "o-1", |o| {
            o.is_some_and(|o| o["state"] == "confirmed")
        })
        .await
        .unwrap();
    assert_eq!(o1["txn_id"], "t-ok");

    // Inventory refuses: payment releases its hold, the order disappears.
    let ev = sys
        .run(order("t-stock", "o-2", "pear", 5, "alice", 100))
        .await;
    let Some(Reason::VoteAbort {
        service, message, ..
    }) = &ev.reason
    else {
        panic!("{ev:?}")
    };
    assert_eq!(service, "inventory");
    assert!(message.starts_with("out of stock"), "{message}");
    // Payment refuses: inventory releases its hold.
    let ev = sys
        .run(order("t-funds", "o-3", "pear", 1, "bob", 500))
        .await;
    let Some(Reason::VoteAbort {
        service, message, ..
    }) = &ev.reason
    else {
        panic!("{ev:?}")
    };
    assert_eq!(service, "payment");
    assert!(message.starts_with("insufficient funds"), "{message}");
    // Order refuses (a duplicate id): inventory and payment release theirs.
    let ev = sys
        .run(order("t-dup", "o-1", "apple", 1, "alice", 10))
        .await;
    let Some(Reason::VoteAbort {
        service, message, ..
    }) = &ev.reason
    else {
        panic!("{ev:?}")
    };
    assert_eq!(service, "order");
    assert!(message.starts_with("duplicate order_id"), "{message}");
    // Unknown account.
    let ev = sys
        .run(order("t-who", "o-4", "apple", 1, "mallory", 10))
        .await;
    assert!(
        matches!(&ev.reason, Some(Reason::VoteAbort { message, .. }) if message.starts_with("unknown account"))
    );

    let pear = sys
        .wait_record("inventory_data", "pear", no_holds)
        .await
        .unwrap();
    assert_eq!((n(&pear, "available"), n(&pear, "sold")), (3, 0));
    let apple = sys
        .wait_record("inventory_data", "apple", no_holds)
        .await
        .unwrap();
    assert_eq!((n(&apple, "available"), n(&apple, "sold")), (8, 2));
    let alice = sys
        .wait_record("payment_data", "alice", no_holds)
        .await
        .unwrap();
    assert_eq!((n(&alice, "balance"), n(&alice, "charged")), (700, 300));
    let bob = sys
        .wait_record("payment_data", "bob", no_holds)
        .await
        .unwrap();
    assert_eq!(n(&bob, "balance"), 50);
    for id in ["o-2", "o-3", "o-4"] {
        sys.wait_record("order_data", id, |o| o.is_none()).await;
    }
    let o1 = sys.record("order_data", "o-1").await.unwrap();
    assert_eq!(
        o1["txn_id"], "t-ok",
        "the duplicate did not touch the first order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_killed_after_voting_completes_the_transaction_after_restart() {
    let mut sys = shop().await;
    // Payment is slow, so the decision comes after inventory has voted and died.
    let mut req = order("t-kill", "o-k", "apple", 4, "alice", 100);
    req["steps"][1]["payload"]["delay_ms"] = json!(1500);
    sys.client
        .submit_raw(serde_json::to_vec(&req).unwrap().into(), "t-kill")
        .await
        .unwrap();
    sys.wait_vote("t-kill", 0).await;
    sys.participant("inventory").kill9();
    sys.wait_state("t-kill", |e| e.state == TxnState::Committing)
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let held = sys.record("inventory_data", "apple").await.unwrap();
    assert_eq!(
        n(&held, "sold"),
        0,
        "nothing applied while inventory is down"
    );
    sys.participant("inventory").restart();
    let ev = sys.wait_state("t-kill", |e| e.state.is_terminal()).await;
    assert_eq!(ev.state, TxnState::Committed);
    let apple = sys
        .wait_record("inventory_data", "apple", no_holds)
        .await
        .unwrap();
    assert_eq!((n(&apple, "available"), n(&apple, "sold")), (6, 4));
}

/// Inventory holds (or, as a saga step, takes) 4 apples and dies before the SDK records it.
/// The coordinator times out and aborts (compensates); inventory comes back without the
/// failpoint. The apples must come back.
/// Whichever reaches the restarted service first, the redelivered prepare (too late now) or
/// the abort, must release the hold; `ends` are the branch states either order leaves.
async fn died_before_recording(mode: &str, outcome: TxnState, ends: [BranchState; 2]) {
    let mut sys = System::start(&["b"], &[]).await;
    sys.spawn_service_env(
        "inventory",
        "inventory",
        &["--seed", "apple=10"],
        &[("TXCOORD_FAILPOINT", "participant-exit-before-record")],
    )
    .await;
    let id = format!("died-{mode}");
    let compensate = if mode == "saga" {
        json!("restock")
    } else {
        Value::Null
    };
    let req = json!({"txn_id": id, "mode": mode, "timeout_ms": 1000, "steps": [
        {"service": "inventory", "action": "reserve", "payload": {"sku": "apple", "qty": 4}, "compensate": compensate},
        {"service": "b", "action": "act", "payload": {}},
    ]});
    sys.submit(&req, &id).await;
    let status = sys
        .participant("inventory")
        .wait_exit(Duration::from_secs(30))
        .await;
    assert_eq!(status.code(), Some(101), "the failpoint fired");
    let apple = sys.record("inventory_data", "apple").await.unwrap();
    assert_eq!(n(&apple, "available"), 6, "the effect was applied: {apple}");
    // The decision (2PC) or the compensation (saga) is on its way to the dead process.
    sys.wait_state(&id, |e| {
        matches!(e.state, TxnState::Aborting | TxnState::Compensating)
    })
    .await;
    sys.participant("inventory").restart_with(&[]);
    let ev = sys.wait_state(&id, |e| e.state.is_terminal()).await;
    assert_eq!(ev.state, outcome, "{ev:?}");
    let apple = sys
        .wait_record("inventory_data", "apple", |r| {
            r.is_some_and(|r| n(r, "available") == 10)
        })
        .await
        .unwrap();
    assert!(no_holds(Some(&apple)), "{apple}");
    assert_eq!(n(&apple, "sold"), 0, "{apple}");
    let rec = sys.branch("inventory", &id, 0).await.map(|r| r.state);
    assert!(rec.is_some_and(|s| ends.contains(&s)), "{rec:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepare_that_died_before_its_vote_was_recorded_is_released_by_the_abort() {
    died_before_recording(
        "2pc",
        TxnState::Aborted,
        [BranchState::VotedAbort, BranchState::AbortedBeforePrepare],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_step_that_died_before_it_was_recorded_is_undone_by_its_compensation() {
    died_before_recording(
        "saga",
        TxnState::Compensated,
        [
            BranchState::Compensated,
            BranchState::CompensatedBeforeExecute,
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_orders_on_one_sku_never_oversell() {
    let mut sys = shop().await;
    // A second inventory instance shares the durable consumer.
    sys.spawn_service("inventory-2", "inventory", &[]).await;
    let reqs: Vec<_> = (0..60)
        .map(|i| {
            order(
                &format!("hot-{i}"),
                &format!("oh-{i}"),
                "hot",
                1,
                "alice",
                10,
            )
        })
        .collect();
    let outs = sys
        .client
        .submit_and_wait(reqs, Duration::from_secs(120))
        .await;
    let committed = outs
        .iter()
        .filter(|o| o.as_ref().is_ok_and(|e| e.state == TxnState::Committed))
        .count();
    let out_of_stock = outs
        .iter()
        .filter(|o| {
            o.as_ref().is_ok_and(|e| matches!(&e.reason, Some(Reason::VoteAbort { message, .. }) if message.starts_with("out of stock")))
        })
        .count();
    assert_eq!(committed, 10, "exactly the stock sells");
    assert_eq!(committed + out_of_stock, 60);
    let hot = sys
        .wait_record("inventory_data", "hot", no_holds)
        .await
        .unwrap();
    assert_eq!(
        (n(&hot, "available"), n(&hot, "sold"), n(&hot, "version")),
        (0, 10, 10),
        "no lost update"
    );
    let alice = sys
        .wait_record("payment_data", "alice", no_holds)
        .await
        .unwrap();
    assert_eq!((n(&alice, "balance"), n(&alice, "charged")), (900, 100));
    // Both instances did work.
    let served = |name: &str| {
        sys.participants
            .iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
            .log_text()
    };
    assert!(
        !served("inventory").contains("panicked") && !served("inventory-2").contains("panicked")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_expected_version_aborts_with_version_conflict() {
    let sys = shop().await;
    assert_eq!(
        sys.run(order("v-1", "ov-1", "apple", 1, "alice", 10))
            .await
            .state,
        TxnState::Committed
    );
    sys.wait_record("inventory_data", "apple", |r| {
        r.is_some_and(|r| r["version"] == 1)
    })
    .await;
    let mut stale = order("v-2", "ov-2", "apple", 1, "alice", 10);
    stale["steps"][0]["payload"]["expected_version"] = json!(0);
    let ev = sys.run(stale).await;
    let Some(Reason::VoteAbort {
        service, message, ..
    }) = &ev.reason
    else {
        panic!("{ev:?}")
    };
    assert_eq!(service, "inventory");
    assert!(message.starts_with("version_conflict"), "{message}");
    let mut fresh = order("v-3", "ov-3", "apple", 1, "alice", 10);
    fresh["steps"][0]["payload"]["expected_version"] = json!(1);
    assert_eq!(sys.run(fresh).await.state, TxnState::Committed);
    let apple = sys
        .wait_record("inventory_data", "apple", no_holds)
        .await
        .unwrap();
    assert_eq!((n(&apple, "sold"), n(&apple, "version")), (2, 2));
}

/// Optimistic concurrency, done right: two orders that read the same version cannot both
/// commit. The first one's hold reserves the version; the second is refused while the first
/// is prepared (before the fix both prepared, both committed, and the stock moved twice
/// from the version both had read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_orders_expecting_the_same_version_cannot_both_commit() {
    let sys = shop().await;
    let expecting = |txn: &str, order_id: &str, delay_ms: u64| {
        let mut o = order(txn, order_id, "pear", 1, "alice", 10);
        o["steps"][0]["payload"]["expected_version"] = json!(0);
        // The payment step keeps the first order prepared while the second arrives.
        o["steps"][1]["payload"]["delay_ms"] = json!(delay_ms);
        o
    };
    sys.submit(&expecting("occ-1", "oocc-1", 1500), "occ-1")
        .await;
    sys.wait_record("inventory_data", "pear", |r| {
        r.is_some_and(|r| r["holds"].as_object().is_some_and(|h| !h.is_empty()))
    })
    .await;
    let second = sys.run(expecting("occ-2", "oocc-2", 0)).await;
    assert_eq!(second.state, TxnState::Aborted, "{second:?}");
    let Some(Reason::VoteAbort {
        service, message, ..
    }) = &second.reason
    else {
        panic!("{second:?}")
    };
    assert_eq!(service, "inventory");
    assert!(message.starts_with("version_conflict"), "{message}");
    let first = sys.wait_state("occ-1", |e| e.state.is_terminal()).await;
    assert_eq!(first.state, TxnState::Committed, "{first:?}");
    let pear = sys
        .wait_record("inventory_data", "pear", no_holds)
        .await
        .unwrap();
    assert_eq!((n(&pear, "sold"), n(&pear, "version")), (1, 1));
    assert!(pear.get("version_holder").is_none(), "released: {pear}");
    // A plain order (no expected_version) waits for nobody once the reservation is gone.
    assert_eq!(
        sys.run(order("occ-3", "oocc-3", "pear", 1, "alice", 10))
            .await
            .state,
        TxnState::Committed
    );
}

/// Runs `txcoord demo` with a killed coordinator in the given mode and checks its verdict.
fn demo_with_kill(mode: &str, success: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_txcoord"))
        .args([
            "demo",
            "--kill-coordinator",
            "--orders",
            "150",
            "--mode",
            mode,
            "--data-dir",
        ])
        .arg(dir.path())
        .env("TXCOORD_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("invariants: OK"), "{stdout}");
    assert!(
        stdout.contains("SIGKILLed after"),
        "the kill happened: {stdout}"
    );
    let ok: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix(success))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(ok > 30, "most orders should go through: {stdout}");
}

#[test]
fn the_demo_with_a_killed_coordinator_keeps_every_invariant() {
    demo_with_kill("2pc", "committed");
}

#[test]
fn the_saga_demo_with_a_killed_coordinator_keeps_every_invariant() {
    demo_with_kill("saga", "completed");
}

/// The saga form of [`order`], its last step (the order service's) taking `delay_ms`.
fn saga_order(txn: &str, order_id: &str, amount: u64, delay_ms: u64) -> Value {
    let mut v = order(txn, order_id, "apple", 1, "alice", amount);
    v["mode"] = json!("saga");
    v["steps"][2]["payload"]["delay_ms"] = json!(delay_ms);
    v
}

/// The saga markers (`<txn_id>.<step>`) a record holds.
fn markers(v: Option<&Value>) -> Vec<String> {
    v.and_then(|v| v["sagas"].as_object())
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// The record `key` of `bucket` once it holds no saga marker.
async fn swept(sys: &System, bucket: &str, key: &str) -> Value {
    sys.wait_record(bucket, key, |v| v.is_some() && markers(v).is_empty())
        .await
        .unwrap_or_default()
}

/// A saga step that takes stock or money leaves a marker in the record; the services' sweep
/// removes those of finished sagas (every completed saga used to grow its records for
/// good), and never one of a saga still running, without touching the quantities or the
/// record's version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_markers_of_finished_sagas_are_swept_and_no_others() {
    let mut sys = System::start(&[], &[]).await;
    let sweep = ["--sweep-secs", "1"];
    sys.spawn_service(
        "inventory",
        "inventory",
        &[&["--seed", "apple=10", "--seed", "pear=10"], &sweep[..]].concat(),
    )
    .await;
    sys.spawn_service(
        "payment",
        "payment",
        &[&["--seed", "alice=1000", "--seed", "bob=1000"], &sweep[..]].concat(),
    )
    .await;
    sys.spawn_service("order", "order", &[]).await;
    for i in 0..3 {
        let ev = sys
            .run(saga_order(
                &format!("s-done-{i}"),
                &format!("o-{i}"),
                100,
                0,
            ))
            .await;
        assert_eq!(ev.state, TxnState::Completed, "{ev:?}");
    }
    let apple = swept(&sys, "inventory_data", "apple").await;
    assert_eq!(
        (
            n(&apple, "available"),
            n(&apple, "sold"),
            n(&apple, "version")
        ),
        (7, 3, 3)
    );
    let alice = swept(&sys, "payment_data", "alice").await;
    assert_eq!(
        (
            n(&alice, "balance"),
            n(&alice, "charged"),
            n(&alice, "version")
        ),
        (700, 300, 3)
    );
    assert!(
        sys.participant_log("inventory")
            .log_text()
            .contains("saga markers of finished sagas removed")
    );

    // A saga whose last step takes eight seconds keeps its markers through the sweeps
    // meanwhile, and loses them once it has completed. That a sweep ran meanwhile is seen,
    // not waited for: another saga (on other records) completes while the first runs, and
    // its markers go, so a sweep read every record after the first saga's markers were in.
    let mut running = saga_order("s-running", "o-9", 100, 8000);
    running["steps"][2]["timeout_ms"] = json!(30_000);
    let check = async {
        sys.wait_record("inventory_data", "apple", |v| markers(v) == ["s-running.0"])
            .await;
        let mut other = saga_order("s-other", "o-10", 100, 0);
        other["steps"][0]["payload"]["sku"] = json!("pear");
        other["steps"][1]["payload"]["account"] = json!("bob");
        other["steps"][2]["payload"]["account"] = json!("bob");
        other["steps"][2]["payload"]["items"][0]["sku"] = json!("pear");
        assert_eq!(sys.run(other).await.state, TxnState::Completed);
        swept(&sys, "inventory_data", "pear").await;
        swept(&sys, "payment_data", "bob").await;
        let apple = sys.record("inventory_data", "apple").await;
        let alice = sys.record("payment_data", "alice").await;
        (markers(apple.as_ref()), markers(alice.as_ref()))
    };
    let (ev, during) = tokio::join!(sys.run(running), check);
    assert_eq!(ev.state, TxnState::Completed, "{ev:?}");
    assert_eq!(
        during,
        (
            vec!["s-running.0".to_string()],
            vec!["s-running.1".to_string()]
        )
    );
    let apple = swept(&sys, "inventory_data", "apple").await;
    assert_eq!((n(&apple, "available"), n(&apple, "sold")), (6, 4));
}
