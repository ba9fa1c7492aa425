//! A client of the coordinator: submits requests on `<prefix>.submit` and waits for their
//! final events ([`Outcomes`]); runs one through `<prefix>.api.execute` (which can answer at
//! the durable decision); asks `<prefix>.api.status`; reads a transaction's log. Used
//! by the CLI, the tests, the demo and the benchmark.

mod outcomes;

pub(crate) use outcomes::WaitList;
pub use outcomes::{Outcomes, Watch};

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use serde_json::Value;

use crate::nats::{
    Expect, NatsError, StreamSettings, ensure_streams, publish_durable, publish_durable_with,
};
use crate::proto::{ApiError, StatusRequest, Subjects, TransactionEvent, Until, WAIT_HEADER};

/// A client failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// NATS trouble.
    #[error(transparent)]
    Nats(#[from] NatsError),
    /// A request that cannot be submitted as given.
    #[error("{0}")]
    Invalid(String),
    /// No final event arrived in time.
    #[error("no outcome for {txn_id} within {waited:?}")]
    TimedOut {
        /// The transaction.
        txn_id: String,
        /// How long we waited.
        waited: Duration,
    },
    /// The coordinator answered with an error.
    #[error("coordinator: {0}")]
    Api(String),
    /// Could not subscribe to the outcomes.
    #[error("cannot subscribe to {subject}: {source}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// Why.
        source: async_nats::SubscribeError,
    },
}

/// A connection to a coordinator's subjects.
#[derive(Clone)]
pub struct Client {
    nc: async_nats::Client,
    js: jetstream::Context,
    subjects: Subjects,
    events: jetstream::stream::Stream,
    outcomes: Outcomes,
    /// Where it submits: `<prefix>.submit`, or `<prefix>.submit.<client>` ([`Client::as_client`]).
    submit: String,
    /// Where it executes: `<prefix>.api.execute`, or `<prefix>.api.execute.<client>`.
    execute: String,
}

impl Client {
    /// Opens the streams (creating them if the coordinator has not yet).
    pub async fn new(nc: async_nats::Client, prefix: &str) -> Result<Client, ClientError> {
        let subjects = Subjects::new(prefix);
        let js = crate::nats::jetstream(nc.clone(), Duration::from_secs(5));
        let streams = ensure_streams(&js, &subjects, &StreamSettings::default()).await?;
        let submit = subjects.submit();
        let execute = subjects.api("execute");
        let outcomes = Outcomes::start(&nc, subjects.clone(), streams.events.clone()).await?;
        Ok(Client {
            nc,
            js,
            subjects,
            events: streams.events,
            outcomes,
            submit,
            execute,
        })
    }

    /// Submits as the client `name` (on `<prefix>.submit.<name>`): the coordinator gives
    /// each named client its own share of the running transactions, and `txcoord auth`'s
    /// permissions let each client user publish only on its own submit subject.
    pub fn as_client(mut self, name: &str) -> Client {
        self.submit = self.subjects.submit_as(name);
        self.execute = self.subjects.api_execute_as(name);
        self
    }

    /// As [`Client::as_client`] when `name` is not empty (the `submit_as` configuration key).
    pub fn submitting_as(self, name: &str) -> Client {
        if name.is_empty() {
            self
        } else {
            self.as_client(name)
        }
    }

    /// The subjects used.
    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// The last recorded event of a transaction, read from the stream.
    pub async fn last_event(&self, txn_id: &str) -> Option<TransactionEvent> {
        last_record_of(&self.events, &self.subjects, txn_id).await
    }

    /// Every recorded event of a transaction, oldest first.
    pub async fn history(&self, txn_id: &str) -> Vec<TransactionEvent> {
        self.read_all(&self.subjects.events(txn_id)).await
    }

    /// Every submission error recorded on `<prefix>.errors`, oldest first.
    pub async fn errors(&self) -> Vec<crate::proto::SubmitError> {
        self.read_all(&self.subjects.errors()).await
    }

    async fn read_all<T: serde::de::DeserializeOwned>(&self, subject: &str) -> Vec<T> {
        read_log(&self.events, subject).await
    }

    /// The submissions stream (bad submissions stay there for inspection).
    pub async fn submission(&self, seq: u64) -> Option<bytes::Bytes> {
        let js = self.js.clone();
        let stream = js.get_stream(self.subjects.submit_stream()).await.ok()?;
        stream.direct_get(seq).await.ok().map(|m| m.payload)
    }

    /// Publishes raw bytes on the submit subject (for tools and tests of bad input).
    pub async fn submit_raw(&self, body: bytes::Bytes, msg_id: &str) -> Result<u64, ClientError> {
        let ack = publish_durable(
            &self.js,
            &self.submit,
            msg_id,
            body,
            Expect::default(),
            Some(5),
        )
        .await?;
        Ok(ack.sequence)
    }

    /// Submits requests (JSON objects; a missing txn_id is filled in) and waits up to
    /// `timeout` for each one's final event. Results come back in input order.
    pub async fn submit_and_wait(
        &self,
        requests: Vec<Value>,
        timeout: Duration,
    ) -> Vec<Result<TransactionEvent, ClientError>> {
        self.submit_and_watch(requests, timeout, |_, _| {}).await
    }

    /// As [`Client::submit_and_wait`], calling `on_done(event, latency)` as each final event
    /// arrives; the latency runs from the request's publish to the event's arrival.
    pub async fn submit_and_watch(
        &self,
        requests: Vec<Value>,
        timeout: Duration,
        on_done: impl FnMut(&TransactionEvent, Duration),
    ) -> Vec<Result<TransactionEvent, ClientError>> {
        self.submit_until(requests, Until::Outcome, timeout, on_done)
            .await
    }

    /// As [`Client::submit_and_watch`], each waiting `until`: the outcome, or with
    /// [`Until::Decided`] the decision as soon as the coordinator has made it durable. Each
    /// submission names this client's inbox ([`Outcomes::header_for`]), where the coordinator
    /// that writes the record publishes it, so the answer takes no round trip through the
    /// API and this client hears of no other transaction. The submission is durable, so a
    /// coordinator that dies first leaves it to its successor; if that one resumed it from
    /// the log, the wait finds the answer in the log and the transaction's events.
    pub async fn submit_until(
        &self,
        requests: Vec<Value>,
        until: Until,
        timeout: Duration,
        mut on_done: impl FnMut(&TransactionEvent, Duration),
    ) -> Vec<Result<TransactionEvent, ClientError>> {
        let mut results: Vec<Option<Result<TransactionEvent, ClientError>>> =
            Vec::with_capacity(requests.len());
        let mut pending = futures::stream::FuturesUnordered::new();
        for (index, mut req) in requests.into_iter().enumerate() {
            let id = match Self::txn_id_of(&mut req) {
                Ok(id) => id,
                Err(e) => {
                    results.push(Some(Err(e)));
                    continue;
                }
            };
            results.push(None);
            // Waiting starts before the publish, so the outcome cannot slip past.
            let watch = self.outcomes.watch_submitted(&id, until);
            let body = bytes::Bytes::from(serde_json::to_vec(&req).unwrap_or_default());
            let (js, subject) = (self.js.clone(), self.submit.clone());
            let header = self
                .outcomes
                .header_for(until)
                .map(|(name, value)| (name, value.to_string()));
            let sent = tokio::time::Instant::now();
            let publish = tokio::spawn(async move {
                let headers: Vec<(&str, &str)> =
                    header.iter().map(|(n, v)| (*n, v.as_str())).collect();
                publish_durable_with(
                    &js,
                    &subject,
                    &id,
                    &headers,
                    body,
                    Expect::default(),
                    Some(10),
                )
                .await
            });
            pending.push(async move {
                let outcome = match publish.await {
                    Ok(Err(e)) => Err(ClientError::Nats(e)),
                    _ => watch.outcome(timeout.saturating_sub(sent.elapsed())).await,
                };
                (index, sent, outcome)
            });
        }
        while let Some((index, sent, outcome)) = pending.next().await {
            if let Ok(ev) = &outcome {
                on_done(ev, sent.elapsed());
            }
            results[index] = Some(outcome);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ClientError::Invalid("no result".into()))))
            .collect()
    }

    /// The outcomes this client waits through.
    pub fn outcomes(&self) -> &Outcomes {
        &self.outcomes
    }

    /// Starts waiting for a transaction's outcome (see [`Outcomes`]).
    pub fn watch(&self, txn_id: &str) -> Watch {
        self.outcomes.watch(txn_id)
    }

    /// The request's txn_id, filled in (a UUIDv7) when it has none.
    fn txn_id_of(req: &mut Value) -> Result<String, ClientError> {
        let Some(obj) = req.as_object_mut() else {
            return Err(ClientError::Invalid(
                "a request must be a JSON object".into(),
            ));
        };
        match obj.get("txn_id") {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(ClientError::Invalid("txn_id must be a string".into())),
            None => {
                let id = uuid::Uuid::now_v7().to_string();
                obj.insert("txn_id".into(), Value::String(id.clone()));
                Ok(id)
            }
        }
    }

    /// Asks the coordinator for a transaction's latest state.
    pub async fn status(&self, txn_id: &str) -> Result<TransactionEvent, ClientError> {
        let body = serde_json::to_vec(&StatusRequest {
            txn_id: txn_id.to_string(),
        })
        .unwrap_or_default();
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            self.nc.request(self.subjects.api("status"), body.into()),
        )
        .await
        .map_err(|_| ClientError::Api("no answer from txn.api.status".into()))?
        .map_err(|e| ClientError::Api(e.to_string()))?;
        event_or_error(&reply.payload)
    }

    /// Runs one request through the coordinator (`<prefix>.api.execute`, or
    /// `<prefix>.api.execute.<client>` after [`Client::as_client`]) and answers its outcome,
    /// or with [`Until::Decided`] its decision as soon as that is durable (`committing` or
    /// `aborting`; the participants apply it afterwards). A missing txn_id is filled in.
    /// Unlike [`Client::submit_and_wait`], it needs a coordinator that is running.
    pub async fn execute(
        &self,
        mut request: Value,
        until: Until,
        timeout: Duration,
    ) -> Result<TransactionEvent, ClientError> {
        let txn_id = Self::txn_id_of(&mut request)?;
        let body = serde_json::to_vec(&request).unwrap_or_default();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(WAIT_HEADER, until.as_str());
        let reply = self
            .nc
            .send_request(
                self.execute.clone(),
                async_nats::Request::new()
                    .payload(body.into())
                    .headers(headers)
                    .timeout(Some(timeout)),
            )
            .await
            .map_err(|e| match e.kind() {
                async_nats::RequestErrorKind::TimedOut => ClientError::TimedOut {
                    txn_id,
                    waited: timeout,
                },
                _ => ClientError::Api(format!("{}: {e}", self.execute)),
            })?;
        event_or_error(&reply.payload)
    }
}

/// An API answer: a transaction's event, or the coordinator's error.
fn event_or_error(payload: &[u8]) -> Result<TransactionEvent, ClientError> {
    if let Ok(ev) = serde_json::from_slice::<TransactionEvent>(payload) {
        return Ok(ev);
    }
    match serde_json::from_slice::<ApiError>(payload) {
        Ok(e) => Err(ClientError::Api(e.error)),
        Err(_) => Err(ClientError::Api(
            String::from_utf8_lossy(payload).into_owned(),
        )),
    }
}

/// The end of one transaction's log as its readers and writers must see it.
#[derive(Debug, Clone, Default)]
pub struct LogTail {
    /// The sequence of the last message on the log's subject (0: none), whatever it is: the
    /// sequence the next fenced write must expect.
    pub last_seq: u64,
    /// The last message that is one of this transaction's records.
    pub record: Option<TailRecord>,
}

/// A record found at the end of a log.
#[derive(Debug, Clone)]
pub struct TailRecord {
    /// The record.
    pub event: TransactionEvent,
    /// Its stream sequence.
    pub seq: u64,
    /// The `Nats-Msg-Id` it was written with.
    pub msg_id: Option<String>,
}

/// Every message on `subject` of the events stream that parses as `T`, oldest first.
pub async fn read_log<T: serde::de::DeserializeOwned>(
    events: &jetstream::stream::Stream,
    subject: &str,
) -> Vec<T> {
    let mut out = Vec::new();
    let mut seq = 0;
    while let Ok(msg) = events
        .direct_get_next_for_subject(subject.to_string(), Some(seq + 1))
        .await
    {
        seq = msg.sequence;
        if let Ok(v) = serde_json::from_slice(&msg.payload) {
            out.push(v);
        }
    }
    out
}

/// Reads the end of `txn_id`'s log. Normally its last message is its last record; if that
/// is something else (anyone allowed to publish there, or a confused deputy, may have stored
/// anything), the log is read from the start and the last readable record of this
/// transaction is the record, while `last_seq` stays the foreign message's.
pub async fn log_tail(
    events: &jetstream::stream::Stream,
    subjects: &Subjects,
    txn_id: &str,
) -> Result<LogTail, jetstream::stream::DirectGetError> {
    use jetstream::stream::DirectGetErrorKind;
    let subject = subjects.events(txn_id);
    let record = |m: &jetstream::message::StreamMessage| {
        serde_json::from_slice::<TransactionEvent>(&m.payload)
            .ok()
            .filter(|e| e.txn_id == txn_id)
            .map(|event| TailRecord {
                event,
                seq: m.sequence,
                msg_id: m
                    .headers
                    .get(async_nats::header::NATS_MESSAGE_ID)
                    .map(|v| v.as_str().to_string()),
            })
    };
    let last = match events.direct_get_last_for_subject(subject.clone()).await {
        Ok(m) => m,
        Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => return Ok(LogTail::default()),
        Err(e) => return Err(e),
    };
    let mut tail = LogTail {
        last_seq: last.sequence,
        record: record(&last),
    };
    if tail.record.is_some() {
        return Ok(tail);
    }
    tracing::warn!(%subject, seq = last.sequence, "the last message of a log is not one of its records; reading the log from the start");
    let mut seq = 0;
    while seq < tail.last_seq {
        match events
            .direct_get_next_for_subject(subject.clone(), Some(seq + 1))
            .await
        {
            Ok(m) => {
                seq = m.sequence;
                if let Some(r) = record(&m) {
                    tail.record = Some(r);
                }
            }
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(tail)
}

/// The last record of `txn_id`'s log that is one of its events (see [`log_tail`]); `None`
/// when it has none or the log cannot be read.
pub async fn last_record_of(
    events: &jetstream::stream::Stream,
    subjects: &Subjects,
    txn_id: &str,
) -> Option<TransactionEvent> {
    log_tail(events, subjects, txn_id)
        .await
        .ok()?
        .record
        .map(|r| r.event)
}
