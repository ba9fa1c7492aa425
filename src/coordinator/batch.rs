//! Batched commands: group commit for the command stream.
//!
//! A service whose replies carry [`BATCH_HEADER`] (the SDK's, unless its batching is off)
//! is sent its commands through one queue per service. A sender task takes what the queue
//! holds (up to `batch_max` commands, and no more bytes than the server takes in one
//! message), publishes it as one [`CommandBatch`](crate::proto::CommandBatch) on `<prefix>.cmd.<service>.batch.<id>`,
//! and waits for JetStream's ack before it sends the next: while one batch is being stored
//! the next one fills. A lone command goes out as it always did, on its own subject, so a
//! quiet coordinator adds no delay (`batch_linger_us` can add a little on purpose); under
//! load the batches grow by themselves. Each command in a batch is the same as alone (its
//! token, attempt, reply subject), so the participant's barrier and the engine's rules do
//! not change: a batch only carries them.
//!
//! Every other service (a raw-protocol participant that never said it reads batches, or
//! an SDK whose latest reply did not say so) gets one message per command, as documented.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::mpsc;

use super::txn::{TxnMsg, to_bytes};
use crate::proto::{MAX_BATCH, ParticipantCommand, Subjects};
use txcoord_nats::{Expect, publish_durable, publish_durable_with};

/// How the coordinator batches commands (config keys `batch_max`, `batch_linger_us`).
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// The most commands in one batch; 1 turns batching off.
    pub max: usize,
    /// How long a sender waits after the first command of a batch for more.
    pub linger: Duration,
    /// The most bytes of commands in one batch.
    pub max_bytes: usize,
}

/// What a service's reply says it takes, from its headers: [`BATCH_HEADER`] and
/// [`ONE_PHASE_HEADER`](crate::proto::ONE_PHASE_HEADER). Nothing, until it said so.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Takes {
    /// It reads command batches.
    pub batches: bool,
    /// It takes `commit_one_phase`.
    pub one_phase: bool,
}

impl Takes {
    /// What the headers of a reply message say.
    pub fn from_headers(headers: Option<&async_nats::HeaderMap>) -> Takes {
        let says = |name: &str| {
            headers
                .and_then(|h| h.get(name))
                .is_some_and(|v| v.as_str() == "1")
        };
        Takes {
            batches: says(crate::proto::BATCH_HEADER),
            one_phase: says(crate::proto::ONE_PHASE_HEADER),
        }
    }
}

/// One command waiting to be sent, and whom to tell when it is stored.
struct Queued {
    cmd: ParticipantCommand,
    body: bytes::Bytes,
    notify: mpsc::WeakSender<TxnMsg>,
}

/// The services that read batches, and a sender per service.
pub struct Batching {
    settings: BatchSettings,
    /// What each service's latest believed reply said it takes. Read for every command and
    /// reply, written only when a service changes its mind.
    capable: RwLock<HashMap<String, Takes>>,
    senders: Mutex<HashMap<String, mpsc::UnboundedSender<Queued>>>,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Batching {
    /// Batching with `settings`; no service reads batches until one of its replies says so.
    pub fn new(settings: BatchSettings) -> Batching {
        Batching {
            settings,
            capable: RwLock::default(),
            senders: Mutex::default(),
            next_id: AtomicU64::new(0),
        }
    }

    /// A believed reply of `service` said what it takes.
    pub fn heard(&self, service: &str, takes: Takes) {
        let takes = Takes {
            batches: takes.batches && self.settings.max > 1,
            ..takes
        };
        let known = |c: &HashMap<String, Takes>| c.get(service) == Some(&takes);
        if known(&self.capable.read().unwrap_or_else(|p| p.into_inner())) {
            return;
        }
        let mut capable = self.capable.write().unwrap_or_else(|p| p.into_inner());
        if !known(&capable) {
            tracing::info!(
                service,
                batches = takes.batches,
                one_phase = takes.one_phase,
                "the service's replies say whether it reads command batches and takes one-phase commits"
            );
            capable.insert(service.to_string(), takes);
        }
    }

    /// Whether `service` is sent batches.
    pub fn reads_batches(&self, service: &str) -> bool {
        self.said(service).batches
    }

    /// Whether `service` takes one-phase commits.
    pub fn takes_one_phase(&self, service: &str) -> bool {
        self.said(service).one_phase
    }

    fn said(&self, service: &str) -> Takes {
        self.capable
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .copied()
            .unwrap_or_default()
    }

    /// Queues a stamped command for a service that reads batches; `notify` hears
    /// [`TxnMsg::Stored`] once it is stored.
    pub fn send(
        self: &Arc<Self>,
        shared: &Arc<super::Shared>,
        cmd: ParticipantCommand,
        notify: mpsc::WeakSender<TxnMsg>,
    ) {
        let body = to_bytes(&cmd);
        let queued = Queued { cmd, body, notify };
        let mut senders = lock(&self.senders);
        let service = queued.cmd.service.clone();
        let tx = senders.entry(service.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run_sender(self.clone(), shared.clone(), service, rx));
            tx
        });
        if let Err(mpsc::error::SendError(q)) = tx.send(queued) {
            // The sender ended (it never does while the coordinator runs): send alone.
            tracing::warn!(service = %q.cmd.service, "batch sender gone; command sent alone");
            tokio::spawn(send_alone(shared.clone(), q));
        }
    }
}

/// One service's sender: one batch in flight at a time, the next one filling meanwhile.
async fn run_sender(
    batching: Arc<Batching>,
    shared: Arc<super::Shared>,
    service: String,
    mut rx: mpsc::UnboundedReceiver<Queued>,
) {
    let settings = batching.settings;
    while let Some(first) = rx.recv().await {
        let mut bytes = first.body.len();
        let mut batch = vec![first];
        if !settings.linger.is_zero() {
            tokio::time::sleep(settings.linger).await;
        }
        let most = settings.max.clamp(1, MAX_BATCH);
        while batch.len() < most {
            match rx.try_recv() {
                Ok(q) if bytes + q.body.len() <= settings.max_bytes => {
                    bytes += q.body.len();
                    batch.push(q);
                }
                Ok(q) => {
                    // Too big to join: it opens the next batch.
                    send_batch(&batching, &shared, &service, std::mem::take(&mut batch)).await;
                    bytes = q.body.len();
                    batch.push(q);
                }
                Err(_) => break,
            }
        }
        send_batch(&batching, &shared, &service, batch).await;
    }
}

async fn send_batch(
    batching: &Batching,
    shared: &Arc<super::Shared>,
    service: &str,
    mut batch: Vec<Queued>,
) {
    // Queued while the lease was held; sent only while it still is (a standby that took
    // over resends what its log says).
    if shared.lease.ready().await.is_err() {
        return;
    }
    if batch.len() <= 1 {
        if let Some(q) = batch.pop() {
            send_alone(shared.clone(), q).await;
        }
        return;
    }
    let n = batching.next_id.fetch_add(1, Ordering::Relaxed);
    let id = format!("{}-{n}", shared.run_id);
    let subject = shared.subjects.command_batch(service, &id);
    // A CommandBatch, from the commands' own bodies (each is one JSON object).
    let mut body = Vec::with_capacity(batch.iter().map(|q| q.body.len() + 1).sum::<usize>() + 16);
    body.extend_from_slice(b"{\"commands\":[");
    for (i, q) in batch.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&q.body);
    }
    body.extend_from_slice(b"]}");
    // The id is this run's and this batch's: a retry of the publish is dropped as a
    // duplicate, and no other batch (of this or another run) can share it.
    match publish_durable(
        &shared.js,
        &subject,
        &format!("batch.{service}.{id}"),
        body.into(),
        Expect::default(),
        Some(8),
    )
    .await
    {
        Ok(_) => {
            let m = &shared.metrics;
            m.command_batches.fetch_add(1, Ordering::Relaxed);
            m.batched_commands
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            for q in &batch {
                stored(&q.notify, &q.cmd).await;
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, %service, commands = batch.len(), "command batch not sent; the next round or the timeout covers its commands");
        }
    }
}

/// One command on its own subject, as for a service that does not read batches.
async fn send_alone(shared: Arc<super::Shared>, q: Queued) {
    // A lone command of a batching service: its body's trace context is the header too.
    publish_one(
        &shared.js,
        &shared.subjects,
        &q.cmd,
        q.body,
        &q.notify,
        q.cmd.traceparent.as_deref(),
    )
    .await;
}

/// Publishes one command on `<prefix>.cmd.<service>.<txn_id>` with its deterministic id and
/// tells its transaction once it is stored.
pub async fn publish_one(
    js: &jetstream::Context,
    subjects: &Subjects,
    cmd: &ParticipantCommand,
    body: bytes::Bytes,
    notify: &mpsc::WeakSender<TxnMsg>,
    traceparent: Option<&str>,
) {
    let subject = subjects.command(&cmd.service, &cmd.txn_id);
    let msg_id = format!(
        "{}.{}.{}.{}",
        cmd.txn_id,
        cmd.step,
        cmd.kind.as_str(),
        cmd.attempt
    );
    // Bounded: a lost prepare ends in the prepare timeout, a lost phase-2 command in the
    // next resend round.
    // The send's span, for the participant's span to continue (W3C trace context).
    let headers: Vec<(&str, &str)> = traceparent
        .map(|t| (crate::proto::TRACEPARENT_HEADER, t))
        .into_iter()
        .collect();
    match publish_durable_with(
        js,
        &subject,
        &msg_id,
        &headers,
        body,
        Expect::default(),
        Some(8),
    )
    .await
    {
        Ok(_) => stored(notify, cmd).await,
        Err(e) => {
            tracing::warn!(error = %e, service = %cmd.service, "command not sent; the next round or the timeout covers it")
        }
    }
}

async fn stored(notify: &mpsc::WeakSender<TxnMsg>, cmd: &ParticipantCommand) {
    if let Some(tx) = notify.upgrade() {
        let _ = tx
            .send(TxnMsg::Stored {
                step: cmd.step,
                kind: cmd.kind,
                attempt: cmd.attempt,
            })
            .await;
    }
}
