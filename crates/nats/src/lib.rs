//! NATS plumbing shared by the coordinator, the participant SDK and the CLI: connecting
//! with the configured credentials, creating the streams, and durable publishes that retry
//! under the same `Nats-Msg-Id` until JetStream acknowledges them.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;

use txcoord_proto::Subjects;

/// How to reach and authenticate to NATS.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsAuth {
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password (with `user`).
    pub password: Option<String>,
    /// Token authentication.
    pub token: Option<String>,
    /// A `.creds` file (JWT and NKey seed).
    pub creds_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust for TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS, with `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// Client key (PEM), with `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Refuse to connect without TLS.
    pub tls_required: bool,
    /// The prefix of this connection's reply inboxes (`_INBOX` when not set). `txcoord auth`
    /// gives each identity its own (`_INBOX_<name>`) and lets it subscribe only there.
    pub inbox_prefix: Option<String>,
}

/// Where JetStream keeps the streams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// On disk: survives a server restart.
    #[default]
    File,
    /// In memory: fast, lost on restart.
    Memory,
}

/// A failure talking to NATS.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// Could not connect.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// The URL tried.
        url: String,
        /// Why.
        source: async_nats::ConnectError,
    },
    /// Could not read the credentials file.
    #[error("cannot read NATS credentials file {path}: {source}")]
    Credentials {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Could not create or read a stream.
    #[error("stream {stream}: {message}")]
    Stream {
        /// The stream.
        stream: String,
        /// What went wrong.
        message: String,
    },
    /// A publish failed for good.
    #[error("publish to {subject} failed: {source}")]
    Publish {
        /// The subject.
        subject: String,
        /// Why.
        source: jetstream::context::PublishError,
    },
    /// The process is shutting down.
    #[error("shutting down")]
    Shutdown,
}

/// Connects with the credentials and TLS settings of `auth`. With `retry`, keeps trying
/// until the server is reachable (the coordinator and services may start before NATS).
pub async fn connect(
    url: &str,
    auth: &NatsAuth,
    name: &str,
    retry: bool,
) -> Result<async_nats::Client, NatsError> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5));
    if let (Some(user), Some(pass)) = (&auth.user, &auth.password) {
        opts = opts.user_and_password(user.clone(), pass.clone());
    }
    if let Some(token) = &auth.token {
        opts = opts.token(token.clone());
    }
    if let Some(path) = &auth.creds_file {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|source| NatsError::Credentials {
                path: path.display().to_string(),
                source,
            })?;
    }
    if let Some(ca) = &auth.tls_ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&auth.tls_cert_file, &auth.tls_key_file) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if auth.tls_required {
        opts = opts.require_tls(true);
    }
    if let Some(prefix) = &auth.inbox_prefix {
        opts = opts.custom_inbox_prefix(prefix.clone());
    }
    if retry {
        opts = opts.retry_on_initial_connect();
    }
    let addrs: Vec<String> = url.split(',').map(|u| u.trim().to_string()).collect();
    let addrs: Vec<async_nats::ServerAddr> = addrs
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect::<Vec<_>>();
    opts.connect(addrs.as_slice())
        .await
        .map_err(|source| NatsError::Connect {
            url: url.to_string(),
            source,
        })
}

/// A JetStream context whose publishes wait at most `timeout` for an acknowledgement and
/// apply backpressure instead of failing when many acks are outstanding.
pub fn jetstream(client: async_nats::Client, timeout: Duration) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(timeout)
        .max_ack_inflight(20_000)
        .backpressure_on_inflight(true)
        .build(client)
}

/// Settings of the four streams.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamSettings {
    /// 1 or 3.
    pub replicas: usize,
    /// File or memory.
    pub storage: Storage,
    /// Submission retention.
    pub submit_max_age: Duration,
    /// Event (log) retention; zero is forever.
    pub events_max_age: Duration,
    /// Command retention (a safety net: acked commands are removed).
    pub command_max_age: Duration,
    /// Reply retention by age.
    pub reply_max_age: Duration,
    /// Reply retention by size, in bytes.
    pub reply_max_bytes: i64,
    /// JetStream's message-id duplicate window.
    pub duplicate_window: Duration,
}

impl Default for StreamSettings {
    /// The coordinator's defaults (its configuration keys `stream_replicas`, `storage`,
    /// `*_max_age_secs`, `reply_max_bytes`, `duplicate_window_secs`).
    fn default() -> Self {
        StreamSettings {
            replicas: 1,
            storage: Storage::File,
            submit_max_age: Duration::from_secs(7 * 24 * 3600),
            events_max_age: Duration::ZERO,
            command_max_age: Duration::from_secs(7 * 24 * 3600),
            reply_max_age: Duration::from_secs(3600),
            reply_max_bytes: 1 << 30,
            duplicate_window: Duration::from_secs(120),
        }
    }
}

/// The streams txcoord uses, each created if missing (an existing stream is used as it is).
#[derive(Debug, Clone)]
pub struct Streams {
    /// `<prefix>.submit`, kept for inspection.
    pub submit: stream::Stream,
    /// `<prefix>.events.>` and `<prefix>.errors`: the coordinator's log.
    pub events: stream::Stream,
    /// `<prefix>.cmd.>`, a work queue read by each service's durable consumer.
    pub commands: stream::Stream,
    /// `<prefix>.reply.>`, bounded by age and size, read by the coordinator without acks.
    pub replies: stream::Stream,
}

/// Creates (or opens) every stream.
pub async fn ensure_streams(
    js: &jetstream::Context,
    subjects: &Subjects,
    settings: &StreamSettings,
) -> Result<Streams, NatsError> {
    let base = |name: String, subjects: Vec<String>| stream::Config {
        name,
        subjects,
        num_replicas: settings.replicas,
        storage: match settings.storage {
            Storage::File => stream::StorageType::File,
            Storage::Memory => stream::StorageType::Memory,
        },
        duplicate_window: settings.duplicate_window,
        allow_direct: true,
        ..Default::default()
    };
    let submit = stream::Config {
        max_age: settings.submit_max_age,
        ..base(
            subjects.submit_stream(),
            vec![subjects.submit(), subjects.submit_named()],
        )
    };
    let events = events_config(
        subjects,
        stream::Config {
            max_age: settings.events_max_age,
            ..base(subjects.events_stream(), Vec::new())
        },
    );
    let commands = stream::Config {
        max_age: settings.command_max_age,
        retention: stream::RetentionPolicy::WorkQueue,
        ..base(subjects.command_stream(), vec![subjects.commands_all()])
    };
    // Replies are not a work queue: removing every acknowledged reply costs the server an
    // ack and a delete per reply, and buys nothing, because a reply the coordinator has not
    // acted on when it crashes is made again by its resend. They expire by age and size.
    let replies = stream::Config {
        max_age: settings.reply_max_age,
        max_bytes: settings.reply_max_bytes,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        ..base(subjects.reply_stream(), vec![subjects.replies_all()])
    };
    Ok(Streams {
        submit: open_stream(js, submit).await?,
        events: open_events_stream(js, events).await?,
        commands: open_stream(js, commands).await?,
        replies: open_reply_stream(js, replies).await?,
    })
}

/// The events stream's subjects on top of `base`: it takes log records on
/// `<prefix>.log.<id>` (and submission errors on `<prefix>.errors`), stores each record as
/// `<prefix>.events.<id>`, and republishes what it stored there. So a write it refuses
/// reaches no subscriber, and nothing published straight on `<prefix>.events.<id>` is
/// stored ([`Subjects::log`]).
fn events_config(subjects: &Subjects, base: stream::Config) -> stream::Config {
    let events = format!("{}.events.{{{{wildcard(1)}}}}", subjects.prefix());
    stream::Config {
        subjects: vec![subjects.log_all(), subjects.errors()],
        subject_transform: Some(stream::SubjectTransform {
            source: subjects.log_all(),
            destination: events.clone(),
        }),
        republish: Some(stream::Republish {
            source: format!("{}.events.*", subjects.prefix()),
            destination: events,
            headers_only: false,
        }),
        ..base
    }
}

/// Opens the events stream. One created by an older txcoord (records published and stored
/// on `<prefix>.events.<id>`) is updated in place: its records keep their subjects, so
/// every read by subject goes on as before; only where records are written changes.
async fn open_events_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, NatsError> {
    let name = config.name.clone();
    let stream = get_or_create(js, &config).await?;
    let have = &stream.cached_info().config;
    if have.subjects == config.subjects
        && have.subject_transform == config.subject_transform
        && have.republish == config.republish
    {
        return Ok(stream);
    }
    let mut updated = have.clone();
    updated.subjects = config.subjects.clone();
    updated.subject_transform = config.subject_transform.clone();
    updated.republish = config.republish.clone();
    tracing::info!(stream = %name, subjects = ?updated.subjects,
        "events stream from an older txcoord: records are now written on the log subjects and republished once stored");
    update(js, &updated, "cannot move the log to its write subjects").await
}

/// Updates a stream to `config` and opens it again; `failed` says what did not happen.
async fn update(
    js: &jetstream::Context,
    config: &stream::Config,
    failed: &str,
) -> Result<stream::Stream, NatsError> {
    let failure = |e: &dyn std::fmt::Display, what: &str| NatsError::Stream {
        stream: config.name.clone(),
        message: format!("{what}: {e}"),
    };
    js.update_stream(config)
        .await
        .map_err(|e| failure(&e, failed))?;
    js.get_stream(&config.name)
        .await
        .map_err(|e| failure(&e, "cannot open it after the update"))
}

/// Opens the reply stream. One created by an older txcoord as a work queue cannot be turned
/// into a limits stream in place; it holds only replies, which resends make again, so it is
/// replaced.
async fn open_reply_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, NatsError> {
    let name = config.name.clone();
    let stream = open_stream(js, config.clone()).await?;
    // The info the create-or-open answer carried: no second request (which a cluster still
    // electing leaders may refuse).
    let info = stream.cached_info();
    if info.config.retention != stream::RetentionPolicy::WorkQueue {
        return Ok(stream);
    }
    tracing::warn!(stream = %name, messages = info.state.messages,
        "replacing a work-queue reply stream from an older txcoord with a limits stream; unread replies are made again by resends");
    js.delete_stream(&name)
        .await
        .map_err(|e| NatsError::Stream {
            stream: name.clone(),
            message: format!("cannot replace the work-queue reply stream: {e}"),
        })?;
    open_stream(js, config).await
}

async fn open_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, NatsError> {
    let stream = get_or_create(js, &config).await?;
    add_subjects(js, stream, &config).await
}

/// Runs a setup step (opening or creating a stream, a bucket, a consumer) until it
/// succeeds, fails in a way `transient` says no retry changes, or `attempts` tries have
/// failed, waiting 100 ms after the first failure and twice as long after each next one, up
/// to 2 s: JetStream may still be starting, or a cluster electing a leader (30 tries wait
/// about 50 s in all). The error is the last one.
async fn retry_setup<T, E, F, Fut>(
    what: &str,
    attempts: u32,
    transient: impl Fn(&E) -> bool,
    mut op: F,
) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut delay = Duration::from_millis(100);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match op().await {
            Ok(done) => return Ok(done),
            Err(e) if attempt < attempts && transient(&e) => {
                tracing::debug!(%what, error = %e, attempt, "JetStream not ready, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The stream named in `config`, created with it when missing. JetStream may still be
/// starting (or electing a leader on a cluster): retries a while.
async fn get_or_create(
    js: &jetstream::Context,
    config: &stream::Config,
) -> Result<stream::Stream, NatsError> {
    retry_setup(
        &format!("stream {}", config.name),
        30,
        |_| true,
        || js.get_or_create_stream(config.clone()),
    )
    .await
    .map_err(|e| NatsError::Stream {
        stream: config.name.clone(),
        message: e.to_string(),
    })
}

/// The durable pull consumer `config.durable_name` of `stream`, created with `config` when
/// missing. A process that starts while JetStream is starting, or while a cluster elects the
/// stream's leader, waits for it (as for the streams) instead of failing at once; a refusal
/// no retry changes (a bad name or filter) fails at once. The error is the last failure, as
/// text.
pub async fn durable_consumer(
    stream: &stream::Stream,
    config: jetstream::consumer::pull::Config,
) -> Result<jetstream::consumer::PullConsumer, String> {
    use jetstream::stream::ConsumerErrorKind as Kind;
    let name = config.durable_name.clone().unwrap_or_default();
    let transient = |e: &jetstream::stream::ConsumerError| match e.kind() {
        Kind::TimedOut | Kind::Request | Kind::Other => true,
        // 503: JetStream temporarily unavailable (no leader yet); 500: a server error; 404:
        // a stream a new leader does not know yet.
        Kind::JetStream(js) => matches!(js.code(), 404 | 500 | 503),
        Kind::InvalidConsumerType | Kind::InvalidName => false,
    };
    retry_setup(&format!("durable consumer {name}"), 30, transient, || {
        stream.get_or_create_consumer(&name, config.clone())
    })
    .await
    .map_err(|e| e.to_string())
}

/// A stream made by an older txcoord may lack subjects this one adds (the named submit
/// subjects): they are added, the rest of its configuration kept.
async fn add_subjects(
    js: &jetstream::Context,
    stream: stream::Stream,
    want: &stream::Config,
) -> Result<stream::Stream, NatsError> {
    let have = &stream.cached_info().config;
    let missing: Vec<String> = want
        .subjects
        .iter()
        .filter(|s| !have.subjects.contains(s))
        .cloned()
        .collect();
    if missing.is_empty() {
        return Ok(stream);
    }
    let mut config = have.clone();
    config.subjects.extend(missing);
    tracing::info!(stream = %config.name, subjects = ?config.subjects, "adding subjects to a stream from an older txcoord");
    let failed = format!("cannot add subjects {:?}", config.subjects);
    update(js, &config, &failed).await
}

/// Opens the KV bucket `bucket`, creating it (history 1, `replicas`, and `max_age` if not
/// zero) when missing. Retries a while: JetStream may still be starting, or a cluster
/// electing a leader. The error is the last failure, as text.
///
/// On more than one replica its reads go to the stream's leader ([`consistent_reads`]).
pub async fn key_value(
    js: &jetstream::Context,
    bucket: &str,
    replicas: usize,
    max_age: Duration,
) -> Result<jetstream::kv::Store, String> {
    let store = open_bucket(js, bucket, replicas, max_age).await?;
    consistent_reads(js, store).await
}

/// A bucket's reads made consistent on a cluster. A KV bucket allows direct gets (the KV
/// API creates it so), and on more than one replica any replica answers one, a follower
/// that lags behind included: a record read that way can be older than one this very
/// process wrote a moment ago. Nothing fences a decision taken from such a read (a
/// participant that finds no record runs its prepare again; a service that finds no hold
/// releases nothing), so on more than one replica the bucket is set to refuse direct gets,
/// and reads go through the stream's leader. On one replica the only copy answers, and
/// direct gets stay. Decided from the stream info the bucket was opened with: no request
/// more at start-up unless the bucket must change.
async fn consistent_reads(
    js: &jetstream::Context,
    store: jetstream::kv::Store,
) -> Result<jetstream::kv::Store, String> {
    let have = &store.stream.cached_info().config;
    if have.num_replicas <= 1 || !have.allow_direct {
        return Ok(store);
    }
    let config = stream::Config {
        allow_direct: false,
        ..have.clone()
    };
    tracing::info!(bucket = %store.name, replicas = have.num_replicas,
        "KV bucket on several replicas: its reads now go to the stream's leader");
    retry_setup(
        &format!("KV bucket {} (leader reads)", store.name),
        20,
        |_| true,
        || js.update_stream(&config),
    )
    .await
    .map_err(|e| e.to_string())?;
    let name = store.name.clone();
    retry_setup(
        &format!("KV bucket {name}"),
        20,
        |_| true,
        || js.get_key_value(&name),
    )
    .await
    .map_err(|e| e.to_string())
}

async fn open_bucket(
    js: &jetstream::Context,
    bucket: &str,
    replicas: usize,
    max_age: Duration,
) -> Result<jetstream::kv::Store, String> {
    retry_setup(
        &format!("KV bucket {bucket}"),
        20,
        |_| true,
        || async {
            match js.get_key_value(bucket).await {
                Ok(store) => Ok(store),
                Err(_) => js
                    .create_key_value(jetstream::kv::Config {
                        bucket: bucket.to_string(),
                        history: 1,
                        num_replicas: replicas,
                        max_age,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string()),
            }
        },
    )
    .await
}

/// What a durable publish is asked to guarantee besides the message id.
#[derive(Debug, Clone, Copy, Default)]
pub struct Expect {
    /// `Nats-Expected-Last-Subject-Sequence`: 0 means "nothing on this subject yet".
    pub last_subject_sequence: Option<u64>,
}

/// Whether a failed publish may succeed if tried again with the same message id: timeouts,
/// lost connections, a stream not there yet, and any refusal of the stream except the ones
/// no retry changes (the message is larger than the stream takes, the stream is sealed). A
/// full stream or a server short of resources is transient: space may come back.
pub fn is_transient(error: &jetstream::context::PublishError) -> bool {
    use async_nats::jetstream::ErrorCode;
    match error.kind() {
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::StreamNotFound
        | PublishErrorKind::MaxAckPending => true,
        PublishErrorKind::Other => {
            let code = std::error::Error::source(error)
                .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
                .map(|e| e.error_code());
            !matches!(
                code,
                Some(ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM | ErrorCode::STREAM_SEALED)
            )
        }
        _ => false,
    }
}

/// Publishes once with a message id and waits for the acknowledgement.
pub async fn publish_once(
    js: &jetstream::Context,
    subject: &str,
    msg_id: &str,
    payload: Bytes,
    expect: Expect,
) -> Result<jetstream::publish::PublishAck, jetstream::context::PublishError> {
    publish_once_with(js, subject, msg_id, &[], payload, expect).await
}

/// [`publish_once`] with extra headers.
pub async fn publish_once_with(
    js: &jetstream::Context,
    subject: &str,
    msg_id: &str,
    headers: &[(&str, &str)],
    payload: Bytes,
    expect: Expect,
) -> Result<jetstream::publish::PublishAck, jetstream::context::PublishError> {
    let mut msg = jetstream::message::PublishMessage::build()
        .payload(payload)
        .message_id(msg_id);
    for (name, value) in headers {
        msg = msg.header(*name, *value);
    }
    if let Some(seq) = expect.last_subject_sequence {
        msg = msg.expected_last_subject_sequence(seq);
    }
    js.send_publish(subject.to_string(), msg).await?.await
}

/// Publishes with a message id, retrying transient failures with backoff up to
/// `max_attempts` times (`None`: until it succeeds). Retries are idempotent: JetStream
/// drops a second copy with the same id inside its duplicate window.
pub async fn publish_durable(
    js: &jetstream::Context,
    subject: &str,
    msg_id: &str,
    payload: Bytes,
    expect: Expect,
    max_attempts: Option<u32>,
) -> Result<jetstream::publish::PublishAck, NatsError> {
    publish_durable_with(js, subject, msg_id, &[], payload, expect, max_attempts).await
}

/// [`publish_durable`] with extra headers.
pub async fn publish_durable_with(
    js: &jetstream::Context,
    subject: &str,
    msg_id: &str,
    headers: &[(&str, &str)],
    payload: Bytes,
    expect: Expect,
    max_attempts: Option<u32>,
) -> Result<jetstream::publish::PublishAck, NatsError> {
    let mut delay = Duration::from_millis(50);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match publish_once_with(js, subject, msg_id, headers, payload.clone(), expect).await {
            Ok(ack) => return Ok(ack),
            Err(e) if is_transient(&e) && max_attempts.is_none_or(|m| attempt < m) => {
                if attempt == 3 || attempt.is_multiple_of(20) {
                    tracing::warn!(%subject, %msg_id, attempt, error = %e, "publish failing, retrying");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(source) => {
                return Err(NatsError::Publish {
                    subject: subject.to_string(),
                    source,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// An operation that fails `failures` times with `error`, then succeeds; it counts calls.
    fn flaky<'a>(
        calls: &'a Cell<u32>,
        failures: u32,
        error: &'static str,
    ) -> impl FnMut() -> std::future::Ready<Result<u32, &'static str>> + 'a {
        move || {
            calls.set(calls.get() + 1);
            std::future::ready(if calls.get() > failures {
                Ok(calls.get())
            } else {
                Err(error)
            })
        }
    }

    #[tokio::test]
    async fn a_setup_step_is_retried_through_transient_failures() {
        let calls = Cell::new(0);
        let got = retry_setup("x", 5, |_| true, flaky(&calls, 2, "unavailable")).await;
        assert_eq!(got, Ok(3));
    }

    #[tokio::test]
    async fn a_permanent_failure_ends_the_retries_at_once() {
        let calls = Cell::new(0);
        let got = retry_setup("x", 5, |e| *e != "bad name", flaky(&calls, 9, "bad name")).await;
        assert_eq!((got, calls.get()), (Err("bad name"), 1));
    }

    #[tokio::test]
    async fn the_last_failure_is_returned_when_the_attempts_run_out() {
        let calls = Cell::new(0);
        let got = retry_setup("x", 3, |_| true, flaky(&calls, 9, "unavailable")).await;
        assert_eq!((got, calls.get()), (Err("unavailable"), 3));
    }
}
