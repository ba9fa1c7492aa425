//! The NATS plumbing of [`txcoord_nats`] (re-exported here), and what the configuration
//! adds to it: connecting as configured and the stream settings it names.

pub use txcoord_nats::*;

use std::time::Duration;

use crate::config::Config;

/// Connects as configured.
pub async fn connect_config(
    cfg: &Config,
    name: &str,
    retry: bool,
) -> Result<async_nats::Client, NatsError> {
    connect(&cfg.nats_url, &cfg.nats, name, retry).await
}

/// The settings of the four streams the configuration names.
pub fn stream_settings(cfg: &Config) -> StreamSettings {
    StreamSettings {
        replicas: cfg.stream_replicas,
        storage: cfg.storage,
        submit_max_age: Duration::from_secs(cfg.submit_max_age_secs),
        events_max_age: Duration::from_secs(cfg.events_max_age_secs),
        command_max_age: Duration::from_secs(cfg.command_max_age_secs),
        reply_max_age: Duration::from_secs(cfg.reply_max_age_secs),
        reply_max_bytes: i64::try_from(cfg.reply_max_bytes).unwrap_or(i64::MAX),
        duplicate_window: Duration::from_secs(cfg.duplicate_window_secs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_stream_settings_are_the_default_configuration_s() {
        assert_eq!(
            StreamSettings::default(),
            stream_settings(&Config::default())
        );
    }
}
