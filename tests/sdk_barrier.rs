//! The participant SDK's barrier (sagas, and the 2PC rows a test can only show with real
//! deliveries) against a real nats-server: commands are published by
//! hand (as a coordinator would, duplicates and misorderings included) and the test counts
//! how often the service itself was called.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use txcoord::natsserver::NatsServer;
use txcoord::participant::{self, BranchState, Participant, ServiceError, StepResult, TxnContext};
use txcoord::proto::{CommandKind, ParticipantCommand, ParticipantReply, ReplyOutcome, Subjects};

#[derive(Default)]
struct Counting {
    executes: AtomicU32,
    compensates: AtomicU32,
    prepares: AtomicU32,
    commits: AtomicU32,
    aborts: AtomicU32,
    /// Fail retryably this many times first.
    flaky: AtomicU32,
}

/// The service as the SDK sees it; the test keeps the other handle to read the counters.
struct Svc(Arc<Counting>);

impl Participant for Svc {
    async fn prepare(
        &self,
        _txn: &TxnContext,
        _action: &str,
        _payload: &Value,
    ) -> participant::Vote {
        self.0.prepares.fetch_add(1, Ordering::SeqCst);
        participant::Vote::Ready
    }

    async fn commit(&self, _txn: &TxnContext) -> Result<(), ServiceError> {
        self.0.commits.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn abort(&self, _txn: &TxnContext) -> Result<(), ServiceError> {
        self.0.aborts.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn execute(&self, _txn: &TxnContext, _action: &str, _payload: &Value) -> StepResult {
        self.0.executes.fetch_add(1, Ordering::SeqCst);
        if self.0.flaky.load(Ordering::SeqCst) > 0 {
            self.0.flaky.fetch_sub(1, Ordering::SeqCst);
            return StepResult::Failed {
                reason: "busy".into(),
                retryable: true,
            };
        }
        StepResult::Done
    }

    async fn compensate(&self, _txn: &TxnContext) -> Result<(), ServiceError> {
        self.0.compensates.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct Harness {
    _nats: NatsServer,
    js: async_nats::jetstream::Context,
    service: Arc<Counting>,
    replies: async_nats::Subscriber,
    subjects: Subjects,
}

impl Harness {
    async fn start() -> Harness {
        Self::start_with(Default::default()).await
    }

    async fn start_with(options: participant::Options) -> Harness {
        let nats = NatsServer::start().expect("nats-server (run ./dev setup)");
        let nc = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(nc.clone());
        let subjects = Subjects::default();
        txcoord::nats::ensure_streams(&js, &subjects, &Default::default())
            .await
            .unwrap();
        let service = Arc::new(Counting::default());
        let replies = nc.subscribe("txn.reply.>").await.unwrap();
        let run = participant::run(
            nc.clone(),
            "svc",
            Svc(service.clone()),
            options,
            std::future::pending(),
        );
        tokio::spawn(run);
        Harness {
            _nats: nats,
            js,
            service,
            replies,
            subjects,
        }
    }

    /// Sends one command and returns the participant's reply to it.
    async fn send(&mut self, txn: &str, kind: CommandKind, attempt: u32) -> ParticipantReply {
        self.send_copy(txn, kind, attempt, 0).await
    }

    /// Sends a command as [`Harness::send`] does; `copy` above 0 stores the same command
    /// again as a new message (another message id), as JetStream can after a crash: the
    /// participant sees it as a first delivery.
    async fn send_copy(
        &mut self,
        txn: &str,
        kind: CommandKind,
        attempt: u32,
        copy: u32,
    ) -> ParticipantReply {
        let cmd = ParticipantCommand {
            action: "ship".into(),
            payload: json!({"box": 1}),
            reply_to: self.subjects.reply(txn),
            attempt,
            ..ParticipantCommand::new(txn.into(), "svc".into(), 0, kind)
        };
        let subject = self.subjects.command("svc", txn);
        let mut id = format!("{txn}.0.{}.{attempt}", kind.as_str());
        if copy > 0 {
            id.push_str(&format!(".copy{copy}"));
        }
        txcoord::nats::publish_durable(
            &self.js,
            &subject,
            &id,
            serde_json::to_vec(&cmd).unwrap().into(),
            Default::default(),
            Some(3),
        )
        .await
        .unwrap();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), self.replies.next())
                .await
                .expect("a reply")
                .unwrap();
            let r: ParticipantReply = serde_json::from_slice(&msg.payload).unwrap();
            if r.txn_id == txn && r.kind == kind && r.attempt == attempt {
                return r;
            }
        }
    }

    async fn record(&self, txn: &str) -> Option<BranchState> {
        let store = participant::branch_store(&self.js, "svc", 1).await.unwrap();
        participant::read_branch(&store, txn, 0)
            .await
            .map(|r| r.state)
    }

    fn calls(&self) -> (u32, u32) {
        (
            self.service.executes.load(Ordering::SeqCst),
            self.service.compensates.load(Ordering::SeqCst),
        )
    }

    /// The 2PC calls so far: prepares, commits, aborts.
    fn calls_2pc(&self) -> (u32, u32, u32) {
        let s = &self.service;
        (
            s.prepares.load(Ordering::SeqCst),
            s.commits.load(Ordering::SeqCst),
            s.aborts.load(Ordering::SeqCst),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_prepare_is_answered_from_the_record_and_a_late_one_after_its_abort_votes_abort() {
    let mut h = Harness::start().await;
    assert_eq!(
        h.send("p2", CommandKind::Prepare, 1).await.outcome,
        ReplyOutcome::Ready
    );
    // A resend (a higher attempt) reads the record first: no second prepare.
    assert_eq!(
        h.send("p2", CommandKind::Prepare, 2).await.outcome,
        ReplyOutcome::Ready
    );
    assert_eq!(h.calls_2pc(), (1, 0, 0));
    // The abort came first (the prepare timed out somewhere on the way): the late
    // prepare, even on its first delivery, finds the abort's record and votes abort
    // without calling the service.
    h.send("p3", CommandKind::Abort, 1).await;
    assert_eq!(h.calls_2pc(), (1, 0, 1));
    let late = h.send("p3", CommandKind::Prepare, 1).await;
    assert_eq!(late.outcome, ReplyOutcome::Abort);
    assert_eq!(
        h.record("p3").await,
        Some(BranchState::AbortedBeforePrepare)
    );
    assert_eq!(h.calls_2pc(), (1, 0, 1), "the late prepare did not run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_phase_commit_prepares_and_commits_once_and_its_repeat_is_answered_from_the_record() {
    let mut h = Harness::start().await;
    assert_eq!(
        h.send("o1", CommandKind::CommitOnePhase, 1).await.outcome,
        ReplyOutcome::Done
    );
    assert_eq!(h.record("o1").await, Some(BranchState::Committed));
    assert_eq!(
        h.send("o1", CommandKind::CommitOnePhase, 2).await.outcome,
        ReplyOutcome::Done
    );
    assert_eq!(h.calls_2pc(), (1, 1, 0));
    // The very same command stored again as a new message (what the fault suite saw after
    // a crash): a first delivery of attempt 1, still answered from the record, so the
    // service does not prepare (hold) again what its commit settled.
    assert_eq!(
        h.send_copy("o1", CommandKind::CommitOnePhase, 1, 1)
            .await
            .outcome,
        ReplyOutcome::Done
    );
    assert_eq!(
        h.calls_2pc(),
        (1, 1, 0),
        "no second prepare after the commit"
    );
    // The same for a two-phase prepare stored again after its commit.
    h.send("p5", CommandKind::Prepare, 1).await;
    h.send("p5", CommandKind::Commit, 1).await;
    assert_eq!(
        h.send_copy("p5", CommandKind::Prepare, 1, 1).await.outcome,
        ReplyOutcome::Ready
    );
    assert_eq!(h.calls_2pc(), (2, 2, 0), "no prepare after the commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_execute_returns_the_first_result_without_calling_again() {
    let mut h = Harness::start().await;
    assert_eq!(
        h.send("t1", CommandKind::Execute, 1).await.outcome,
        ReplyOutcome::Done
    );
    assert_eq!(
        h.send("t1", CommandKind::Execute, 2).await.outcome,
        ReplyOutcome::Done
    );
    assert_eq!(h.calls(), (1, 0));
    assert_eq!(h.record("t1").await, Some(BranchState::Executed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_compensate_undoes_once() {
    let mut h = Harness::start().await;
    h.send("t2", CommandKind::Execute, 1).await;
    assert_eq!(
        h.send("t2", CommandKind::Compensate, 1).await.outcome,
        ReplyOutcome::Done
    );
    assert_eq!(
        h.send("t2", CommandKind::Compensate, 2).await.outcome,
        ReplyOutcome::Done
    );
    assert_eq!(h.calls(), (1, 1));
    assert_eq!(h.record("t2").await, Some(BranchState::Compensated));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compensate_before_execute_is_a_null_compensation() {
    let mut h = Harness::start().await;
    assert_eq!(
        h.send("t3", CommandKind::Compensate, 1).await.outcome,
        ReplyOutcome::Done
    );
    assert_eq!(
        h.calls(),
        (0, 1),
        "no execute is recorded, but one may have applied and crashed before its record: the service is asked to undo (and finds nothing)"
    );
    assert_eq!(
        h.record("t3").await,
        Some(BranchState::CompensatedBeforeExecute)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_after_compensate_is_refused() {
    let mut h = Harness::start().await;
    h.send("t4", CommandKind::Compensate, 1).await;
    let late = h.send("t4", CommandKind::Execute, 1).await;
    assert_eq!(late.outcome, ReplyOutcome::Failed);
    assert_eq!(late.retryable, Some(false));
    assert!(
        late.reason
            .unwrap_or_default()
            .contains("after its compensation")
    );
    assert_eq!(
        h.calls(),
        (0, 1),
        "the service never runs a step whose compensation came first (the one call is that compensation)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_failure_is_not_recorded_so_the_retry_runs_again() {
    let mut h = Harness::start().await;
    h.service.flaky.store(1, Ordering::SeqCst);
    let first = h.send("t5", CommandKind::Execute, 1).await;
    assert_eq!(
        (first.outcome, first.retryable),
        (ReplyOutcome::Failed, Some(true))
    );
    assert_eq!(h.record("t5").await, None);
    assert_eq!(
        h.send("t5", CommandKind::Execute, 2).await.outcome,
        ReplyOutcome::Done
    );
    assert_eq!(h.calls(), (2, 0));
}

/// Waits until `txn`'s record is gone, or panics after `within`.
async fn expires(h: &Harness, txn: &str, within: Duration) {
    let start = std::time::Instant::now();
    while h.record(txn).await.is_some() {
        assert!(start.elapsed() < within, "{txn}: record still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_records_expire_and_open_ones_stay() {
    let mut h = Harness::start_with(participant::Options {
        finished_record_ttl: Some(Duration::from_secs(1)),
        ..Default::default()
    })
    .await;
    // A prepared branch and an executed saga step may still be asked to finish or undo:
    // they outlive the TTL.
    assert_eq!(
        h.send("p1", CommandKind::Prepare, 1).await.outcome,
        ReplyOutcome::Ready
    );
    assert_eq!(
        h.send("s1", CommandKind::Execute, 1).await.outcome,
        ReplyOutcome::Done
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(h.record("p1").await, Some(BranchState::Prepared));
    assert_eq!(h.record("s1").await, Some(BranchState::Executed));
    // Finished, they expire.
    assert_eq!(
        h.send("p1", CommandKind::Commit, 1).await.outcome,
        ReplyOutcome::Done
    );
    assert_eq!(
        h.send("s1", CommandKind::Compensate, 1).await.outcome,
        ReplyOutcome::Done
    );
    assert_eq!(h.calls(), (1, 1));
    expires(&h, "p1", Duration::from_secs(15)).await;
    expires(&h, "s1", Duration::from_secs(15)).await;
    // A very late repeat of the commit is confirmed: the only way a ready branch's record
    // can be missing is that it was committed and expired.
    assert_eq!(
        h.send("p1", CommandKind::Commit, 2).await.outcome,
        ReplyOutcome::Done
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_acting_on_its_own_prepared_record_finds_another_instances_commit_and_answers_from_it()
 {
    let mut h = Harness::start().await;
    assert_eq!(
        h.send("p4", CommandKind::Prepare, 1).await.outcome,
        ReplyOutcome::Ready
    );
    // Another instance of the service commits the branch meanwhile (a resend went there).
    let store = participant::branch_store(&h.js, "svc", 1).await.unwrap();
    let entry = store.entry("p4.0").await.unwrap().expect("prepared record");
    let mut rec: participant::BranchRecord = serde_json::from_slice(&entry.value).unwrap();
    rec.state = BranchState::Committed;
    store
        .update(
            "p4.0",
            serde_json::to_vec(&rec).unwrap().into(),
            entry.revision,
        )
        .await
        .unwrap();
    // This process's first commit, right after its own prepare, acts on the record it wrote
    // without reading it; its compare-and-set fails, and it answers from what is stored.
    assert_eq!(
        h.send("p4", CommandKind::Commit, 1).await.outcome,
        ReplyOutcome::Done
    );
    assert_eq!(h.record("p4").await, Some(BranchState::Committed));
    assert_eq!(
        h.calls_2pc(),
        (1, 1, 0),
        "the one commit it ran (every service bears a repeated call)"
    );
    // A repeat reads the record: no second commit here.
    assert_eq!(
        h.send("p4", CommandKind::Commit, 2).await.outcome,
        ReplyOutcome::Done
    );
    assert_eq!(h.calls_2pc(), (1, 1, 0));
}
