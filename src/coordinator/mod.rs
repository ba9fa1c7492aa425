//! The coordinator runtime (`txcoord serve`): it reads submissions and participant replies
//! from JetStream, drives one [`TwoPc`] engine per transaction, and performs the engine's
//! commands. It owns no state that is not in JetStream: on start it rebuilds every
//! unfinished transaction from the events stream and resumes it.
//!
//! ```text
//!  txn.submit ─▶ [submit consumer] ─▶ spawn txn task ─┐        ┌─▶ txn.events.<id>  (log)
//!                                                    ├─ engine ┤
//!  txn.reply.> ─▶ [reply consumer] ─▶ Router ────────┘        └─▶ txn.cmd.<svc>.<id>
//! ```

pub mod api;
pub mod batch;
pub mod checkpoint;
pub mod console;
pub mod deadlock;
pub mod http;
pub mod lease;
pub mod limits;
pub mod prometheus;
pub mod replies;
pub mod txn;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tokio::sync::{Semaphore, mpsc};
use tracing::Instrument;

use crate::client::LogTail;
use crate::config::Config;
use crate::engine::EngineConfig;
use crate::engine::Machine;
use crate::engine::twopc::RecoverError;
use crate::nats::{Expect, NatsError, Streams, ensure_streams, publish_durable};
use crate::proto::{
    Mode, Parsed, ParticipantReply, Reason, RequestError, RequestLimits, Subjects, SubmitError,
    TransactionEvent, TransactionRequest, TxnState, now_ms, parse_request,
};
use txn::{Begin, Router, TxnMsg, to_bytes};

/// The durable consumer that reads submissions.
pub const SUBMIT_CONSUMER: &str = "txcoord-submit";
/// The reply consumer's name, before the run id: each run of a coordinator reads replies
/// through its own consumer, `txcoord-reply-reader-<run id>`. Older txcoord versions
/// shared one consumer of exactly this name.
pub const REPLY_CONSUMER: &str = "txcoord-reply-reader";

/// How long a run's reply consumer outlives its reader: the server deletes it this long
/// after the last pull (the coordinator died); a coordinator cut off for longer makes it
/// again where it left off.
const REPLY_CONSUMER_IDLE: Duration = Duration::from_secs(600);

/// Why the coordinator stopped.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A setting could not be used.
    #[error("configuration: {0}")]
    Config(String),
    /// NATS could not be reached or used.
    #[error(transparent)]
    Nats(#[from] NatsError),
    /// A JetStream consumer could not be set up.
    #[error("consumer {consumer}: {message}")]
    Consumer {
        /// Which one.
        consumer: String,
        /// What went wrong.
        message: String,
    },
    /// The request/reply API could not subscribe to its subjects.
    #[error("cannot start the txcoord micro service: {0}")]
    Api(#[from] async_nats::SubscribeError),
    /// The API's outcome waiter could not start.
    #[error("cannot start the txcoord micro service: {0}")]
    ApiOutcomes(#[from] crate::client::ClientError),
    /// An entry of `http_allow` is not a usable base URL.
    #[error("invalid configuration: http_allow[{0}]: {1}")]
    HttpAllow(usize, txcoord_http::UrlError),
    /// The lease could not be taken.
    #[error(transparent)]
    Lease(#[from] lease::LeaseError),
    /// A listener (metrics, front door, console) could not listen on its address.
    #[error("{key} {addr}: {source}")]
    Listen {
        /// The configuration key (`metrics_listen`, `http_listen`, `console_listen`).
        key: &'static str,
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// `TXCOORD_FAILPOINT` names no failpoint.
    #[error("{0}")]
    Failpoint(String),
    /// The server did not echo a message after the API's subscriptions, so they may not be
    /// in place.
    #[error(
        "cannot start the txcoord micro service: the server did not confirm its subscriptions ({0})"
    )]
    ApiNotConfirmed(String),
    /// Another coordinator took the lease, or it expired while this one was cut off.
    #[error("this coordinator lost its lease and stopped; restart it to recover from the log")]
    LeaseLost,
}

/// Counters exposed in the micro service's stats.
#[derive(Debug, Default)]
pub struct Metrics {
    accepted: AtomicU64,
    committed: AtomicU64,
    aborted: AtomicU64,
    rejected: AtomicU64,
    duplicates: AtomicU64,
    recovered: AtomicU64,
    completed: AtomicU64,
    compensated: AtomicU64,
    rejected_replies: AtomicU64,
    refused_api_requests: AtomicU64,
    held_back: AtomicU64,
    foreign_log_messages: AtomicU64,
    log_refusals: AtomicU64,
    /// Deadlock victims chosen.
    pub deadlocks: AtomicU64,
    /// Wait-for edges refused.
    pub rejected_edges: AtomicU64,
    /// Command batches sent.
    pub command_batches: AtomicU64,
    /// Commands sent in batches.
    pub batched_commands: AtomicU64,
    /// Transactions started in one phase (`commit_one_phase`).
    pub one_phase: AtomicU64,
    /// Time from acceptance to outcome of the transactions this coordinator started, by
    /// outcome (committed, aborted, completed, compensated).
    pub durations: [Histogram; 4],
    /// Aborted and compensated transactions by reason kind.
    pub ended_by_reason: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Alerts published on `<prefix>.alerts`.
    pub alerts: AtomicU64,
    /// Late one-phase answers that contradict the outcome an operator recorded by hand
    /// (`contradicted` alerts): the service and the log disagree.
    pub contradicted: AtomicU64,
}

/// The outcomes [`Metrics::durations`] is kept for, in its order.
pub const OUTCOMES: [TxnState; 4] = [
    TxnState::Committed,
    TxnState::Aborted,
    TxnState::Completed,
    TxnState::Compensated,
];

/// The upper bounds, in seconds, of [`Histogram`]'s buckets.
pub const BUCKETS_S: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A Prometheus-style histogram with fixed buckets ([`BUCKETS_S`]), lock-free.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations at or below each bound (not cumulative; the exporter sums them).
    pub buckets: [AtomicU64; 15],
    /// Observations above the last bound.
    pub over: AtomicU64,
    /// Sum of the observations, in microseconds.
    pub sum_us: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        match BUCKETS_S.iter().position(|&b| s <= b) {
            Some(i) => self.buckets[i].fetch_add(1, Ordering::Relaxed),
            None => self.over.fetch_add(1, Ordering::Relaxed),
        };
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

impl Metrics {
    fn accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }
    fn held_back(&self) {
        self.held_back.fetch_add(1, Ordering::Relaxed);
    }
    fn refused_api_request(&self) {
        self.refused_api_requests.fetch_add(1, Ordering::Relaxed);
    }
    fn foreign_log_message(&self) {
        self.foreign_log_messages.fetch_add(1, Ordering::Relaxed);
    }
    fn log_refusal(&self) {
        self.log_refusals.fetch_add(1, Ordering::Relaxed);
    }
    fn duplicate(&self) {
        self.duplicates.fetch_add(1, Ordering::Relaxed);
    }
    /// A transaction ended in `state`, `took` after this coordinator accepted it (`None`
    /// for one it resumed from the log), for `reason` when it did not succeed.
    fn ended(
        &self,
        state: TxnState,
        took: Option<Duration>,
        reason: Option<&crate::proto::Reason>,
    ) {
        self.finished(state);
        if let (Some(d), Some(i)) = (took, OUTCOMES.iter().position(|&s| s == state)) {
            self.durations[i].observe(d);
        }
        if matches!(state, TxnState::Aborted | TxnState::Compensated)
            && let Some(r) = reason
        {
            let kind = serde_json::to_value(r)
                .ok()
                .and_then(|v| v["kind"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "unknown".into());
            *self
                .ended_by_reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(kind)
                .or_default() += 1;
        }
    }

    fn finished(&self, state: TxnState) {
        match state {
            TxnState::Committed => self.committed.fetch_add(1, Ordering::Relaxed),
            TxnState::Aborted => self.aborted.fetch_add(1, Ordering::Relaxed),
            TxnState::Completed => self.completed.fetch_add(1, Ordering::Relaxed),
            TxnState::Compensated => self.compensated.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    /// The counters as JSON.
    pub fn to_json(&self, in_flight: usize) -> serde_json::Value {
        serde_json::json!({
            "accepted": self.accepted.load(Ordering::Relaxed),
            "committed": self.committed.load(Ordering::Relaxed),
            "aborted": self.aborted.load(Ordering::Relaxed),
            "rejected": self.rejected.load(Ordering::Relaxed),
            "duplicates": self.duplicates.load(Ordering::Relaxed),
            "recovered": self.recovered.load(Ordering::Relaxed),
            "completed": self.completed.load(Ordering::Relaxed),
            "compensated": self.compensated.load(Ordering::Relaxed),
            "rejected_replies": self.rejected_replies.load(Ordering::Relaxed),
            "refused_api_requests": self.refused_api_requests.load(Ordering::Relaxed),
            "held_back": self.held_back.load(Ordering::Relaxed),
            "foreign_log_messages": self.foreign_log_messages.load(Ordering::Relaxed),
            "log_refusals": self.log_refusals.load(Ordering::Relaxed),
            "deadlocks": self.deadlocks.load(Ordering::Relaxed),
            "rejected_edges": self.rejected_edges.load(Ordering::Relaxed),
            "command_batches": self.command_batches.load(Ordering::Relaxed),
            "batched_commands": self.batched_commands.load(Ordering::Relaxed),
            "one_phase": self.one_phase.load(Ordering::Relaxed),
            "alerts": self.alerts.load(Ordering::Relaxed),
            "contradicted": self.contradicted.load(Ordering::Relaxed),
            "in_flight": in_flight,
        })
    }
}

/// What every task of the coordinator shares.
pub struct Shared {
    /// Subjects under the configured prefix.
    pub subjects: Subjects,
    /// JetStream, for every write.
    pub js: jetstream::Context,
    /// The streams.
    pub streams: Streams,
    /// Running transactions.
    pub router: Router,
    /// Engine settings.
    pub engine: EngineConfig,
    /// Request limits.
    pub limits: RequestLimits,
    /// Counters.
    pub metrics: Metrics,
    /// The lease: every write waits until it is held.
    pub lease: lease::LeaseHandle,
    /// Accepted records of running transactions, for the recovery checkpoint.
    pub inflight: Arc<checkpoint::InFlight>,
    /// A test hook (`TXCOORD_FAILPOINT`).
    pub failpoint: Option<Failpoint>,
    /// Unique to this run of this coordinator: with [`Shared::drivers`], it goes into the
    /// message id of every log record written, so a record can be told apart from any other
    /// writer's.
    pub run_id: String,
    /// How many transaction drivers this run has started: each takes the next number, which
    /// makes its log writes' message ids its own. Two drivers of one transaction in one run
    /// (one resumed after another was fenced, or one for a redelivered submission after the
    /// first had finished) must never share a message id: JetStream answers a write whose id
    /// it has stored as a duplicate, with the stored record's sequence, before it checks the
    /// expected last sequence, so the second driver would take another record's
    /// acknowledgement for its own (RELIABILITY.md, finding 7).
    pub drivers: std::sync::atomic::AtomicU64,
    /// The submit consumer's ack wait.
    pub submit_ack_wait: Duration,
    /// Transactions whose driver was fenced, with their `accepted` sequence: a task reads
    /// each one's log again and resumes it if it is unfinished ([`reread_and_resume`]).
    pub fenced: mpsc::UnboundedSender<(String, u64)>,
    /// Makes each command's token and checks each reply's ([`replies`]).
    pub reply_key: replies::ReplyKey,
    /// Believe replies that carry no token (participants older than tokens).
    pub accept_untokened_replies: bool,
    /// The API answers only to reply subjects starting with one of these.
    pub api_reply_prefixes: Vec<String>,
    /// Each service's share of the running transactions.
    pub service_limits: Arc<limits::Shares>,
    /// Each client's share of the running transactions.
    pub client_limits: Arc<limits::Shares>,
    /// The deadlock detector's inbox: transactions report their decisions there.
    pub detector: mpsc::UnboundedSender<deadlock::DetectorMsg>,
    /// `http_allow`: where a URL step may point.
    pub url_allow: txcoord_http::UrlAllowList,
    /// `http_url_service`: the service that runs URL steps.
    pub url_service: String,
    /// Command batches for the services that read them ([`batch`]), and what each
    /// service's replies say it takes.
    pub batching: Arc<batch::Batching>,
    /// `one_phase`: a 2PC transaction of one step commits in one phase when its service
    /// takes that.
    pub one_phase: bool,
    /// `announce_preparing`: write the `preparing` record that follows `accepted`.
    pub announce_preparing: bool,
    /// The waits of the front door and `<prefix>.api.execute` for a transaction's outcome
    /// or decision ([`crate::proto::Until`]), answered by this coordinator's own record once
    /// it is durable.
    pub(crate) waits: Arc<crate::client::WaitList>,
}

impl Shared {
    /// The engine's settings for a new transaction: one phase for a 2PC request of one
    /// step whose service said it takes `commit_one_phase` (and `one_phase` is on).
    pub fn engine_for(&self, request: &TransactionRequest) -> EngineConfig {
        let one_phase = self.one_phase
            && request.mode == Mode::TwoPc
            && matches!(request.steps.as_slice(), [only] if self.batching.takes_one_phase(&only.service));
        EngineConfig {
            one_phase,
            ..self.engine
        }
    }

    /// Parses and validates an untrusted submission, as every way in (the submit stream,
    /// the NATS API, the HTTP front door) must: the request rules of
    /// [`parse_request`], then each URL step against `http_allow` (the step keeps the URL's
    /// normal form, and gets `http_url_service` when it names no service).
    ///
    /// `traceparent` is the submission's `traceparent` header (NATS or HTTP): a request
    /// whose body names none takes it when it is a valid W3C trace context. An invalid
    /// header is ignored, as the W3C recommendation asks (a body field must be valid).
    pub fn parse_request(&self, bytes: &[u8], traceparent: Option<&str>) -> Parsed {
        let mut parsed = parse_request(bytes, &self.limits);
        if let Ok(request) = &mut parsed.result {
            if let Err(e) = self.check_urls(request) {
                parsed.result = Err(e);
            } else if request.traceparent.is_none() {
                request.traceparent = traceparent
                    .and_then(crate::proto::traceparent)
                    .map(str::to_owned);
            }
        }
        parsed
    }

    fn check_urls(&self, request: &mut TransactionRequest) -> Result<(), RequestError> {
        for (i, step) in request.steps.iter_mut().enumerate() {
            let Some(url) = &step.url else { continue };
            let normal = self.url_allow.check(url).map_err(|e| {
                let hint = if self.url_allow.is_empty() {
                    " (http_allow is empty: this coordinator runs no URL steps)"
                } else {
                    ""
                };
                RequestError::invalid(format!("steps[{i}].url"), format!("{e}{hint}"))
            })?;
            step.url = Some(normal);
            if step.service.is_empty() {
                step.service = self.url_service.clone();
            }
        }
        Ok(())
    }
}

/// The `traceparent` header of a NATS message, if it has one.
pub(crate) fn nats_traceparent(headers: Option<&async_nats::HeaderMap>) -> Option<&str> {
    headers?
        .get(crate::proto::TRACEPARENT_HEADER)
        .map(|v| v.as_str())
}

/// Test hooks, chosen with `TXCOORD_FAILPOINT`, that put the coordinator where a test needs
/// to kill it or to see what it does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// `after-decision`: a transaction stops right after its decision is durable, before any
    /// participant hears it.
    AfterDecision,
    /// `skip-submission-ack`: submissions are never acked, as if every ack were lost, so the
    /// server redelivers each one after the ack wait.
    SkipSubmissionAck,
    /// `before-accepted`: a pulled submission waits forever before its `accepted` record is
    /// written (the coordinator holds it unacked, as one that dies there does).
    BeforeAccepted,
    /// `recovery-stall-once`: the first read of the log at start stops after its first
    /// record, as one does when JetStream stops delivering partway (its reader times out).
    RecoveryStallOnce,
    /// `resume-read-fails-once`: the first unfinished transaction whose `accepted` record
    /// must be read to resume it finds it unreadable, as it is while JetStream elects the
    /// stream's leader or from a lagging replica.
    ResumeReadFailsOnce,
    /// `accepted-write-stalls`: a new transaction's `accepted` record is written only after
    /// 30 s, with no progress acks meanwhile (as when a cluster in trouble loses them), so
    /// the server redelivers its submission while the first copy is still being handled.
    AcceptedWriteStalls,
}

impl Failpoint {
    /// Parses the environment's value; unknown names are refused with the known ones.
    pub fn parse(value: &str) -> Result<Option<Failpoint>, String> {
        match value {
            "" => Ok(None),
            "after-decision" => Ok(Some(Failpoint::AfterDecision)),
            "skip-submission-ack" => Ok(Some(Failpoint::SkipSubmissionAck)),
            "before-accepted" => Ok(Some(Failpoint::BeforeAccepted)),
            "recovery-stall-once" => Ok(Some(Failpoint::RecoveryStallOnce)),
            "resume-read-fails-once" => Ok(Some(Failpoint::ResumeReadFailsOnce)),
            "accepted-write-stalls" => Ok(Some(Failpoint::AcceptedWriteStalls)),
            other => Err(format!(
                "TXCOORD_FAILPOINT {other:?} is not one of after-decision, skip-submission-ack, before-accepted, recovery-stall-once, resume-read-fails-once, accepted-write-stalls"
            )),
        }
    }
}

/// Room kept for the `accepted` record's envelope around the request (every step's state,
/// the echoed metadata, headers).
const LOG_RECORD_ROOM: usize = 64 * 1024;

/// The request limits, with `max_request_bytes` capped so that the `accepted` record that
/// carries a request fits the server's `max_payload`. Otherwise a request could be taken
/// and then refused by the log; it would be rejected then, but with a vaguer reason.
fn capped_limits(cfg: &Config, server_max_payload: usize) -> RequestLimits {
    let mut limits = cfg.limits();
    let cap = server_max_payload
        .saturating_sub(LOG_RECORD_ROOM)
        .max(server_max_payload / 2);
    if limits.max_bytes > cap {
        tracing::warn!(
            max_request_bytes = limits.max_bytes,
            server_max_payload,
            effective = cap,
            "max_request_bytes is more than the NATS server can log; requests are limited to the server's max_payload less room for the log record"
        );
        limits.max_bytes = cap;
    }
    limits
}

/// Listens on `addr`, the value of the configuration key `key`.
async fn listen(
    key: &'static str,
    addr: &str,
) -> Result<tokio::net::TcpListener, CoordinatorError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| CoordinatorError::Listen {
            key,
            addr: addr.to_string(),
            source,
        })
}

/// A credential from the configuration ([`txcoord_http::secret_value`]); `None` when empty.
fn secret(raw: &str) -> Result<Option<String>, String> {
    let value = txcoord_http::secret_value(raw)?.trim().to_string();
    Ok((!value.is_empty()).then_some(value))
}

/// Runs the coordinator until `shutdown` completes.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), CoordinatorError> {
    let failpoint = Failpoint::parse(&std::env::var("TXCOORD_FAILPOINT").unwrap_or_default())
        .map_err(CoordinatorError::Failpoint)?;
    let client = crate::nats::connect_config(&cfg, "txcoord", true).await?;
    let js = crate::nats::jetstream(
        client.clone(),
        Duration::from_millis(cfg.publish_timeout_ms),
    );
    let subjects = cfg.subjects();
    let streams = ensure_streams(&js, &subjects, &crate::nats::stream_settings(&cfg)).await?;
    let mut shutdown = std::pin::pin!(shutdown);
    // The front door listens from now on, answering 503 until this coordinator is active.
    let (front_door, ready) = tokio::sync::watch::channel(None);
    if !cfg.console_listen.is_empty() {
        let listener = listen("console_listen", &cfg.console_listen).await?;
        let admin_token = secret(&cfg.console_admin_token)
            .map_err(|e| CoordinatorError::Config(format!("console_admin_token: {e}")))?;
        let console = console::Console {
            events: streams.events.clone(),
            subjects: subjects.clone(),
            ready: ready.clone(),
            admin_token,
            samples: Arc::default(),
        };
        tracing::info!(addr = %cfg.console_listen, actions = console.admin_token.is_some(), "web console");
        tokio::spawn(console::sample(ready.clone(), console.samples.clone()));
        tokio::spawn(async move {
            if let Err(e) = console::serve(listener, console).await {
                tracing::error!(error = %e, "the web console stopped");
            }
        });
    }
    if !cfg.http_listen.is_empty() {
        let listener = listen("http_listen", &cfg.http_listen).await?;
        tracing::info!(addr = %cfg.http_listen, "HTTP front door at /v1/transactions");
        tokio::spawn(async move {
            if let Err(e) = http::serve(listener, ready).await {
                tracing::error!(error = %e, "the HTTP front door stopped");
            }
        });
    }
    let lease = match lease::acquire(
        &js,
        &cfg.subject_prefix,
        Duration::from_millis(cfg.lease_ttl_ms),
        cfg.stream_replicas,
        &mut shutdown,
    )
    .await
    {
        Ok(l) => l,
        Err(lease::LeaseError::Shutdown) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    tracing::info!(holder = %lease.holder, "lease held");
    let (fenced, mut fenced_rx) = mpsc::unbounded_channel::<(String, u64)>();
    let (detector, detector_rx) = mpsc::unbounded_channel();
    // Subscribed before recovery, so the waits of resumed transactions are heard.
    let waits = client.subscribe(cfg.subjects().waits()).await?;
    let shared = Arc::new(Shared {
        detector,
        fenced,
        lease: lease.handle(),
        inflight: Arc::default(),
        subjects,
        js,
        streams,
        router: Router::new(),
        engine: cfg.engine(),
        limits: capped_limits(&cfg, client.server_info().max_payload),
        metrics: Metrics::default(),
        failpoint,
        run_id: uuid::Uuid::now_v7().simple().to_string(),
        drivers: std::sync::atomic::AtomicU64::new(0),
        submit_ack_wait: Duration::from_millis(cfg.submit_ack_wait_ms),
        reply_key: replies::ReplyKey::random(),
        accept_untokened_replies: cfg.accept_untokened_replies,
        api_reply_prefixes: cfg.api_reply_prefixes.clone(),
        service_limits: limits::Shares::new(cfg.max_in_flight_per_service),
        url_allow: txcoord_http::UrlAllowList::new(&cfg.http_allow)
            .map_err(|(i, e)| CoordinatorError::HttpAllow(i, e))?,
        url_service: cfg.http_url_service.clone(),
        batching: Arc::new(batch::Batching::new(batch::BatchSettings {
            max: cfg.batch_max,
            linger: Duration::from_micros(cfg.batch_linger_us),
            max_bytes: client
                .server_info()
                .max_payload
                .saturating_sub(LOG_RECORD_ROOM)
                .max(64 * 1024),
        })),
        one_phase: cfg.one_phase,
        announce_preparing: cfg.announce_preparing,
        waits: Arc::default(),
        client_limits: limits::Shares::new(cfg.max_in_flight_per_client),
    });

    let state = checkpoint::open(&shared.js, &cfg.subject_prefix, cfg.stream_replicas).await;
    let from = match &state {
        Some(store) => checkpoint::read(store).await,
        None => None,
    };
    let resumer = shared.clone();
    tokio::spawn(async move {
        while let Some((txn_id, accepted_seq)) = fenced_rx.recv().await {
            // Only once a new driver tracks it (or its log is finished) may the old tracking
            // go: the recovery checkpoint never passes the transaction meanwhile.
            let resumer = resumer.clone();
            tokio::spawn(async move {
                if resume_until_done(&resumer, &txn_id).await {
                    resumer.inflight.finished(accepted_seq);
                }
            });
        }
    });
    if cfg.deadlock_detection {
        tokio::spawn(deadlock::run(
            shared.clone(),
            waits,
            detector_rx,
            Duration::from_millis(cfg.deadlock_edge_ttl_ms),
        ));
    } else {
        tracing::warn!(
            "deadlock detection is off: cycles of lock waits last until the prepare timeout"
        );
        drop((waits, detector_rx));
    }
    // Before recovery resends anything: every reply to this run's commands is read.
    let replies = ReplyReader::open(&shared).await?;
    let (recovered, scanned) = recover(&shared, from).await?;
    tracing::info!(recovered, scanned, from = ?from, "recovery done");
    if let Some(store) = state {
        tokio::spawn(checkpoint::run(
            store,
            shared.streams.events.clone(),
            shared.inflight.clone(),
            shared.lease.clone(),
            Duration::from_millis(cfg.checkpoint_interval_ms),
            from.unwrap_or(0),
        ));
    }
    let submissions = submit_consumer(&shared).await?;
    let api = api::start(client.clone(), shared.clone()).await?;
    let _ = front_door.send(Some(http::Active {
        shared: shared.clone(),
    }));
    if !cfg.metrics_listen.is_empty() {
        let listener = listen("metrics_listen", &cfg.metrics_listen).await?;
        tracing::info!(addr = %cfg.metrics_listen, "Prometheus metrics at /metrics");
        tokio::spawn(prometheus::serve(listener, shared.clone()));
    }
    let permits = Arc::new(Semaphore::new(cfg.max_in_flight));
    tracing::info!(url = %cfg.nats_url, prefix = %cfg.subject_prefix, "coordinator ready");
    println!("txcoord ready");

    let lost = tokio::select! {
        biased;
        _ = shutdown => { tracing::info!("shutting down"); false }
        _ = shared.lease.lost() => true,
        _ = run_replies(shared.clone(), replies) => { tracing::error!("reply loop ended"); false }
        _ = run_submissions(shared.clone(), submissions, permits) => { tracing::error!("submit loop ended"); false }
    };
    // From here on the front door answers 503, as a standby's does: a client's load
    // balancer moves on to the coordinator that holds the lease.
    let _ = front_door.send(None);
    drop(api);
    if lost {
        return Err(CoordinatorError::LeaseLost);
    }
    ReplyReader::remove(&shared).await;
    lease.release().await;
    // Every write is either acknowledged or will be redone from the log: nothing to flush.
    let _ = client.flush().await;
    Ok(())
}

async fn pull_consumer(
    stream: &jetstream::stream::Stream,
    name: &str,
    config: consumer::pull::Config,
) -> Result<consumer::Consumer<consumer::pull::Config>, CoordinatorError> {
    txcoord_nats::durable_consumer(
        stream,
        consumer::pull::Config {
            durable_name: Some(name.to_string()),
            ..config
        },
    )
    .await
    .map_err(|message| CoordinatorError::Consumer {
        consumer: name.to_string(),
        message,
    })
}

/// This run's reader of the reply stream, through a consumer of its own.
///
/// Replies are read without acknowledgements. A reply only ever moves a transaction the
/// coordinator holds in memory; if the coordinator dies before acting on one, recovery
/// resends the command and the participant answers again from its durable record. An ack
/// per reply would cost the server a message and a delete and protect nothing.
///
/// The consumer is this run's alone (`txcoord-reply-reader-<run id>`), starting at the
/// replies that arrive after it is made. Shared by every run, as it once was, a reply was
/// delivered to whichever process pulled first, and a coordinator whose lease had run out
/// without its noticing yet (cut off, then back) took replies to its successor's commands
/// and dropped them; the successor waited for its next resend. It is made before recovery
/// sends anything, removed when the coordinator stops cleanly, and deleted by the server
/// [`REPLY_CONSUMER_IDLE`] after the last pull otherwise; a reader that finds it gone
/// makes it again from the reply after the last one it read.
struct ReplyReader {
    consumer: consumer::Consumer<consumer::pull::Config>,
    /// The stream sequence after the last reply read: where a remade consumer starts.
    next_seq: Option<u64>,
}

impl ReplyReader {
    fn name(shared: &Shared) -> String {
        format!("{REPLY_CONSUMER}-{}", shared.run_id)
    }

    fn config(next_seq: Option<u64>) -> consumer::pull::Config {
        consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            deliver_policy: match next_seq {
                Some(start_sequence) => consumer::DeliverPolicy::ByStartSequence { start_sequence },
                None => consumer::DeliverPolicy::New,
            },
            inactive_threshold: REPLY_CONSUMER_IDLE,
            ..Default::default()
        }
    }

    async fn open(shared: &Shared) -> Result<ReplyReader, CoordinatorError> {
        let consumer = Self::make(shared, None).await?;
        // A consumer shared by the runs of an older txcoord: this coordinator holds the
        // lease, so no reader of it is left that should be. Best effort, and in the
        // background: a cluster electing a leader must not hold up the start.
        let replies = shared.streams.replies.clone();
        tokio::spawn(async move {
            if replies.delete_consumer(REPLY_CONSUMER).await.is_ok() {
                tracing::info!(
                    consumer = REPLY_CONSUMER,
                    "removed the reply consumer an older txcoord shared between runs"
                );
            }
        });
        Ok(ReplyReader {
            consumer,
            next_seq: None,
        })
    }

    async fn make(
        shared: &Shared,
        next_seq: Option<u64>,
    ) -> Result<consumer::Consumer<consumer::pull::Config>, CoordinatorError> {
        pull_consumer(
            &shared.streams.replies,
            &Self::name(shared),
            Self::config(next_seq),
        )
        .await
    }

    /// Reads replies for ever, handing each to `f`. After the consumer is deleted (or no
    /// server answers for it), it is fetched again, or made again where reading stopped.
    async fn each<F, Fut>(mut self, shared: &Shared, mut f: F)
    where
        F: FnMut(jetstream::Message) -> Fut,
        Fut: Future<Output = ()>,
    {
        let name = Self::name(shared);
        loop {
            match self
                .consumer
                .stream()
                .max_messages_per_batch(500)
                .messages()
                .await
            {
                Ok(mut messages) => {
                    while let Some(next) = messages.next().await {
                        match next {
                            Ok(msg) => {
                                if let Ok(info) = msg.info() {
                                    self.next_seq = Some(info.stream_sequence + 1);
                                }
                                f(msg).await
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    consumer::pull::MessagesErrorKind::ConsumerDeleted
                                        | consumer::pull::MessagesErrorKind::NoResponders
                                ) =>
                            {
                                tracing::warn!(consumer = %name, error = %e, "the reply consumer is not answering; fetching or making it again");
                                break;
                            }
                            Err(e) => {
                                tracing::debug!(consumer = %name, error = %e, "consumer stream error");
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(consumer = %name, error = %e, "cannot read the reply consumer, retrying");
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            match Self::make(shared, self.next_seq).await {
                Ok(consumer) => self.consumer = consumer,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot make the reply consumer again, retrying")
                }
            }
        }
    }

    /// Deletes this run's consumer (a clean stop); the server would after
    /// [`REPLY_CONSUMER_IDLE`] anyway.
    async fn remove(shared: &Shared) {
        let _ = shared
            .streams
            .replies
            .delete_consumer(&Self::name(shared))
            .await;
    }
}

async fn submit_consumer(
    shared: &Shared,
) -> Result<consumer::Consumer<consumer::pull::Config>, CoordinatorError> {
    pull_consumer(
        &shared.streams.submit,
        SUBMIT_CONSUMER,
        consumer::pull::Config {
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: shared.submit_ack_wait,
            max_ack_pending: 20_000,
            ..Default::default()
        },
    )
    .await
}

async fn run_replies(shared: Arc<Shared>, reader: ReplyReader) {
    reader.each(&shared.clone(), |msg| {
        let shared = shared.clone();
        async move {
            let takes = batch::Takes::from_headers(msg.headers.as_ref());
            if shared.subjects.reply_batch_service(&msg.subject).is_some() {
                match serde_json::from_slice::<crate::proto::ReplyBatch>(&msg.payload) {
                    Ok(batch) if batch.replies.len() <= crate::proto::MAX_BATCH => {
                        for reply in batch.replies {
                            take_reply(&shared, &msg, reply, takes).await;
                        }
                    }
                    Ok(batch) => tracing::warn!(subject = %msg.subject, replies = batch.replies.len(),
                        "reply batch over the limit of {} ignored", crate::proto::MAX_BATCH),
                    Err(e) => tracing::warn!(subject = %msg.subject, error = %e, "malformed reply batch ignored"),
                }
                return;
            }
            match serde_json::from_slice::<ParticipantReply>(&msg.payload) {
                Ok(reply) => take_reply(&shared, &msg, reply, takes).await,
                Err(e) => tracing::warn!(subject = %msg.subject, error = %e, "malformed participant reply ignored"),
            }
        }
    })
    .await
}

/// One reply, alone or from a batch: believed only if [`replies::check`] passes, then
/// handed to its transaction. A believed reply also says whether its service reads
/// command batches.
async fn take_reply(
    shared: &Arc<Shared>,
    msg: &jetstream::Message,
    mut reply: ParticipantReply,
    takes: batch::Takes,
) {
    if let Err(why) = replies::check(
        &shared.reply_key,
        &shared.subjects,
        &msg.subject,
        &reply,
        shared.accept_untokened_replies,
    ) {
        let n = shared
            .metrics
            .rejected_replies
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        // NATS does not say which connection published a message; the
        // subject does, as far as the server's permissions restrict it.
        let sent_by = shared.subjects.reply_sender(&msg.subject);
        let msg_id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        tracing::warn!(subject = %msg.subject, %sent_by, %msg_id, stream_seq = seq,
            txn_id = %reply.txn_id, claimed_service = %reply.service, step = reply.step,
            kind = reply.kind.as_str(), attempt = reply.attempt, reason = %why, total = n,
            "participant reply rejected");
        return;
    }
    shared.batching.heard(&reply.service, takes);
    reply.reason = reply
        .reason
        .map(|r| replies::bound(r, replies::MAX_REASON_BYTES));
    match shared.router.get(&reply.txn_id) {
        Some(tx) => {
            let _ = tx.send(TxnMsg::Reply(reply)).await;
        }
        // Checked in its own task: the read must not hold up the replies behind it.
        None if reply.kind == crate::proto::CommandKind::CommitOnePhase => {
            let shared = shared.clone();
            tokio::spawn(async move { late_one_phase_answer(&shared, &reply).await });
        }
        None => tracing::debug!(txn_id = %reply.txn_id, service = %reply.service,
            "reply for a transaction that is not running (finished or unknown); ignored"),
    }
}

/// Whether a one-phase participant's answer contradicts the outcome an operator recorded by
/// hand (`mark-done --outcome`): `done` after `aborted`, or a refusal after `committed`. A
/// read-only answer agrees with either (the participant changed nothing).
fn contradicts(event: &TransactionEvent, answer: crate::proto::ReplyOutcome) -> bool {
    use crate::proto::{ConfirmedOutcome, ReplyOutcome};
    let confirmed = event.resolved.as_ref().and_then(|r| r.outcome);
    matches!(
        (confirmed, answer),
        (Some(ConfirmedOutcome::Aborted), ReplyOutcome::Done)
            | (Some(ConfirmedOutcome::Committed), ReplyOutcome::Abort)
    )
}

/// A one-phase answer for a transaction that is no longer running: if an operator ended it
/// by hand with the other outcome, the service and the log now disagree, which only a
/// person can reconcile: an error in the log and a `contradicted` alert. Any other late
/// answer (a duplicate, a redelivery) is ignored.
async fn late_one_phase_answer(shared: &Shared, reply: &ParticipantReply) {
    let subject = shared.subjects.events(&reply.txn_id);
    let last = match shared
        .streams
        .events
        .direct_get_last_for_subject(subject.clone())
        .await
    {
        Ok(msg) => serde_json::from_slice::<TransactionEvent>(&msg.payload).ok(),
        Err(e) => {
            tracing::debug!(txn_id = %reply.txn_id, error = %e, "late one-phase answer: no record readable; ignored");
            None
        }
    };
    let Some(event) = last.filter(|e| e.state.is_outcome() && contradicts(e, reply.outcome)) else {
        tracing::debug!(txn_id = %reply.txn_id, service = %reply.service,
            "one-phase answer for a transaction that is not running; ignored");
        return;
    };
    let message = format!(
        "{} answered {} after an operator recorded the transaction {} by hand: the service and the log disagree",
        reply.service,
        reply.outcome.as_str(),
        event.state.as_str()
    );
    tracing::error!(txn_id = %reply.txn_id, service = %reply.service, answer = reply.outcome.as_str(),
        recorded = event.state.as_str(), "HEURISTIC HAZARD: {message}");
    shared.metrics.contradicted.fetch_add(1, Ordering::Relaxed);
    txn::publish_alert(
        shared,
        crate::proto::AlertKind::Contradicted,
        &event,
        message,
    )
    .await;
}

/// Pulls submissions only with permits in hand: at the in-flight limit nothing is pulled,
/// so submissions wait in the stream (backpressure) instead of sitting unacked in this
/// process, where the short ack wait would hand them to the server again.
async fn run_submissions(
    shared: Arc<Shared>,
    consumer: consumer::Consumer<consumer::pull::Config>,
    permits: Arc<Semaphore>,
) {
    const MOST_PER_PULL: usize = 256;
    loop {
        let Ok(first) = permits.clone().acquire_owned().await else {
            return;
        };
        let mut held = vec![first];
        while held.len() < MOST_PER_PULL {
            match permits.clone().try_acquire_owned() {
                Ok(p) => held.push(p),
                Err(_) => break,
            }
        }
        let batch = consumer
            .batch()
            .max_messages(held.len())
            .expires(Duration::from_secs(1))
            .messages()
            .await;
        let mut messages = match batch {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(consumer = SUBMIT_CONSUMER, error = %e, "cannot read consumer, retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        while let Some(next) = messages.next().await {
            match next {
                Ok(msg) => {
                    let Some(permit) = held.pop() else { break };
                    submission(shared.clone(), msg, permit).await;
                }
                Err(e) => {
                    tracing::debug!(consumer = SUBMIT_CONSUMER, error = %e, "consumer stream error");
                }
            }
        }
    }
}

/// Handles one submission: reject it, or start its transaction.
async fn submission(
    shared: Arc<Shared>,
    msg: jetstream::Message,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    // Without the lease, leave the submission unacked: the next coordinator gets it.
    if shared.lease.ready().await.is_err() {
        return;
    }
    if shared.failpoint == Some(Failpoint::BeforeAccepted) {
        eprintln!("FAILPOINT before-accepted");
        std::future::pending::<()>().await;
    }
    let seq = msg.info().map(|i| i.stream_sequence).ok();
    let parsed = shared.parse_request(&msg.payload, nats_traceparent(msg.headers.as_ref()));
    let request = match parsed.result {
        Ok(r) => r,
        Err(e) => {
            let id = parsed.txn_id.as_deref().unwrap_or("-");
            let notices = txn::Notices::of(&shared, id, msg.headers.as_ref());
            reject(&shared, parsed.txn_id, seq, e, notices).await;
            if let Err(e) = msg.ack().await {
                tracing::debug!(error = %e, "ack of a rejected submission failed");
            }
            return;
        }
    };
    let txn_id = request
        .txn_id
        .clone()
        .unwrap_or_else(|| derived_txn_id(&shared.subjects, seq));
    // A service or a client at its share: the submission waits in the stream and comes back
    // shortly, while the others' transactions go on.
    // (Plain `<prefix>.submit` names no client and has no client share.)
    let client = shared.subjects.submitter(&msg.subject).map(str::to_string);
    let shares = shared
        .client_limits
        .try_take(client)
        .map_err(|c| format!("client {c}"))
        .and_then(|c| {
            shared
                .service_limits
                .try_take(request.steps.iter().map(|s| s.service.clone()))
                .map(|s| [c, s])
                .map_err(|s| format!("service {s}"))
        });
    let slots = match shares {
        Ok(slots) => slots,
        Err(full) => {
            shared.metrics.held_back();
            tracing::debug!(%txn_id, share = %full, "at its in-flight share; submission waits");
            let _ = msg
                .ack_with(jetstream::AckKind::Nak(Some(Duration::from_millis(500))))
                .await;
            return;
        }
    };
    let (tx, rx) = mpsc::channel(64);
    if !shared.router.insert(&txn_id, tx.clone()) {
        // Not acked: this may be the running transaction's own submission, redelivered
        // because its progress acks were lost, and acking it here would ack that one too
        // before its `accepted` record is durable (a coordinator dying then would lose the
        // transaction). It comes back after the ack wait; once the transaction is over, its
        // log answers it (a retry changes nothing).
        tracing::info!(%txn_id, "submission of a running transaction: it comes back once that one is done");
        shared.metrics.duplicate();
        let _ = msg
            .ack_with(jetstream::AckKind::Nak(Some(shared.submit_ack_wait)))
            .await;
        return;
    }
    let span = tracing::info_span!("txn", %txn_id);
    let mut out = Vec::new();
    let engine_cfg = shared.engine_for(&request);
    if engine_cfg.one_phase {
        shared.metrics.one_phase.fetch_add(1, Ordering::Relaxed);
    }
    let engine = Machine::start(
        txn_id.clone(),
        &request,
        seq,
        shared.subjects.reply(&txn_id),
        engine_cfg,
        now_ms(),
        &mut out,
    );
    tokio::spawn(
        txn::drive(
            shared.clone(),
            engine,
            out,
            Begin::New {
                submission: Some(Box::new(msg)),
            },
            tx,
            rx,
            Some((permit, slots)),
        )
        .instrument(span),
    );
}

/// A txn_id for a request that has none: derived from its stream sequence, so a redelivery
/// of the same submission gets the same id (and is recognised as a duplicate).
fn derived_txn_id(subjects: &Subjects, seq: Option<u64>) -> String {
    match seq {
        Some(seq) => uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("{}:{seq}", subjects.submit_stream()).as_bytes(),
        )
        .to_string(),
        None => uuid::Uuid::now_v7().to_string(),
    }
}

/// Records a bad submission: a `rejected` event if it has a usable txn_id that is not taken,
/// otherwise an error on `<prefix>.errors` naming its stream sequence. The `rejected` record,
/// once durable, goes to the inboxes the submission named (`notices`).
pub(crate) async fn reject(
    shared: &Shared,
    txn_id: Option<String>,
    seq: Option<u64>,
    err: RequestError,
    mut notices: txn::Notices,
) {
    tracing::warn!(txn_id = txn_id.as_deref().unwrap_or("-"), submit_seq = seq, error = %err, "submission rejected");
    shared.metrics.rejected.fetch_add(1, Ordering::Relaxed);
    let now = now_ms();
    if let Some(id) = &txn_id {
        let event = TransactionEvent {
            reason: Some(Reason::InvalidRequest {
                message: err.to_string(),
                path: err.path(),
            }),
            submit_seq: seq,
            ..TransactionEvent::new(id.clone(), TxnState::Rejected, Mode::TwoPc, now)
        };
        let subject = shared.subjects.log(id);
        let msg_id = format!("{id}.rejected.{}", seq.unwrap_or(0));
        match publish_durable(
            &shared.js,
            &subject,
            &msg_id,
            to_bytes(&event),
            Expect {
                last_subject_sequence: Some(0),
            },
            None,
        )
        .await
        {
            Ok(_) => {
                // Durable: it answers whoever waits here for this transaction.
                shared.waits.deliver(&event);
                notices.send(&shared.js, &event).await;
                return;
            }
            Err(e) => {
                tracing::info!(txn_id = %id, error = %e, "txn_id already used; reporting on the errors subject")
            }
        }
    }
    let report = SubmitError {
        submit_seq: seq,
        txn_id,
        kind: err.kind().into(),
        message: err.to_string(),
        path: err.path(),
        timestamp_ms: now,
    };
    report_error(shared, report).await;
}

/// Publishes a submission error on `<prefix>.errors` (its id: the submission's sequence).
pub(crate) async fn report_error(shared: &Shared, report: SubmitError) {
    let msg_id = format!("error.{}", report.submit_seq.unwrap_or(0));
    if let Err(e) = publish_durable(
        &shared.js,
        &shared.subjects.errors(),
        &msg_id,
        to_bytes(&report),
        Expect::default(),
        None,
    )
    .await
    {
        tracing::error!(error = %e, "cannot publish a submission error");
    }
}

/// Rebuilds and resumes every unfinished transaction from the events stream.
/// Resumes every unfinished transaction; returns how many, and how many records it read.
/// With a checkpoint it reads every record from there (all of every unfinished
/// transaction's records are); without one, the last record of every transaction ever.
///
/// The read is done in full or not at all: one that stalls or fails (JetStream electing the
/// stream's leader, a connection lost) is started again, up to ten times, before anything
/// is resumed. A recovery that went on with half the log would leave every transaction in
/// the other half unresumed, and the checkpoint could then move past them.
async fn recover(
    shared: &Arc<Shared>,
    from: Option<u64>,
) -> Result<(usize, u64), CoordinatorError> {
    let mut delay = Duration::from_millis(200);
    let mut attempt = 0;
    let (tails, scanned) = loop {
        attempt += 1;
        let stall = shared.failpoint == Some(Failpoint::RecoveryStallOnce) && attempt == 1;
        match read_log_tails(shared, from, stall).await {
            Ok(found) => break found,
            Err(ReadFailed::Retry(e)) if attempt < 10 => {
                tracing::warn!(error = %e, attempt, "recovery read failed; reading the log again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(ReadFailed::Retry(e) | ReadFailed::Fatal(e)) => return Err(e),
        }
    };
    let mut count = 0;
    for (ev, record_seq, last_seq) in tails {
        if ev.state.is_terminal() {
            continue;
        }
        let txn_id = ev.txn_id.clone();
        match resume(shared, ev, record_seq, last_seq).await {
            Resumed::Running => count += 1,
            Resumed::Finished => {}
            // Tried again in the background until it runs; until then the checkpoint stays
            // where it was, so a restart meanwhile still sees it.
            Resumed::Failed => {
                let pin = from.unwrap_or(1);
                shared.inflight.track(pin);
                let shared = shared.clone();
                tokio::spawn(async move {
                    if resume_until_done(&shared, &txn_id).await {
                        shared.inflight.finished(pin);
                    }
                });
            }
        }
    }
    shared
        .metrics
        .recovered
        .store(count as u64, Ordering::Relaxed);
    Ok((count, scanned))
}

/// Why a read of the log for recovery did not finish.
enum ReadFailed {
    /// It may finish if tried again (a stall, a consumer that could not be made).
    Retry(CoordinatorError),
    /// It cannot (the lease is gone).
    Fatal(CoordinatorError),
}

/// One full read of the log for recovery: the last record of every transaction it
/// reaches (with its sequence and the last sequence of its log), and how many messages it
/// read. Ends only at the message JetStream says is the last one pending. `stall`: the
/// `recovery-stall-once` failpoint stops it after the first record.
async fn read_log_tails(
    shared: &Arc<Shared>,
    from: Option<u64>,
    stall: bool,
) -> Result<(Vec<(TransactionEvent, u64, u64)>, u64), ReadFailed> {
    let consumer_error = |e: &dyn std::fmt::Display| {
        ReadFailed::Retry(CoordinatorError::Consumer {
            consumer: "recovery".into(),
            message: e.to_string(),
        })
    };
    let deliver_policy = match from {
        Some(seq) => consumer::DeliverPolicy::ByStartSequence {
            start_sequence: seq,
        },
        None => consumer::DeliverPolicy::LastPerSubject,
    };
    let mut consumer = shared
        .streams
        .events
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: shared.subjects.events_all(),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| consumer_error(&e))?;
    let pending = consumer
        .info()
        .await
        .map_err(|e| consumer_error(&e))?
        .num_pending;
    if pending == 0 {
        return Ok((Vec::new(), 0));
    }
    let mut messages = consumer.messages().await.map_err(|e| consumer_error(&e))?;
    // The latest record of each transaction seen, with its sequence.
    let mut last: std::collections::HashMap<String, (TransactionEvent, u64)> = Default::default();
    // The last sequence seen on each log whose last message seen is not one of its records
    // (anyone allowed to publish on the log's subject may have stored anything there).
    let mut foreign: std::collections::HashMap<String, u64> = Default::default();
    let mut scanned = 0u64;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next()).await;
        let msg = match next {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %e, "recovery read error");
                continue;
            }
            Ok(None) => {
                return Err(consumer_error(&format!(
                    "the log's reader ended after {scanned} of at least {pending} records"
                )));
            }
            Err(_) => {
                return Err(consumer_error(&format!(
                    "no record for 10 s after {scanned} of at least {pending}"
                )));
            }
        };
        scanned += 1;
        let (seq, done) = msg
            .info()
            .map(|i| (i.stream_sequence, i.pending == 0))
            .unwrap_or((0, false));
        let Some(txn_id) = shared.subjects.events_txn(&msg.subject) else {
            continue;
        };
        match serde_json::from_slice::<TransactionEvent>(&msg.payload) {
            Ok(ev) if ev.txn_id == txn_id => {
                foreign.remove(txn_id);
                last.insert(ev.txn_id.clone(), (ev, seq));
            }
            _ => {
                tracing::warn!(subject = %msg.subject, seq, "a foreign message in a log skipped");
                shared.metrics.foreign_log_message();
                foreign.insert(txn_id.to_string(), seq);
            }
        }
        if done {
            break;
        }
        if stall {
            tracing::warn!(
                scanned,
                "failpoint recovery-stall-once: the read stops here"
            );
            return Err(consumer_error(&format!(
                "stalled (failpoint) after {scanned} of at least {pending}"
            )));
        }
    }
    // A log that ends in a foreign message is read again from its start: its last record
    // may be before the messages scanned (a recovery of the last message per log).
    let mut tails: Vec<(TransactionEvent, u64, u64)> = Vec::new();
    for (txn_id, foreign_seq) in foreign {
        match txn::log_tail(shared, &txn_id).await {
            Some(LogTail {
                last_seq,
                record: Some(r),
            }) => {
                last.remove(&txn_id);
                tails.push((r.event, r.seq, last_seq.max(foreign_seq)));
            }
            Some(_) => {}
            None => {
                return Err(ReadFailed::Fatal(CoordinatorError::Consumer {
                    consumer: "recovery".into(),
                    message: "the lease was lost during recovery".into(),
                }));
            }
        }
    }
    tails.extend(last.into_values().map(|(ev, seq)| (ev, seq, seq)));
    Ok((tails, scanned))
}

/// Resumes `txn_id` from its log ([`reread_and_resume`]) until that succeeds, pausing
/// longer each time (0.2 s, doubling up to 30 s), for as long as this coordinator holds the
/// lease. A transaction that could not be resumed once (its log unreadable during a leader
/// election, its `accepted` record not yet on the replica that answered) must not wait for
/// the next restart: its participants hold their prepared branches until it ends. One that
/// can never be rebuilt (a record this build cannot read) is logged on every try, and
/// stops being tried once an operator ends it (`txcoord resolve`). False if the lease went.
async fn resume_until_done(shared: &Arc<Shared>, txn_id: &str) -> bool {
    let mut delay = Duration::from_millis(200);
    loop {
        if reread_and_resume(shared, txn_id).await {
            return true;
        }
        if !shared.lease.is_held() {
            return false;
        }
        tracing::warn!(
            %txn_id,
            retry_in_ms = delay.as_millis() as u64,
            "an unfinished transaction could not be resumed; trying again"
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// Reads one transaction's log again (after a driver of it was fenced, or a first attempt
/// to resume it failed), and resumes it if its last record is not terminal and this
/// coordinator still holds the lease. Called once any earlier driver has left the router.
/// True when the earlier checkpoint tracking may go: the log is finished, or a new driver
/// tracks the transaction.
pub(crate) async fn reread_and_resume(shared: &Arc<Shared>, txn_id: &str) -> bool {
    if !shared.lease.is_held() {
        return false;
    }
    let Some(tail) = txn::log_tail(shared, txn_id).await else {
        return false;
    };
    match tail.record {
        Some(r) if r.event.state.is_terminal() => {
            tracing::info!(%txn_id, state = ?r.event.state, "the log of a fenced transaction is finished; nothing to do");
            true
        }
        Some(r) => {
            tracing::info!(%txn_id, state = ?r.event.state, "resuming a transaction from its log again");
            !matches!(
                resume(shared, r.event, r.seq, tail.last_seq).await,
                Resumed::Failed
            )
        }
        None => {
            tracing::error!(%txn_id, "an unfinished transaction's log has no readable record");
            false
        }
    }
}

/// What became of a transaction found unfinished in the log.
enum Resumed {
    /// Its task runs.
    Running,
    /// It needs nothing more (or already runs).
    Finished,
    /// It could not be rebuilt now; [`resume_until_done`] tries again.
    Failed,
}

/// Resumes the transaction whose log's last record is `last`, at `record_seq`; the log's
/// subject ends at `last_seq` (a foreign message's, or `record_seq`).
async fn resume(
    shared: &Arc<Shared>,
    last: TransactionEvent,
    record_seq: u64,
    last_seq: u64,
) -> Resumed {
    let txn_id = last.txn_id.clone();
    let (accepted, accepted_seq) = if last.state == TxnState::Accepted {
        (last.clone(), record_seq)
    } else {
        static FAILED_ONCE: std::sync::atomic::AtomicBool =
            std::sync::atomic::AtomicBool::new(false);
        let read = if shared.failpoint == Some(Failpoint::ResumeReadFailsOnce)
            && !FAILED_ONCE.swap(true, Ordering::SeqCst)
        {
            tracing::warn!(%txn_id, "failpoint resume-read-fails-once: the accepted record is not read");
            Err("unreadable (failpoint)".to_string())
        } else {
            txn::first_record(shared, &txn_id).await
        };
        match read {
            Ok(Some(first)) => first,
            other => {
                tracing::error!(%txn_id, "cannot read the accepted record: {other:?}");
                return Resumed::Failed;
            }
        }
    };
    let mut out = Vec::new();
    let engine = match Machine::recover(
        &accepted,
        &last,
        shared.subjects.reply(&txn_id),
        shared.engine,
        now_ms(),
        &mut out,
    ) {
        Ok(e) => e,
        Err(RecoverError::Finished(_)) => return Resumed::Finished,
        Err(e) => {
            tracing::error!(%txn_id, error = %e, "cannot resume transaction");
            return Resumed::Failed;
        }
    };
    let (tx, rx) = mpsc::channel(64);
    if !shared.router.insert(&txn_id, tx.clone()) {
        return Resumed::Finished;
    }
    shared.inflight.track(accepted_seq);
    tracing::info!(%txn_id, state = ?last.state, "resuming transaction");
    let span = tracing::info_span!("txn", %txn_id);
    tokio::spawn(
        txn::drive(
            shared.clone(),
            engine,
            out,
            Begin::Recovered {
                accepted_seq,
                record_seq,
                last_seq,
            },
            tx,
            rx,
            None,
        )
        .instrument(span),
    );
    Resumed::Running
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ConfirmedOutcome, ReplyOutcome, Resolution, ResolveAction};

    fn ended(state: TxnState, outcome: Option<ConfirmedOutcome>) -> TransactionEvent {
        TransactionEvent {
            resolved: Some(Resolution {
                action: ResolveAction::MarkDone,
                step: Some(0),
                outcome,
                reason: "checked".into(),
                by: "ops".into(),
                at_ms: 0,
            }),
            one_phase: true,
            ..TransactionEvent::new("t".into(), state, Mode::TwoPc, 0)
        }
    }

    #[test]
    fn only_the_other_outcome_after_a_confirmed_one_contradicts_it() {
        let aborted = ended(TxnState::Aborted, Some(ConfirmedOutcome::Aborted));
        let committed = ended(TxnState::Committed, Some(ConfirmedOutcome::Committed));
        assert!(contradicts(&aborted, ReplyOutcome::Done));
        assert!(contradicts(&committed, ReplyOutcome::Abort));
        // Agreeing, or read-only (nothing changed): no contradiction.
        assert!(!contradicts(&aborted, ReplyOutcome::Abort));
        assert!(!contradicts(&committed, ReplyOutcome::Done));
        assert!(!contradicts(&aborted, ReplyOutcome::ReadOnly));
        assert!(!contradicts(&committed, ReplyOutcome::ReadOnly));
        // An outcome the participant gave itself, or an operator action without an
        // outcome: a late answer is only a duplicate.
        let answered = TransactionEvent {
            resolved: None,
            ..ended(TxnState::Aborted, None)
        };
        assert!(!contradicts(&answered, ReplyOutcome::Done));
        assert!(!contradicts(
            &ended(TxnState::Aborted, None),
            ReplyOutcome::Done
        ));
    }
}
