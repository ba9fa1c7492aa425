//! Configuration: defaults, then a TOML file, then `TXCOORD_*` environment variables, then
//! command-line flags; [`Config::validate`] names the field of any bad value.
//!
//! Nested keys use a double underscore in the environment: `TXCOORD_NATS__TOKEN` sets
//! `nats.token`; `TXCOORD_NATS_URL` sets `nats_url`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::engine::EngineConfig;
use crate::proto::{RequestLimits, Subjects};

/// `TXCOORD_*` variables that are not configuration keys: the log filter, the test hook, and
/// the Python the fault suite and tests use.
pub const RESERVED_ENV: &[&str] = &["TXCOORD_LOG", "TXCOORD_FAILPOINT", "TXCOORD_PYTHON"];

/// Splits `TXCOORD_*` variables into the ones that name configuration keys (`TXCOORD_NATS_URL`,
/// `TXCOORD_NATS__TOKEN`, ...) and the names of the others. The `TXCOORD_` namespace is shared
/// with scripts and tools, so an unknown variable is reported, not fatal; an unknown key in a
/// configuration file, which is ours alone, is an error.
pub fn env_layer(
    vars: impl Iterator<Item = (String, String)>,
) -> (config::Map<String, String>, Vec<String>) {
    let mut known = std::collections::HashSet::new();
    if let Ok(serde_json::Value::Object(top)) = serde_json::to_value(Config::default()) {
        for (k, v) in top {
            if let serde_json::Value::Object(inner) = v {
                known.extend(inner.keys().map(|i| format!("{k}__{i}")));
            } else {
                known.insert(k);
            }
        }
    }
    let mut keep = config::Map::new();
    let mut ignored = Vec::new();
    for (name, value) in vars {
        let Some(key) = name.strip_prefix("TXCOORD_") else {
            continue;
        };
        if known.contains(&key.to_lowercase()) {
            keep.insert(name, value);
        } else if !RESERVED_ENV.contains(&name.as_str()) {
            ignored.push(name);
        }
    }
    (keep, ignored)
}

pub use txcoord_nats::{NatsAuth, Storage};

/// Everything the coordinator and the CLI read from configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// NATS server URLs, comma separated.
    pub nats_url: String,
    /// Credentials and TLS.
    pub nats: NatsAuth,
    /// First token(s) of every subject (`txn`).
    pub subject_prefix: String,
    /// Prepare timeout when a request names none.
    pub prepare_timeout_ms: u64,
    /// Largest prepare timeout a request may ask for.
    pub max_timeout_ms: u64,
    /// First delay before phase-2 commands are resent.
    pub retry_base_ms: u64,
    /// Largest delay between resends (phase 2, compensations), and the longest an
    /// unanswered prepare or saga execute waits before it is sent again.
    pub retry_cap_ms: u64,
    /// After this long unconfirmed, phase 2 is flagged `stuck` (and still retried).
    pub stuck_after_ms: u64,
    /// How long to wait for a JetStream acknowledgement before retrying a write.
    pub publish_timeout_ms: u64,
    /// Saga: tries of an execute that fails retryably before the step counts as failed.
    pub saga_execute_attempts: u32,
    /// Saga: failed tries of a compensation before the saga shows `failed` (still retried).
    pub saga_compensation_attempts: u32,
    /// Transactions in flight at once; more submissions wait in the stream (backpressure).
    pub max_in_flight: usize,
    /// Running transactions that may involve any one service; more that involve it wait in
    /// the stream, so a flood to one service cannot starve the others. 0: no limit but
    /// `max_in_flight`.
    pub max_in_flight_per_service: usize,
    /// Running transactions any one client may have (a client is known by its submit
    /// subject, `<prefix>.submit.<client>`; plain `<prefix>.submit` names none and has no
    /// client share); more of its submissions wait in the stream. 0: no limit.
    pub max_in_flight_per_client: usize,
    /// Largest request accepted, in bytes.
    pub max_request_bytes: usize,
    /// Largest number of steps in a request.
    pub max_steps: usize,
    /// Stream replicas: 1, or 3 on a cluster.
    pub stream_replicas: usize,
    /// File or memory.
    pub storage: Storage,
    /// How long submissions are kept (for inspection), in seconds; 0 keeps them forever.
    pub submit_max_age_secs: u64,
    /// How long events (the log) are kept, in seconds; 0 keeps them forever, which is what
    /// "one outcome per txn_id, forever" needs.
    pub events_max_age_secs: u64,
    /// How long unacknowledged commands are kept, in seconds (acknowledged ones are removed).
    pub command_max_age_secs: u64,
    /// How long participants' replies are kept, in seconds. The coordinator reads them
    /// without acknowledging each one; a reply it never read is made again by a resend, so
    /// this only bounds how long an outage the stream bridges.
    pub reply_max_age_secs: u64,
    /// The most bytes the reply stream keeps (the oldest replies go first).
    pub reply_max_bytes: u64,
    /// JetStream's duplicate window for message ids, in seconds.
    pub duplicate_window_secs: u64,
    /// The coordinator's lease time-to-live, in milliseconds: a standby takes over this long
    /// after the active coordinator dies (at once after a clean shutdown).
    pub lease_ttl_ms: u64,
    /// How often the recovery checkpoint (where a restart starts reading the log) may move.
    pub checkpoint_interval_ms: u64,
    /// The submit consumer's ack wait, in milliseconds: how soon a submission a coordinator
    /// pulled and did not finish taking in (it crashed, say) is handed to the next one. A
    /// submission is held only until its `accepted` record is durable, and kept alive with
    /// progress acks meanwhile, so this can be short.
    pub submit_ack_wait_ms: u64,
    /// Participants (the SDK): how long a prepared branch may hear nothing from the
    /// coordinator before it reads its decision from the log and applies it; 0: never.
    pub in_doubt_after_ms: u64,
    /// Where to serve Prometheus metrics (`GET /metrics`), as `host:port`; empty: nowhere.
    pub metrics_listen: String,
    /// The client name the CLI and the demo submit as (`<prefix>.submit.<name>`, with its
    /// own fair share); empty: plain `<prefix>.submit`. `txcoord auth` sets it in each
    /// client's file, since a client user may publish only on its own submit subject.
    pub submit_as: String,
    /// Believe participant replies that carry no command token (raw-protocol participants
    /// written before tokens). Off by default: such a reply can be forged by anyone who may
    /// publish on the reply subjects.
    pub accept_untokened_replies: bool,
    /// The API (`<prefix>.api.*`) answers only to reply subjects that start with one of
    /// these (client inboxes); any other reply subject, such as one of the coordinator's own
    /// subjects, is refused.
    pub api_reply_prefixes: Vec<String>,
    /// Threads of `txcoord serve`'s async runtime. 1 (the default) runs it on one thread:
    /// async-nats sends everything through one connection task, and one thread lets it
    /// gather writes instead of waking across threads for each message, which measured
    /// 40% less CPU per transaction. More threads give a multi-threaded runtime.
    pub worker_threads: usize,
    /// How distributed deadlocks between lock-holding participants are dealt with:
    /// `detect` (the default: participants report their waits on `<prefix>.waits`, and the
    /// coordinator aborts the youngest undecided transaction of each cycle), `wait-die` (an
    /// older transaction waits for a younger one, a younger one refuses at once) or
    /// `no-wait` (any conflict refuses at once). Carried in every prepare.
    pub deadlock: crate::proto::DeadlockPolicy,
    /// How long a reported wait-for edge lives without a refresh (participants refresh
    /// every second), so a waiter that died leaves no ghost edge.
    pub deadlock_edge_ttl_ms: u64,
    /// Run the deadlock detector (on by default). Off, cycles of waits under `detect` last
    /// until the prepare timeout, as they would without txcoord's help (the deadlock demo
    /// shows the difference).
    pub deadlock_detection: bool,
    /// `txcoord http-bridge`: the HTTP services it joins to transactions, by service name
    /// (`[http_services.<name>]`, with at least `url`).
    pub http_services: std::collections::BTreeMap<String, txcoord_http::HttpServiceConfig>,
    /// Where `txcoord serve` serves the HTTP front door (`POST /v1/transactions`, `GET
    /// /v1/transactions/{id}`), as `host:port`; empty (the default): nowhere.
    pub http_listen: String,
    /// Base URLs under which a request step may name its HTTP service by a URL
    /// (`steps[].url`): same scheme, host and port, and a path at or below the entry's at a
    /// segment boundary. Empty (the default): no step may. The coordinator refuses any other
    /// URL step, and `txcoord http-bridge` checks every command's URL again. In the
    /// environment, `TXCOORD_HTTP_ALLOW` is a comma-separated list.
    pub http_allow: Vec<String>,
    /// The service that runs URL steps (a step with a `url` and no `service` is given this
    /// one): `txcoord http-bridge` serves it when `http_allow` is set.
    pub http_url_service: String,
    /// The most commands sent to one service in one message (a command batch), for
    /// services whose replies say they read batches (the SDK's do). Batches fill while the
    /// previous one is being stored, so they grow with the load and a lone command goes out
    /// alone at once. 1 turns batching off; at most 512.
    pub batch_max: usize,
    /// How long a batch waits for more commands after its first, in microseconds. 0 (the
    /// default): not at all, batches hold what queued while the last one was stored.
    pub batch_linger_us: u64,
    /// Commit a 2PC transaction of one step in one phase (`commit_one_phase`) when its
    /// service's replies say it takes that (the SDK's do): no decision record, no second
    /// command. True by default; false sends every transaction through both phases.
    pub one_phase: bool,
    /// Write the `preparing` record of a 2PC transaction (true, the default): the event
    /// observers see right after the prepares went out. Recovery does not need it (the
    /// `accepted` record before it announces the prepares), so false saves one log write per
    /// transaction; a transaction in its first round of prepares then shows `accepted` as
    /// its latest state. Resend rounds (`preparing` with a higher `prepare_attempt`) are
    /// written either way: they are needed.
    pub announce_preparing: bool,
    /// Where `txcoord serve` serves the web console, as `host:port`; empty (the default):
    /// nowhere.
    pub console_listen: String,
    /// The admin credential the console's resolve actions ask for; empty (the default):
    /// the actions are disabled. `env:NAME` or `file:PATH` read it from there.
    pub console_admin_token: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats: NatsAuth::default(),
            subject_prefix: "txn".into(),
            prepare_timeout_ms: 5_000,
            max_timeout_ms: 3_600_000,
            retry_base_ms: 500,
            retry_cap_ms: 30_000,
            stuck_after_ms: 60_000,
            publish_timeout_ms: 1_000,
            saga_execute_attempts: 3,
            saga_compensation_attempts: 5,
            max_in_flight: 10_000,
            max_in_flight_per_service: 2_500,
            max_in_flight_per_client: 2_500,
            max_request_bytes: 256 * 1024,
            max_steps: crate::proto::MAX_STEPS,
            stream_replicas: 1,
            storage: Storage::File,
            submit_max_age_secs: 7 * 24 * 3600,
            events_max_age_secs: 0,
            command_max_age_secs: 7 * 24 * 3600,
            reply_max_age_secs: 3600,
            reply_max_bytes: 1 << 30,
            duplicate_window_secs: 120,
            lease_ttl_ms: 10_000,
            checkpoint_interval_ms: 10_000,
            submit_ack_wait_ms: 3_000,
            in_doubt_after_ms: 10_000,
            metrics_listen: String::new(),
            submit_as: String::new(),
            accept_untokened_replies: false,
            api_reply_prefixes: vec!["_INBOX".into()],
            worker_threads: 1,
            deadlock: crate::proto::DeadlockPolicy::Detect,
            deadlock_edge_ttl_ms: 5_000,
            deadlock_detection: true,
            http_services: Default::default(),
            http_listen: String::new(),
            http_allow: Vec::new(),
            http_url_service: "http".into(),
            batch_max: 128,
            batch_linger_us: 0,
            one_phase: true,
            announce_preparing: true,
            console_listen: String::new(),
            console_admin_token: String::new(),
        }
    }
}

/// A configuration that could not be loaded or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or environment could not be read or parsed.
    #[error("cannot load configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// A field has a bad value.
    #[error("invalid configuration: {field}: {message}")]
    Invalid {
        /// The field, as written in `txcoord.toml`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

impl Config {
    /// Loads defaults, then `file` (or `./txcoord.toml` if it exists), then `TXCOORD_*`
    /// variables. Flags are applied by the caller afterwards, then [`Config::validate`].
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let defaults = config::Config::try_from(&Config::default())?;
        let mut builder = config::Config::builder().add_source(defaults);
        match file {
            Some(path) => {
                builder = builder.add_source(config::File::from(path).required(true));
            }
            None => {
                builder =
                    builder.add_source(config::File::with_name("txcoord.toml").required(false));
            }
        }
        let (vars, ignored) = env_layer(std::env::vars());
        for name in ignored {
            tracing::warn!(variable = %name, "ignoring {name}: not a configuration key (see txcoord.toml keys)");
        }
        builder = builder.add_source(
            config::Environment::with_prefix("TXCOORD")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("http_allow")
                .source(Some(vars)),
        );
        let cfg: Config = builder.build()?.try_deserialize()?;
        Ok(cfg)
    }

    /// This configuration as a TOML file that [`Config::load`] reads back to the same
    /// values (unset optional keys are left out). `txcoord bench` hands the processes it
    /// starts their settings this way.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    /// The top-level keys whose values differ from [`Config::default`], with their values
    /// (a table's key when anything in it differs). Reports say with it what a run changed.
    pub fn changed_from_default(&self) -> serde_json::Map<String, serde_json::Value> {
        let (Ok(serde_json::Value::Object(mine)), Ok(serde_json::Value::Object(defaults))) = (
            serde_json::to_value(self),
            serde_json::to_value(Config::default()),
        ) else {
            return serde_json::Map::new();
        };
        mine.into_iter()
            .filter(|(k, v)| defaults.get(k) != Some(v))
            .collect()
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.nats_url.split(',').any(|u| u.trim().is_empty()) {
            return Err(invalid("nats_url", "must list at least one server URL"));
        }
        if self.subject_prefix.is_empty()
            || !self
                .subject_prefix
                .split('.')
                .all(|t| crate::proto::is_token(t, 64))
        {
            return Err(invalid(
                "subject_prefix",
                format!(
                    "{:?} must be dot-separated tokens of A-Z, a-z, 0-9, '_' or '-'",
                    self.subject_prefix
                ),
            ));
        }
        let positive = [
            ("prepare_timeout_ms", self.prepare_timeout_ms),
            ("max_timeout_ms", self.max_timeout_ms),
            ("retry_base_ms", self.retry_base_ms),
            ("retry_cap_ms", self.retry_cap_ms),
            ("stuck_after_ms", self.stuck_after_ms),
            ("publish_timeout_ms", self.publish_timeout_ms),
            ("duplicate_window_secs", self.duplicate_window_secs),
            ("reply_max_age_secs", self.reply_max_age_secs),
            ("reply_max_bytes", self.reply_max_bytes),
            ("checkpoint_interval_ms", self.checkpoint_interval_ms),
        ];
        if self.api_reply_prefixes.is_empty()
            || self.api_reply_prefixes.iter().any(String::is_empty)
        {
            return Err(invalid(
                "api_reply_prefixes",
                "must list at least one non-empty subject prefix (client inboxes start with _INBOX)",
            ));
        }
        if let Err((i, e)) = txcoord_http::UrlAllowList::new(&self.http_allow) {
            return Err(invalid(format!("http_allow[{i}]"), e.to_string()));
        }
        if !crate::proto::is_token(&self.http_url_service, crate::proto::MAX_NAME_LEN) {
            return Err(invalid(
                "http_url_service",
                format!(
                    "{:?} is not a service name: 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-'",
                    self.http_url_service
                ),
            ));
        }
        if !self.http_allow.is_empty() && self.http_services.contains_key(&self.http_url_service) {
            return Err(invalid(
                format!("http_services.{}", self.http_url_service),
                format!(
                    "{0:?} is http_url_service, the service that runs URL steps; name this HTTP service otherwise or set http_url_service",
                    self.http_url_service
                ),
            ));
        }
        if self.batch_max == 0 || self.batch_max > crate::proto::MAX_BATCH {
            return Err(invalid(
                "batch_max",
                format!(
                    "{} must be between 1 (no batches) and {}",
                    self.batch_max,
                    crate::proto::MAX_BATCH
                ),
            ));
        }
        if self.batch_linger_us > 100_000 {
            return Err(invalid(
                "batch_linger_us",
                format!(
                    "{} is more than 100000 (0.1 s): every batched command would wait that long",
                    self.batch_linger_us
                ),
            ));
        }
        if self.deadlock_edge_ttl_ms < 2_000 {
            return Err(invalid(
                "deadlock_edge_ttl_ms",
                format!(
                    "{} is too short: at least 2000 (participants refresh their waits every second)",
                    self.deadlock_edge_ttl_ms
                ),
            ));
        }
        if self.submit_ack_wait_ms < 500 {
            return Err(invalid(
                "submit_ack_wait_ms",
                format!(
                    "{} is too short: at least 500 (a submission is kept alive with progress acks every third of it)",
                    self.submit_ack_wait_ms
                ),
            ));
        }
        for (field, value) in positive {
            if value == 0 {
                return Err(invalid(field, "must be greater than 0"));
            }
        }
        if !self.metrics_listen.is_empty()
            && self.metrics_listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid(
                "metrics_listen",
                format!(
                    "{:?} is not host:port with an IP address (say 127.0.0.1:9464 or 0.0.0.0:9464)",
                    self.metrics_listen
                ),
            ));
        }
        if !self.submit_as.is_empty()
            && !crate::proto::is_token(&self.submit_as, crate::proto::MAX_NAME_LEN)
        {
            return Err(invalid(
                "submit_as",
                format!(
                    "{:?} is not a client name: 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-'",
                    self.submit_as
                ),
            ));
        }
        if self.worker_threads == 0 || self.worker_threads > 1024 {
            return Err(invalid(
                "worker_threads",
                format!("{} must be from 1 to 1024", self.worker_threads),
            ));
        }
        if self.lease_ttl_ms < 1_000 {
            return Err(invalid(
                "lease_ttl_ms",
                format!(
                    "{} is too short: at least 1000 (it is renewed every quarter of it)",
                    self.lease_ttl_ms
                ),
            ));
        }
        if self.prepare_timeout_ms > self.max_timeout_ms {
            return Err(invalid(
                "prepare_timeout_ms",
                format!(
                    "{} exceeds max_timeout_ms ({})",
                    self.prepare_timeout_ms, self.max_timeout_ms
                ),
            ));
        }
        if self.retry_base_ms > self.retry_cap_ms {
            return Err(invalid(
                "retry_base_ms",
                format!(
                    "{} exceeds retry_cap_ms ({})",
                    self.retry_base_ms, self.retry_cap_ms
                ),
            ));
        }
        if self.saga_execute_attempts == 0 {
            return Err(invalid("saga_execute_attempts", "must be at least 1"));
        }
        if self.saga_compensation_attempts == 0 {
            return Err(invalid("saga_compensation_attempts", "must be at least 1"));
        }
        if self.max_in_flight == 0 {
            return Err(invalid("max_in_flight", "must be at least 1"));
        }
        if !(64..=8 * 1024 * 1024).contains(&self.max_request_bytes) {
            return Err(invalid(
                "max_request_bytes",
                "must be between 64 bytes and 8 MiB (and below the server's max_payload)",
            ));
        }
        if !(1..=crate::proto::MAX_STEPS).contains(&self.max_steps) {
            return Err(invalid(
                "max_steps",
                format!("must be between 1 and {}", crate::proto::MAX_STEPS),
            ));
        }
        if !matches!(self.stream_replicas, 1 | 3) {
            return Err(invalid(
                "stream_replicas",
                format!("must be 1 or 3 (got {})", self.stream_replicas),
            ));
        }
        let a = &self.nats;
        if a.user.is_some() != a.password.is_some() {
            return Err(invalid("nats.user", "user and password go together"));
        }
        if a.token.is_some() && a.user.is_some() {
            return Err(invalid("nats.token", "use either a token or user/password"));
        }
        if a.tls_cert_file.is_some() != a.tls_key_file.is_some() {
            return Err(invalid(
                "nats.tls_cert_file",
                "tls_cert_file and tls_key_file go together",
            ));
        }
        for (field, path) in [
            ("nats.creds_file", &a.creds_file),
            ("nats.tls_ca_file", &a.tls_ca_file),
            ("nats.tls_cert_file", &a.tls_cert_file),
            ("nats.tls_key_file", &a.tls_key_file),
        ] {
            if let Some(p) = path
                && !p.is_file()
            {
                return Err(invalid(
                    field,
                    format!("{} is not a readable file", p.display()),
                ));
            }
        }
        Ok(())
    }

    /// The subjects under the configured prefix.
    pub fn subjects(&self) -> Subjects {
        Subjects::new(self.subject_prefix.clone())
    }

    /// The limits applied to incoming requests.
    pub fn limits(&self) -> RequestLimits {
        RequestLimits {
            max_bytes: self.max_request_bytes,
            max_steps: self.max_steps,
            max_timeout_ms: self.max_timeout_ms,
        }
    }

    /// The engine's settings.
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            deadlock: self.deadlock,
            default_timeout_ms: self.prepare_timeout_ms,
            retry_base_ms: self.retry_base_ms,
            retry_cap_ms: self.retry_cap_ms,
            stuck_after_ms: self.stuck_after_ms,
            execute_attempts: self.saga_execute_attempts,
            compensation_attempts: self.saga_compensation_attempts,
            // Per transaction: the runtime turns it on when the step's service takes it.
            one_phase: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn a_written_configuration_reads_back_the_same() {
        let mut cfg = Config {
            announce_preparing: false,
            batch_linger_us: 750,
            stream_replicas: 3,
            ..Config::default()
        };
        cfg.nats.user = Some("bench".into());
        cfg.nats.password = Some("secret".into());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("txcoord.toml");
        std::fs::write(&file, cfg.to_toml().unwrap()).unwrap();
        assert_eq!(Config::load(Some(&file)).unwrap(), cfg);
    }

    #[test]
    fn changed_from_default_names_only_what_differs() {
        assert!(Config::default().changed_from_default().is_empty());
        let mut cfg = Config {
            announce_preparing: false,
            ..Config::default()
        };
        cfg.nats.user = Some("u".into());
        let changed = cfg.changed_from_default();
        let mut keys: Vec<&str> = changed.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["announce_preparing", "nats"]);
        assert_eq!(changed["announce_preparing"], serde_json::json!(false));
    }

    #[test]
    fn validation_names_the_field() {
        type Mutation = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|c| c.stream_replicas = 2), "stream_replicas"),
            (
                Box::new(|c| c.subject_prefix = "a..b".into()),
                "subject_prefix",
            ),
            (
                Box::new(|c| c.subject_prefix = "a*".into()),
                "subject_prefix",
            ),
            (Box::new(|c| c.prepare_timeout_ms = 0), "prepare_timeout_ms"),
            (Box::new(|c| c.retry_base_ms = 100_000), "retry_base_ms"),
            (Box::new(|c| c.max_in_flight = 0), "max_in_flight"),
            (Box::new(|c| c.nats.user = Some("u".into())), "nats.user"),
            (
                Box::new(|c| c.nats.creds_file = Some("/nonexistent.creds".into())),
                "nats.creds_file",
            ),
            (Box::new(|c| c.nats_url = "".into()), "nats_url"),
            (
                Box::new(|c| c.http_allow = vec!["https://ok.test".into(), "ftp://x".into()]),
                "http_allow[1]",
            ),
            (
                Box::new(|c| c.http_url_service = "a.b".into()),
                "http_url_service",
            ),
            (
                Box::new(|c| {
                    c.http_allow = vec!["https://ok.test".into()];
                    c.http_services.insert("http".into(), Default::default());
                }),
                "http_services.http",
            ),
        ];
        for (mutate, field) in cases {
            let mut c = Config::default();
            mutate(&mut c);
            match c.validate() {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn layers_apply_in_order_file_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "prepare_timeout_ms = 1234\nmax_in_flight = 7\n[nats]\ntoken = \"s3cret\"\n",
        )
        .unwrap();
        // The environment layer reads a map here, so the test leaves the process
        // environment alone (other tests run in parallel).
        let cfg = config::Config::builder()
            .add_source(config::Config::try_from(&Config::default()).unwrap())
            .add_source(config::File::from(file.as_path()))
            .add_source(
                config::Environment::with_prefix("TXCOORD")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(
                        [
                            ("TXCOORD_MAX_IN_FLIGHT".to_string(), "9".to_string()),
                            ("TXCOORD_NATS_URL".to_string(), "nats://h:1".to_string()),
                        ]
                        .into_iter()
                        .collect(),
                    )),
            )
            .build()
            .unwrap()
            .try_deserialize::<Config>()
            .unwrap();
        assert_eq!(cfg.prepare_timeout_ms, 1234);
        assert_eq!(cfg.max_in_flight, 9);
        assert_eq!(cfg.nats_url, "nats://h:1");
        assert_eq!(cfg.nats.token.as_deref(), Some("s3cret"));
        assert_eq!(cfg.retry_cap_ms, Config::default().retry_cap_ms);
    }

    #[test]
    fn environment_variables_that_are_not_keys_are_reported_not_used() {
        let vars = [
            ("TXCOORD_NATS_URL", "nats://h:1"),
            ("TXCOORD_NATS__TOKEN", "t"),
            ("TXCOORD_MAX_IN_FLIGHT", "3"),
            ("TXCOORD_LOG", "debug"),
            ("TXCOORD_PREPARE_TIMEOUT", "5"),
            ("TXCOORD_NATS__TOKN", "x"),
            ("HOME", "/root"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let (keep, ignored) = env_layer(vars);
        let mut kept: Vec<_> = keep.keys().cloned().collect();
        kept.sort();
        assert_eq!(
            kept,
            [
                "TXCOORD_MAX_IN_FLIGHT",
                "TXCOORD_NATS_URL",
                "TXCOORD_NATS__TOKEN"
            ]
        );
        assert_eq!(ignored, ["TXCOORD_PREPARE_TIMEOUT", "TXCOORD_NATS__TOKN"]);
    }

    #[test]
    fn unknown_keys_in_the_file_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "prepare_timeout = 5\n").unwrap();
        let err = Config::load(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("prepare_timeout"), "{err}");
    }
}
