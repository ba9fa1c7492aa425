//! The request/reply API, served as the NATS micro service `txcoord` (`$SRV.PING`,
//! `$SRV.INFO` and `$SRV.STATS` answer as the micro protocol says, so `nats micro` tools
//! work): `<prefix>.api.execute` runs a request and replies with its final event;
//! `<prefix>.api.status` replies with a transaction's latest state.
//!
//! Answers go only to reply inboxes (subjects starting with one of `api_reply_prefixes`,
//! `_INBOX` by default), for the `$SRV.*` subjects as much as for the API: a request whose
//! reply subject is, say, `txn.events.<id>` or `txn.cmd.<service>.<id>` would have the
//! coordinator write into its own log or hand a service a command (a confused deputy), so
//! it is refused and not answered. That is why this module serves the micro protocol itself
//! rather than through async-nats's service, which answers any reply subject.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::txn::{TxnMsg, first_record, to_bytes};
use super::{CoordinatorError, Shared};
use crate::nats::{Expect, publish_durable};
use crate::ops::time::rfc3339;
use crate::proto::{
    ApiError, MAX_TXN_ID_LEN, RequestShape, StatusRequest, TransactionEvent, Until, WAIT_HEADER,
    is_token,
};

/// The micro service's name.
const NAME: &str = "txcoord";
/// The API endpoints' queue group (several coordinators never answer one request twice).
const QUEUE: &str = "q";

/// The running API; dropping it stops the endpoints.
pub struct ApiHandle {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ApiHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// One request: the message and the connection to answer on.
struct Req {
    client: async_nats::Client,
    message: async_nats::Message,
}

/// What `$SRV.INFO` and `$SRV.STATS` say about this instance.
struct Instance {
    id: String,
    started: String,
    endpoints: Vec<(&'static str, String, AtomicU64)>,
}

impl Instance {
    fn base(&self, kind: &str) -> serde_json::Value {
        json!({
            "type": format!("io.nats.micro.v1.{kind}_response"),
            "name": NAME,
            "id": self.id,
            "version": env!("CARGO_PKG_VERSION"),
            "metadata": {},
        })
    }

    fn info(&self) -> serde_json::Value {
        let mut v = self.base("info");
        v["description"] = json!("txcoord distributed-transaction coordinator");
        v["endpoints"] = self
            .endpoints
            .iter()
            .map(|(name, subject, _)| {
                json!({"name": name, "subject": subject, "queue_group": QUEUE, "metadata": {}})
            })
            .collect();
        v
    }

    fn stats(&self, data: serde_json::Value) -> serde_json::Value {
        let mut v = self.base("stats");
        v["started"] = json!(self.started);
        v["endpoints"] = self
            .endpoints
            .iter()
            .map(|(name, subject, n)| {
                json!({"name": name, "subject": subject, "queue_group": QUEUE,
                    "num_requests": n.load(Ordering::Relaxed), "num_errors": 0,
                    "last_error": "", "processing_time": 0, "average_processing_time": 0,
                    "data": data})
            })
            .collect();
        v
    }
}

/// Serves the micro protocol and the endpoints.
pub async fn start(
    client: async_nats::Client,
    shared: Arc<Shared>,
) -> Result<ApiHandle, CoordinatorError> {
    let api_err = CoordinatorError::Api;
    let instance = Arc::new(Instance {
        id: uuid::Uuid::new_v4().simple().to_string(),
        started: rfc3339(crate::proto::now_ms()),
        endpoints: vec![
            ("execute", shared.subjects.api("execute"), AtomicU64::new(0)),
            ("status", shared.subjects.api("status"), AtomicU64::new(0)),
            ("resolve", shared.subjects.api("resolve"), AtomicU64::new(0)),
            (
                "execute_as",
                shared.subjects.api_execute_as("*"),
                AtomicU64::new(0),
            ),
        ],
    });
    let mut tasks = Vec::new();
    for verb in ["PING", "INFO", "STATS"] {
        for subject in [
            format!("$SRV.{verb}"),
            format!("$SRV.{verb}.{NAME}"),
            format!("$SRV.{verb}.{NAME}.{}", instance.id),
        ] {
            let mut sub = client.subscribe(subject).await.map_err(api_err)?;
            let (client, shared, instance) = (client.clone(), shared.clone(), instance.clone());
            tasks.push(tokio::spawn(async move {
                while let Some(message) = sub.next().await {
                    let req = Req {
                        client: client.clone(),
                        message,
                    };
                    if !answerable(&shared, &req) {
                        continue;
                    }
                    let body = match verb {
                        "PING" => instance.base("ping"),
                        "INFO" => instance.info(),
                        _ => instance.stats(shared.metrics.to_json(shared.router.len())),
                    };
                    respond(&req, Bytes::from(body.to_string())).await;
                }
            }));
        }
    }
    for (index, (name, subject, _)) in instance.endpoints.iter().enumerate() {
        let mut sub = client
            .queue_subscribe(subject.clone(), QUEUE.into())
            .await
            .map_err(api_err)?;
        let (client, shared, instance) = (client.clone(), shared.clone(), instance.clone());
        let execute = matches!(*name, "execute" | "execute_as");
        let resolve = *name == "resolve";
        tasks.push(tokio::spawn(async move {
            while let Some(message) = sub.next().await {
                instance.endpoints[index].2.fetch_add(1, Ordering::Relaxed);
                let req = Req {
                    client: client.clone(),
                    message,
                };
                if !answerable(&shared, &req) {
                    continue;
                }
                if execute {
                    tokio::spawn(handle_execute(shared.clone(), req));
                } else if resolve {
                    tokio::spawn(handle_resolve(shared.clone(), req));
                } else {
                    tokio::spawn(handle_status(shared.clone(), req));
                }
            }
        }));
    }
    confirm_subscriptions(&client).await?;
    Ok(ApiHandle { tasks })
}

/// Waits until the server has processed every subscription this connection sent so far, so
/// that "ready" means a request sent now finds its responder. `subscribe` only queues the
/// SUB and `flush` only writes it to the socket; a message that this connection publishes
/// to itself comes back only after the server has read everything before it, in order.
async fn confirm_subscriptions(client: &async_nats::Client) -> Result<(), CoordinatorError> {
    let not_confirmed = |e: String| CoordinatorError::ApiNotConfirmed(e);
    let inbox = client.new_inbox();
    let mut echo = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| not_confirmed(e.to_string()))?;
    client
        .publish(inbox, Bytes::new())
        .await
        .map_err(|e| not_confirmed(e.to_string()))?;
    client
        .flush()
        .await
        .map_err(|e| not_confirmed(e.to_string()))?;
    match tokio::time::timeout(Duration::from_secs(30), echo.next()).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(not_confirmed("the connection closed".into())),
        Err(_) => Err(not_confirmed("no echo within 30 s".into())),
    }
}

/// Whether `reply` may receive an API answer: it starts with one of `prefixes` (as
/// `_INBOX.abc` does with `_INBOX`), at a token boundary or inside the first token (so
/// `_INBOX_alice.x` passes `_INBOX` too); the reason when not.
pub fn reply_allowed(prefixes: &[String], reply: Option<&str>) -> Result<(), String> {
    let Some(reply) = reply else {
        return Err("the request has no reply subject".into());
    };
    if prefixes
        .iter()
        .any(|p| !p.is_empty() && reply.starts_with(p.as_str()))
    {
        return Ok(());
    }
    Err(format!(
        "reply subject {reply:?} is not an inbox (allowed prefixes: {prefixes:?}); the coordinator answers only to inboxes"
    ))
}

fn answerable(shared: &Shared, req: &Req) -> bool {
    let reply = req.message.reply.as_ref().map(|s| s.as_str());
    match reply_allowed(&shared.api_reply_prefixes, reply) {
        Ok(()) => true,
        Err(why) => {
            shared.metrics.refused_api_request();
            tracing::warn!(subject = %req.message.subject, reason = %why, "API request refused, not answered");
            false
        }
    }
}

fn error_body(message: impl Into<String>) -> Bytes {
    to_bytes(&ApiError {
        error: message.into(),
    })
}

async fn respond(req: &Req, body: Bytes) {
    let Some(reply) = req.message.reply.clone() else {
        return;
    };
    if let Err(e) = req.client.publish(reply, body).await {
        tracing::debug!(error = %e, "API reply not delivered");
    }
}

/// `<prefix>.api.execute` (or `<prefix>.api.execute.<client>`, which submits as that client,
/// with its fair share): submits the request and answers its outcome.
async fn handle_execute(shared: Arc<Shared>, req: Req) {
    let submit = match shared.subjects.execute_caller(&req.message.subject) {
        Some(name) => shared.subjects.submit_as(name),
        None => shared.subjects.submit(),
    };
    let until = match req
        .message
        .headers
        .as_ref()
        .and_then(|h| h.get(WAIT_HEADER))
        .map(|v| v.as_str().parse::<Until>())
    {
        None => Until::Outcome,
        Some(Ok(until)) => until,
        Some(Err(e)) => {
            return respond(&req, error_body(format!("header {WAIT_HEADER}: {e}"))).await;
        }
    };
    let parsed = shared.parse_request(
        &req.message.payload,
        super::nats_traceparent(req.message.headers.as_ref()),
    );
    // Invalid requests still go through the submit stream when they carry a txn_id, so they
    // are recorded and rejected exactly like any other submission.
    let (txn_id, body, timeout_ms) = match (parsed.result, parsed.txn_id) {
        (Ok(mut request), _) => {
            if let Some(why) = taken(&shared, &request).await {
                return respond(&req, error_body(why)).await;
            }
            let id = request
                .txn_id
                .get_or_insert_with(|| uuid::Uuid::now_v7().to_string())
                .clone();
            let t = request
                .timeout_ms
                .unwrap_or(shared.engine.default_timeout_ms);
            (id, to_bytes(&request), t)
        }
        (Err(_), Some(id)) => (
            id,
            req.message.payload.clone(),
            shared.engine.default_timeout_ms,
        ),
        (Err(e), None) => return respond(&req, error_body(e.to_string())).await,
    };
    let body =
        match publish_and_wait(&shared, &submit, &txn_id, body, Some(timeout_ms), until).await {
            Ran::Event(ev) => to_bytes(&*ev),
            Ran::Accepted => error_body(format!("no outcome for {txn_id}")),
            Ran::NoOutcome(wait) => error_body(format!(
                "no outcome for {txn_id} within {wait:?}; ask txn.api.status later"
            )),
            Ran::NotAccepted(e) => error_body(format!("submission not accepted: {e}")),
        };
    respond(&req, body).await
}

/// Why a valid request may not run: its txn_id is taken by another request (a retry of the
/// same request is not: it is answered with its outcome).
pub(crate) async fn taken(
    shared: &Shared,
    request: &crate::proto::TransactionRequest,
) -> Option<String> {
    let id = request.txn_id.as_ref()?;
    let Ok(Some((first, _))) = first_record(shared, id).await else {
        return None;
    };
    if RequestShape::of_request(request).matches(&RequestShape::of_accepted(&first)) {
        return None;
    }
    let state = last_event(shared, id)
        .await
        .map(|e| format!("{:?}", e.state).to_lowercase())
        .unwrap_or_else(|| "unknown".into());
    Some(format!(
        "txn_id {id} is taken by another request, which is {state}; this request was not run"
    ))
}

/// How a submission went.
pub(crate) enum Ran {
    /// The final event (a resubmission's recorded one), or, when no outcome came in time,
    /// the latest state the log has.
    Event(Box<TransactionEvent>),
    /// In the submit stream; not waited for.
    Accepted,
    /// Waited this long, and the log has nothing yet.
    NoOutcome(Duration),
    /// JetStream did not take it.
    NotAccepted(String),
}

/// Publishes a submission (idempotently: its txn_id is its message id) and, with
/// `wait_for` (the request's prepare timeout), waits `until` its outcome or its decision.
///
/// The wait is answered in-process ([`Shared::waits`]), by this coordinator's own record
/// once JetStream acknowledged it, so the coordinator needs no subscription to every
/// transaction's events (four or five deliveries per transaction that nobody else asked
/// for) and never takes a message someone else published on the events subject for a
/// record. The log is read at
/// once (a resubmission of a transaction that is already over or decided) and then after
/// a second, at doubling intervals (an outcome another coordinator wrote, as around a
/// fail-over).
pub(crate) async fn publish_and_wait(
    shared: &Shared,
    submit: &str,
    txn_id: &str,
    body: Bytes,
    wait_for: Option<u64>,
    until: Until,
) -> Ran {
    // Waiting starts before the publish, so the record cannot slip past.
    let waiting = wait_for.map(|ms| (ms, shared.waits.register(txn_id, until)));
    if let Err(e) =
        publish_durable(&shared.js, submit, txn_id, body, Expect::default(), Some(5)).await
    {
        return Ran::NotAccepted(e.to_string());
    }
    let Some((timeout_ms, mut wait)) = waiting else {
        return Ran::Accepted;
    };
    let waited = Duration::from_millis(timeout_ms.saturating_add(30_000));
    let deadline = tokio::time::Instant::now() + waited;
    let mut every = Duration::ZERO;
    loop {
        let check = (tokio::time::Instant::now() + every).min(deadline);
        tokio::select! {
            Some(ev) = wait.event() => return Ran::Event(Box::new(ev)),
            _ = tokio::time::sleep_until(check) => {
                let last = last_event(shared, txn_id).await;
                if let Some(ev) = last.as_ref().filter(|ev| until.reached(ev.state)) {
                    return Ran::Event(Box::new(ev.clone()));
                }
                if tokio::time::Instant::now() >= deadline {
                    // Nothing in time: the latest state the log has, if any.
                    return match last {
                        Some(ev) => Ran::Event(Box::new(ev)),
                        None => Ran::NoOutcome(waited),
                    };
                }
                every = (every * 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
            }
        }
    }
}

/// A transaction's latest state: a running one's engine snapshot (every vote so far), else
/// the last record of its log; `Ok(None)` for an unknown one, `Err` (what went wrong) when
/// the log could not be read, so an unreachable server is not taken for an unknown id.
pub(crate) async fn current_state(
    shared: &Shared,
    txn_id: &str,
) -> Result<Option<TransactionEvent>, String> {
    if let Some(tx) = shared.router.get(txn_id) {
        let (otx, orx) = oneshot::channel();
        if tx.send(TxnMsg::Status(otx)).await.is_ok()
            && let Ok(Ok(ev)) = tokio::time::timeout(Duration::from_secs(2), orx).await
        {
            return Ok(Some(ev));
        }
    }
    crate::client::log_tail(&shared.streams.events, &shared.subjects, txn_id)
        .await
        .map(|tail| tail.record.map(|r| r.event))
        .map_err(|e| format!("the log of {txn_id} could not be read: {e}"))
}

/// The last recorded event of a transaction, if any.
pub async fn last_event(shared: &Shared, txn_id: &str) -> Option<TransactionEvent> {
    crate::client::last_record_of(&shared.streams.events, &shared.subjects, txn_id).await
}

/// `<prefix>.api.resolve`: an operator's action on one transaction, carried out by the
/// engine that runs it (the active coordinator), which answers once the record that
/// carries it (with the audit) is durable, or with the rule that refuses it.
async fn handle_resolve(shared: Arc<Shared>, req: Req) {
    let answer = resolve(&shared, &req.message.payload).await;
    let body = match answer {
        Ok(v) => Bytes::from(v.to_string()),
        Err(e) => error_body(e),
    };
    respond(&req, body).await
}

async fn resolve(shared: &Shared, payload: &[u8]) -> Result<serde_json::Value, String> {
    let q: crate::proto::ResolveRequest = serde_json::from_slice(payload).map_err(|e| {
        format!(
            "resolve request must be {{\"txn_id\", \"action\": \"retry-now\"|\"abort\"|\"mark-done\", \"step\"?, \"reason\", \"by\", \"dry_run\"?}}: {e}"
        )
    })?;
    resolve_request(shared, q).await
}

/// Carries out (or, with `dry_run`, checks) an operator's action on a transaction this
/// coordinator runs: the NATS endpoint's and the console's one path.
pub(crate) async fn resolve_request(
    shared: &Shared,
    mut q: crate::proto::ResolveRequest,
) -> Result<serde_json::Value, String> {
    use crate::proto::MAX_RESOLVE_TEXT;
    if !is_token(&q.txn_id, MAX_TXN_ID_LEN) {
        return Err(format!("txn_id {:?} is not a valid id", q.txn_id));
    }
    let r = &mut q.resolution;
    for (field, text) in [("reason", &r.reason), ("by", &r.by)] {
        if text.trim().is_empty() || text.len() > MAX_RESOLVE_TEXT {
            return Err(format!(
                "{field} must say something, in at most {MAX_RESOLVE_TEXT} bytes (the audit record keeps it)"
            ));
        }
    }
    r.at_ms = crate::proto::now_ms();
    let Some(tx) = shared.router.get(&q.txn_id) else {
        return Err(match last_event(shared, &q.txn_id).await {
            Some(ev) if ev.state.is_terminal() => format!(
                "{} is {}: nothing is left to do",
                q.txn_id,
                ev.state.as_str()
            ),
            Some(ev) => format!(
                "{} ({}) is not running on this coordinator: it resumes when the coordinator holding the lease recovers it; ask that one",
                q.txn_id,
                ev.state.as_str()
            ),
            None => format!("unknown txn_id {}", q.txn_id),
        });
    };
    let (answer, rx) = oneshot::channel();
    tx.send(TxnMsg::Resolve {
        resolution: q.resolution.clone(),
        dry_run: q.dry_run,
        answer,
    })
    .await
    .map_err(|_| format!("{} finished meanwhile", q.txn_id))?;
    let ev = tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .map_err(|_| "no answer within 30 s; look at the transaction's log".to_string())?
        .map_err(|_| format!("{} finished meanwhile", q.txn_id))??;
    Ok(json!({
        "txn_id": q.txn_id,
        "resolved": q.resolution,
        "dry_run": q.dry_run,
        "state": ev.state,
        "event": ev,
    }))
}

async fn handle_status(shared: Arc<Shared>, req: Req) {
    let query: StatusRequest = match serde_json::from_slice(&req.message.payload) {
        Ok(q) => q,
        Err(e) => {
            return respond(
                &req,
                error_body(format!(
                    "status request must be {{\"txn_id\": \"...\"}}: {e}"
                )),
            )
            .await;
        }
    };
    if !is_token(&query.txn_id, MAX_TXN_ID_LEN) {
        return respond(
            &req,
            error_body(format!("txn_id {:?} is not a valid id", query.txn_id)),
        )
        .await;
    }
    match current_state(&shared, &query.txn_id).await {
        Ok(Some(ev)) => respond(&req, to_bytes(&ev)).await,
        Ok(None) => respond(&req, error_body(format!("unknown txn_id {}", query.txn_id))).await,
        Err(e) => respond(&req, error_body(e)).await,
    }
}

#[cfg(test)]
mod tests {
    use super::reply_allowed;

    #[test]
    fn only_inboxes_get_answers() {
        let p = vec!["_INBOX".to_string()];
        assert!(reply_allowed(&p, Some("_INBOX.abc.def")).is_ok());
        assert!(reply_allowed(&p, Some("_INBOX_alice.abc")).is_ok());
        for bad in [
            "txn.events.victim",
            "txn.cmd.inventory.x",
            "$JS.API.STREAM.DELETE.TXN_EVENTS",
            "INBOX.x",
        ] {
            let e = reply_allowed(&p, Some(bad)).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        assert!(reply_allowed(&p, None).is_err());
        assert!(reply_allowed(&[String::new()], Some("txn.events.x")).is_err());
    }
}
