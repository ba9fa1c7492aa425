//! The lock table's rules, one test each, on paused time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use txcoord_proto::{DeadlockPolicy, LockMode};

use super::{BranchId, EdgeChange, LockTable};
use crate::barrier::HeldLock;

fn b(txn: &str) -> BranchId {
    BranchId {
        txn_id: txn.into(),
        step: 0,
    }
}

fn x(resource: &str) -> Vec<HeldLock> {
    vec![HeldLock {
        resource: resource.into(),
        mode: LockMode::Exclusive,
    }]
}

fn s(resource: &str) -> Vec<HeldLock> {
    vec![HeldLock {
        resource: resource.into(),
        mode: LockMode::Shared,
    }]
}

type Log = Arc<Mutex<Vec<EdgeChange>>>;

fn recorder() -> (Log, impl Fn(EdgeChange) + Send + Sync) {
    let log: Log = Default::default();
    let l = log.clone();
    (log, move |e| l.lock().unwrap().push(e))
}

fn later(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

const NEVER: fn(EdgeChange) = |_| {};

/// Takes `locks` for `txn`'s step 0 (age `ts`), waiting at most `ms`, reporting nowhere.
async fn take(
    t: &LockTable,
    txn: &str,
    ts: u64,
    locks: &[HeldLock],
    policy: DeadlockPolicy,
    ms: u64,
) -> Result<(), txcoord_proto::LockConflict> {
    t.acquire(&b(txn), ts, locks, policy, later(ms), &NEVER)
        .await
}

#[tokio::test(start_paused = true)]
async fn a_free_resource_is_granted_and_released() {
    let t = LockTable::default();
    take(&t, "t1", 1, &x("alice"), DeadlockPolicy::Detect, 10)
        .await
        .unwrap();
    assert_eq!(t.holders("alice"), vec![(b("t1"), LockMode::Exclusive)]);
    t.release(&b("t1"));
    assert!(t.holders("alice").is_empty());
}

#[tokio::test(start_paused = true)]
async fn shared_holders_share_and_exclusive_waits_for_them() {
    let t = Arc::new(LockTable::default());
    for txn in ["t1", "t2"] {
        t.acquire(
            &b(txn),
            1,
            &s("seat"),
            DeadlockPolicy::Detect,
            later(10),
            &NEVER,
        )
        .await
        .unwrap();
    }
    assert_eq!(t.holders("seat").len(), 2);
    let err = take(&t, "t3", 1, &x("seat"), DeadlockPolicy::Detect, 100)
        .await
        .unwrap_err();
    let mut holders = err.holders.clone();
    holders.sort();
    assert_eq!(holders, vec!["t1".to_string(), "t2".to_string()]);
    assert_eq!(err.policy, DeadlockPolicy::Detect, "a wait that ran out");
}

#[tokio::test(start_paused = true)]
async fn a_waiter_gets_the_lock_when_the_holder_releases_and_reports_then_withdraws_its_edge() {
    let t = Arc::new(LockTable::default());
    take(&t, "t1", 1, &x("alice"), DeadlockPolicy::Detect, 10)
        .await
        .unwrap();
    let (log, report) = recorder();
    let t2 = t.clone();
    let waiter = tokio::spawn(async move {
        t2.acquire(
            &b("t2"),
            2,
            &x("alice"),
            DeadlockPolicy::Detect,
            later(60_000),
            &report,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(t.waiting(), 1);
    {
        let l = log.lock().unwrap();
        assert!(
            l.len() >= 2,
            "reported at once and refreshed every second: {l:?}"
        );
        assert!(
            l.iter()
                .all(|e| e.holder == "t1" && !e.withdrawn && e.holder_ts == 1)
        );
    }
    t.release(&b("t1"));
    waiter.await.unwrap().unwrap();
    assert_eq!(t.holders("alice"), vec![(b("t2"), LockMode::Exclusive)]);
    let l = log.lock().unwrap();
    assert!(
        l.last().unwrap().withdrawn,
        "the edge is withdrawn when the wait ends"
    );
    assert_eq!(t.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_first_come_first_served() {
    let t = Arc::new(LockTable::default());
    take(&t, "t0", 0, &x("r"), DeadlockPolicy::Detect, 10)
        .await
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, txn) in ["t1", "t2", "t3"].into_iter().enumerate() {
        let (t, order) = (t.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            t.acquire(
                &b(txn),
                9,
                &x("r"),
                DeadlockPolicy::Detect,
                later(60_000),
                &NEVER,
            )
            .await
            .unwrap();
            order.lock().unwrap().push(txn);
            tokio::time::sleep(Duration::from_millis(10)).await;
            t.release(&b(txn));
        }));
        // Queue them in this order.
        tokio::time::sleep(Duration::from_millis(1 + i as u64)).await;
    }
    t.release(&b("t0"));
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec!["t1", "t2", "t3"]);
}

#[tokio::test(start_paused = true)]
async fn a_new_shared_request_queues_behind_a_waiting_exclusive_one() {
    let t = Arc::new(LockTable::default());
    take(&t, "t1", 1, &s("r"), DeadlockPolicy::Detect, 10)
        .await
        .unwrap();
    let t2 = t.clone();
    let writer =
        tokio::spawn(
            async move { take(&t2, "t2", 2, &x("r"), DeadlockPolicy::Detect, 60_000).await },
        );
    tokio::time::sleep(Duration::from_millis(5)).await;
    // No overtaking the writer, or a stream of readers would starve it.
    let err = take(&t, "t3", 3, &s("r"), DeadlockPolicy::Detect, 50)
        .await
        .unwrap_err();
    assert_eq!(err.holders, vec!["t2".to_string()]);
    t.release(&b("t1"));
    writer.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn branches_of_one_transaction_do_not_block_each_other() {
    let t = LockTable::default();
    let other_step = BranchId {
        txn_id: "t1".into(),
        step: 1,
    };
    take(&t, "t1", 1, &x("r"), DeadlockPolicy::NoWait, 10)
        .await
        .unwrap();
    t.acquire(
        &other_step,
        1,
        &x("r"),
        DeadlockPolicy::NoWait,
        later(10),
        &NEVER,
    )
    .await
    .unwrap();
    // And asking again for what one holds is a no-op.
    take(&t, "t1", 1, &x("r"), DeadlockPolicy::NoWait, 10)
        .await
        .unwrap();
    assert_eq!(t.holders("r").len(), 2);
}

#[tokio::test(start_paused = true)]
async fn no_wait_refuses_any_conflict_at_once() {
    let t = LockTable::default();
    take(&t, "young", 9, &x("r"), DeadlockPolicy::NoWait, 10)
        .await
        .unwrap();
    let started = Instant::now();
    let err = take(&t, "old", 1, &x("r"), DeadlockPolicy::NoWait, 60_000)
        .await
        .unwrap_err();
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(err.policy, DeadlockPolicy::NoWait);
    assert_eq!(err.holders, vec!["young".to_string()]);
}

#[tokio::test(start_paused = true)]
async fn wait_die_lets_the_older_wait_and_the_younger_die() {
    let t = Arc::new(LockTable::default());
    take(&t, "mid", 5, &x("r"), DeadlockPolicy::WaitDie, 10)
        .await
        .unwrap();
    // Younger than the holder: refused at once.
    let err = take(&t, "young", 9, &x("r"), DeadlockPolicy::WaitDie, 60_000)
        .await
        .unwrap_err();
    assert_eq!(err.policy, DeadlockPolicy::WaitDie);
    // Older: waits, and gets it.
    let t2 = t.clone();
    let old =
        tokio::spawn(
            async move { take(&t2, "old", 1, &x("r"), DeadlockPolicy::WaitDie, 60_000).await },
        );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(t.waiting(), 1);
    t.release(&b("mid"));
    old.await.unwrap().unwrap();
    // Equal timestamps are ordered by txn id, so two never both wait for each other.
    t.release(&b("old"));
    take(&t, "a", 7, &x("q"), DeadlockPolicy::WaitDie, 10)
        .await
        .unwrap();
    let err = take(&t, "b", 7, &x("q"), DeadlockPolicy::WaitDie, 10)
        .await
        .unwrap_err();
    assert_eq!(err.holders, vec!["a".to_string()]);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_wait_refuses_and_leaves_the_queue() {
    let t = Arc::new(LockTable::default());
    take(&t, "t1", 1, &x("r"), DeadlockPolicy::Detect, 10)
        .await
        .unwrap();
    let t2 = t.clone();
    let waiter =
        tokio::spawn(
            async move { take(&t2, "t2", 2, &x("r"), DeadlockPolicy::Detect, 60_000).await },
        );
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(t.cancel(&b("t2")));
    assert!(waiter.await.unwrap().is_err());
    assert_eq!(t.waiting(), 0);
    assert!(!t.cancel(&b("t2")), "nothing waits any more");
    t.release(&b("t1"));
    assert!(
        t.holders("r").is_empty(),
        "the cancelled waiter took nothing"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refusal_releases_what_the_same_prepare_already_took() {
    let t = LockTable::default();
    take(&t, "t1", 1, &x("b"), DeadlockPolicy::NoWait, 10)
        .await
        .unwrap();
    let mut both = x("a");
    both.extend(x("b"));
    take(&t, "t2", 2, &both, DeadlockPolicy::NoWait, 10)
        .await
        .unwrap_err();
    assert!(
        t.holders("a").is_empty(),
        "a was taken first, then given back"
    );
}

#[tokio::test(start_paused = true)]
async fn restored_locks_block_like_taken_ones() {
    let t = LockTable::default();
    t.grant(&b("prepared-before-restart"), 1, &x("alice"));
    let err = take(&t, "t2", 2, &x("alice"), DeadlockPolicy::NoWait, 10)
        .await
        .unwrap_err();
    assert_eq!(err.holders, vec!["prepared-before-restart".to_string()]);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_reports_the_waiters_ahead_of_it_too() {
    let t = Arc::new(LockTable::default());
    take(&t, "t1", 1, &x("r"), DeadlockPolicy::Detect, 10)
        .await
        .unwrap();
    let t2 = t.clone();
    let _first =
        tokio::spawn(
            async move { take(&t2, "t2", 2, &x("r"), DeadlockPolicy::Detect, 60_000).await },
        );
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (log, report) = recorder();
    let t3 = t.clone();
    let _second = tokio::spawn(async move {
        t3.acquire(
            &b("t3"),
            3,
            &x("r"),
            DeadlockPolicy::Detect,
            later(60_000),
            &report,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut holders: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.holder.clone())
        .collect();
    holders.sort();
    holders.dedup();
    assert_eq!(holders, vec!["t1".to_string(), "t2".to_string()]);
}
