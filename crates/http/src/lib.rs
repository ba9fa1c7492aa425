//! HTTP participants: [`HttpParticipant`] joins an HTTP service to txcoord transactions as
//! an ordinary participant of the SDK (so it gets the durable consumer, the branch records,
//! idempotency and crash recovery of the SDK) and forwards each command to the service:
//!
//! - `POST {url}/prepare`, `/commit`, `/abort` (2PC) and `/execute`, `/compensate` (sagas),
//!   with the JSON body `{txn_id, step, action, payload, attempt, deadline_ms}`;
//! - headers `Idempotency-Key: <txn_id>:<step>:<kind>` (the service's barrier: a bridge that
//!   restarted sends what is unconfirmed again), `Txcoord-Txn-Id`, `Txcoord-Step`,
//!   `Txcoord-Deadline-Ms`, `traceparent` when the transaction has a W3C trace context,
//!   and the configured ones (an `Authorization` from a file or an environment variable).
//!
//! Answers: `200`/`204` yes (a prepare's body may say `{"vote": "read_only"}`); `409` on
//! prepare or execute a refusal, with the body's `reason`; `202` or `425` "in progress, ask
//! again"; `410` on commit, abort or compensate "already done". `5xx`, connection errors and
//! timeouts are retried with backoff and jitter: a prepare until its deadline (then the
//! branch votes abort), commit and abort until confirmed. Anything else (a redirect, another
//! status, a body that is not JSON, a wrong content type, a body over the limit) is a clear
//! error: a prepare votes abort saying what the service answered, a commit is retried and
//! logged. Nothing else is ever read as a vote.
//!
//! A request step may also name its HTTP service by a URL (`steps[].url`) instead of a
//! service name: [`HttpParticipant::for_urls`] serves those, sending each command to the
//! URL it carries only when the URL falls under the [`UrlAllowList`] (`http_allow`), with
//! the default settings and none of the configured headers (a client chooses the URL, so no
//! credential goes to it).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod allow;

pub use allow::{UrlAllowList, UrlError};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use txcoord_participant::{Participant, ServiceError, StepResult, TxnContext, Vote};
use txcoord_proto::now_ms;

/// One HTTP service (`[http_services.<name>]` in the configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpServiceConfig {
    /// The base URL: commands go to `{url}/prepare` and so on.
    pub url: String,
    /// Longest wait for one request, in milliseconds (a prepare's also ends at its
    /// deadline).
    pub timeout_ms: u64,
    /// Headers added to every request. A value `env:NAME` is read from the environment
    /// variable NAME, `file:PATH` from a file (trimmed), anything else is taken as it is.
    pub headers: BTreeMap<String, String>,
    /// A PEM file of extra CA certificates to trust (for a service with its own CA).
    pub tls_ca_file: Option<PathBuf>,
    /// First delay before a retry, in milliseconds (doubling, with jitter).
    pub retry_base_ms: u64,
    /// Longest delay between retries.
    pub retry_cap_ms: u64,
    /// Tries of a commit, abort or compensate within one command delivery before the
    /// command is handed back to be delivered again (it is retried until confirmed).
    pub max_attempts: u32,
    /// Largest response body read, in bytes; a larger one is an error.
    pub max_body_bytes: usize,
}

impl Default for HttpServiceConfig {
    fn default() -> Self {
        HttpServiceConfig {
            url: String::new(),
            timeout_ms: 5_000,
            headers: BTreeMap::new(),
            tls_ca_file: None,
            retry_base_ms: 100,
            retry_cap_ms: 2_000,
            max_attempts: 5,
            max_body_bytes: 64 * 1024,
        }
    }
}

/// Why a bridge could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The URL is not an http(s) URL.
    #[error("http_services.{service}.url {url:?}: {message}")]
    BadUrl {
        /// The service.
        service: String,
        /// The URL.
        url: String,
        /// What is wrong with it.
        message: String,
    },
    /// A header could not be read or is not valid.
    #[error("http_services.{service}.headers.{header}: {message}")]
    Header {
        /// The service.
        service: String,
        /// The header.
        header: String,
        /// What went wrong.
        message: String,
    },
    /// The TLS settings could not be used.
    #[error("http_services.{service}.tls_ca_file: {message}")]
    Tls {
        /// The service.
        service: String,
        /// What went wrong.
        message: String,
    },
    /// The HTTP client could not be built.
    #[error("http_services.{service}: {message}")]
    Client {
        /// The service.
        service: String,
        /// What went wrong.
        message: String,
    },
}

/// What one request came back with.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    /// 200/204, with the body if there was one.
    Yes(Option<Value>),
    /// 409: refused, with the reason.
    Refused(String),
    /// 202/425: in progress, ask again.
    InProgress,
    /// 410: nothing left to do.
    Gone,
    /// 5xx, a connection error, a timeout: try again.
    Retry(String),
    /// Anything else: a clear error, never a vote.
    Broken(String),
}

/// Reads a configured secret (a header value, a token): `env:NAME`, `file:PATH` (trimmed),
/// or the text itself.
pub fn secret_value(raw: &str) -> Result<String, String> {
    if let Some(var) = raw.strip_prefix("env:") {
        return std::env::var(var).map_err(|_| format!("environment variable {var} is not set"));
    }
    if let Some(path) = raw.strip_prefix("file:") {
        return std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .map_err(|e| format!("cannot read {path}: {e}"));
    }
    Ok(raw.to_string())
}

/// An error and each of its sources, `: `-separated (reqwest's own text leaves out why).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let part = s.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        next = s.source();
    }
    text
}

/// Whether the TLS handshake failed on the server's certificate (unknown issuer, wrong
/// name, expired...), somewhere in `e`'s sources. An `io::Error` hides the error it wraps
/// from `source()` (it answers that error's source), so it is opened with `get_ref`: the
/// connector wraps rustls's error in two of them.
fn refused_certificate(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if matches!(
            err.downcast_ref::<rustls::Error>(),
            Some(rustls::Error::InvalidCertificate(_))
        ) {
            return true;
        }
        next = match err.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    false
}

/// The settings every bridge's HTTP client has: no redirects (an answer the contract does
/// not have: never followed) and the per-request timeout.
fn client_builder(cfg: &HttpServiceConfig) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_millis(cfg.timeout_ms.max(1)))
}

/// An HTTP service as a participant.
pub struct HttpParticipant {
    name: String,
    target: Target,
    cfg: HttpServiceConfig,
    client: reqwest::Client,
}

/// Where commands go.
enum Target {
    /// One configured service: `{base}/prepare` and so on.
    Fixed(String),
    /// The URL each command carries, when the list allows it.
    Urls(UrlAllowList),
}

impl HttpParticipant {
    /// The bridge to service `name` as `cfg` describes it.
    pub fn new(name: &str, cfg: HttpServiceConfig) -> Result<HttpParticipant, BridgeError> {
        let url = reqwest::Url::parse(&cfg.url).map_err(|e| BridgeError::BadUrl {
            service: name.into(),
            url: cfg.url.clone(),
            message: e.to_string(),
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(BridgeError::BadUrl {
                service: name.into(),
                url: cfg.url.clone(),
                message: "must be http:// or https://".into(),
            });
        }
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, raw) in &cfg.headers {
            let bad = |message: String| BridgeError::Header {
                service: name.into(),
                header: k.clone(),
                message,
            };
            let value = secret_value(raw).map_err(bad)?;
            let hk = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| bad(e.to_string()))?;
            let hv =
                reqwest::header::HeaderValue::from_str(&value).map_err(|e| bad(e.to_string()))?;
            headers.insert(hk, hv);
        }
        let mut builder = client_builder(&cfg).default_headers(headers);
        if let Some(path) = &cfg.tls_ca_file {
            let tls = |message: String| BridgeError::Tls {
                service: name.into(),
                message,
            };
            let pem = std::fs::read(path).map_err(|e| tls(format!("{}: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| tls(format!("{}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(tls(format!(
                    "{}: no PEM certificate in the file",
                    path.display()
                )));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder.build().map_err(|e| BridgeError::Client {
            service: name.into(),
            message: e.to_string(),
        })?;
        Ok(HttpParticipant {
            name: name.into(),
            target: Target::Fixed(cfg.url.trim_end_matches('/').to_string()),
            cfg,
            client,
        })
    }

    /// The bridge service `name` for steps that name their HTTP service by a URL: each
    /// command goes to the URL it carries, only if `allow` allows it, with the default
    /// settings and no added headers.
    pub fn for_urls(name: &str, allow: UrlAllowList) -> Result<HttpParticipant, BridgeError> {
        let cfg = HttpServiceConfig::default();
        let client = client_builder(&cfg)
            .build()
            .map_err(|e| BridgeError::Client {
                service: name.into(),
                message: e.to_string(),
            })?;
        Ok(HttpParticipant {
            name: name.into(),
            target: Target::Urls(allow),
            cfg,
            client,
        })
    }

    /// The base URL for the branch's commands, or why there is none.
    fn base(&self, txn: &TxnContext) -> Result<String, String> {
        match &self.target {
            Target::Fixed(base) => Ok(base.clone()),
            Target::Urls(allow) => match &txn.url {
                None => Err(format!(
                    "{} runs only steps named by a URL, and the command carries none",
                    self.name
                )),
                Some(url) => allow.check(url).map_err(|e| format!("{}: {e}", self.name)),
            },
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.cfg.retry_base_ms.max(1);
        let exp = base.saturating_mul(1u64 << attempt.min(16));
        let capped = exp.min(self.cfg.retry_cap_ms.max(base));
        // Jitter: between half and all of it.
        let r = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            attempt,
        );
        Duration::from_millis(capped / 2 + r % (capped / 2 + 1))
    }

    /// One request of `kind` for the branch, waiting no longer than `limit`.
    async fn call(&self, kind: &str, txn: &TxnContext, limit: Option<Duration>) -> Answer {
        let base = match self.base(txn) {
            Ok(base) => base,
            Err(why) => return Answer::Broken(why),
        };
        let body = json!({
            "txn_id": txn.txn_id,
            "step": txn.step,
            "action": txn.action,
            "payload": txn.payload,
            "attempt": txn.attempt,
            "deadline_ms": txn.deadline_ms,
        });
        let mut req = self
            .client
            .post(format!("{base}/{kind}"))
            .header(
                "Idempotency-Key",
                format!("{}:{}:{kind}", txn.txn_id, txn.step),
            )
            .header("Txcoord-Txn-Id", txn.txn_id.as_str())
            .header("Txcoord-Step", txn.step.to_string())
            .header("Txcoord-Deadline-Ms", txn.deadline_ms.to_string())
            .json(&body);
        if let Some(t) = &txn.traceparent {
            req = req.header(txcoord_proto::TRACEPARENT_HEADER, t.as_str());
        }
        if let Some(limit) = limit {
            req = req.timeout(limit.min(Duration::from_millis(self.cfg.timeout_ms.max(1))));
        }
        let mut resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Answer::Retry(format!("{kind} timed out")),
            // Trying again does not change a certificate: say so at once.
            Err(e) if refused_certificate(&e) => {
                return Answer::Broken(format!(
                    "{kind}: {base} presented a certificate the bridge does not trust ({}); \
                     is tls_ca_file set to its CA?",
                    error_chain(&e)
                ));
            }
            Err(e) => {
                return Answer::Retry(format!("{kind}: cannot reach {base}: {}", error_chain(&e)));
            }
        };
        let status = resp.status();
        let json_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.trim_start().starts_with("application/json"));
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("nowhere")
            .to_string();
        // The body, read up to the limit.
        let mut bytes = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if bytes.len() + chunk.len() > self.cfg.max_body_bytes {
                        return Answer::Broken(format!(
                            "{kind} answered {status} with a body over {} bytes",
                            self.cfg.max_body_bytes
                        ));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) if status.is_server_error() => {
                    return Answer::Retry(format!("{kind} answered {status}: {e}"));
                }
                Err(e) => return Answer::Retry(format!("{kind}: the answer broke off: {e}")),
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        let parsed = || -> Result<Option<Value>, String> {
            if bytes.iter().all(u8::is_ascii_whitespace) {
                return Ok(None);
            }
            if !json_type {
                return Err(format!(
                    "{kind} answered {status} with a body that is not application/json"
                ));
            }
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{kind} answered {status} with a body that is not JSON: {e}"))
        };
        match status.as_u16() {
            200 | 204 => match parsed() {
                Ok(v) => Answer::Yes(v),
                Err(e) => Answer::Broken(e),
            },
            409 => {
                let reason = parsed()
                    .ok()
                    .flatten()
                    .and_then(|v| v.get("reason").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_else(|| text.chars().take(1024).collect());
                Answer::Refused(if reason.is_empty() {
                    "refused (409, no reason given)".into()
                } else {
                    reason
                })
            }
            202 | 425 => Answer::InProgress,
            410 => Answer::Gone,
            s if (500..=599).contains(&s) => Answer::Retry(format!("{kind} answered {status}")),
            s if (300..=399).contains(&s) => Answer::Broken(format!(
                "{kind} answered {status} (a redirect to {location:?}): redirects are not followed"
            )),
            _ => Answer::Broken(format!(
                "{kind} answered {status}: {}",
                text.chars().take(200).collect::<String>()
            )),
        }
    }

    /// Prepare or execute: tries until the deadline, then gives the last error.
    async fn until_deadline(&self, kind: &str, txn: &TxnContext) -> Result<Option<Value>, Ended> {
        let mut attempt = 0u32;
        let mut last = String::from("no answer");
        loop {
            let left = if txn.deadline_ms == 0 {
                None
            } else {
                // A little past the deadline: the coordinator's own timeout decides first.
                let left = (txn.deadline_ms + 250).saturating_sub(now_ms());
                if left == 0 {
                    return Err(Ended::Unreachable(last));
                }
                Some(Duration::from_millis(left))
            };
            match self.call(kind, txn, left).await {
                Answer::Yes(v) => return Ok(v),
                Answer::Refused(r) => return Err(Ended::Refused(r)),
                Answer::Gone => {
                    return Err(Ended::Broken(format!(
                        "{kind} answered 410 Gone, which only commit, abort and compensate may"
                    )));
                }
                Answer::Broken(m) => return Err(Ended::Broken(m)),
                Answer::InProgress => last = format!("{kind} still in progress"),
                Answer::Retry(m) => last = m,
            }
            tracing::debug!(service = %self.name, txn_id = %txn.txn_id, %last, "trying again");
            let mut wait = self.backoff(attempt);
            if let Some(left) = left {
                wait = wait.min(left);
            }
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// Commit, abort or compensate: tries `max_attempts` times, then hands the command back
    /// (the SDK delivers it again: it is retried until confirmed).
    async fn until_confirmed(&self, kind: &str, txn: &TxnContext) -> Result<(), ServiceError> {
        let mut last = String::new();
        for attempt in 0..self.cfg.max_attempts.max(1) {
            match self.call(kind, txn, None).await {
                Answer::Yes(_) | Answer::Gone => return Ok(()),
                Answer::InProgress => last = format!("{kind} still in progress"),
                Answer::Retry(m) => last = m,
                Answer::Refused(r) => {
                    last = format!("{kind} answered 409 ({r}), which only prepare and execute may")
                }
                Answer::Broken(m) => last = m,
            }
            tokio::time::sleep(self.backoff(attempt)).await;
        }
        tracing::warn!(service = %self.name, txn_id = %txn.txn_id, step = txn.step, error = %last,
            "{kind} not confirmed yet; it is delivered again");
        Err(ServiceError(format!("{}: {last}", self.name)))
    }
}

/// How a prepare or execute ended without a yes.
enum Ended {
    Refused(String),
    Unreachable(String),
    Broken(String),
}

impl HttpParticipant {
    /// After a prepare that got no clear answer (none in time, or a malformed one) the
    /// service may still have applied it: it is told to abort (its abort-before-prepare
    /// rule covers a prepare that arrives later). Best effort: the vote is abort anyway.
    async fn release_unknown(&self, txn: &TxnContext) {
        let abort = TxnContext {
            deadline_ms: 0,
            ..txn.clone()
        };
        if let Err(e) = self.until_confirmed("abort", &abort).await {
            tracing::warn!(service = %self.name, txn_id = %txn.txn_id, step = txn.step, error = %e,
                "abort after an unanswered prepare not confirmed; the coordinator's abort follows");
        }
    }
}

impl Participant for HttpParticipant {
    async fn prepare(&self, txn: &TxnContext, _action: &str, _payload: &Value) -> Vote {
        // Nothing is sent to a URL the list refuses, so there is nothing to release either.
        if let Err(why) = self.base(txn) {
            return Vote::Abort(why);
        }
        match self.until_deadline("prepare", txn).await {
            Ok(Some(v)) if v.get("vote").and_then(Value::as_str) == Some("read_only") => {
                Vote::ReadOnly
            }
            Ok(_) => Vote::Ready,
            Err(Ended::Refused(r)) => Vote::Abort(r),
            Err(Ended::Unreachable(last)) => {
                self.release_unknown(txn).await;
                Vote::Abort(format!(
                    "{}: no answer before the deadline ({last})",
                    self.name
                ))
            }
            Err(Ended::Broken(m)) => {
                self.release_unknown(txn).await;
                Vote::Abort(format!("{}: {m}", self.name))
            }
        }
    }

    async fn commit(&self, txn: &TxnContext) -> Result<(), ServiceError> {
        self.until_confirmed("commit", txn).await
    }

    async fn abort(&self, txn: &TxnContext) -> Result<(), ServiceError> {
        self.until_confirmed("abort", txn).await
    }

    async fn execute(&self, txn: &TxnContext, _action: &str, _payload: &Value) -> StepResult {
        if let Err(why) = self.base(txn) {
            return StepResult::Failed {
                reason: why,
                retryable: false,
            };
        }
        match self.until_deadline("execute", txn).await {
            Ok(_) => StepResult::Done,
            Err(Ended::Refused(r)) => StepResult::Failed {
                reason: r,
                retryable: false,
            },
            Err(Ended::Unreachable(last)) => StepResult::Failed {
                reason: format!("{}: no answer before the deadline ({last})", self.name),
                retryable: true,
            },
            Err(Ended::Broken(m)) => StepResult::Failed {
                reason: format!("{}: {m}", self.name),
                retryable: false,
            },
        }
    }

    async fn compensate(&self, txn: &TxnContext) -> Result<(), ServiceError> {
        self.until_confirmed("compensate", txn).await
    }
}
