//! The request/reply API, registered as the NATS micro service `txcoord` (so `$SRV.PING`,
//! `$SRV.INFO` and `$SRV.STATS` work): `<prefix>.api.execute` runs a request and replies with
//! its final event; `<prefix>.api.status` replies with a transaction's latest state.
//!
//! Answers go only to reply inboxes (subjects starting with one of `api_reply_prefixes`,
//! `_INBOX` by default): a request whose reply subject is, say, `txn.events.<id>` or
//! `txn.cmd.<service>.<id>` would have the coordinator write into its own log or hand a
//! service a command (a confused deputy), so it is refused and not answered.

use std::sync::Arc;
use std::time::Duration;

use async_nats::service::ServiceExt;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::txn::{TxnMsg, first_record, to_bytes};
use super::{CoordinatorError, Shared};
use crate::nats::{Expect, publish_durable};
use crate::proto::{
    ApiError, MAX_TXN_ID_LEN, RequestShape, StatusRequest, TransactionEvent, is_token,
    parse_request,
};

/// The running API; dropping it stops the endpoints.
pub struct ApiHandle {
    _service: async_nats::service::Service,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ApiHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Registers the micro service and its endpoints.
pub async fn start(
    client: async_nats::Client,
    shared: Arc<Shared>,
) -> Result<ApiHandle, CoordinatorError> {
    let stats_shared = shared.clone();
    let service = client
        .service_builder()
        .description("txcoord distributed-transaction coordinator")
        .stats_handler(move |_endpoint, _stats| {
            stats_shared.metrics.to_json(stats_shared.router.len())
        })
        .start("txcoord", env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| CoordinatorError::Api(e.to_string()))?;
    let api_err = |e: async_nats::Error| CoordinatorError::Api(e.to_string());
    let mut execute = service
        .endpoint_builder()
        .name("execute")
        .add(shared.subjects.api("execute"))
        .await
        .map_err(api_err)?;
    let mut status = service
        .endpoint_builder()
        .name("status")
        .add(shared.subjects.api("status"))
        .await
        .map_err(api_err)?;
    let s1 = shared.clone();
    let c1 = client.clone();
    let t1 = tokio::spawn(async move {
        while let Some(req) = execute.next().await {
            if answerable(&s1, &req) {
                tokio::spawn(handle_execute(c1.clone(), s1.clone(), req));
            }
        }
    });
    let s2 = shared.clone();
    let t2 = tokio::spawn(async move {
        while let Some(req) = status.next().await {
            if answerable(&s2, &req) {
                tokio::spawn(handle_status(s2.clone(), req));
            }
        }
    });
    Ok(ApiHandle {
        _service: service,
        tasks: vec![t1, t2],
    })
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

fn answerable(shared: &Shared, req: &async_nats::service::Request) -> bool {
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

async fn respond(req: &async_nats::service::Request, body: Bytes) {
    if let Err(e) = req.respond(Ok(body)).await {
        tracing::debug!(error = %e, "API reply not delivered");
    }
}

async fn handle_execute(
    client: async_nats::Client,
    shared: Arc<Shared>,
    req: async_nats::service::Request,
) {
    let parsed = parse_request(&req.message.payload, &shared.limits);
    // Invalid requests still go through the submit stream when they carry a txn_id, so they
    // are recorded and rejected exactly like any other submission.
    let (txn_id, body, timeout_ms) = match (parsed.result, parsed.txn_id) {
        (Ok(mut request), _) => {
            // An id the client chose may be taken: by this very request (a retry, answered
            // with its outcome below) or by another one, which is an error, not its outcome.
            if let Some(id) = &request.txn_id
                && let Ok(Some(first)) = first_record(&shared, id).await
                && !RequestShape::of_request(&request).matches(&RequestShape::of_accepted(&first))
            {
                let state = last_event(&shared, id)
                    .await
                    .map(|e| format!("{:?}", e.state).to_lowercase())
                    .unwrap_or_else(|| "unknown".into());
                return respond(
                    &req,
                    error_body(format!(
                        "txn_id {id} is taken by another request, which is {state}; this request was not run"
                    )),
                )
                .await;
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
    let subject = shared.subjects.events(&txn_id);
    let mut sub = match client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => return respond(&req, error_body(format!("cannot watch {subject}: {e}"))).await,
    };
    if let Err(e) = publish_durable(
        &shared.js,
        &shared.subjects.submit(),
        &txn_id,
        body,
        Expect::default(),
        Some(5),
    )
    .await
    {
        return respond(&req, error_body(format!("submission not accepted: {e}"))).await;
    }
    // Already finished (a resubmission): the recorded outcome is the answer.
    if let Some(ev) = last_event(&shared, &txn_id).await
        && ev.state.is_outcome()
    {
        return respond(&req, to_bytes(&ev)).await;
    }
    let wait = Duration::from_millis(timeout_ms.saturating_add(30_000));
    let mut latest: Option<TransactionEvent> = None;
    let outcome = tokio::time::timeout(wait, async {
        while let Some(msg) = sub.next().await {
            if let Ok(ev) = serde_json::from_slice::<TransactionEvent>(&msg.payload) {
                let terminal = ev.state.is_outcome();
                latest = Some(ev);
                if terminal {
                    return;
                }
            }
        }
    })
    .await;
    match (outcome, latest) {
        (Ok(()), Some(ev)) => respond(&req, to_bytes(&ev)).await,
        (_, Some(ev)) => respond(&req, to_bytes(&ev)).await,
        (_, None) => {
            respond(
                &req,
                error_body(format!(
                    "no outcome for {txn_id} within {wait:?}; ask txn.api.status later"
                )),
            )
            .await
        }
    }
}

/// The last recorded event of a transaction, if any.
pub async fn last_event(shared: &Shared, txn_id: &str) -> Option<TransactionEvent> {
    crate::client::last_record_of(&shared.streams.events, &shared.subjects, txn_id).await
}

async fn handle_status(shared: Arc<Shared>, req: async_nats::service::Request) {
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
    if let Some(tx) = shared.router.get(&query.txn_id) {
        let (otx, orx) = oneshot::channel();
        if tx.send(TxnMsg::Status(otx)).await.is_ok()
            && let Ok(Ok(ev)) = tokio::time::timeout(Duration::from_secs(2), orx).await
        {
            return respond(&req, to_bytes(&ev)).await;
        }
    }
    match last_event(&shared, &query.txn_id).await {
        Some(ev) => respond(&req, to_bytes(&ev)).await,
        None => respond(&req, error_body(format!("unknown txn_id {}", query.txn_id))).await,
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
