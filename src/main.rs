//! The `txcoord` command: `serve` runs the coordinator, `submit` and `status` talk to one,
//! `participant` runs the built-in scripted participant.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::Value;
use txcoord::config::Config;

/// mimalloc instead of the system allocator: per-message allocations are most of what the
/// processes do besides I/O (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod chaos;
mod deadlock_demo;
mod demo;
mod procs;

#[derive(Parser)]
#[command(
    name = "txcoord",
    version,
    about = "Distributed transactions (2PC) over NATS JetStream"
)]
struct Cli {
    /// NATS server URL(s), comma separated.
    #[arg(long, global = true, env = "TXCOORD_NATS_URL")]
    nats_url: Option<String>,
    /// Configuration file (TOML); ./txcoord.toml is read if present.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Subject prefix.
    #[arg(long, global = true)]
    prefix: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

/// The filters of `list` and `watch`.
#[derive(clap::Args, Debug, Default)]
struct FilterArgs {
    /// Only these latest states (repeatable, or comma separated): accepted, preparing,
    /// committing, aborting, committed, aborted, rejected, executing, compensating,
    /// completed, compensated, failed.
    #[arg(long = "state", value_delimiter = ',')]
    states: Vec<String>,
    /// Only those flagged stuck.
    #[arg(long)]
    stuck: bool,
    /// Only those whose latest record is older than this (90s, 5m, 2h, 1d).
    #[arg(long)]
    older_than: Option<String>,
    /// Only those with a step of this service.
    #[arg(long)]
    service: Option<String>,
    /// Only 2pc or saga.
    #[arg(long, value_parser = ["2pc", "saga"])]
    mode: Option<String>,
    /// Only those whose latest record is this recent or newer: RFC 3339, a date, or a
    /// duration ago (30m).
    #[arg(long)]
    since: Option<String>,
    /// Only those whose latest record is this old or older (same forms as --since).
    #[arg(long)]
    until: Option<String>,
}

impl FilterArgs {
    fn filter(&self) -> anyhow::Result<txcoord::ops::Filter> {
        use txcoord::ops::time::{parse_duration, parse_time};
        let now = txcoord::proto::now_ms();
        let states = self
            .states
            .iter()
            .map(|s| txcoord::ops::parse_state(s).map_err(|e| anyhow::anyhow!("--state: {e}")))
            .collect::<anyhow::Result<_>>()?;
        let time = |flag: &str, v: &Option<String>| -> anyhow::Result<Option<u64>> {
            v.as_deref()
                .map(|t| parse_time(t, now).map_err(|e| anyhow::anyhow!("--{flag}: {e}")))
                .transpose()
        };
        Ok(txcoord::ops::Filter {
            states,
            stuck: self.stuck,
            older_than: self
                .older_than
                .as_deref()
                .map(|d| parse_duration(d).map_err(|e| anyhow::anyhow!("--older-than: {e}")))
                .transpose()?,
            service: self.service.clone(),
            mode: match self.mode.as_deref() {
                Some("saga") => Some(txcoord::proto::Mode::Saga),
                Some(_) => Some(txcoord::proto::Mode::TwoPc),
                None => None,
            },
            since_ms: time("since", &self.since)?,
            until_ms: time("until", &self.until)?,
        })
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the coordinator.
    Serve {
        /// Largest number of transactions in flight.
        #[arg(long)]
        max_in_flight: Option<usize>,
        /// Default prepare timeout in milliseconds.
        #[arg(long)]
        prepare_timeout_ms: Option<u64>,
        /// Lease time-to-live in milliseconds: how soon a standby takes over from a dead
        /// coordinator.
        #[arg(long)]
        lease_ttl_ms: Option<u64>,
    },
    /// Submit one request (a JSON object) or many (JSON Lines) and print each final event.
    /// Exit 0 if all committed (or, for sagas, completed), 1 if any did not, 2 on error.
    Submit {
        /// A file, or - for standard input.
        file: String,
        /// How long to wait for the outcomes, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
        /// `outcome` (every participant confirmed) or `decided` (the decision is durable;
        /// the participants apply it afterwards, and `committing` counts as committed).
        #[arg(long, default_value = "outcome", value_parser = parse_until)]
        until: txcoord::proto::Until,
    },
    /// Print a transaction's latest state.
    Status {
        /// The transaction id.
        txn_id: String,
    },
    /// List transactions from the log (it works while no coordinator runs), newest first,
    /// a page at a time; the filters apply to each transaction's latest state.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Transactions per page.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Start below this log sequence (the `next page` a listing prints).
        #[arg(long)]
        before: Option<u64>,
        /// Read at most this many log records for one page.
        #[arg(long, default_value_t = 1_000_000)]
        scan_max: u64,
        /// One JSON object: the transactions' latest events and where the next page starts.
        #[arg(long)]
        json: bool,
    },
    /// The timeline of one transaction from its log: every record, each step's votes and
    /// attempts, the reasons, and how long it took.
    Show {
        /// The transaction id.
        txn_id: String,
        /// Every record, as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Ask the active coordinator to act on a transaction: `resolve <id> retry-now`,
    /// `resolve <id> abort --reason TEXT`, `resolve <id> mark-done --step N --reason TEXT`,
    /// `resolve <id> mark-done --outcome committed|aborted --reason TEXT` (a one-phase
    /// transaction whose participant never answered, past its deadline);
    /// or on every stuck one: `resolve --all-stuck <action> --reason TEXT`. The rules keep
    /// atomicity (an abort only before a decision is durable; mark-done only for a step of
    /// a decided transaction, fixed by hand) and a refusal names the rule. The record that
    /// carries it out names who asked and why. Exit 0 if every action was carried out (or,
    /// with --dry-run, would be), 1 if any was refused, 2 on error.
    Resolve {
        /// `<txn_id> <action>`, or only `<action>` with --all-stuck; the action is
        /// retry-now, abort or mark-done.
        #[arg(num_args = 1..=2, required = true)]
        args: Vec<String>,
        /// mark-done: the step the operator applied by hand.
        #[arg(long)]
        step: Option<usize>,
        /// mark-done of a one-phase transaction whose participant never answered, past its
        /// deadline: what the participant did, as confirmed at the service (`committed` or
        /// `aborted`). The transaction ends so, recorded as the operator's decision.
        #[arg(long, value_parser = parse_outcome)]
        outcome: Option<txcoord::proto::ConfirmedOutcome>,
        /// Why (required: it goes into the audit record).
        #[arg(long)]
        reason: String,
        /// Who asks (default: the user and host this runs as).
        #[arg(long)]
        by: Option<String>,
        /// Every transaction flagged stuck (from the log), instead of one.
        #[arg(long)]
        all_stuck: bool,
        /// Check the rules and say what would happen; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print each answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow the log live: one line per new record that matches the filters.
    Watch {
        #[command(flatten)]
        filter: FilterArgs,
        /// One JSON event per line.
        #[arg(long)]
        json: bool,
    },
    /// Run the order demo end to end: nats-server (unless --nats-url), the coordinator, the
    /// inventory, payment and order services; place orders; print a summary; check invariants.
    Demo(demo::DemoArgs),
    /// Benchmark: a closed loop of clients against a coordinator (started here with no-op
    /// participants unless --nats-url is given), with the raw JetStream ceiling.
    Bench(bench::BenchArgs),
    /// The fault suite: bank transfers across SDK and raw-protocol participants while
    /// coordinators, banks and nats-server are killed and connections cut or delayed; then
    /// one line per check. Exit 0 if every check passed, 1 if any did not.
    Chaos(chaos::ChaosArgs),
    /// Generate NATS identities (users, passwords, permissions) for the coordinator, each
    /// client, each service and each operator: an authorization block for nats-server and a
    /// txcoord configuration file per identity.
    Auth {
        /// A service that takes part in transactions (repeatable).
        #[arg(long = "service", value_name = "NAME")]
        services: Vec<String>,
        /// A client that submits transactions (repeatable).
        #[arg(long = "client", value_name = "NAME")]
        clients: Vec<String>,
        /// An operator (repeatable): may read the log, watch records and alerts, ask the
        /// coordinator's $SRV endpoints, and call status and resolve; may write nothing else.
        #[arg(long = "operator", value_name = "NAME")]
        operators: Vec<String>,
        /// Where to write nats-auth.conf and <name>.toml (created if missing).
        #[arg(long, default_value = "txcoord-auth")]
        out: PathBuf,
    },
    /// Join the HTTP services of `[http_services.<name>]` to transactions: one SDK
    /// participant per service, forwarding each command to `POST {url}/<kind>`; with
    /// `http_allow` set, also the service `http_url_service`, which runs the steps that name
    /// their HTTP service by a URL under that list.
    HttpBridge {
        /// Commands handled at once, per service.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// An HTTP service as NAME=URL (repeatable), with the default settings; it adds to
        /// (or sets the url of) `[http_services.<name>]`.
        #[arg(long = "service", value_name = "NAME=URL")]
        services: Vec<String>,
    },
    /// A no-op HTTP participant for `txcoord bench --http`: `POST /<service>/<kind>` answers
    /// 200, or 409 when the payload says `"vote": "abort"` (or `"execute": "fail"`).
    #[command(hide = true)]
    HttpNoop {
        /// The port on 127.0.0.1.
        #[arg(long)]
        port: u16,
    },
    /// Run the built-in scripted participant (each step's payload says how it votes).
    Participant {
        /// The service name to serve.
        #[arg(long)]
        service: String,
        /// Delay every prepare by this many milliseconds.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Commands handled at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Print no VOTED/EXECUTED/COMPENSATED line per command.
        #[arg(long)]
        quiet: bool,
        /// Read no command batches (and say so on every reply): the coordinator then sends
        /// this service one message per command, as to a raw-protocol participant.
        #[arg(long)]
        no_batch: bool,
        /// Take no one-phase commits (and say so on every reply): the coordinator then
        /// runs every transaction with this service through both phases.
        #[arg(long)]
        no_one_phase: bool,
        /// Keep records of finished branches this many seconds (0: forever). Default: the
        /// command stream's retention plus a day.
        #[arg(long)]
        finished_record_ttl_secs: Option<u64>,
    },
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut cfg = Config::load(cli.config.as_deref())?;
    if let Some(url) = &cli.nats_url {
        cfg.nats_url = url.clone();
    }
    if let Some(p) = &cli.prefix {
        cfg.subject_prefix = p.clone();
    }
    if let Cmd::Serve {
        max_in_flight,
        prepare_timeout_ms,
        lease_ttl_ms,
    } = &cli.command
    {
        if let Some(t) = lease_ttl_ms {
            cfg.lease_ttl_ms = *t;
        }
        if let Some(m) = max_in_flight {
            cfg.max_in_flight = *m;
        }
        if let Some(t) = prepare_timeout_ms {
            cfg.prepare_timeout_ms = *t;
        }
    }
    cfg.validate()?;
    Ok(cfg)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logging, and OTLP trace export when OTEL_EXPORTER_OTLP_ENDPOINT is set; kept until
    // the end so the last spans are flushed.
    let service = match &cli.command {
        Cmd::Serve { .. } => "txcoord",
        Cmd::HttpBridge { .. } => "txcoord-http-bridge",
        Cmd::Participant { service, .. } => service.as_str(),
        _ => "txcoord-cli",
    };
    let _telemetry = match txcoord_telemetry::init(service) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = match load_config(&cli) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    // One thread unless `serve` is configured for more: async-nats sends all traffic through
    // one connection task, and on one thread it gathers writes instead of being woken
    // across threads for each (BENCHMARKS.md measures the difference).
    let threads = match cli.command {
        Cmd::Serve { .. } => cfg.worker_threads,
        // The fault injector and the workload must not stall each other.
        Cmd::Chaos(_) => 2,
        _ => 1,
    };
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli, cfg)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Who runs this command, for an operator action's audit record: `user@host`.
/// `--outcome`: `committed` or `aborted`.
fn parse_outcome(s: &str) -> Result<txcoord::proto::ConfirmedOutcome, String> {
    match s {
        "committed" => Ok(txcoord::proto::ConfirmedOutcome::Committed),
        "aborted" => Ok(txcoord::proto::ConfirmedOutcome::Aborted),
        other => Err(format!("{other:?} is not an outcome: committed or aborted")),
    }
}

fn whoami() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{user}@{host}")
}

/// The log (the events stream) and the subjects, for the read-only operator commands. The
/// stream is looked up, not created: an empty server has no log to read.
async fn log_reader(
    cfg: &Config,
) -> anyhow::Result<(
    async_nats::jetstream::stream::Stream,
    txcoord::proto::Subjects,
)> {
    let nc = txcoord::nats::connect_config(cfg, "txcoord-cli", false).await?;
    let subjects = txcoord::proto::Subjects::new(cfg.subject_prefix.clone());
    let js = async_nats::jetstream::new(nc);
    let events = js
        .get_stream(subjects.events_stream())
        .await
        .with_context(|| format!("no log here: stream {} not found", subjects.events_stream()))?;
    Ok((events, subjects))
}

/// The SDK's settings for a participant this binary runs, from the configuration.
fn sdk_options(cfg: &Config, concurrency: usize) -> txcoord::participant::Options {
    txcoord::participant::Options {
        prefix: cfg.subject_prefix.clone(),
        max_concurrent: concurrency,
        replicas: cfg.stream_replicas,
        in_doubt_after: Duration::from_millis(cfg.in_doubt_after_ms),
        ..Default::default()
    }
}

async fn run(cli: Cli, cfg: Config) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Bench(args) => {
            bench::run(args, cli.nats_url, &cfg).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo(args) => {
            let ok = demo::run(args, cli.nats_url, &cfg).await?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Auth {
            services,
            clients,
            operators,
            out,
        } => {
            write_auth(&cfg.subject_prefix, &services, &clients, &operators, &out)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Chaos(args) => {
            // Interrupted (Ctrl-C, SIGTERM), the run is dropped, and with the runtime every
            // task holding its servers and processes: each is stopped on drop, so none is
            // left running.
            let ok = tokio::select! {
                ok = chaos::run(args) => ok?,
                _ = shutdown_signal() => {
                    eprintln!("chaos: interrupted; stopping the servers and processes it started");
                    return Ok(ExitCode::from(130));
                }
            };
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Serve { .. } => {
            txcoord::coordinator::run(cfg, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Submit {
            file,
            timeout_secs,
            until,
        } => submit(&cfg, &file, Duration::from_secs(timeout_secs), until).await,
        Cmd::Status { txn_id } => {
            let nc = txcoord::nats::connect_config(&cfg, "txcoord-cli", false).await?;
            let client = txcoord::client::Client::new(nc, &cfg.subject_prefix)
                .await?
                .submitting_as(&cfg.submit_as);
            let ev = client.status(&txn_id).await?;
            println!("{}", serde_json::to_string(&ev)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::List {
            filter,
            limit,
            before,
            scan_max,
            json,
        } => {
            let filter = filter.filter()?;
            anyhow::ensure!(limit > 0, "--limit must be at least 1");
            let (events, subjects) = log_reader(&cfg).await?;
            let page =
                txcoord::ops::list(&events, &subjects, &filter, limit, before, scan_max.max(1))
                    .await?;
            if json {
                let items: Vec<Value> = page
                    .items
                    .iter()
                    .map(|l| serde_json::json!({"seq": l.seq, "event": l.event}))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({
                        "transactions": items,
                        "next_before": page.next_before,
                        "scanned": page.scanned,
                        "cut_short": page.cut_short,
                    })
                );
            } else {
                let now = txcoord::proto::now_ms();
                for l in &page.items {
                    println!("{}", txcoord::ops::list_line(&l.event, now));
                }
                if page.items.is_empty() {
                    println!("no transaction matches ({} log records read)", page.scanned);
                }
                if let Some(b) = page.next_before {
                    println!(
                        "next page: --before {b}{}",
                        if page.cut_short {
                            " (this page stopped at --scan-max)"
                        } else {
                            ""
                        }
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Show { txn_id, json } => {
            anyhow::ensure!(
                txcoord::proto::is_token(&txn_id, txcoord::proto::MAX_TXN_ID_LEN),
                "{txn_id:?} is not a valid txn_id"
            );
            let (events, subjects) = log_reader(&cfg).await?;
            let history: Vec<txcoord::proto::TransactionEvent> =
                txcoord::client::read_log(&events, &subjects.events(&txn_id))
                    .await
                    .into_iter()
                    .filter(|e: &txcoord::proto::TransactionEvent| e.txn_id == txn_id)
                    .collect();
            if history.is_empty() {
                eprintln!("no transaction {txn_id} in the log");
                return Ok(ExitCode::from(1));
            }
            if json {
                println!("{}", serde_json::to_string(&history)?);
            } else {
                print!("{}", txcoord::ops::timeline(&history));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Resolve {
            args,
            step,
            outcome,
            reason,
            by,
            all_stuck,
            dry_run,
            json,
        } => {
            let (ids, action) = match (all_stuck, args.as_slice()) {
                (true, [action]) => (None, action.clone()),
                (false, [id, action]) => (Some(vec![id.clone()]), action.clone()),
                (true, _) => anyhow::bail!(
                    "with --all-stuck, give only the action: resolve --all-stuck retry-now --reason ..."
                ),
                (false, _) => anyhow::bail!(
                    "give the transaction and the action: resolve <txn_id> retry-now|abort|mark-done --reason ..."
                ),
            };
            let action: txcoord::proto::ResolveAction =
                serde_json::from_value(Value::String(action.clone())).map_err(|_| {
                    anyhow::anyhow!("{action:?} is not an action: retry-now, abort or mark-done")
                })?;
            let ids = match ids {
                Some(ids) => ids,
                None => {
                    let (events, subjects) = log_reader(&cfg).await?;
                    let filter = txcoord::ops::Filter {
                        stuck: true,
                        ..Default::default()
                    };
                    let mut all = Vec::new();
                    let mut before = None;
                    loop {
                        let page =
                            txcoord::ops::list(&events, &subjects, &filter, 500, before, u64::MAX)
                                .await?;
                        all.extend(page.items.into_iter().map(|l| l.event.txn_id));
                        match page.next_before {
                            Some(b) => before = Some(b),
                            None => break,
                        }
                    }
                    if all.is_empty() {
                        println!("no transaction is flagged stuck");
                    }
                    all
                }
            };
            let nc = txcoord::nats::connect_config(&cfg, "txcoord-cli", false).await?;
            let subject = txcoord::proto::Subjects::new(cfg.subject_prefix.clone()).api("resolve");
            let by = by.unwrap_or_else(whoami);
            let mut refused = 0;
            for txn_id in ids {
                let request = txcoord::proto::ResolveRequest {
                    txn_id: txn_id.clone(),
                    resolution: txcoord::proto::Resolution {
                        action,
                        step,
                        outcome,
                        reason: reason.clone(),
                        by: by.clone(),
                        at_ms: 0,
                    },
                    dry_run,
                };
                let reply = tokio::time::timeout(
                    Duration::from_secs(35),
                    nc.request(subject.clone(), serde_json::to_vec(&request)?.into()),
                )
                .await
                .map_err(|_| {
                    anyhow::anyhow!("no answer from the coordinator on {subject} within 35 s")
                })?
                .with_context(|| {
                    format!("asking the coordinator on {subject} (is one running? may this identity publish there?)")
                })?;
                let v: Value = serde_json::from_slice(&reply.payload).with_context(|| {
                    format!("the coordinator's answer on {subject} is not JSON")
                })?;
                if json {
                    println!("{v}");
                }
                if let Some(e) = v.get("error").and_then(Value::as_str) {
                    refused += 1;
                    if !json {
                        println!("{txn_id}: {} refused: {e}", action.as_str());
                    }
                } else if !json {
                    let state = v["state"].as_str().unwrap_or("?");
                    if dry_run {
                        println!(
                            "{txn_id}: {} would be carried out (it is {state}; dry run, nothing changed)",
                            action.as_str()
                        );
                    } else {
                        println!("{txn_id}: {} carried out; it is {state}", action.as_str());
                    }
                }
            }
            Ok(ExitCode::from(if refused > 0 { 1 } else { 0 }))
        }
        Cmd::Watch { filter, json } => {
            let filter = filter.filter()?;
            let nc = txcoord::nats::connect_config(&cfg, "txcoord-cli", false).await?;
            let subjects = txcoord::proto::Subjects::new(cfg.subject_prefix.clone());
            let mut sub = nc.subscribe(subjects.events_all()).await?;
            nc.flush().await?;
            eprintln!("watching {} (Ctrl-C to stop)", subjects.events_all());
            use futures::StreamExt;
            while let Some(msg) = sub.next().await {
                let Ok(ev) =
                    serde_json::from_slice::<txcoord::proto::TransactionEvent>(&msg.payload)
                else {
                    continue;
                };
                if subjects.events_txn(&msg.subject) != Some(ev.txn_id.as_str())
                    || !filter.matches(&ev, txcoord::proto::now_ms())
                {
                    continue;
                }
                if json {
                    println!("{}", serde_json::to_string(&ev)?);
                } else {
                    println!("{}", txcoord::ops::list_line(&ev, txcoord::proto::now_ms()));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::HttpNoop { port } => {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
            println!("http-noop ready on 127.0.0.1:{port}");
            let app = axum::Router::new().route(
                "/{service}/{kind}",
                axum::routing::post(|body: axum::Json<serde_json::Value>| async move {
                    let p = &body.0["payload"];
                    if p["vote"] == "abort" || p["execute"] == "fail" {
                        (
                            axum::http::StatusCode::CONFLICT,
                            axum::Json(serde_json::json!({"reason": "scripted abort"})),
                        )
                    } else {
                        (
                            axum::http::StatusCode::OK,
                            axum::Json(serde_json::json!({})),
                        )
                    }
                }),
            );
            axum::serve(listener, app).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::HttpBridge {
            concurrency,
            services,
        } => {
            let mut cfg = cfg;
            for s in services {
                let Some((name, url)) = s.split_once('=') else {
                    anyhow::bail!("--service {s:?}: expected NAME=URL");
                };
                cfg.http_services.entry(name.to_string()).or_default().url = url.to_string();
            }
            cfg.validate()?;
            if cfg.http_services.is_empty() && cfg.http_allow.is_empty() {
                anyhow::bail!(
                    "no HTTP services: add [http_services.<name>] with a url to the configuration, or --service NAME=URL, or http_allow for steps named by URL"
                );
            }
            let mut participants = Vec::new();
            for (name, svc) in &cfg.http_services {
                participants.push((
                    name.clone(),
                    txcoord_http::HttpParticipant::new(name, svc.clone())?,
                ));
            }
            if !cfg.http_allow.is_empty() {
                let allow = txcoord_http::UrlAllowList::new(&cfg.http_allow)
                    .map_err(|(i, e)| anyhow::anyhow!("http_allow[{i}]: {e}"))?;
                participants.push((
                    cfg.http_url_service.clone(),
                    txcoord_http::HttpParticipant::for_urls(&cfg.http_url_service, allow)?,
                ));
            }
            let names: Vec<String> = participants.iter().map(|(n, _)| n.clone()).collect();
            let mut bridges = Vec::new();
            for (name, participant) in participants {
                let nc = txcoord::nats::connect_config(&cfg, &format!("txcoord-http-{name}"), true)
                    .await?;
                let options = sdk_options(&cfg, concurrency);
                bridges.push(tokio::spawn(async move {
                    let r = txcoord::participant::run(
                        nc,
                        &name,
                        participant,
                        options,
                        shutdown_signal(),
                    )
                    .await;
                    (name, r)
                }));
            }
            println!("http-bridge ready: {}", names.join(", "));
            for b in bridges {
                let (name, r) = b.await?;
                if let Err(e) = r {
                    anyhow::bail!("http service {name}: {e}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Participant {
            service,
            delay_ms,
            concurrency,
            quiet,
            no_batch,
            no_one_phase,
            finished_record_ttl_secs,
        } => {
            let nc = txcoord::nats::connect_config(
                &cfg,
                &format!("txcoord-participant-{service}"),
                true,
            )
            .await?;
            let options = txcoord::participant::Options {
                finished_record_ttl: finished_record_ttl_secs.map(Duration::from_secs),
                batch: !no_batch,
                one_phase: !no_one_phase,
                ..sdk_options(&cfg, concurrency)
            };
            let mut p = txcoord::scripted::Scripted::new(Duration::from_millis(delay_ms));
            if quiet {
                p = p.quiet();
            }
            println!("participant {service} starting");
            txcoord::participant::run(nc, &service, p, options, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Writes `txcoord auth`'s files: the server block and one configuration per identity, each
/// readable by its owner only (they hold passwords).
fn write_auth(
    prefix: &str,
    services: &[String],
    clients: &[String],
    operators: &[String],
    out: &std::path::Path,
) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if services.is_empty() && clients.is_empty() && operators.is_empty() {
        anyhow::bail!("name at least one --service, --client or --operator");
    }
    let generated =
        txcoord::authgen::generate_with_operators(prefix, services, clients, operators)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let write = |name: String, text: String| -> anyhow::Result<()> {
        let path = out.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        std::io::Write::write_all(&mut f, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
        Ok(())
    };
    write("nats-auth.conf".into(), generated.server_block())?;
    for id in &generated.identities {
        write(format!("{}.toml", id.name), id.config_toml())?;
    }
    println!(
        "include nats-auth.conf in nats-server's configuration; start each process with --config <its file> (or TXCOORD_NATS__USER, __PASSWORD, __INBOX_PREFIX)"
    );
    Ok(())
}

/// Reads one JSON object, or JSON Lines.
fn read_requests(text: &str) -> Vec<Result<Value, String>> {
    if let Ok(v) = serde_json::from_str::<Value>(text)
        && v.is_object()
    {
        return vec![Ok(v)];
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str::<Value>(l)
                .map_err(|e| format!("line {}: not valid JSON: {e}", i + 1))
        })
        .collect()
}

/// `--until` of `submit` and `bench`: `outcome` or `decided`.
fn parse_until(s: &str) -> Result<txcoord::proto::Until, String> {
    s.parse()
}

async fn submit(
    cfg: &Config,
    file: &str,
    timeout: Duration,
    until: txcoord::proto::Until,
) -> anyhow::Result<ExitCode> {
    let text = if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading standard input")?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?
    };
    let parsed = read_requests(&text);
    let mut failed = false;
    let mut good = Vec::new();
    for p in parsed {
        match p {
            Ok(v) => good.push(v),
            Err(e) => {
                println!("{}", serde_json::json!({ "error": e }));
                failed = true;
            }
        }
    }
    let nc = txcoord::nats::connect_config(cfg, "txcoord-cli", false).await?;
    let client = txcoord::client::Client::new(nc, &cfg.subject_prefix)
        .await?
        .submitting_as(&cfg.submit_as);
    let mut aborted = false;
    let results = client.submit_until(good, until, timeout, |_, _| {}).await;
    for result in results {
        match result {
            Ok(ev) => {
                if !ev.state.takes_effect() {
                    aborted = true;
                }
                println!("{}", serde_json::to_string(&ev)?);
            }
            Err(e) => {
                println!("{}", serde_json::json!({ "error": e.to_string() }));
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::from(2)
    } else if aborted {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
