//! Child processes and readiness checks shared by `txcoord demo` and `txcoord bench`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

/// A child process killed on drop.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    cmd: Vec<String>,
    envs: Vec<(String, String)>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: Vec<String>, log: PathBuf) -> anyhow::Result<Proc> {
        Self::spawn_env(name, cmd, Vec::new(), log)
    }

    /// As [`Proc::spawn`], with extra environment variables (kept for restarts).
    pub fn spawn_env(
        name: &str,
        cmd: Vec<String>,
        envs: Vec<(String, String)>,
        log: PathBuf,
    ) -> anyhow::Result<Proc> {
        let mut p = Proc {
            name: name.to_string(),
            child: None,
            cmd,
            envs,
            log,
        };
        p.start()?;
        Ok(p)
    }

    /// The running child's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the child was started and has exited on its own (reaped here).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let err = out.try_clone()?;
        let child = Command::new(&self.cmd[0])
            .args(&self.cmd[1..])
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.cmd[0]))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn stop(&mut self) {
        if let Some(c) = self.child.take() {
            txcoord::natsserver::terminate(c, Duration::from_secs(5));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
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
