//! Crash recovery with real processes: the coordinator SIGKILLed during prepare and right
//! after its decision is durable, a participant SIGKILLed after voting, and nats-server
//! restarted mid-run with the same store.

mod common;

use std::time::Duration;

use common::{System, request, step};
use serde_json::json;
use txcoord::natsserver::NatsServer;
use txcoord::participant::BranchState;
use txcoord::proto::TxnState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_during_prepare_resumes_and_commits() {
    let mut sys = System::start(&["a", "b"], &[]).await;
    let url = sys.nats.url();
    let req = request(
        "kill-prep",
        vec![step("a", json!({})), step("b", json!({"delay_ms": 1500}))],
    );
    sys.client
        .submit_raw(serde_json::to_vec(&req).unwrap().into(), "kill-prep")
        .await
        .unwrap();
    // a has voted; b is still preparing: the coordinator holds a's vote only in memory.
    sys.participant("a")
        .wait_for("VOTED Ready txn_id=kill-prep", Duration::from_secs(10))
        .await;
    sys.coordinator.kill9();
    let last = sys
        .client
        .last_event("kill-prep")
        .await
        .expect("accepted record");
    assert!(
        matches!(last.state, TxnState::Accepted | TxnState::Preparing),
        "{last:?}"
    );
    sys.coordinator.restart_with(&[("TXCOORD_NATS_URL", &url)]);
    let ev = sys.wait_state("kill-prep", |e| e.state.is_terminal()).await;
    assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
    // The resumed prepare was answered from a's stored vote (attempt 2), not by preparing again.
    assert_eq!(ev.steps[0].prepare_attempt, 2);
    assert_eq!(
        sys.participant("a")
            .log_text()
            .matches("VOTED Ready txn_id=kill-prep")
            .count(),
        1
    );
    sys.wait_branch("a", "kill-prep", 0, BranchState::Committed)
        .await;
    sys.wait_branch("b", "kill-prep", 1, BranchState::Committed)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_after_the_decision_is_durable_delivers_it_after_restart() {
    let mut sys = System::start(&["a", "b"], &[("TXCOORD_FAILPOINT", "after-decision")]).await;
    let url = sys.nats.url();
    for (id, vote) in [("kill-dec-c", "ready"), ("kill-dec-a", "abort")] {
        sys.decide_unheard(id, vote).await;
    }
    sys.coordinator.kill9();
    // The decisions are on disk; nobody has heard them.
    let c = sys.client.last_event("kill-dec-c").await.unwrap();
    assert_eq!(c.state, TxnState::Committing);
    let a = sys.client.last_event("kill-dec-a").await.unwrap();
    assert_eq!(a.state, TxnState::Aborting);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        sys.branch("a", "kill-dec-c", 0).await.map(|r| r.state),
        Some(BranchState::Prepared)
    );
    assert_eq!(
        sys.branch("a", "kill-dec-a", 0).await.map(|r| r.state),
        Some(BranchState::Prepared)
    );

    sys.coordinator.restart_with(&[("TXCOORD_NATS_URL", &url)]);
    let c = sys
        .wait_state("kill-dec-c", |e| e.state.is_terminal())
        .await;
    assert_eq!(c.state, TxnState::Committed);
    let a = sys
        .wait_state("kill-dec-a", |e| e.state.is_terminal())
        .await;
    assert_eq!(a.state, TxnState::Aborted);
    sys.wait_branch("a", "kill-dec-c", 0, BranchState::Committed)
        .await;
    sys.wait_branch("b", "kill-dec-c", 1, BranchState::Committed)
        .await;
    sys.wait_branch("a", "kill-dec-a", 0, BranchState::Aborted)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_killed_after_voting_ready_applies_the_decision_after_restart() {
    let mut sys = System::start(&["a", "b"], &[]).await;
    // b votes at once; a takes a while, so the decision comes after b is dead.
    let req = request(
        "kill-part",
        vec![step("a", json!({"delay_ms": 1500})), step("b", json!({}))],
    );
    sys.client
        .submit_raw(serde_json::to_vec(&req).unwrap().into(), "kill-part")
        .await
        .unwrap();
    sys.wait_vote("kill-part", 1).await;
    sys.participant("b").kill9();
    assert_eq!(
        sys.branch("b", "kill-part", 1).await.map(|r| r.state),
        Some(BranchState::Prepared)
    );
    // The commit is decided while b is down; it waits in b's durable consumer.
    let committing = sys
        .wait_state("kill-part", |e| e.state == TxnState::Committing)
        .await;
    assert!(!committing.steps[1].done);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        sys.branch("b", "kill-part", 1).await.map(|r| r.state),
        Some(BranchState::Prepared)
    );
    sys.participant("b").restart();
    let ev = sys.wait_state("kill-part", |e| e.state.is_terminal()).await;
    assert_eq!(ev.state, TxnState::Committed);
    sys.wait_branch("b", "kill-part", 1, BranchState::Committed)
        .await;
    // b did not prepare twice.
    assert_eq!(
        sys.participant("b")
            .log_text()
            .matches("VOTED Ready txn_id=kill-part")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_killed_before_voting_still_commits_after_restart() {
    let mut sys = System::start(&["a", "b"], &[]).await;
    // b dies while preparing; its prepare then sits on its durable consumer until the ack
    // wait (30 s) runs out. The resend halfway to the 4 s deadline reaches the new process.
    let mut req = request(
        "kill-before",
        vec![step("a", json!({})), step("b", json!({"delay_ms": 600}))],
    );
    req["timeout_ms"] = json!(4000);
    sys.client
        .submit_raw(serde_json::to_vec(&req).unwrap().into(), "kill-before")
        .await
        .unwrap();
    sys.participant("a")
        .wait_for("VOTED Ready txn_id=kill-before", Duration::from_secs(10))
        .await;
    sys.participant("b").kill9();
    assert!(
        sys.branch("b", "kill-before", 1).await.is_none(),
        "b had not voted"
    );
    sys.participant("b").restart();
    let ev = sys
        .wait_state("kill-before", |e| e.state.is_outcome())
        .await;
    assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
    assert_eq!(
        ev.steps[1].prepare_attempt, 2,
        "committed through the resent prepare"
    );
    sys.wait_branch("b", "kill-before", 1, BranchState::Committed)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restart_mid_run_loses_no_transaction() {
    let sys = System::start(&["a", "b"], &[]).await;
    server_trouble_mid_run(sys, 200, |s| s.restart()).await;
}

/// With every write fsynced before its ack, even a SIGKILL of nats-server loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_sigkilled_with_sync_always_loses_no_transaction() {
    let nats = NatsServer::start_with(None, None, "sync_interval: always").expect("nats-server");
    let sys = System::start_on(nats, &["a", "b"], &[]).await;
    server_trouble_mid_run(sys, 100, |s| s.kill_and_restart()).await;
}

/// Runs `n` transactions, hits the server with `trouble` while many are in flight, and
/// checks that every one finishes with the outcome its votes dictate.
async fn server_trouble_mid_run(
    mut sys: System,
    n: usize,
    trouble: impl FnOnce(&mut NatsServer) -> Result<(), txcoord::natsserver::ServerError>,
) {
    let reqs: Vec<_> = (0..n)
        .map(|i| {
            let vote = if i % 7 == 0 { "abort" } else { "ready" };
            request(
                &format!("restart-{i}"),
                vec![
                    step("a", json!({"delay_ms": (i % 10) * 150})),
                    step("b", json!({"vote": vote})),
                ],
            )
        })
        .collect();
    let client = sys.client.clone();
    let run =
        tokio::spawn(async move { client.submit_and_wait(reqs, Duration::from_secs(180)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut unfinished = 0;
    for i in 0..n {
        if !sys
            .client
            .last_event(&format!("restart-{i}"))
            .await
            .is_some_and(|e| e.state.is_terminal())
        {
            unfinished += 1;
        }
    }
    trouble(&mut sys.nats).expect("restart nats-server");
    eprintln!("restarted nats-server with {unfinished} of {n} transactions unfinished");
    assert!(
        unfinished > n / 4,
        "the restart must hit transactions in flight ({unfinished} unfinished)"
    );
    let outs = run.await.unwrap();
    // Client publishes retry under their message ids, so every submission lands once the
    // server is back, and every transaction must finish with the outcome its votes dictate.
    let mut wrong = Vec::new();
    for (i, o) in outs.into_iter().enumerate() {
        let id = format!("restart-{i}");
        let ev = match o {
            Ok(ev) => ev,
            Err(e) => {
                eprintln!("{id}: client wait ended ({e}); reading the outcome from the log");
                sys.wait_state(&id, |e| e.state.is_terminal()).await
            }
        };
        let want = if i % 7 == 0 {
            TxnState::Aborted
        } else {
            TxnState::Committed
        };
        if ev.state != want {
            sys.dump_matching(&format!("{id} "));
            sys.dump_matching(&format!("{id}}}"));
            wrong.push((id, ev));
        }
    }
    if !wrong.is_empty() {
        sys.dump_logs();
    }
    assert!(
        wrong.is_empty(),
        "{} wrong outcomes: {wrong:?}",
        wrong.len()
    );
}

/// A reply stream left by an older txcoord as a work queue (which cannot become a limits
/// stream in place) is replaced, and the coordinator then runs transactions normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_work_queue_reply_stream_is_replaced() {
    use async_nats::jetstream::stream;
    let nats = NatsServer::start().expect("nats-server");
    let nc = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(nc);
    js.create_stream(stream::Config {
        name: "TXN_REPLY".into(),
        subjects: vec!["txn.reply.>".into()],
        retention: stream::RetentionPolicy::WorkQueue,
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish("txn.reply.old", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let subjects = txcoord::proto::Subjects::new("txn");
    let streams =
        txcoord::nats::ensure_streams(&js, &subjects, &txcoord::nats::StreamSettings::default())
            .await
            .unwrap();
    let mut replies = streams.replies;
    let info = replies.info().await.unwrap();
    assert_eq!(info.config.retention, stream::RetentionPolicy::Limits);
    assert_eq!(info.config.max_age, Duration::from_secs(3600));
    assert_eq!(
        info.state.messages, 0,
        "the old stream's replies went with it"
    );
    // Opening again keeps the new stream as it is.
    let again =
        txcoord::nats::ensure_streams(&js, &subjects, &txcoord::nats::StreamSettings::default())
            .await
            .unwrap();
    let mut replies = again.replies;
    assert_eq!(
        replies.info().await.unwrap().config.retention,
        stream::RetentionPolicy::Limits
    );
    // And a coordinator on top of it commits.
    let sys = System::start_on(nats, &["a"], &[]).await;
    let req = request("after-replace", vec![step("a", json!({}))]);
    sys.client
        .submit_raw(serde_json::to_vec(&req).unwrap().into(), "after-replace")
        .await
        .unwrap();
    let ev = sys
        .wait_state("after-replace", |e| e.state.is_terminal())
        .await;
    assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
}

/// A restart reads the log from the recovery checkpoint, not from the beginning: with 20
/// finished transactions behind it, it reads only the unfinished one's records, and
/// resumes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reads_the_log_from_the_checkpoint() {
    let mut sys = System::start(&["a", "b"], &[("TXCOORD_CHECKPOINT_INTERVAL_MS", "100")]).await;
    let url = sys.nats.url();
    for i in 0..20 {
        let ev = sys
            .run(request(&format!("old-{i}"), vec![step("a", json!({}))]))
            .await;
        assert_eq!(ev.state, TxnState::Committed);
    }
    let js = async_nats::jetstream::new(sys.nc.clone());
    let end = js
        .get_stream("TXN_EVENTS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    let kv = js
        .get_key_value(txcoord::coordinator::checkpoint::bucket_name("txn"))
        .await
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        let at: u64 = match kv.get("recovery_from").await.unwrap() {
            Some(v) => std::str::from_utf8(&v).unwrap().parse().unwrap(),
            None => 0,
        };
        if at > end {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "checkpoint stuck at {at}, log ends at {end}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let req = request(
        "ckpt-live",
        vec![step("a", json!({})), step("b", json!({"delay_ms": 1500}))],
    );
    sys.client
        .submit_raw(serde_json::to_vec(&req).unwrap().into(), "ckpt-live")
        .await
        .unwrap();
    sys.wait_vote("ckpt-live", 0).await;
    sys.coordinator.kill9();
    sys.coordinator.restart_with(&[("TXCOORD_NATS_URL", &url)]);
    let ev = sys.wait_state("ckpt-live", |e| e.state.is_terminal()).await;
    assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
    let log = sys.coordinator.log_text();
    let line = log
        .lines()
        .rfind(|l| l.contains("recovery done"))
        .expect("a recovery line")
        .to_string();
    let field = |name: &str| -> u64 {
        let rest = &line[line.find(&format!("{name}=")).expect(name) + name.len() + 1..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(field("recovered"), 1, "{line}");
    // Only ckpt-live's records (accepted, preparing): the 20 finished ones are behind.
    assert!(field("scanned") <= 3, "{line}");
}

/// Three 2PC transactions whose second step is slow are left unfinished: once each has its
/// first vote, the coordinator is SIGKILLed and started again with `failpoint`. Every one
/// must still commit; returns the restarted coordinator's last `recovery done` line and
/// its whole log.
async fn unfinished_three_then_restart_with(prefix: &str, failpoint: &str) -> (String, String) {
    let mut sys = System::start(&["a", "b"], &[]).await;
    let url = sys.nats.url();
    let ids: Vec<String> = (0..3).map(|i| format!("{prefix}-{i}")).collect();
    for id in &ids {
        let req = request(
            id,
            vec![step("a", json!({})), step("b", json!({"delay_ms": 1500}))],
        );
        sys.client
            .submit_raw(serde_json::to_vec(&req).unwrap().into(), id)
            .await
            .unwrap();
    }
    for id in &ids {
        sys.wait_vote(id, 0).await;
    }
    sys.coordinator.kill9();
    sys.coordinator
        .restart_with(&[("TXCOORD_NATS_URL", &url), ("TXCOORD_FAILPOINT", failpoint)]);
    for id in &ids {
        let ev = sys.wait_state(id, |e| e.state.is_terminal()).await;
        assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
    }
    let log = sys.coordinator.log_text();
    let done = log
        .lines()
        .rfind(|l| l.contains("recovery done"))
        .expect("a recovery line")
        .to_string();
    (done, log)
}

/// A read of the log at start that stalls partway (JetStream electing the stream's leader,
/// say) is read again in full, so every unfinished transaction is resumed, not only those
/// before the stall. The failpoint stops the first read after one record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_read_that_stalls_is_read_again_in_full() {
    let (done, log) = unfinished_three_then_restart_with("stalled", "recovery-stall-once").await;
    assert!(
        log.contains("failpoint recovery-stall-once")
            && log.contains("recovery read failed; reading the log again"),
        "{log}"
    );
    assert!(done.contains("recovered=3"), "{done}");
}

/// An unfinished transaction that cannot be resumed at start (its `accepted` record
/// unreadable for a moment: a leader election, a lagging replica) is tried again in the
/// background until it runs, not left until the next restart with its participants holding
/// their prepared branches. The failpoint makes the first such read fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_cannot_be_resumed_at_once_is_resumed_later() {
    let (done, log) =
        unfinished_three_then_restart_with("unreadable", "resume-read-fails-once").await;
    assert!(
        log.contains("failpoint resume-read-fails-once")
            && log.contains("resuming a transaction from its log again"),
        "{log}"
    );
    // Two resumed by the recovery at start, the third by the retry, in the same process.
    assert!(done.contains("recovered=2"), "{done}");
}
