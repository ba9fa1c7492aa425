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

/// Parses arguments, opens the table, seeds it with `seed(amount)` (a service whose records
/// only come from transactions passes None, and refuses seeds), and runs the participant.
pub async fn main<T, P>(
    service: &str,
    seed: Option<fn(u64) -> T>,
    make: impl FnOnce(Table<T>) -> P,
) -> ExitCode
where
    T: Serialize + DeserializeOwned + Clone,
    P: Participant,
{
    txcoord_participant::init_logging();
    let args = Args::parse();
    let service = args.service.clone().unwrap_or_else(|| service.to_string());
    let service = service.as_str();
    match run(service, args, seed, make).await {
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
    make: impl FnOnce(Table<T>) -> P,
) -> anyhow::Result<()>
where
    T: Serialize + DeserializeOwned + Clone,
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
        ..Default::default()
    };
    txcoord_participant::run(nc, service, make(table), options, shutdown()).await?;
    Ok(())
}
