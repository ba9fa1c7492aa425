//! The part of txcoord's configuration a service reads: NATS credentials and TLS
//! (`[nats]`), `stream_replicas` and `in_doubt_after_ms`, from the same file `txcoord serve`
//! reads (`--config`, or `./txcoord.toml` if present) and the same `TXCOORD_*` variables.
//! Keys a service does not use (the coordinator's) are left alone, so one file serves both.

use std::path::Path;

use serde::Deserialize;
use txcoord_nats::NatsAuth;

/// What a service takes from the configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ServiceConfig {
    /// Credentials and TLS.
    pub nats: NatsAuth,
    /// Replicas of the streams and buckets it creates: 1, or 3 on a cluster.
    pub stream_replicas: usize,
    /// How long a prepared branch may hear nothing before it reads its decision from the
    /// log, in milliseconds; 0: never.
    pub in_doubt_after_ms: u64,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            nats: NatsAuth::default(),
            stream_replicas: 1,
            in_doubt_after_ms: 10_000,
        }
    }
}

/// The keys (as `TXCOORD_` variables name them) a service reads from the environment.
const ENV_KEYS: &[&str] = &["NATS__", "STREAM_REPLICAS", "IN_DOUBT_AFTER_MS"];

impl ServiceConfig {
    /// Defaults, then the file (`file`, or `./txcoord.toml` if present), then `TXCOORD_*`.
    pub fn load(file: Option<&Path>) -> Result<ServiceConfig, config::ConfigError> {
        let mut builder = config::Config::builder();
        builder = match file {
            Some(path) => builder.add_source(config::File::from(path).required(true)),
            None => builder.add_source(config::File::with_name("txcoord.toml").required(false)),
        };
        let vars: config::Map<String, String> = std::env::vars()
            .filter(|(k, _)| {
                k.strip_prefix("TXCOORD_")
                    .is_some_and(|key| ENV_KEYS.iter().any(|p| key.starts_with(p)))
            })
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("TXCOORD")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(vars)),
        );
        builder.build()?.try_deserialize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_coordinator_file_serves_a_service_too() {
        let dir = std::env::temp_dir().join(format!("txcoord-svc-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("shop.toml");
        std::fs::write(
            &file,
            "submit_as = \"shop\"\nmax_in_flight = 5\nstream_replicas = 3\n[nats]\nuser = \"u\"\npassword = \"p\"\n",
        )
        .unwrap();
        let cfg = ServiceConfig::load(Some(&file)).unwrap();
        assert_eq!(cfg.stream_replicas, 3);
        assert_eq!(cfg.nats.user.as_deref(), Some("u"));
        assert_eq!(cfg.in_doubt_after_ms, 10_000);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
