//! Starting child processes ([`Proc`], from the testkit) and readiness checks, shared by
//! `txcoord demo`, `txcoord bench` and `txcoord chaos`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

pub use txcoord_testkit::process::Proc;

/// Starts `cmd` (the program, then its arguments) as `name`, its output appended to `log`.
pub fn spawn(name: &str, cmd: Vec<String>, log: PathBuf) -> anyhow::Result<Proc> {
    spawn_env(name, cmd, Vec::new(), log)
}

/// As [`spawn`], with extra environment variables (kept for restarts).
pub fn spawn_env(
    name: &str,
    cmd: Vec<String>,
    envs: Vec<(String, String)>,
    log: PathBuf,
) -> anyhow::Result<Proc> {
    let (program, args) = cmd
        .split_first()
        .with_context(|| format!("{name}: no command to run"))?;
    Ok(Proc::start(name, program, args, &envs, log)?)
}

/// Waits until the coordinator's micro service answers (it registers after recovery) and
/// returns its counters.
pub async fn coordinator_stats(
    nc: &async_nats::Client,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let start = Instant::now();
    loop {
        let asked = tokio::time::timeout(
            Duration::from_millis(500),
            nc.request("$SRV.STATS.txcoord", "".into()),
        )
        .await;
        if let Ok(Ok(reply)) = asked
            && let Ok(v) = serde_json::from_slice::<Value>(&reply.payload)
        {
            return Ok(v["endpoints"][0]["data"].clone());
        }
        if start.elapsed() > timeout {
            bail!("no answer on $SRV.STATS.txcoord within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until a service's durable consumer exists (the SDK creates it when it starts).
pub async fn wait_consumer(
    js: &async_nats::jetstream::Context,
    stream: &str,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Ok(s) = js.get_stream(stream).await
            && s.consumer_info(name).await.is_ok()
        {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("no durable consumer {name} on {stream} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for a child process to listen on).
pub fn free_port() -> anyhow::Result<u16> {
    txcoord::natsserver::free_port().context("finding a free port on 127.0.0.1")
}

/// A sibling binary of this one (the services are built next to `txcoord`).
pub fn sibling(name: &str) -> anyhow::Result<String> {
    let me = std::env::current_exe().context("locating the txcoord binary")?;
    let path = me.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} not found next to {}; build all binaries (cargo build --bins)",
            name,
            me.display()
        );
    }
    Ok(path.display().to_string())
}
