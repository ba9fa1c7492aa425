//! One-phase commit with real processes: a transaction whose only step is a service that
//! said it takes `commit_one_phase` commits with one command and one reply, and no decision
//! record; a service that did not say so, a coordinator with `one_phase = false` and a
//! transaction of two steps run both phases; a participant killed between its `prepared`
//! record and its commit, and a coordinator killed while the command is out, each end with
//! the service's commit run exactly once. Every command and reply on the bus is checked
//! against its schema.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Proc, System, check, request, step, validator};
use futures::StreamExt;
use serde_json::{Value, json};
use txcoord::participant::BranchState;
use txcoord::proto::{
    CommandBatch, CommandKind, ParticipantCommand, ParticipantReply, Reason, ReplyBatch,
    ReplyOutcome, TransactionEvent, TxnState,
};

/// Every command and reply on the bus (alone or in a batch), each checked against its
/// schema as it passes.
#[derive(Clone, Default)]
struct Bus {
    commands: Arc<Mutex<Vec<ParticipantCommand>>>,
    replies: Arc<Mutex<Vec<ParticipantReply>>>,
    /// The last marker subject the watcher read ([`Bus::settle`]).
    marker: Arc<Mutex<Option<String>>>,
}

impl Bus {
    async fn watch(nc: &async_nats::Client) -> Bus {
        let bus = Bus::default();
        let mut sub = nc.subscribe("txn.>").await.expect("subscribe");
        nc.flush().await.expect("flush");
        let seen = bus.clone();
        tokio::spawn(async move {
            let schema = |name| (name, validator(name));
            let (command, batch, reply, replies) = (
                schema("participant-command"),
                schema("command-batch"),
                schema("participant-reply"),
                schema("reply-batch"),
            );
            while let Some(msg) = sub.next().await {
                let subject = msg.subject.as_str();
                if subject.starts_with("txn.test-marker.") {
                    *seen.marker.lock().unwrap() = Some(subject.to_string());
                    continue;
                }
                let Ok(v) = serde_json::from_slice::<Value>(&msg.payload) else {
                    continue;
                };
                let batched = subject.contains(".batch.");
                if subject.starts_with("txn.cmd.") {
                    if batched {
                        check(&batch.1, batch.0, subject, &v);
                        let b: CommandBatch = serde_json::from_value(v).expect("command batch");
                        seen.commands.lock().unwrap().extend(b.commands);
                    } else {
                        check(&command.1, command.0, subject, &v);
                        let c = serde_json::from_value(v).expect("command");
                        seen.commands.lock().unwrap().push(c);
                    }
                } else if subject.starts_with("txn.reply.") {
                    if batched {
                        check(&replies.1, replies.0, subject, &v);
                        let b: ReplyBatch = serde_json::from_value(v).expect("reply batch");
                        seen.replies.lock().unwrap().extend(b.replies);
                    } else {
                        check(&reply.1, reply.0, subject, &v);
                        let r = serde_json::from_value(v).expect("reply");
                        seen.replies.lock().unwrap().push(r);
                    }
                }
            }
        });
        bus
    }

    /// The kinds and attempts of the commands sent for `txn_id`, in order, once the bus
    /// has carried everything published so far (the watcher runs in its own task, so an
    /// outcome can reach the test before the watcher read the commands before it).
    async fn commands(&self, nc: &async_nats::Client, txn_id: &str) -> Vec<(CommandKind, u32)> {
        self.settle(nc).await;
        let all = self.commands.lock().unwrap();
        all.iter()
            .filter(|c| c.txn_id == txn_id)
            .map(|c| (c.kind, c.attempt))
            .collect()
    }

    /// The kinds and outcomes of the replies for `txn_id`, in order (as
    /// [`Bus::commands`]).
    async fn replies(
        &self,
        nc: &async_nats::Client,
        txn_id: &str,
    ) -> Vec<(CommandKind, ReplyOutcome)> {
        self.settle(nc).await;
        let all = self.replies.lock().unwrap();
        all.iter()
            .filter(|r| r.txn_id == txn_id)
            .map(|r| (r.kind, r.outcome))
            .collect()
    }

    /// Publishes a marker on the watched subjects and waits until the watcher read it: it
    /// then read everything the server sent it before.
    async fn settle(&self, nc: &async_nats::Client) {
        let marker = format!("txn.test-marker.{}", uuid::Uuid::new_v4().simple());
        *self.marker.lock().unwrap() = None;
        nc.publish(marker.clone(), "{}".into())
            .await
            .expect("publish marker");
        let start = std::time::Instant::now();
        while self.marker.lock().unwrap().as_deref() != Some(marker.as_str()) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the bus watcher is stuck"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn states(history: &[TransactionEvent]) -> Vec<TxnState> {
    history.iter().map(|e| e.state).collect()
}

/// How often a participant's log has `word` (a scripted participant's VOTED or COMMITTED
/// line) for `txn_id`.
fn lines(p: &Proc, word: &str, txn_id: &str) -> usize {
    p.log_text()
        .lines()
        .filter(|l| l.starts_with(word) && l.contains(&format!("txn_id={txn_id} ")))
        .count()
}

/// Runs a one-step transaction for `service` so that the coordinator hears its reply (and
/// with it what it takes); it is two-phase, since nothing was heard before it.
async fn warm_up(sys: &System, service: &str) {
    let id = format!("warm-{service}");
    let ev = sys.run(request(&id, vec![step(service, json!({}))])).await;
    assert_eq!(ev.state, TxnState::Committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_step_commits_in_one_phase_once_its_service_said_it_takes_that() {
    let sys = System::start(&["a", "b"], &[]).await;
    let bus = Bus::watch(&sys.nc).await;
    // Nothing was heard from `a` yet: its first transaction runs both phases.
    warm_up(&sys, "a").await;
    let first = sys.client.history("warm-a").await;
    assert!(states(&first).contains(&TxnState::Committing), "{first:?}");
    assert_eq!(
        bus.commands(&sys.nc, "warm-a").await,
        vec![(CommandKind::Prepare, 1), (CommandKind::Commit, 1)]
    );

    // From then on, one command, one reply, no decision record.
    let ev = sys.run(request("one", vec![step("a", json!({}))])).await;
    assert_eq!(ev.state, TxnState::Committed);
    let history = sys.client.history("one").await;
    assert_eq!(
        states(&history),
        vec![TxnState::Accepted, TxnState::Preparing, TxnState::Committed],
        "{history:?}"
    );
    assert!(history.iter().all(|e| e.one_phase), "{history:?}");
    assert_eq!(sys.stats().await["one_phase"], 1, "counted in $SRV.STATS");
    let events = validator("transaction-event");
    for e in &history {
        check(&events, "transaction-event", "txn.events.one", &json!(e));
    }
    assert_eq!(
        bus.commands(&sys.nc, "one").await,
        vec![(CommandKind::CommitOnePhase, 1)]
    );
    assert_eq!(
        bus.replies(&sys.nc, "one").await,
        vec![(CommandKind::CommitOnePhase, ReplyOutcome::Done)]
    );
    sys.wait_branch("a", "one", 0, BranchState::Committed).await;
    let a = sys.participant_log("a");
    assert_eq!(
        (lines(a, "VOTED", "one"), lines(a, "COMMITTED", "one")),
        (1, 1),
        "the service prepared and committed once"
    );

    // A refusal aborts it with the service's reason, and nothing else is sent.
    let req = request(
        "no",
        vec![step("a", json!({"vote": "abort", "reason": "sold out"}))],
    );
    let ev = sys.run(req).await;
    assert_eq!(ev.state, TxnState::Aborted);
    assert!(
        matches!(&ev.reason, Some(Reason::VoteAbort { service, message, .. }) if service == "a" && message == "sold out"),
        "{ev:?}"
    );
    assert_eq!(
        states(&sys.client.history("no").await),
        vec![TxnState::Accepted, TxnState::Preparing, TxnState::Aborted]
    );
    assert_eq!(
        bus.commands(&sys.nc, "no").await,
        vec![(CommandKind::CommitOnePhase, 1)]
    );
    assert_eq!(lines(a, "COMMITTED", "no"), 0);

    // Read-only: committed, nothing to commit.
    let ev = sys
        .run(request("ro", vec![step("a", json!({"vote": "read_only"}))]))
        .await;
    assert_eq!(ev.state, TxnState::Committed);
    assert_eq!(
        bus.replies(&sys.nc, "ro").await,
        vec![(CommandKind::CommitOnePhase, ReplyOutcome::ReadOnly)]
    );

    // Two steps are two phases, whatever the services take.
    warm_up(&sys, "b").await;
    let ev = sys
        .run(request(
            "two",
            vec![step("a", json!({})), step("b", json!({}))],
        ))
        .await;
    assert_eq!(ev.state, TxnState::Committed);
    assert!(!ev.one_phase);
    assert!(states(&sys.client.history("two").await).contains(&TxnState::Committing));
    let kinds: Vec<CommandKind> = bus
        .commands(&sys.nc, "two")
        .await
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(kinds.len(), 4, "{kinds:?}");
    assert!(!kinds.contains(&CommandKind::CommitOnePhase), "{kinds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_takes_no_one_phase_and_a_coordinator_with_it_off_run_both_phases() {
    let mut sys = System::start(&["a"], &[]).await;
    let url = sys.nats.url();
    sys.spawn_participant("c", &["--no-one-phase"]).await;
    let bus = Bus::watch(&sys.nc).await;
    warm_up(&sys, "c").await;
    let ev = sys.run(request("c1", vec![step("c", json!({}))])).await;
    assert_eq!(ev.state, TxnState::Committed);
    assert!(!ev.one_phase);
    assert_eq!(
        bus.commands(&sys.nc, "c1").await,
        vec![(CommandKind::Prepare, 1), (CommandKind::Commit, 1)]
    );

    // The same service `a` that takes it, under a coordinator configured without it.
    sys.coordinator.restart_with(&[
        ("TXCOORD_NATS_URL", url.as_str()),
        ("TXCOORD_LEASE_TTL_MS", "2000"),
        ("TXCOORD_ONE_PHASE", "false"),
    ]);
    sys.coordinator
        .wait_for("coordinator ready", Duration::from_secs(30))
        .await;
    warm_up(&sys, "a").await;
    let ev = sys.run(request("a1", vec![step("a", json!({}))])).await;
    assert_eq!(ev.state, TxnState::Committed);
    assert_eq!(
        bus.commands(&sys.nc, "a1").await,
        vec![(CommandKind::Prepare, 1), (CommandKind::Commit, 1)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_killed_between_its_prepared_record_and_its_commit_commits_once() {
    let mut sys = System::start(&["a"], &[]).await;
    let url = sys.nats.url();
    let bus = Bus::watch(&sys.nc).await;
    warm_up(&sys, "a").await;
    // From now on `a` exits right after recording a one-phase commit's prepare.
    sys.participant("a").restart_with(&[
        ("TXCOORD_NATS_URL", url.as_str()),
        (
            "TXCOORD_FAILPOINT",
            "participant-exit-before-one-phase-commit",
        ),
    ]);
    sys.participant_log("a")
        .wait_for("participant ready", Duration::from_secs(30))
        .await;
    sys.submit(&request("crash", vec![step("a", json!({}))]), "crash")
        .await;
    let status = sys
        .participant("a")
        .wait_exit(Duration::from_secs(30))
        .await;
    assert!(!status.success(), "the failpoint exits: {status}");
    sys.wait_branch("a", "crash", 0, BranchState::Prepared)
        .await;
    let a = sys.participant_log("a");
    assert_eq!(lines(a, "VOTED", "crash"), 1);
    assert_eq!(lines(a, "COMMITTED", "crash"), 0);

    // Back without the failpoint: the redelivered command commits from the record.
    sys.participant("a")
        .restart_with(&[("TXCOORD_NATS_URL", url.as_str())]);
    let ev = sys.wait_state("crash", |e| e.state.is_terminal()).await;
    assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
    assert!(
        !states(&sys.client.history("crash").await).contains(&TxnState::Committing),
        "no decision record"
    );
    sys.wait_branch("a", "crash", 0, BranchState::Committed)
        .await;
    let a = sys.participant_log("a");
    assert_eq!(
        (lines(a, "VOTED", "crash"), lines(a, "COMMITTED", "crash")),
        (1, 1),
        "prepared once, committed once"
    );
    assert!(
        bus.commands(&sys.nc, "crash")
            .await
            .iter()
            .all(|(k, _)| *k == CommandKind::CommitOnePhase),
        "{:?}",
        bus.commands(&sys.nc, "crash").await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_with_the_command_out_finishes_it_after_a_restart() {
    let mut sys = System::start(&["a"], &[]).await;
    let bus = Bus::watch(&sys.nc).await;
    warm_up(&sys, "a").await;
    // The service takes its time; the coordinator dies once the command is out.
    let req = request("slow", vec![step("a", json!({"delay_ms": 1500}))]);
    sys.submit(&req, "slow").await;
    sys.wait_state("slow", |e| e.state == TxnState::Preparing)
        .await;
    let since = std::time::Instant::now();
    while bus.commands(&sys.nc, "slow").await.is_empty() {
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "the one-phase command never went out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sys.coordinator.kill9();
    // The participant decides alone meanwhile.
    sys.wait_branch("a", "slow", 0, BranchState::Committed)
        .await;
    sys.coordinator.restart();
    let ev = sys.wait_state("slow", |e| e.state.is_terminal()).await;
    assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
    let history = sys.client.history("slow").await;
    assert!(
        !states(&history).contains(&TxnState::Committing),
        "{history:?}"
    );
    // The restarted coordinator asked again, with a higher attempt, and was answered from
    // the record: the service prepared and committed once.
    let sent = bus.commands(&sys.nc, "slow").await;
    assert!(
        sent.iter().all(|(k, _)| *k == CommandKind::CommitOnePhase)
            && sent.iter().any(|(_, attempt)| *attempt > 1),
        "{sent:?}"
    );
    let a = sys.participant_log("a");
    assert_eq!(
        (lines(a, "VOTED", "slow"), lines(a, "COMMITTED", "slow")),
        (1, 1)
    );
}

/// A one-phase transaction whose participant does not answer by its deadline can only be
/// ended by a person: `txcoord resolve <id> mark-done --outcome aborted` (refused until the
/// deadline has passed) ends it `aborted`, recorded as the operator's decision. When the
/// participant does answer later, and says it committed, the coordinator reports the
/// disagreement: a `contradicted` alert on `txn.alerts`, because the service and the log
/// now disagree and only a person can reconcile them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_one_phase_transaction_ended_by_hand_and_contradicted_later_raises_an_alert() {
    let sys = System::start(&["a"], &[]).await;
    warm_up(&sys, "a").await;
    let mut alerts = sys.nc.subscribe("txn.alerts").await.expect("alerts");
    sys.nc.flush().await.expect("flush");
    // The service sleeps past the deadline before it votes (then commits, in one phase).
    let mut req = request("by-hand", vec![step("a", json!({"delay_ms": 5000}))]);
    req["timeout_ms"] = json!(1000);
    sys.submit(&req, "by-hand").await;
    sys.wait_state("by-hand", |e| e.state == TxnState::Preparing)
        .await;
    let resolve = [
        "resolve",
        "by-hand",
        "mark-done",
        "--outcome",
        "aborted",
        "--reason",
        "the service shows nothing for it",
        "--by",
        "ops",
    ];
    // Refused while the participant may still be deciding; carried out past the deadline.
    let since = std::time::Instant::now();
    loop {
        let out = sys.cli(&resolve);
        if out.status.success() {
            break;
        }
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("may still be deciding"), "{said}");
        assert!(
            since.elapsed() < Duration::from_secs(20),
            "never past the deadline: {said}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ev = sys.wait_state("by-hand", |e| e.state.is_terminal()).await;
    assert_eq!(ev.state, TxnState::Aborted, "{ev:?}");
    assert_eq!(
        ev.reason,
        Some(Reason::Operator {
            by: "ops".into(),
            message: "the service shows nothing for it".into()
        })
    );
    let resolved = ev.resolved.clone().expect("the audit");
    assert_eq!(
        resolved.outcome,
        Some(txcoord::proto::ConfirmedOutcome::Aborted)
    );
    // The participant wakes up, commits in one phase and says so: an alert.
    let alert = loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), alerts.next())
            .await
            .expect("a contradicted alert")
            .expect("alerts open");
        let alert: txcoord::proto::Alert = serde_json::from_slice(&msg.payload).expect("an alert");
        if alert.kind == txcoord::proto::AlertKind::Contradicted {
            break alert;
        }
    };
    assert_eq!(alert.txn_id, "by-hand");
    assert_eq!(alert.state, TxnState::Aborted);
    assert!(
        alert.message.contains("a answered done"),
        "{}",
        alert.message
    );
    assert_eq!(alert.resolved, Some(resolved));
    check(
        &validator("alert"),
        "alert",
        "txn.alerts",
        &serde_json::to_value(&alert).unwrap(),
    );
    // The log is unchanged: the operator's outcome stands.
    let last = sys.client.history("by-hand").await;
    assert_eq!(last.last().map(|e| e.state), Some(TxnState::Aborted));
    assert!(
        sys.coordinator.log_text().contains("HEURISTIC HAZARD"),
        "{}",
        sys.coordinator.log_text()
    );
}
