//! Child processes as the tests, the demo, the benchmark and the fault suite run them: one
//! command, its standard output and error appended to a log file that can be searched,
//! killed (SIGKILL) or stopped (SIGTERM, then SIGKILL after a grace period), restarted with
//! the same command (or other environment variables), and stopped on drop.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What went wrong with a child process.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// Its log could not be opened.
    #[error("{name}: cannot open its log {path}: {source}")]
    Log {
        /// The process.
        name: String,
        /// The log file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// It could not be started.
    #[error("starting {name} ({program}): {source}")]
    Start {
        /// The process.
        name: String,
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// It did not exit in time.
    #[error("{name} still running after {waited:?}")]
    StillRunning {
        /// The process.
        name: String,
        /// How long we waited.
        waited: Duration,
    },
    /// Its log did not show a line in time.
    #[error("{name}: {needle:?} not in its log {path} within {waited:?}")]
    NotInLog {
        /// The process.
        name: String,
        /// What was looked for.
        needle: String,
        /// The log file.
        path: String,
        /// How long we waited.
        waited: Duration,
    },
}

/// A child process, stopped (SIGTERM, then SIGKILL) on drop unless [`Proc::kill_on_drop`].
pub struct Proc {
    /// A name for messages.
    pub name: String,
    /// Where its standard output and error go.
    pub log: PathBuf,
    program: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    child: Option<Child>,
    kill_on_drop: bool,
}

impl Proc {
    /// Starts `program` with `args` and the extra environment `envs` (kept for restarts),
    /// appending its output to `log`.
    pub fn start(
        name: &str,
        program: &str,
        args: &[String],
        envs: &[(String, String)],
        log: PathBuf,
    ) -> Result<Proc, ProcError> {
        let mut p = Proc {
            name: name.to_string(),
            log,
            program: program.to_string(),
            args: args.to_vec(),
            envs: envs.to_vec(),
            child: None,
            kill_on_drop: false,
        };
        p.restart()?;
        Ok(p)
    }

    /// On drop, SIGKILL at once instead of a clean stop (tests, where speed matters).
    pub fn kill_on_drop(mut self) -> Proc {
        self.kill_on_drop = true;
        self
    }

    /// The running child's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the child was started and has exited on its own (reaped here).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// Starts the command again (killing the running child first, if any).
    pub fn restart(&mut self) -> Result<(), ProcError> {
        self.kill9();
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
        };
        let log_error = |source| ProcError::Log {
            name: self.name.clone(),
            path: self.log.display().to_string(),
            source,
        };
        let out = open().map_err(log_error)?;
        let err = open().map_err(log_error)?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| ProcError::Start {
                name: self.name.clone(),
                program: self.program.clone(),
                source,
            })?;
        self.child = Some(child);
        Ok(())
    }

    /// Starts the command again with `envs` instead of the environment it had.
    pub fn restart_with(&mut self, envs: &[(String, String)]) -> Result<(), ProcError> {
        self.envs = envs.to_vec();
        self.restart()
    }

    /// SIGKILL, and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (a clean shutdown); SIGKILL if it is still running after `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        if let Some(c) = self.child.take() {
            crate::natsserver::terminate(c, grace);
        }
    }

    /// [`Proc::terminate`] with five seconds' grace.
    pub fn stop(&mut self) {
        self.terminate(Duration::from_secs(5));
    }

    /// Waits until it exits by itself; its exit status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, ProcError> {
        let start = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                return Ok(status);
            }
            if start.elapsed() >= timeout {
                return Err(ProcError::StillRunning {
                    name: self.name.clone(),
                    waited: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything it wrote so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its log contains `needle`.
    pub async fn wait_for(&self, needle: &str, timeout: Duration) -> Result<(), ProcError> {
        let start = Instant::now();
        loop {
            if self.log_text().contains(needle) {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(ProcError::NotInLog {
                    name: self.name.clone(),
                    needle: needle.to_string(),
                    path: self.log.display().to_string(),
                    waited: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.kill_on_drop {
            self.kill9();
        } else {
            self.stop();
        }
    }
}
