//! The HTTP front door (`http_listen`): `POST /v1/transactions` takes a TransactionRequest
//! and answers `202 {"txn_id"}` (or, with `?wait=true` or `Prefer: wait`, `200` and the
//! final event; with `?wait=decided`, `200` and the decision once it is durable, see
//! [`Until::Decided`]); `GET /v1/transactions/{id}` answers the latest state with every vote.
//!
//! Errors have one shape, `{"error": text, "status": code, "kind": name, "path"?: JSON
//! path}`, with the status that fits: `400` (a bad request, with the path), `404` (unknown
//! id), `409` (a txn_id taken by a different request), `413` (over `max_request_bytes`),
//! `503` (this coordinator is not the lease holder yet or any more, NATS did not take the
//! submission, or the log could not be read). The listener opens before the lease is taken,
//! so a standby answers `503` (a load balancer's health check sends clients to the active
//! one), and a coordinator that lost its lease or is shutting down answers `503` until its
//! process ends.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::sync::watch;

use super::Shared;
use super::api::{Ran, current_state, publish_and_wait, taken};
use super::txn::to_bytes;
use crate::proto::{MAX_TXN_ID_LEN, RequestError, Until, is_token};

/// What the front door needs once this coordinator is active.
#[derive(Clone)]
pub struct Active {
    /// The coordinator's shared state.
    pub shared: Arc<Shared>,
}

/// `None` until the lease is held and recovery is done.
pub type Readiness = watch::Receiver<Option<Active>>;

fn error(
    status: StatusCode,
    kind: &str,
    message: impl Into<String>,
    path: Option<String>,
) -> Response {
    let mut body = json!({
        "error": message.into(),
        "status": status.as_u16(),
        "kind": kind,
    });
    if let Some(p) = path {
        body["path"] = json!(p);
    }
    (status, axum::Json(body)).into_response()
}

fn unavailable() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "this coordinator is not the active one (it does not hold the lease); try another",
        None,
    )
}

fn event_response(status: StatusCode, body: bytes::Bytes) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(body),
    )
        .into_response()
}

/// Serves the front door on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, ready: Readiness) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/v1/transactions", post(submit))
        .route("/v1/transactions/{id}", get(status))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such path: the front door serves POST /v1/transactions and GET /v1/transactions/{id}",
                None,
            )
        })
        .with_state(ready);
    axum::serve(listener, app).await
}

#[derive(serde::Deserialize)]
struct SubmitQuery {
    /// `true` or `outcome`, `decided`, `false`; absent means `Prefer: wait` decides.
    wait: Option<String>,
}

impl SubmitQuery {
    /// How long to wait, if at all: the query's `wait`, else `Prefer: wait` (the outcome).
    fn until(&self, headers: &HeaderMap) -> Result<Option<Until>, String> {
        match self.wait.as_deref().map(str::trim) {
            Some("true" | "1") => Ok(Some(Until::Outcome)),
            Some("false" | "0") => Ok(None),
            Some(other) => other
                .parse::<Until>()
                .map(Some)
                .map_err(|e| format!("query parameter wait: {e}, \"true\" or \"false\"")),
            None => Ok(headers
                .get("prefer")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.split(',').any(|p| p.trim() == "wait"))
                .then_some(Until::Outcome)),
        }
    }
}

async fn submit(
    State(ready): State<Readiness>,
    Query(q): Query<SubmitQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(active) = ready.borrow().clone() else {
        return unavailable();
    };
    let shared = &active.shared;
    let limit = shared.limits.max_bytes;
    let bytes = match axum::body::to_bytes(body, limit.saturating_add(1)).await {
        Ok(b) if b.len() <= limit => b,
        Ok(b) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "request is {} bytes or more, over the limit of {limit} bytes",
                    b.len()
                ),
                None,
            );
        }
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("request is over the limit of {limit} bytes"),
                None,
            );
        }
    };
    let until = match q.until(&headers) {
        Ok(until) => until,
        Err(message) => {
            return error(StatusCode::BAD_REQUEST, "invalid_request", message, None);
        }
    };
    let traceparent = headers
        .get(crate::proto::TRACEPARENT_HEADER)
        .and_then(|v| v.to_str().ok());
    let mut request = match shared.parse_request(&bytes, traceparent).result {
        Ok(r) => r,
        Err(RequestError::Invalid { path, message }) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                message,
                Some(path),
            );
        }
        Err(e @ RequestError::TooLarge { .. }) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                e.to_string(),
                None,
            );
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                e.to_string(),
                None,
            );
        }
    };
    if let Some(why) = taken(shared, &request).await {
        return error(StatusCode::CONFLICT, "txn_id_taken", why, None);
    }
    let txn_id = request
        .txn_id
        .get_or_insert_with(|| uuid::Uuid::now_v7().to_string())
        .clone();
    let timeout = request
        .timeout_ms
        .unwrap_or(shared.engine.default_timeout_ms);
    let ran = publish_and_wait(
        shared,
        &shared.subjects.submit(),
        &txn_id,
        to_bytes(&request),
        until.map(|_| timeout),
        until.unwrap_or_default(),
    )
    .await;
    match ran {
        Ran::Accepted => (
            StatusCode::ACCEPTED,
            axum::Json(json!({"txn_id": txn_id})),
        )
            .into_response(),
        Ran::Event(ev) => event_response(StatusCode::OK, to_bytes(&*ev)),
        Ran::NoOutcome(waited) => (
            StatusCode::ACCEPTED,
            axum::Json(json!({
                "txn_id": txn_id,
                "error": format!("no outcome within {waited:?}; GET /v1/transactions/{txn_id} later"),
            })),
        )
            .into_response(),
        Ran::NotAccepted(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("the submission was not accepted by NATS: {e}"),
            None,
        ),
    }
}

async fn status(State(ready): State<Readiness>, Path(id): Path<String>) -> Response {
    let Some(active) = ready.borrow().clone() else {
        return unavailable();
    };
    if !is_token(&id, MAX_TXN_ID_LEN) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{id:?} is not a valid txn_id"),
            Some("txn_id".into()),
        );
    }
    match current_state(&active.shared, &id).await {
        Ok(Some(ev)) => event_response(StatusCode::OK, to_bytes(&ev)),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no transaction {id}"),
            None,
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e, None),
    }
}
