//! Test helpers: a real nats-server on a free port with a temp store, and real `txcoord`
//! processes (coordinator, scripted participants) that can be SIGKILLed and restarted.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use txcoord::client::Client;
use txcoord::natsserver::NatsServer;
use txcoord::participant::{BranchRecord, BranchState, branch_store, read_branch};
use txcoord::proto::TransactionEvent;

/// A child process for tests: the testkit's [`txcoord_testkit::process::Proc`] (output in a
/// log file we can search), SIGKILLed on drop, with constructors and waits that panic with
/// its log when they fail.
pub struct Proc(txcoord_testkit::process::Proc);

impl std::ops::Deref for Proc {
    type Target = txcoord_testkit::process::Proc;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// The environment of a test process: `TXCOORD_LOG` (from `TEST_TXCOORD_LOG`), then `envs`.
fn test_env(envs: &[(&str, &str)]) -> Vec<(String, String)> {
    let log = std::env::var("TEST_TXCOORD_LOG").unwrap_or_else(|_| "info,async_nats=warn".into());
    std::iter::once(("TXCOORD_LOG".to_string(), log))
        .chain(envs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

impl Proc {
    /// `txcoord` with `args`, its output in `<dir>/<name>.log`.
    pub fn spawn(dir: &std::path::Path, name: &str, args: &[&str], envs: &[(&str, &str)]) -> Proc {
        Self::spawn_bin(env!("CARGO_BIN_EXE_txcoord"), dir, name, args, envs)
    }

    /// `bin` with `args`, its output in `<dir>/<name>.log`.
    pub fn spawn_bin(
        bin: &str,
        dir: &std::path::Path,
        name: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Proc {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let log = dir.join(format!("{name}.log"));
        match txcoord_testkit::process::Proc::start(name, bin, &args, &test_env(envs), log) {
            Ok(p) => Proc(p.kill_on_drop()),
            Err(e) => panic!("{e}"),
        }
    }

    /// Starts the same command again, with other environment variables.
    pub fn restart_with(&mut self, envs: &[(&str, &str)]) {
        if let Err(e) = self.0.restart_with(&test_env(envs)) {
            panic!("{e}");
        }
    }

    /// Starts the same command again (SIGKILL first).
    pub fn restart(&mut self) {
        if let Err(e) = self.0.restart() {
            panic!("{e}");
        }
    }

    /// SIGTERM (a clean shutdown), and wait for the process to be gone.
    pub fn terminate(&mut self) {
        self.0.terminate(Duration::from_secs(30));
    }

    /// Waits until the process exits by itself; its exit status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        match self.0.wait_exit(timeout).await {
            Ok(status) => status,
            Err(e) => panic!("{e}; log:\n{}", self.log_text()),
        }
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_for(&self, needle: &str, timeout: Duration) {
        if let Err(e) = self.0.wait_for(needle, timeout).await {
            panic!("{e}:\n{}", self.log_text());
        }
    }
}

/// A whole system: nats-server, coordinator, and scripted participants.
pub struct System {
    pub nats: NatsServer,
    pub dir: tempfile::TempDir,
    pub coordinator: Proc,
    pub participants: Vec<(String, Proc)>,
    pub client: Client,
    pub nc: async_nats::Client,
}

impl System {
    /// Starts everything; the coordinator gets `coord_env` in its environment.
    pub async fn start(services: &[&str], coord_env: &[(&str, &str)]) -> System {
        Self::start_on(
            NatsServer::start().expect("nats-server (run ./dev setup)"),
            services,
            coord_env,
        )
        .await
    }

    /// Starts everything on a given server.
    pub async fn start_on(
        nats: NatsServer,
        services: &[&str],
        coord_env: &[(&str, &str)],
    ) -> System {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = nats.url();
        // A short lease, so that a coordinator restarted after SIGKILL takes over quickly.
        let mut env: Vec<(&str, &str)> = vec![
            ("TXCOORD_NATS_URL", url.as_str()),
            ("TXCOORD_LEASE_TTL_MS", "2000"),
        ];
        env.extend_from_slice(coord_env);
        let coordinator = Proc::spawn(dir.path(), "coordinator", &["serve"], &env);
        let participants = services
            .iter()
            .map(|s| (s.to_string(), scripted(dir.path(), &url, s, &[])))
            .collect();
        let nc = async_nats::connect(&url).await.expect("connect");
        let client = Client::new(nc.clone(), "txn").await.expect("client");
        let sys = System {
            nats,
            dir,
            coordinator,
            participants,
            client,
            nc,
        };
        sys.coordinator
            .wait_for("coordinator ready", Duration::from_secs(30))
            .await;
        for (_, p) in &sys.participants {
            p.wait_for("participant ready", Duration::from_secs(30))
                .await;
        }
        sys
    }

    /// Prints every warning and error the processes logged (for a failing test's output).
    pub fn dump_logs(&self) {
        let procs = std::iter::once(("coordinator", &self.coordinator))
            .chain(self.participants.iter().map(|(s, p)| (s.as_str(), p)));
        for (name, p) in procs {
            for line in p
                .log_text()
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            {
                eprintln!("[{name}] {line}");
            }
        }
    }

    /// Prints every log line that mentions `needle`.
    pub fn dump_matching(&self, needle: &str) {
        let procs = std::iter::once(("coordinator", &self.coordinator))
            .chain(self.participants.iter().map(|(s, p)| (s.as_str(), p)));
        for (name, p) in procs {
            for line in p.log_text().lines().filter(|l| l.contains(needle)) {
                eprintln!("[{name}] {line}");
            }
        }
    }

    /// Starts one more scripted participant, `txcoord participant --service <service>` with
    /// `args` (`--no-batch`, `--no-one-phase`...), and waits until it is ready.
    pub async fn spawn_participant(&mut self, service: &str, args: &[&str]) {
        let p = scripted(self.dir.path(), &self.nats.url(), service, args);
        p.wait_for("participant ready", Duration::from_secs(30))
            .await;
        self.participants.push((service.to_string(), p));
    }

    /// Starts one of the example services (`inventory`, `payment`, `order`) as `name`, with
    /// extra arguments, and waits until it is ready.
    pub async fn spawn_service(&mut self, name: &str, service: &str, args: &[&str]) {
        self.spawn_service_env(name, service, args, &[]).await
    }

    /// As [`System::spawn_service`], with environment variables (a failpoint).
    pub async fn spawn_service_env(
        &mut self,
        name: &str,
        service: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) {
        let bin = match service {
            "inventory" | "payment" | "order" | "bank" => {
                service_bin(&format!("txcoord-{service}"))
            }
            other => panic!("no service {other}"),
        };
        let url = self.nats.url();
        let mut all = vec!["--nats-url", url.as_str()];
        all.extend_from_slice(args);
        let p = Proc::spawn_bin(&bin, self.dir.path(), name, &all, envs);
        p.wait_for("participant ready", Duration::from_secs(30))
            .await;
        self.participants.push((name.to_string(), p));
    }

    /// Leaves `id` stuck in commit: `first` votes a little late, `second` votes and is
    /// killed before it hears the commit, and the coordinator (started with a short
    /// `TXCOORD_STUCK_AFTER_MS`) flags it stuck. `second` stays down.
    #[allow(dead_code)]
    pub async fn stuck_commit(&mut self, id: &str, first: &str, second: &str) {
        let req = request(
            id,
            vec![
                step(first, json!({"delay_ms": 300})),
                step(second, json!({})),
            ],
        );
        self.submit(&req, id).await;
        self.wait_vote(id, 1).await;
        self.participant(second).kill9();
        self.wait_state(id, |e| e.stuck).await;
    }

    /// Starts the Python raw-protocol participant (`participants/python/ledger.py`, service
    /// `ledger`) and waits until it is ready.
    #[allow(dead_code)]
    pub async fn spawn_ledger(&self) -> Proc {
        let script = format!(
            "{}/participants/python/ledger.py",
            env!("CARGO_MANIFEST_DIR")
        );
        let url = self.nats.url();
        let ledger = Proc::spawn_bin(
            &python(),
            self.dir.path(),
            "ledger",
            &[script.as_str(), "--nats-url", &url],
            &[],
        );
        ledger
            .wait_for("participant ready", Duration::from_secs(30))
            .await;
        ledger
    }

    /// Starts a second `txcoord serve` (a standby while the first holds the lease) with
    /// `env` besides the server's URL, and waits for `ready_line` in its log.
    #[allow(dead_code)]
    pub async fn spawn_standby(&self, env: &[(&str, &str)], ready_line: &str) -> Proc {
        let url = self.nats.url();
        let mut all = vec![("TXCOORD_NATS_URL", url.as_str())];
        all.extend_from_slice(env);
        let standby = Proc::spawn(self.dir.path(), "standby", &["serve"], &all);
        standby.wait_for(ready_line, Duration::from_secs(30)).await;
        standby
    }

    /// Runs `txcoord` with `args` against this system's server and waits for it.
    #[allow(dead_code)]
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_txcoord"))
            .args(args)
            .env("TXCOORD_NATS_URL", self.nats.url())
            .env("TXCOORD_LOG", "error")
            .output()
            .expect("txcoord runs")
    }

    /// The coordinator's counters (`$SRV.STATS.txcoord`).
    #[allow(dead_code)]
    pub async fn stats(&self) -> Value {
        let reply = self
            .nc
            .request("$SRV.STATS.txcoord", "".into())
            .await
            .expect("stats");
        let v: Value = serde_json::from_slice(&reply.payload).expect("stats JSON");
        v["endpoints"][0]["data"].clone()
    }

    /// A service's record, as JSON.
    pub async fn record(&self, bucket: &str, key: &str) -> Option<Value> {
        let js = async_nats::jetstream::new(self.nc.clone());
        let table: txcoord::kvtable::Table<Value> =
            txcoord::kvtable::Table::open(&js, bucket, 1).await.ok()?;
        table.get(key).await.ok().flatten().map(|(v, _)| v)
    }

    /// Waits until a service's record satisfies `pred`.
    pub async fn wait_record(
        &self,
        bucket: &str,
        key: &str,
        pred: impl Fn(Option<&Value>) -> bool,
    ) -> Option<Value> {
        let start = Instant::now();
        loop {
            let rec = self.record(bucket, key).await;
            if pred(rec.as_ref()) {
                return rec;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{bucket}/{key} never got there: {rec:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A participant's process, read-only.
    pub fn participant_log(&self, service: &str) -> &Proc {
        &self
            .participants
            .iter()
            .find(|(s, _)| s == service)
            .expect("participant")
            .1
    }

    pub fn participant(&mut self, service: &str) -> &mut Proc {
        &mut self
            .participants
            .iter_mut()
            .find(|(s, _)| s == service)
            .expect("participant")
            .1
    }

    pub async fn run(&self, request: Value) -> TransactionEvent {
        self.client
            .submit_and_wait(vec![request], Duration::from_secs(60))
            .await
            .remove(0)
            .unwrap_or_else(|e| {
                panic!(
                    "no outcome: {e}\ncoordinator log:\n{}",
                    self.coordinator.log_text()
                )
            })
    }

    /// A service's branch record.
    pub async fn branch(&self, service: &str, txn_id: &str, step: usize) -> Option<BranchRecord> {
        let js = async_nats::jetstream::new(self.nc.clone());
        let store = branch_store(&js, service, 1).await.ok()?;
        read_branch(&store, txn_id, step).await
    }

    /// Waits until a service's branch reaches `state`.
    pub async fn wait_branch(&self, service: &str, txn_id: &str, step: usize, state: BranchState) {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < Duration::from_secs(30) {
            last = self.branch(service, txn_id, step).await.map(|r| r.state);
            if last == Some(state) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{service} branch {txn_id}/{step} is {last:?}, expected {state:?}");
    }

    /// Waits until the coordinator holds a vote from `step` (asked through txn.api.status):
    /// the vote is then durable at the participant and delivered, so killing the participant
    /// is a kill "after voting". (A participant's own log line comes before the vote is stored.)
    pub async fn wait_vote(&self, txn_id: &str, step: usize) {
        let start = Instant::now();
        loop {
            if let Ok(ev) = self.client.status(txn_id).await
                && ev.steps.get(step).is_some_and(|s| s.vote.is_some())
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{txn_id}: no vote from step {step}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Submits a request (as JSON) under message id `id`.
    pub async fn submit(&self, request: &Value, id: &str) {
        self.client
            .submit_raw(serde_json::to_vec(request).unwrap().into(), id)
            .await
            .expect("submit");
    }

    /// Submits a 2PC request with the two steps `a` (ready) and `b` (voting `vote`, a little
    /// late), on a coordinator started with the `after-decision` failpoint, and waits until
    /// its decision is durable and nobody has heard it.
    pub async fn decide_unheard(&self, id: &str, vote: &str) {
        let req = request(
            id,
            vec![
                step("a", json!({})),
                step("b", json!({"vote": vote, "delay_ms": 100})),
            ],
        );
        self.submit(&req, id).await;
        self.coordinator
            .wait_for(
                &format!("FAILPOINT after-decision txn_id={id}"),
                Duration::from_secs(10),
            )
            .await;
    }

    /// Publishes `body` on `subject` through JetStream and waits until a stream stored it
    /// (what an intruder with publish rights, or a forged coordinator, can do).
    pub async fn publish_stored(&self, subject: String, body: Vec<u8>) {
        let js = async_nats::jetstream::new(self.nc.clone());
        js.publish(subject, body.into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }

    /// Waits until the transaction's log has a record in one of `states`.
    pub async fn wait_state(
        &self,
        txn_id: &str,
        pred: impl Fn(&TransactionEvent) -> bool,
    ) -> TransactionEvent {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Some(ev) = self
                .client
                .history(txn_id)
                .await
                .into_iter()
                .find(|e| pred(e))
            {
                return ev;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "{txn_id}: state not reached; history {:?}",
            self.client.history(txn_id).await
        );
    }
}

/// `txcoord participant --service <service>` with `args`, on the server at `url`.
fn scripted(dir: &std::path::Path, url: &str, service: &str, args: &[&str]) -> Proc {
    let mut all = vec!["participant", "--service", service];
    all.extend_from_slice(args);
    Proc::spawn(dir, service, &all, &[("TXCOORD_NATS_URL", url)])
}

/// The path of an example service's binary (another workspace package's, built into the
/// same target directory).
#[allow(dead_code)]
pub fn service_bin(name: &str) -> String {
    txcoord_testkit::bins::workspace_bin(name)
        .unwrap_or_else(|e| panic!("{e}"))
        .display()
        .to_string()
}

/// The validator of `schemas/<name>.schema.json`.
#[allow(dead_code)]
pub fn validator(name: &str) -> jsonschema::Validator {
    let path = format!("{}/schemas/{name}.schema.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let schema: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    jsonschema::options()
        .with_retriever(LocalSchemas)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Resolves a schema's `$ref` to another of ours (`https://txcoord.dev/schemas/<file>`)
/// from `schemas/`, never over the network.
struct LocalSchemas;

impl jsonschema::Retrieve for LocalSchemas {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        let file = uri
            .as_str()
            .strip_prefix("https://txcoord.dev/schemas/")
            .ok_or_else(|| format!("{uri} is not one of txcoord's schemas"))?;
        let path = format!("{}/schemas/{file}", env!("CARGO_MANIFEST_DIR"));
        Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
    }
}

/// Asserts that `msg` (seen on `subject`) matches the schema `name`.
#[allow(dead_code)]
pub fn check(v: &jsonschema::Validator, name: &str, subject: &str, msg: &Value) {
    let errors: Vec<String> = v
        .iter_errors(msg)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{subject} does not match {name}: {errors:?}\n{msg}"
    );
}

/// The Python that runs the raw-protocol participants (the project's venv unless
/// `TXCOORD_PYTHON` names another).
#[allow(dead_code)]
pub fn python() -> String {
    std::env::var("TXCOORD_PYTHON")
        .unwrap_or_else(|_| format!("{}/.tools/venv/bin/python", env!("CARGO_MANIFEST_DIR")))
}

/// A step for the scripted participant.
pub fn step(service: &str, payload: Value) -> Value {
    json!({"service": service, "action": "act", "payload": payload})
}

/// A request with these steps.
pub fn request(txn_id: &str, steps: Vec<Value>) -> Value {
    json!({"txn_id": txn_id, "mode": "2pc", "steps": steps})
}

/// Waits (10 s at most) on `alerts` (a subscription to `txn.alerts`) for an alert of `kind`
/// about `txn_id`; every alert seen on the way must match the schema. The alert, as JSON.
#[allow(dead_code)]
pub async fn next_alert(alerts: &mut async_nats::Subscriber, kind: &str, txn_id: &str) -> Value {
    use futures::StreamExt;
    let schema = validator("alert");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        let msg = tokio::time::timeout_at(deadline, alerts.next())
            .await
            .unwrap_or_else(|_| panic!("no {kind} alert for {txn_id}; alerts seen: {seen:?}"))
            .expect("alerts subscription open");
        let v: Value = serde_json::from_slice(&msg.payload).expect("alert is JSON");
        check(&schema, "alert", "txn.alerts", &v);
        if v["kind"] == kind && v["txn_id"] == txn_id {
            return v;
        }
        seen.push(v);
    }
}
