//! What the example services share: command-line arguments, seeding, and running a
//! [`Participant`] with the SDK until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use txcoord_participant::kvtable::Table;
use txcoord_participant::{Participant, TxnContext};

/// Arguments every example service takes.
#[derive(Parser, Debug)]
pub struct Args {
    /// NATS server URL(s).
    #[arg(
        long,
        env = "TXCOORD_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,
    /// Configuration file (TOML), read like `txcoord serve` reads it (./txcoord.toml if
    /// present, then TXCOORD_* variables): NATS credentials and TLS (`[nats]`) and
    /// `stream_replicas` come from it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The service name (its command subjects, durable consumer and branch records); the
    /// binary's own name when not given. Several instances of one service share it.
    #[arg(long)]
    pub service: Option<String>,
    /// Subject prefix of the coordinator.
    #[arg(long, env = "TXCOORD_SUBJECT_PREFIX", default_value = "txn")]
    pub prefix: String,
    /// KV bucket holding this service's records (default: <service>_data).
    #[arg(long)]
    pub bucket: Option<String>,
    /// Seed records as KEY=AMOUNT (repeatable); existing records are never overwritten.
    #[arg(long = "seed", value_name = "KEY=AMOUNT")]
    pub seed: Vec<String>,
    /// Seed records from a JSON file: {"KEY": AMOUNT, ...}.
    #[arg(long)]
    pub seed_file: Option<PathBuf>,
    /// Commands handled at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Lock each step's record exclusively from prepare until commit or abort, in the
    /// SDK's lock table (an account while a charge is held, a stock line while a
    /// reservation is): a second transaction on the same record waits its turn, and waits
    /// that form a cycle across services are broken by the coordinator.
    #[arg(long, env = "TXCOORD_LOCK_RECORDS")]
    pub lock_records: bool,
    /// How long a prepare waits for a locked record before it votes abort.
    #[arg(long, default_value_t = 10_000)]
    pub lock_wait_ms: u64,
    /// Chaos: hold each command up to this many milliseconds before handling it, as a
    /// network with jitter would (the deadlock demo uses it so that concurrent transfers
    /// reach the two banks in different orders).
    #[arg(long, default_value_t = 0)]
    pub jitter_ms: u64,
    /// Read no command batches: the coordinator sends this service one message per
    /// command.
    #[arg(long, env = "TXCOORD_NO_BATCH")]
    pub no_batch: bool,
    /// Take no one-phase commits: the coordinator runs every transaction with this service
    /// through both phases.
    #[arg(long, env = "TXCOORD_NO_ONE_PHASE")]
    pub no_one_phase: bool,
    /// Seconds between sweeps that remove the saga markers of finished sagas from this
    /// service's records (0: never). Only services whose saga steps leave markers sweep.
    #[arg(long, default_value_t = 60)]
    pub sweep_secs: u64,
}

impl Args {
    /// The bucket name.
    pub fn bucket(&self, service: &str) -> String {
        self.bucket
            .clone()
            .unwrap_or_else(|| format!("{service}_data"))
    }

    /// The seed entries, from flags and file.
    pub fn seeds(&self) -> anyhow::Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        if let Some(path) = &self.seed_file {
            let text = std::fs::read_to_string(path)?;
            let map: std::collections::BTreeMap<String, u64> = serde_json::from_str(&text)
                .map_err(|e| {
                    anyhow::anyhow!("{}: expected {{\"KEY\": AMOUNT}}: {e}", path.display())
                })?;
            out.extend(map);
        }
        for s in &self.seed {
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--seed {s:?}: expected KEY=AMOUNT"))?;
            let v: u64 = v
                .parse()
                .map_err(|_| anyhow::anyhow!("--seed {s:?}: AMOUNT must be a whole number"))?;
            out.push((k.to_string(), v));
        }
        Ok(out)
    }
}

/// The key under which a branch's hold is kept inside a record.
pub fn hold_key(txn: &TxnContext) -> String {
    format!("{}.{}", txn.txn_id, txn.step)
}

/// A demo and test knob: a payload's `delay_ms` makes prepare slow.
pub async fn demo_delay(payload: &Value) {
    if let Some(ms) = payload.get("delay_ms").and_then(Value::as_u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The payload fields that name a step's record, in the example services.
const RECORD_FIELDS: [&str; 3] = ["account", "sku", "order_id"];

/// A service whose steps lock their record ([`Args::lock_records`]): the record a step's
/// payload names is locked exclusively as `<service>:<key>`, and so is every name in the
/// payload's `"locks"` list (other things the step must hold alone).
pub struct Locking<P> {
    inner: P,
    lock: bool,
}

impl<P: Participant> Participant for Locking<P> {
    fn locks(
        &self,
        txn: &TxnContext,
        _action: &str,
        payload: &Value,
    ) -> Vec<txcoord_participant::HeldLock> {
        if !self.lock {
            return Vec::new();
        }
        // The step's record, and any other names the payload lists in "locks".
        let extra = payload
            .get("locks")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str);
        RECORD_FIELDS
            .iter()
            .find_map(|f| payload.get(*f).and_then(Value::as_str))
            .into_iter()
            .chain(extra)
            .map(|key| txcoord_participant::HeldLock {
                resource: format!("{}:{key}", txn.service),
                mode: txcoord_participant::LockMode::Exclusive,
            })
            .collect()
    }
    async fn prepare(
        &self,
        txn: &TxnContext,
        action: &str,
        payload: &Value,
    ) -> txcoord_participant::Vote {
        self.inner.prepare(txn, action, payload).await
    }
    async fn commit(&self, txn: &TxnContext) -> Result<(), txcoord_participant::ServiceError> {
        self.inner.commit(txn).await
    }
    async fn abort(&self, txn: &TxnContext) -> Result<(), txcoord_participant::ServiceError> {
        self.inner.abort(txn).await
    }
    async fn execute(
        &self,
        txn: &TxnContext,
        action: &str,
        payload: &Value,
    ) -> txcoord_participant::StepResult {
        self.inner.execute(txn, action, payload).await
    }
    async fn compensate(&self, txn: &TxnContext) -> Result<(), txcoord_participant::ServiceError> {
        self.inner.compensate(txn).await
    }
}

/// Parses arguments, opens the table, seeds it with `seed(amount)` (a service whose records
/// only come from transactions passes None, and refuses seeds), and runs the participant.
pub async fn main<T, P>(
    service: &str,
    seed: Option<fn(u64) -> T>,
    markers: Option<crate::sweep::Markers<T>>,
    make: impl FnOnce(Table<T>) -> P,
) -> ExitCode
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    P: Participant,
{
    let args = Args::parse();
    let service = args.service.clone().unwrap_or_else(|| service.to_string());
    let service = service.as_str();
    // Logging, and OTLP trace export when configured; flushed when main returns.
    let _telemetry = match txcoord_telemetry::init(service) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{service}: error: {e}");
            return ExitCode::from(2);
        }
    };
    match run(service, args, seed, markers, make).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{service}: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run<T, P>(
    service: &str,
    args: Args,
    seed: Option<fn(u64) -> T>,
    markers: Option<crate::sweep::Markers<T>>,
    make: impl FnOnce(Table<T>) -> P,
) -> anyhow::Result<()>
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    P: Participant,
{
    let cfg = crate::config::ServiceConfig::load(args.config.as_deref())?;
    let nc = txcoord_nats::connect(&args.nats_url, &cfg.nats, service, true).await?;
    let js = txcoord_nats::jetstream(nc.clone(), Duration::from_secs(1));
    let table = Table::open(&js, &args.bucket(service), cfg.stream_replicas).await?;
    let seeds = args.seeds()?;
    let seed = match (seed, seeds.is_empty()) {
        (Some(f), _) => f,
        (None, true) => |_| unreachable!("no seeds"),
        (None, false) => {
            anyhow::bail!("{service} takes no seeds: its records come from transactions")
        }
    };
    for (key, amount) in seeds {
        if table.insert_if_absent(&key, seed(amount)).await? {
            tracing::info!(%key, amount, "seeded");
        }
    }
    let options = txcoord_participant::Options {
        prefix: args.prefix.clone(),
        max_concurrent: args.concurrency,
        replicas: cfg.stream_replicas,
        in_doubt_after: Duration::from_millis(cfg.in_doubt_after_ms),
        lock_wait: Duration::from_millis(args.lock_wait_ms),
        jitter: Duration::from_millis(args.jitter_ms),
        batch: !args.no_batch,
        one_phase: !args.no_one_phase,
        ..Default::default()
    };
    if let Some(markers) = markers
        && args.sweep_secs > 0
    {
        tokio::spawn(crate::sweep::run(
            js.clone(),
            txcoord_proto::Subjects::new(args.prefix.clone()),
            table.clone(),
            markers,
            Duration::from_secs(args.sweep_secs),
        ));
    }
    let participant = Locking {
        inner: make(table),
        lock: args.lock_records,
    };
    txcoord_participant::run(nc, service, participant, options, shutdown()).await?;
    Ok(())
}
