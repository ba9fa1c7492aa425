//! The embedded coordinator's contract, edge case by edge case: registrations, unknown ids,
//! every illegal state transition, timeouts that name the slow participant, retried commits
//! and rollbacks, a commit that never turns into a rollback, orphans, limits, events, scale,
//! and optimistic concurrency with `Versioned`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use txcoord_embedded::{
    Config, Participant, PreparedResult, Registered, Resource, TransactionCoordinator, TxnError,
    TxnId, TxnState, Versioned,
};

/// A participant that records its calls and fails or stalls as told.
struct Probe {
    id: Option<String>,
    vote: PreparedResult,
    prepare_delay: Duration,
    commit_failures: AtomicU32,
    rollback_failures: AtomicU32,
    calls: Mutex<Vec<&'static str>>,
}

impl Probe {
    fn new(vote: PreparedResult) -> Probe {
        Probe {
            id: None,
            vote,
            prepare_delay: Duration::ZERO,
            commit_failures: AtomicU32::new(0),
            rollback_failures: AtomicU32::new(0),
            calls: Mutex::new(Vec::new()),
        }
    }
    fn ready() -> Arc<Probe> {
        Arc::new(Probe::new(PreparedResult::Ready))
    }
    fn named(id: &str) -> Arc<Probe> {
        Arc::new(Probe {
            id: Some(id.into()),
            ..Probe::new(PreparedResult::Ready)
        })
    }
    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap().clone()
    }
    fn count(&self, call: &str) -> usize {
        self.calls().iter().filter(|c| **c == call).count()
    }
    fn note(&self, call: &'static str) {
        self.calls.lock().unwrap().push(call);
    }
    fn fail(counter: &AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }
}

#[async_trait::async_trait]
impl Participant for Probe {
    async fn prepare(&self, _txn: TxnId) -> PreparedResult {
        self.note("prepare");
        tokio::time::sleep(self.prepare_delay).await;
        self.vote.clone()
    }
    async fn commit(&self, _txn: TxnId) -> Result<(), String> {
        self.note("commit");
        if Self::fail(&self.commit_failures) {
            return Err("database busy".into());
        }
        Ok(())
    }
    async fn rollback(&self, _txn: TxnId) -> Result<(), String> {
        self.note("rollback");
        if Self::fail(&self.rollback_failures) {
            return Err("lock timeout".into());
        }
        Ok(())
    }
    fn id(&self) -> Option<String> {
        self.id.clone()
    }
}

fn fast() -> Config {
    Config {
        prepare_timeout: Duration::from_millis(300),
        retry_base: Duration::from_millis(10),
        retry_cap: Duration::from_millis(40),
        commit_patience: Duration::from_millis(600),
        ..Config::default()
    }
}

#[tokio::test]
async fn a_transaction_commits_and_read_only_participants_get_no_phase_two() {
    let coord = TransactionCoordinator::new(Config::default());
    let (a, ro) = (
        Probe::ready(),
        Arc::new(Probe::new(PreparedResult::ReadOnly)),
    );
    let id = coord.begin_transaction().unwrap();
    assert_eq!(coord.get_transaction_state(id), Some(TxnState::Active));
    coord.register_participant(id, a.clone()).unwrap();
    coord.register_participant(id, ro.clone()).unwrap();
    coord.prepare_transaction(id).await.unwrap();
    assert_eq!(coord.get_transaction_state(id), Some(TxnState::Prepared));
    coord.commit_transaction(id).await.unwrap();
    assert_eq!(coord.get_transaction_state(id), Some(TxnState::Committed));
    assert_eq!(a.calls(), ["prepare", "commit"]);
    assert_eq!(ro.calls(), ["prepare"], "read-only: no phase 2");
    assert_eq!(coord.unfinished(), 0);
}

#[tokio::test]
async fn registering_the_same_participant_twice_is_a_no_op_that_says_so() {
    let coord = TransactionCoordinator::new(Config::default());
    let id = coord.begin_transaction().unwrap();
    let a = Probe::ready();
    assert_eq!(
        coord.register_participant(id, a.clone()),
        Ok(Registered::Added)
    );
    assert_eq!(
        coord.register_participant(id, a.clone()),
        Ok(Registered::AlreadyRegistered)
    );
    // Another object with the same id is the same participant.
    assert_eq!(
        coord.register_participant(id, Probe::named("inv")),
        Ok(Registered::Added)
    );
    assert_eq!(
        coord.register_participant(id, Probe::named("inv")),
        Ok(Registered::AlreadyRegistered)
    );
    coord.prepare_transaction(id).await.unwrap();
    coord.commit_transaction(id).await.unwrap();
    assert_eq!(a.calls(), ["prepare", "commit"], "one branch, not two");
}

#[tokio::test]
async fn unknown_transactions_are_errors_everywhere() {
    let coord = TransactionCoordinator::new(Config::default());
    let nobody = TxnId(uuid::Uuid::new_v4());
    let unknown = Err(TxnError::UnknownTransaction(nobody));
    assert_eq!(
        coord
            .register_participant(nobody, Probe::ready())
            .map(|_| ()),
        unknown
    );
    let v: Arc<dyn Resource> = Versioned::new(1u64);
    assert_eq!(coord.enlist_resource(nobody, v).map(|_| ()), unknown);
    assert_eq!(coord.prepare_transaction(nobody).await, unknown);
    assert_eq!(coord.commit_transaction(nobody).await, unknown);
    assert_eq!(coord.rollback_transaction(nobody).await, unknown);
    assert_eq!(coord.get_transaction_state(nobody), None);
}

fn illegal(operation: &'static str, state: TxnState) -> impl Fn(&TxnError) -> bool {
    move |e| matches!(e, TxnError::IllegalState { operation: o, state: s, .. } if *o == operation && *s == state)
}

#[tokio::test]
async fn every_illegal_transition_is_a_typed_error() {
    let coord = TransactionCoordinator::new(fast());
    let id = coord.begin_transaction().unwrap();
    coord.register_participant(id, Probe::ready()).unwrap();
    // Commit before prepare.
    let e = coord.commit_transaction(id).await.unwrap_err();
    assert!(illegal("commit", TxnState::Active)(&e), "{e}");
    coord.prepare_transaction(id).await.unwrap();
    // Register, enlist or prepare again after prepare.
    let e = coord.register_participant(id, Probe::ready()).unwrap_err();
    assert!(
        illegal("register a participant in", TxnState::Prepared)(&e),
        "{e}"
    );
    let v: Arc<dyn Resource> = Versioned::new(0u8);
    let e = coord.enlist_resource(id, v).unwrap_err();
    assert!(
        illegal("enlist a resource in", TxnState::Prepared)(&e),
        "{e}"
    );
    let e = coord.prepare_transaction(id).await.unwrap_err();
    assert!(illegal("prepare", TxnState::Prepared)(&e), "{e}");
    coord.commit_transaction(id).await.unwrap();
    // Roll back after commit: never.
    let e = coord.rollback_transaction(id).await.unwrap_err();
    assert!(illegal("roll back", TxnState::Committed)(&e), "{e}");
    // Committing a committed transaction again is a no-op.
    coord.commit_transaction(id).await.unwrap();

    // Prepare or commit after rollback.
    let id = coord.begin_transaction().unwrap();
    let p = Probe::ready();
    coord.register_participant(id, p.clone()).unwrap();
    coord.rollback_transaction(id).await.unwrap();
    assert_eq!(coord.get_transaction_state(id), Some(TxnState::Aborted));
    assert_eq!(p.calls(), ["rollback"]);
    let e = coord.prepare_transaction(id).await.unwrap_err();
    assert!(illegal("prepare", TxnState::Aborted)(&e), "{e}");
    let e = coord.commit_transaction(id).await.unwrap_err();
    assert!(illegal("commit", TxnState::Aborted)(&e), "{e}");
    coord.rollback_transaction(id).await.unwrap();
}

#[tokio::test]
async fn a_refusal_rolls_everyone_back_and_names_who() {
    let coord = TransactionCoordinator::new(fast());
    let (a, no) = (
        Probe::ready(),
        Arc::new(Probe {
            id: Some("payment".into()),
            ..Probe::new(PreparedResult::Aborted("insufficient funds".into()))
        }),
    );
    let id = coord.begin_transaction().unwrap();
    coord.register_participant(id, a.clone()).unwrap();
    coord.register_participant(id, no.clone()).unwrap();
    let e = coord.prepare_transaction(id).await.unwrap_err();
    assert_eq!(
        e,
        TxnError::PrepareRefused {
            txn: id,
            participant: "payment".into(),
            reason: "insufficient funds".into()
        }
    );
    assert_eq!(coord.get_transaction_state(id), Some(TxnState::Aborted));
    assert_eq!(a.calls(), ["prepare", "rollback"]);
    assert_eq!(no.calls(), ["prepare"], "a refuser holds nothing");
}

#[tokio::test(start_paused = true)]
async fn a_slow_participant_times_out_by_name_and_the_rest_roll_back() {
    let coord = TransactionCoordinator::new(fast());
    let a = Probe::ready();
    let slow = Arc::new(Probe {
        id: Some("slow-db".into()),
        prepare_delay: Duration::from_secs(5),
        ..Probe::new(PreparedResult::Ready)
    });
    let id = coord.begin_transaction().unwrap();
    coord.register_participant(id, a.clone()).unwrap();
    coord.register_participant(id, slow.clone()).unwrap();
    // Paused time: the clock moves only as the coordinator's timers fire.
    let started = tokio::time::Instant::now();
    let e = coord.prepare_transaction(id).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the timeout, not the slow call: {:?}",
        started.elapsed()
    );
    assert_eq!(
        e,
        TxnError::PrepareTimedOut {
            txn: id,
            participants: vec!["slow-db".into()],
            timeout: Duration::from_millis(300)
        }
    );
    assert_eq!(coord.get_transaction_state(id), Some(TxnState::Aborted));
    assert_eq!(a.calls(), ["prepare", "rollback"]);
    assert_eq!(
        slow.count("rollback"),
        1,
        "the silent one may hold something: told too"
    );
    assert_eq!(
        slow.count("prepare"),
        1,
        "prepared once, not again at the halfway nudge"
    );
}

#[tokio::test(start_paused = true)]
async fn a_commit_that_fails_twice_then_succeeds_is_retried() {
    let coord = TransactionCoordinator::new(fast());
    let flaky = Probe::ready();
    flaky.commit_failures.store(2, Ordering::Release);
    let id = coord.begin_transaction().unwrap();
    coord.register_participant(id, flaky.clone()).unwrap();
    coord.prepare_transaction(id).await.unwrap();
    coord.commit_transaction(id).await.unwrap();
    assert_eq!(flaky.count("commit"), 3);
    assert_eq!(coord.get_transaction_state(id), Some(TxnState::Committed));
}

#[tokio::test(start_paused = true)]
async fn a_rollback_that_fails_transiently_is_retried() {
    let coord = TransactionCoordinator::new(fast());
    let flaky = Probe::ready();
    flaky.rollback_failures.store(2, Ordering::Release);
    let id = coord.begin_transaction().unwrap();
    coord.register_participant(id, flaky.clone()).unwrap();
    coord.prepare_transaction(id).await.unwrap();
    coord.rollback_transaction(id).await.unwrap();
    assert_eq!(flaky.count("rollback"), 3);
    assert_eq!(coord.get_transaction_state(id), Some(TxnState::Aborted));
}

#[tokio::test(start_paused = true)]
async fn a_decided_commit_that_keeps_failing_is_stuck_not_rolled_back() {
    let coord = TransactionCoordinator::new(fast());
    let (ok, stuck) = (Probe::ready(), Probe::named("ledger"));
    stuck.commit_failures.store(u32::MAX, Ordering::Release);
    let id = coord.begin_transaction().unwrap();
    coord.register_participant(id, ok.clone()).unwrap();
    coord.register_participant(id, stuck.clone()).unwrap();
    coord.prepare_transaction(id).await.unwrap();
    let e = coord.commit_transaction(id).await.unwrap_err();
    let TxnError::CommitStuck {
        participants,
        last_error,
        ..
    } = &e
    else {
        panic!("{e}")
    };
    assert_eq!(participants, &["ledger".to_string()]);
    assert!(last_error.contains("database busy"), "{last_error}");
    assert!(!e.retry_may_help());
    assert_eq!(coord.get_transaction_state(id), Some(TxnState::Committing));
    let e = coord.rollback_transaction(id).await.unwrap_err();
    assert!(illegal("roll back", TxnState::Committing)(&e), "{e}");
    // The coordinator keeps trying; once the ledger recovers, the commit completes.
    stuck.commit_failures.store(0, Ordering::Release);
    for _ in 0..200 {
        if coord.get_transaction_state(id) == Some(TxnState::Committed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(coord.get_transaction_state(id), Some(TxnState::Committed));
    assert_eq!(
        ok.count("rollback") + stuck.count("rollback"),
        0,
        "never rolled back"
    );
}

#[tokio::test(start_paused = true)]
async fn an_orphan_is_rolled_back_and_says_why() {
    let coord = TransactionCoordinator::new(Config {
        orphan_timeout: Duration::from_millis(100),
        ..fast()
    });
    let p = Probe::ready();
    let id = coord.begin_transaction().unwrap();
    coord.register_participant(id, p.clone()).unwrap();
    // The client forgets it.
    for _ in 0..200 {
        if coord.get_transaction_state(id) == Some(TxnState::Aborted) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(coord.get_transaction_state(id), Some(TxnState::Aborted));
    assert!(
        coord
            .transaction_reason(id)
            .is_some_and(|r| r.contains("orphaned")),
        "{:?}",
        coord.transaction_reason(id)
    );
    assert_eq!(p.calls(), ["rollback"]);
    assert_eq!(coord.unfinished(), 0, "nothing leaks");
    let e = coord.prepare_transaction(id).await.unwrap_err();
    assert!(matches!(e, TxnError::Orphaned { .. }), "{e}");
}

#[tokio::test]
async fn limits_are_clear_errors() {
    let coord = TransactionCoordinator::new(Config {
        max_participants: 2,
        max_concurrent: 2,
        ..fast()
    });
    let id = coord.begin_transaction().unwrap();
    coord.register_participant(id, Probe::ready()).unwrap();
    coord.register_participant(id, Probe::ready()).unwrap();
    assert_eq!(
        coord.register_participant(id, Probe::ready()),
        Err(TxnError::TooManyParticipants { txn: id, max: 2 })
    );
    let _second = coord.begin_transaction().unwrap();
    let e = coord.begin_transaction().unwrap_err();
    assert_eq!(e, TxnError::TooManyConcurrent { max: 2 });
    assert!(e.retry_may_help());
    // Finishing one makes room.
    coord.rollback_transaction(id).await.unwrap();
    coord.begin_transaction().unwrap();
}

#[tokio::test]
async fn subscribers_follow_every_state_change() {
    let coord = TransactionCoordinator::new(fast());
    let mut events = coord.subscribe();
    let id = coord.begin_transaction().unwrap();
    coord.register_participant(id, Probe::ready()).unwrap();
    coord.prepare_transaction(id).await.unwrap();
    coord.commit_transaction(id).await.unwrap();
    let mut seen = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(200), events.next()).await {
        assert_eq!(ev.txn, id);
        seen.push(ev.state);
    }
    assert_eq!(
        seen,
        [
            TxnState::Active,
            TxnState::Preparing,
            TxnState::Prepared,
            TxnState::Committing,
            TxnState::Committed
        ]
    );
}

/// A participant that does nothing.
struct Noop;

#[async_trait::async_trait]
impl Participant for Noop {
    async fn prepare(&self, _txn: TxnId) -> PreparedResult {
        PreparedResult::Ready
    }
    async fn commit(&self, _txn: TxnId) -> Result<(), String> {
        Ok(())
    }
    async fn rollback(&self, _txn: TxnId) -> Result<(), String> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_transactions_of_a_hundred_participants_each_commit_at_once() {
    let coord = TransactionCoordinator::new(Config::default());
    let parts: Vec<Arc<dyn Participant>> = (0..100).map(|_| Arc::new(Noop) as _).collect();
    let ids: Vec<TxnId> = (0..1000)
        .map(|_| coord.begin_transaction().unwrap())
        .collect();
    // At the limit, one more is refused.
    assert_eq!(
        coord.begin_transaction(),
        Err(TxnError::TooManyConcurrent { max: 1000 })
    );
    let mut tasks = Vec::new();
    for id in ids {
        let (coord, parts) = (coord.clone(), parts.clone());
        tasks.push(tokio::spawn(async move {
            for p in parts {
                coord.register_participant(id, p)?;
            }
            coord.prepare_transaction(id).await?;
            coord.commit_transaction(id).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(coord.unfinished(), 0);
}

#[tokio::test]
async fn two_transactions_that_read_one_version_cannot_both_commit() {
    let coord = TransactionCoordinator::new(fast());
    let stock = Versioned::named("stock", 10u64);
    let (t1, t2) = (
        coord.begin_transaction().unwrap(),
        coord.begin_transaction().unwrap(),
    );
    for t in [t1, t2] {
        coord.enlist_resource(t, stock.clone()).unwrap();
        let (n, version) = stock.read(t);
        assert_eq!((n, version), (10, 0));
        stock.write(t, n - 1);
    }
    coord.prepare_transaction(t1).await.unwrap();
    // t2 read the same version: its prepare finds it reserved.
    let e = coord.prepare_transaction(t2).await.unwrap_err();
    assert!(
        matches!(&e, TxnError::PrepareRefused { participant, reason, .. } if participant == "stock" && reason.contains("conflict")),
        "{e}"
    );
    coord.commit_transaction(t1).await.unwrap();
    assert_eq!(stock.get(), (9, 1), "one decrement: no lost update");
}

#[test]
fn a_decision_in_the_file_log_survives_a_crash_and_is_carried_out_on_reopen() {
    let dir = std::env::temp_dir().join(format!("txcoord-embedded-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = Config {
        log: txcoord_embedded::Log::File(dir.join("decisions.jsonl")),
        ..fast()
    };
    // First process: the ledger cannot commit; the process dies with the commit decided.
    let crashed = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (ok, ledger) = (Probe::named("orders"), Probe::named("ledger"));
    ledger.commit_failures.store(u32::MAX, Ordering::Release);
    let id = crashed.block_on(async {
        let coord = TransactionCoordinator::new(cfg.clone());
        let id = coord.begin_transaction().unwrap();
        coord.register_participant(id, ok.clone()).unwrap();
        coord.register_participant(id, ledger.clone()).unwrap();
        coord.prepare_transaction(id).await.unwrap();
        let e = coord.commit_transaction(id).await.unwrap_err();
        assert!(matches!(e, TxnError::CommitStuck { .. }), "{e}");
        id
    });
    // Like kill -9: every task of that process is gone, retries included.
    drop(crashed);
    assert!(ok.count("commit") >= 1);

    // Second process: given the participants by id, it carries the decision out.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Without the ledger it cannot resume, and says which participant is missing.
        let e = TransactionCoordinator::open(cfg.clone(), vec![Probe::named("orders")])
            .await
            .err()
            .expect("refused");
        assert_eq!(
            e,
            TxnError::MissingParticipant {
                txn: id,
                participant: "ledger".into()
            }
        );
        let ledger2 = Probe::named("ledger");
        let orders2 = Probe::named("orders");
        let (coord, resumed) =
            TransactionCoordinator::open(cfg.clone(), vec![orders2.clone(), ledger2.clone()])
                .await
                .unwrap();
        assert_eq!(resumed, vec![id]);
        for _ in 0..300 {
            if coord.get_transaction_state(id) == Some(TxnState::Committed) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(coord.get_transaction_state(id), Some(TxnState::Committed));
        assert_eq!(ledger2.count("commit"), 1, "the decision, carried out");
        assert_eq!(ledger2.count("rollback") + orders2.count("rollback"), 0);
    });
    drop(rt);
    // Finished: a third process has nothing to resume.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let resumed = rt.block_on(async {
        TransactionCoordinator::open(cfg.clone(), Vec::new())
            .await
            .unwrap()
            .1
    });
    assert!(resumed.is_empty(), "{resumed:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_finished_transaction_is_forgotten_after_keep_finished() {
    let coord = TransactionCoordinator::new(Config {
        keep_finished: Duration::from_millis(50),
        ..fast()
    });
    let id = coord.begin_transaction().unwrap();
    coord.register_participant(id, Probe::ready()).unwrap();
    coord.prepare_transaction(id).await.unwrap();
    coord.commit_transaction(id).await.unwrap();
    assert_eq!(coord.get_transaction_state(id), Some(TxnState::Committed));
    for _ in 0..100 {
        if coord.get_transaction_state(id).is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(coord.get_transaction_state(id), None);
    assert_eq!(
        coord.commit_transaction(id).await,
        Err(TxnError::UnknownTransaction(id))
    );
}
