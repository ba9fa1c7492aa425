//! `txcoord chaos`: the fault suite. It starts nats-server (`sync_interval: always`; with
//! `--cluster`, three nodes and every stream at 3 replicas, one node hit per server fault), two
//! coordinators (one active, one standby), two banks on the Rust SDK and one in Python on the
//! raw protocol, each process behind its own TCP proxy. It runs bank transfers (a debit at
//! one bank and a credit at another, 2PC, or with `--sagas` every other one between the two
//! Rust banks a saga; one in five a withdrawal, a debit alone, which the Rust banks commit
//! in one phase) with a fixed number in flight while it SIGKILLs coordinators and banks,
//! restarts and SIGKILLs nats-server, and cuts and delays connections. At the end it reads
//! the log, the commands it saw and every bank's state, and prints one line per check (see
//! [`check`]).

mod check;
mod proxy;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use txcoord::nats::{Expect, publish_durable_with};
use txcoord::natsserver::{NatsCluster, NatsServer};
use txcoord::participant::BranchState;
use txcoord::proto::{
    CommandBatch, DECIDED_TO_HEADER, OUTCOME_TO_HEADER, ParticipantCommand, Subjects,
    TransactionEvent, now_ms,
};
use txcoord::rng::XorShift;

use crate::procs::{Proc, coordinator_stats, sibling, wait_consumer};
use check::{Branch, Transfer};
use proxy::{Proxies, Proxy};

/// The fault suite's options. The defaults are the long run of RELIABILITY.md.
#[derive(clap::Args, Debug, Clone)]
pub struct ChaosArgs {
    /// How many transfers to run.
    #[arg(long, default_value_t = 10_000)]
    pub transfers: usize,
    /// Transfers in flight at once.
    #[arg(long, default_value_t = 50)]
    pub in_flight: usize,
    /// SIGKILLs of a coordinator (mostly the lease holder, sometimes the standby).
    #[arg(long, default_value_t = 60)]
    pub coordinator_kills: usize,
    /// SIGKILLs of a bank.
    #[arg(long, default_value_t = 60)]
    pub participant_kills: usize,
    /// nats-server restarts; every other one is a SIGKILL (the store syncs every write).
    #[arg(long, default_value_t = 12)]
    pub server_restarts: usize,
    /// Connection cuts (one process's, sometimes everyone's) through the proxies.
    #[arg(long, default_value_t = 30)]
    pub cuts: usize,
    /// Spells of delayed traffic for one process.
    #[arg(long, default_value_t = 30)]
    pub delays: usize,
    /// Seed of the transfers and the faults, for a repeatable plan.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The nats-server binary (else NATS_SERVER_BIN, the project's install, PATH).
    #[arg(long)]
    pub nats_server: Option<PathBuf>,
    /// Where to keep the store, the banks' files and every process's log (a temp dir
    /// otherwise). Must be new or empty.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The Python with nats-py for the raw-protocol bank (else TXCOORD_PYTHON, the
    /// project's .tools/venv, python3).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Leave out the Python bank.
    #[arg(long)]
    pub no_python: bool,
    /// The goal for the time from the last fault to the last terminal transfer, seconds.
    #[arg(long, default_value_t = 10)]
    pub goal_secs: u64,
    /// Fail the run when that goal is missed (the long run does; the test suite's short run
    /// only reports it, since timing belongs in benchmarks).
    #[arg(long)]
    pub strict_time: bool,
    /// How long to wait for every transfer to end after the last one was sent, seconds.
    #[arg(long, default_value_t = 300)]
    pub settle_secs: u64,
    /// Run on a 3-node cluster, every stream and bucket at 3 replicas: each server fault
    /// then restarts or SIGKILLs one node, picked at random, and every process reaches every
    /// node through its own proxies.
    #[arg(long)]
    pub cluster: bool,
    /// With --cluster: times two of the three nodes are SIGKILLed together (no quorum, so
    /// JetStream takes no write) and started again after up to 1.5 s.
    #[arg(long, default_value_t = 0)]
    pub quorum_losses: usize,
    /// With --cluster: times one node is cut off from the other two (its routes go through
    /// proxies) for 0.5 to 6 s, while the processes connected to it stay connected to it.
    #[arg(long, default_value_t = 0)]
    pub partitions: usize,
    /// With --cluster: times one node is SIGKILLed, its JetStream store deleted, and started
    /// again empty (a lost or replaced disk), each once every stream's replicas are in
    /// sync, so it is the only copy lost; its peers bring it up to date.
    #[arg(long, default_value_t = 0)]
    pub wipes: usize,
    /// Run every other transfer between the two Rust banks as a saga (debit, then credit).
    /// Off by default, so a seed's workload stays what it was before sagas joined.
    #[arg(long)]
    pub sagas: bool,
}

const ACCOUNTS: usize = 5;
const OPENING_BALANCE: u64 = 10_000;

/// A bank of the run: its service name and whether it is the Python one.
struct BankSpec {
    service: String,
    python: bool,
}

/// The kinds of fault, in the order the report lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillCoordinator,
    KillParticipant,
    RestartServer,
    KillServer,
    LoseQuorum,
    Partition,
    WipeNode,
    Cut,
    Delay,
}

/// What the faults did, for the report.
#[derive(Default)]
struct FaultLog {
    counts: BTreeMap<Fault, usize>,
    holder_kills: usize,
    /// Server faults by node (one node only, unless on a cluster).
    nodes_hit: BTreeMap<usize, usize>,
    /// When the last fault ended (the process back, the connection up, the delay over).
    last_end_ms: u64,
    /// How long the wipes waited, in all, for every stream's replicas to be in sync.
    wipe_waits: Duration,
    /// Wipes done although the streams were still not in sync after the longest wait.
    wipes_unsynced: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Coordinator,
    Bank,
}

/// One process of the run, with its proxies.
struct Member {
    proc: Proc,
    role: Role,
    proxy: Proxies,
    /// Killed on purpose and not yet restarted: the supervisor leaves it alone.
    down: bool,
    /// Times it exited on its own (a coordinator that lost its lease) and was restarted.
    exits: usize,
}

type Members = Arc<Mutex<Vec<Member>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the suite; `Ok(true)` when every check passed.
pub async fn run(args: ChaosArgs) -> anyhow::Result<bool> {
    let tmp;
    let dir: PathBuf = match &args.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            if std::fs::read_dir(d)?.next().is_some() {
                bail!(
                    "--data-dir {} is not empty; the checks need a fresh store",
                    d.display()
                );
            }
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("txcoord-chaos-")
                .tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    if args.transfers == 0 || args.in_flight == 0 {
        bail!("--transfers and --in-flight must be at least 1");
    }
    if (args.quorum_losses > 0 || args.partitions > 0 || args.wipes > 0) && !args.cluster {
        bail!("--quorum-losses, --partitions and --wipes need --cluster: one server has no peers");
    }
    let banks = bank_specs(&args);
    // Between nodes: a proxy for each direction of each route, so a partition can cut them.
    // They live as long as the run (the injector holds them only while it injects).
    let mut routes: BTreeMap<(usize, usize), Proxy> = BTreeMap::new();
    let nodes = if args.cluster {
        let cluster_ports = (0..3)
            .map(|_| txcoord::natsserver::free_port())
            .collect::<std::io::Result<Vec<u16>>>()?;
        for from in 0..3 {
            for (to, &port) in cluster_ports.iter().enumerate() {
                if from != to {
                    routes.insert((from, to), Proxy::start(port).await?);
                }
            }
        }
        let dial = |from: usize, to: usize| routes.get(&(from, to)).map_or(0, Proxy::port);
        NatsCluster::start_routed(
            args.nats_server.as_deref(),
            &cluster_ports,
            "sync_interval: always",
            Some(&dir.join("nats")),
            dial,
        )
        .context("starting a 3-node nats-server cluster")?
        .nodes
    } else {
        vec![
            NatsServer::start_with(
                args.nats_server.as_deref(),
                Some(&dir.join("nats")),
                "sync_interval: always",
            )
            .context("starting nats-server")?,
        ]
    };
    let url = nodes
        .iter()
        .map(NatsServer::url)
        .collect::<Vec<_>>()
        .join(",");
    let ports: Vec<u16> = nodes.iter().map(NatsServer::port).collect();
    let server = Arc::new(Mutex::new(nodes));
    let routes = Arc::new(routes);
    eprintln!("txcoord chaos: NATS at {url}, logs in {}", dir.display());
    // Every process's streams and buckets at the cluster's replicas.
    let replicas: Vec<(String, String)> = if args.cluster {
        vec![("TXCOORD_STREAM_REPLICAS".into(), "3".into())]
    } else {
        Vec::new()
    };

    let members: Members = Arc::new(Mutex::new(Vec::new()));
    let me = std::env::current_exe()?.display().to_string();
    for i in 1..=2 {
        let proxy = Proxies::start(&ports).await?;
        let cmd = vec![
            me.clone(),
            "serve".into(),
            "--nats-url".into(),
            proxy.url(),
            "--lease-ttl-ms".into(),
            "3000".into(),
        ];
        let name = format!("coordinator-{i}");
        let proc = crate::procs::spawn_env(
            &name,
            cmd,
            replicas.clone(),
            dir.join(format!("{name}.log")),
        )?;
        lock(&members).push(Member {
            proc,
            role: Role::Coordinator,
            proxy,
            down: false,
            exits: 0,
        });
    }
    let nc = txcoord::nats::connect(&url, &Default::default(), "txcoord-chaos", true).await?;
    coordinator_stats(&nc, Duration::from_secs(60))
        .await
        .context("no coordinator became ready")?;
    let python = python(&args);
    for b in &banks {
        let proxy = Proxies::start(&ports).await?;
        let seeds: Vec<String> = (0..ACCOUNTS)
            .map(|a| format!("acct-{a}={OPENING_BALANCE}"))
            .collect();
        let (cmd, envs) = if b.python {
            let mut cmd = vec![
                python.clone(),
                bank_script().display().to_string(),
                "--nats-url".into(),
                proxy.url(),
                "--service".into(),
                b.service.clone(),
                "--db".into(),
                dir.join(format!("{}.sqlite", b.service))
                    .display()
                    .to_string(),
                "--in-doubt-after-ms".into(),
                "5000".into(),
            ];
            for s in seeds {
                cmd.extend(["--seed".into(), s]);
            }
            (cmd, Vec::new())
        } else {
            let mut cmd = vec![
                sibling("txcoord-bank")?,
                "--nats-url".into(),
                proxy.url(),
                "--service".into(),
                b.service.clone(),
            ];
            for s in seeds {
                cmd.extend(["--seed".into(), s]);
            }
            let mut envs = vec![("TXCOORD_IN_DOUBT_AFTER_MS".into(), "5000".into())];
            envs.extend(replicas.iter().cloned());
            (cmd, envs)
        };
        let proc = crate::procs::spawn_env(
            &b.service,
            cmd,
            envs,
            dir.join(format!("{}.log", b.service)),
        )?;
        lock(&members).push(Member {
            proc,
            role: Role::Bank,
            proxy,
            down: false,
            exits: 0,
        });
    }
    let subjects = Subjects::new("txn".to_string());
    let js = txcoord::nats::jetstream(nc.clone(), Duration::from_secs(2));
    for b in &banks {
        wait_consumer(
            &js,
            &subjects.command_stream(),
            &b.service,
            Duration::from_secs(60),
        )
        .await
        .with_context(|| format!("{} not ready (logs in {})", b.service, dir.display()))?;
    }

    let transfers = generate(&args, &banks);
    let mut initial = BTreeMap::new();
    for b in &banks {
        for a in 0..ACCOUNTS {
            initial.insert((b.service.clone(), format!("acct-{a}")), OPENING_BALANCE);
        }
    }
    let commands = observe_commands(&nc, &subjects).await?;
    let (inbox, notices) = observe_decisions(&nc).await?;
    let watch = Watch::start(&nc, &subjects).await?;
    let client = txcoord::client::Client::new(nc.clone(), "txn").await?;

    let stop = Arc::new(tokio::sync::Notify::new());
    let supervisor = tokio::spawn(supervise(members.clone(), stop.clone()));
    let plan = fault_plan(&args);
    let thresholds: Vec<usize> = (0..plan.len())
        .map(|j| (j + 1) * args.transfers / (plan.len() + 1))
        .collect();
    let taken = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let faults = tokio::spawn(inject(
        plan,
        thresholds.clone(),
        taken.clone(),
        started.clone(),
        Injector {
            members: members.clone(),
            server: server.clone(),
            routes: routes.clone(),
            js: js.clone(),
            rng: XorShift::new(args.seed ^ 0xFA17),
        },
    ));

    let bar = indicatif::ProgressBar::new(transfers.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} transfers [{bar:40}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let began = Instant::now();
    let settle = Duration::from_secs(args.settle_secs);
    let work = Arc::new(transfers.clone());
    let latencies = Arc::new(Mutex::new(hdrhistogram::Histogram::<u64>::new(3)?));
    let workers: Vec<_> = (0..args.in_flight)
        .map(|_| {
            let (work, taken, started, thresholds) = (
                work.clone(),
                taken.clone(),
                started.clone(),
                thresholds.clone(),
            );
            let (js, client, watch, bar, latencies) = (
                js.clone(),
                client.clone(),
                watch.clone(),
                bar.clone(),
                latencies.clone(),
            );
            let subject = subjects.submit();
            let inbox = inbox.clone();
            tokio::spawn(async move {
                loop {
                    let i = taken.fetch_add(1, Ordering::SeqCst);
                    let Some(t) = work.get(i) else { break };
                    // Every fault planned before this transfer has started.
                    let due = thresholds.iter().filter(|&&th| th <= i).count();
                    while started.load(Ordering::SeqCst) < due {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    let sent = Instant::now();
                    let to = Target {
                        subject: &subject,
                        inbox: &inbox,
                    };
                    if transfer(&js, &client, &watch, to, t, settle).await {
                        let _ = lock(&latencies).record(sent.elapsed().as_millis() as u64);
                    }
                    bar.inc(1);
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    tracing::info!("every transfer was sent and waited for; waiting for the fault plan to end");
    let faults = faults.await.context("the fault injector failed")??;
    tracing::info!("the fault plan ended; waiting for every transfer to be terminal");
    bar.finish_with_message("done");
    let elapsed = began.elapsed();
    // The transfers that gave up waiting get one more look through the whole settle time.
    wait_terminal(&client, &transfers, settle).await;
    tracing::info!("waiting for the banks to release their holds");
    // An abort is final once its commands are stored (the coordinator does not wait for the
    // confirmations), so a bank that was down may still be releasing holds: wait for that.
    let drained = drain(&js, &python, &dir, &banks, settle).await;
    // `notify_one` keeps a permit when the supervisor is between two waits (restarting a
    // process); `notify_waiters` would be lost then, and the run would never end.
    stop.notify_one();
    let exits: usize = {
        let _ = supervisor.await;
        lock(&members).iter().map(|m| m.exits).sum()
    };
    tracing::info!("reading the log and the banks' records for the checks");
    let log = patiently("reading the log", || read_log(&js, &subjects)).await?;
    let mut bank_states = BTreeMap::new();
    for b in &banks {
        if !b.python {
            let what = format!("reading {}'s records", b.service);
            let bank = patiently(&what, || rust_bank(&js, &b.service, &dir)).await?;
            bank_states.insert(b.service.clone(), bank);
        }
    }
    // Stop everything before the Python bank's file is read.
    let logs: HashMap<String, PathBuf> = {
        let mut m = lock(&members);
        for member in m.iter_mut() {
            member.proc.stop();
        }
        m.iter()
            .map(|x| (x.proc.name.clone(), x.proc.log.clone()))
            .collect()
    };
    for b in banks.iter().filter(|b| b.python) {
        bank_states.insert(
            b.service.clone(),
            python_bank(&python, &dir, &b.service, &logs)?,
        );
    }
    let commands = std::mem::take(&mut *lock(&commands));
    let notices = std::mem::take(&mut *lock(&notices));
    let evidence = check::Evidence {
        transfers: &transfers,
        log: &log,
        commands: &commands,
        notices: &notices,
        banks: &bank_states,
        initial: &initial,
        last_fault_ms: faults.last_end_ms,
    };
    let lines = check::all(&evidence);
    let recovery = check::recovery_ms(&evidence);
    // What the server says, not what was asked for.
    let log_replicas = match js.get_stream(subjects.events_stream()).await {
        Ok(mut stream) => stream
            .info()
            .await
            .map(|i| i.config.num_replicas)
            .unwrap_or(0),
        Err(_) => 0,
    };
    report(&args, &banks, &faults, exits, elapsed, &lines, recovery);
    if args.cluster {
        let hits: Vec<String> = faults
            .nodes_hit
            .iter()
            .map(|(node, n)| format!("n{node} {n}"))
            .collect();
        println!(
            "cluster: 3 nodes, the log at {log_replicas} replicas; {} quorum losses (two nodes SIGKILLed at once), {} partitions (one node cut off from the others); server faults by node: {}",
            faults.counts.get(&Fault::LoseQuorum).copied().unwrap_or(0),
            faults.counts.get(&Fault::Partition).copied().unwrap_or(0),
            if hits.is_empty() {
                "none".to_string()
            } else {
                hits.join(", ")
            }
        );
        let wipes = faults.counts.get(&Fault::WipeNode).copied().unwrap_or(0);
        if wipes > 0 {
            println!(
                "wipes: {wipes} nodes SIGKILLed and started again with an empty store, after waiting {:.1} s in all for every stream's replicas to be in sync ({} wiped while still out of sync)",
                faults.wipe_waits.as_secs_f64(),
                faults.wipes_unsynced
            );
        }
    }
    let one_phase = commands
        .iter()
        .filter(|c| c.kind == txcoord::proto::CommandKind::CommitOnePhase)
        .count();
    println!(
        "one phase: {} withdrawals (one step each), {one_phase} commit_one_phase commands seen",
        transfers.iter().filter(|t| t.to.is_none()).count()
    );
    let sagas: Vec<&Transfer> = transfers.iter().filter(|t| t.saga).collect();
    let ended = |want| {
        sagas
            .iter()
            .filter(|t| check::outcome(log.get(&t.id)) == Some(want))
            .count()
    };
    let compensations = commands
        .iter()
        .filter(|c| c.kind == txcoord::proto::CommandKind::Compensate)
        .count();
    println!(
        "sagas: {} transfers between the Rust banks ran as sagas: {} completed, {} compensated; {compensations} compensate commands seen",
        sagas.len(),
        ended(true),
        ended(false)
    );
    {
        let h = lock(&latencies);
        if !h.is_empty() {
            let slow = h.count_between(10_001, u64::MAX);
            println!(
                "transfer time, sent to terminal (faults included): p50 {} ms, p99 {} ms, max {} ms; {slow} took over 10 s",
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.max()
            );
        }
    }
    match drained {
        Some(at_ms) => println!(
            "holds: every bank had released them {:.2} s after the last fault",
            at_ms.saturating_sub(faults.last_end_ms) as f64 / 1000.0
        ),
        None => println!("holds: still held when the settle time ran out"),
    }
    let time_ok = recovery <= args.goal_secs * 1000 || !args.strict_time;
    let ok = lines.iter().all(|l| l.ok) && time_ok;
    println!("chaos: {}", if ok { "PASSED" } else { "FAILED" });
    for node in lock(&server).iter_mut() {
        node.stop();
    }
    drop(routes);
    Ok(ok)
}

fn bank_specs(args: &ChaosArgs) -> Vec<BankSpec> {
    let mut banks = vec![
        BankSpec {
            service: "bank-a".into(),
            python: false,
        },
        BankSpec {
            service: "bank-b".into(),
            python: false,
        },
    ];
    if !args.no_python {
        banks.push(BankSpec {
            service: "bank-py".into(),
            python: true,
        });
    }
    banks
}

fn python(args: &ChaosArgs) -> String {
    if let Some(p) = &args.python {
        return p.display().to_string();
    }
    if let Ok(p) = std::env::var("TXCOORD_PYTHON") {
        return p;
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/venv/bin/python");
    if venv.is_file() {
        return venv.display().to_string();
    }
    "python3".into()
}

fn bank_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("participants/python/bank.py")
}

/// The transfers: random accounts at random banks, random amounts (some more than an
/// account holds, a few to an account that does not exist: those abort).
fn generate(args: &ChaosArgs, banks: &[BankSpec]) -> Vec<Transfer> {
    let mut rng = XorShift::new(args.seed.wrapping_mul(0x9E3779B97F4A7C15));
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    (0..args.transfers)
        .map(|i| {
            let account = |rng: &mut XorShift| {
                (
                    banks[rng.index(banks.len())].service.clone(),
                    format!("acct-{}", rng.index(ACCOUNTS)),
                )
            };
            let from = account(&mut rng);
            let mut to = account(&mut rng);
            while to == from {
                to = account(&mut rng);
            }
            if rng.below(100) == 0 {
                to.1 = "acct-missing".into();
            }
            // One in five is a withdrawal: one step, committed in one phase by a bank that
            // takes that (the Python bank on the raw protocol runs it in two).
            let to = (rng.below(5) != 0).then_some(to);
            let amount = 1 + rng.below(3_000);
            // A withdrawal takes out a hundredth as much (1 to 30): at full size the
            // withdrawals of a long run would drain the banks within its first thousand
            // transfers, and every later transfer would abort for want of money, leaving the
            // commit path barely exercised. The draws are the same either way, so a seed
            // keeps its plan of faults.
            let amount = if to.is_some() {
                amount
            } else {
                1 + amount / 100
            };
            // Every other transfer between two Rust banks runs as a saga (the Python bank
            // on the raw protocol takes part in 2PC only). Chosen by position, not by a
            // draw, so a seed keeps its plan.
            let on_sdk = |bank: &str| banks.iter().any(|b| b.service == bank && !b.python);
            let saga = args.sagas
                && i % 2 == 1
                && to.as_ref().is_some_and(|to| on_sdk(&to.0))
                && on_sdk(&from.0);
            Transfer {
                id: format!("chaos-{run}-{i}"),
                from,
                to,
                amount,
                saga,
            }
        })
        .collect()
}

fn request(t: &Transfer) -> Value {
    let mut debit = json!({"service": t.from.0, "action": "debit", "payload": {"account": t.from.1, "amount": t.amount}});
    if t.saga {
        // A debit that has not answered within two seconds is compensated, though it may
        // have executed: under the faults, that is the path of a saga most worth testing
        // (the give-back of a debit that did run, and an execute that comes after its
        // compensation, which must not run).
        debit["timeout_ms"] = json!(SAGA_DEBIT_TIMEOUT_MS);
    }
    let mut steps = vec![debit];
    if let Some(to) = &t.to {
        let mut credit = json!({"service": to.0, "action": "credit", "payload": {"account": to.1, "amount": t.amount}});
        if t.saga {
            // Once the money left, the credit is the step that must go through: given ten
            // minutes, it is retried through every fault rather than compensated (taking
            // back a credit the account may have spent is the one compensation that can
            // fail). A credit to an account that does not exist fails at once, and the
            // debit is given back.
            credit["timeout_ms"] = json!(SAGA_CREDIT_TIMEOUT_MS);
        }
        steps.push(credit);
    }
    json!({
        "txn_id": t.id,
        "mode": if t.saga { "saga" } else { "2pc" },
        "metadata": {"chaos": true},
        "steps": steps,
    })
}

/// How long a saga transfer's debit may take before it is compensated.
const SAGA_DEBIT_TIMEOUT_MS: u64 = 2_000;
/// How long a saga transfer's credit may take before it is compensated.
const SAGA_CREDIT_TIMEOUT_MS: u64 = 600_000;

/// Where a transfer goes: the submit subject, and the inbox its decision and outcome are
/// sent to.
#[derive(Clone, Copy)]
struct Target<'a> {
    subject: &'a str,
    inbox: &'a str,
}

/// Submits one transfer (retrying through server restarts; the id deduplicates), naming
/// the inbox for its decision and outcome, and waits for its terminal record; false if `settle` ran
/// out first.
async fn transfer(
    js: &async_nats::jetstream::Context,
    client: &txcoord::client::Client,
    watch: &Watch,
    to: Target<'_>,
    t: &Transfer,
    settle: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + settle;
    let mut done = watch.register(&t.id);
    let body = bytes::Bytes::from(request(t).to_string());
    while publish_durable_with(
        js,
        to.subject,
        &t.id,
        &[(DECIDED_TO_HEADER, to.inbox), (OUTCOME_TO_HEADER, to.inbox)],
        body.clone(),
        Expect::default(),
        Some(10),
    )
    .await
    .is_err()
    {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    loop {
        tokio::select! {
            _ = &mut done => return true,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {
                // An event missed across a reconnect: the log has it.
                if client.last_event(&t.id).await.is_some_and(|e| e.state.is_terminal()) {
                    return true;
                }
            }
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
    }
}

/// Looks up every transfer's last record until all are terminal or `settle` has passed.
async fn wait_terminal(client: &txcoord::client::Client, transfers: &[Transfer], settle: Duration) {
    let deadline = Instant::now() + settle;
    let mut open: Vec<&Transfer> = transfers.iter().collect();
    while !open.is_empty() && Instant::now() < deadline {
        let still: Vec<Option<&Transfer>> = futures::stream::iter(open.iter().copied())
            .map(|t| async move {
                let terminal = client
                    .last_event(&t.id)
                    .await
                    .is_some_and(|e| e.state.is_terminal());
                (!terminal).then_some(t)
            })
            .buffer_unordered(64)
            .collect()
            .await;
        open = still.into_iter().flatten().collect();
        if !open.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Waits until no bank account holds money or waits for a credit; returns when that was
/// first seen (Unix ms), or None if `settle` ran out first.
async fn drain(
    js: &async_nats::jetstream::Context,
    python: &str,
    dir: &Path,
    banks: &[BankSpec],
    settle: Duration,
) -> Option<u64> {
    let deadline = Instant::now() + settle;
    loop {
        let mut held = false;
        for b in banks {
            let accounts = if b.python {
                python_dump(python, dir, &b.service)
                    .map(|d| d.accounts)
                    .ok()
            } else {
                rust_accounts(js, &b.service).await.ok()
            };
            held |= accounts.is_none_or(|a| a.values().any(|x| x.held > 0 || x.incoming > 0));
        }
        if !held {
            return Some(now_ms());
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Records every decision and outcome the coordinators send to the run's inbox (each
/// submission names it in `Txcoord-Decided-To` and `Txcoord-Outcome-To`): what a client
/// that waits for either was told.
async fn observe_decisions(
    nc: &async_nats::Client,
) -> anyhow::Result<(String, Arc<Mutex<Vec<check::Notice>>>)> {
    let inbox = nc.new_inbox();
    let mut sub = nc.subscribe(inbox.clone()).await?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let notice = match serde_json::from_slice::<TransactionEvent>(&msg.payload) {
                Ok(ev) => check::Notice {
                    txn_id: ev.txn_id,
                    state: Some(ev.state),
                },
                Err(_) => check::Notice {
                    txn_id: String::from_utf8_lossy(&msg.payload).into_owned(),
                    state: None,
                },
            };
            lock(&out).push(notice);
        }
    });
    Ok((inbox, seen))
}

/// Wakes each transfer's waiter when its terminal record is published.
#[derive(Clone)]
struct Watch {
    waiting: Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>,
}

impl Watch {
    async fn start(nc: &async_nats::Client, subjects: &Subjects) -> anyhow::Result<Watch> {
        let mut sub = nc
            .subscribe(format!("{}.events.*", subjects.prefix()))
            .await?;
        let watch = Watch {
            waiting: Default::default(),
        };
        let waiting = watch.waiting.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if let Ok(ev) = serde_json::from_slice::<TransactionEvent>(&msg.payload)
                    && ev.state.is_terminal()
                    && let Some(tx) = lock(&waiting).remove(&ev.txn_id)
                {
                    let _ = tx.send(());
                }
            }
        });
        Ok(watch)
    }

    fn register(&self, id: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(id.to_string(), tx);
        rx
    }
}

/// Records every command published on `<prefix>.cmd.>`, alone or in a command batch, from
/// a connection straight to the server (not through a proxy).
async fn observe_commands(
    nc: &async_nats::Client,
    subjects: &Subjects,
) -> anyhow::Result<Arc<Mutex<Vec<check::Command>>>> {
    let mut sub = nc.subscribe(subjects.commands_all()).await?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let commands = match serde_json::from_slice::<ParticipantCommand>(&msg.payload) {
                Ok(c) => vec![c],
                Err(_) => serde_json::from_slice::<CommandBatch>(&msg.payload)
                    .map(|b| b.commands)
                    .unwrap_or_default(),
            };
            lock(&out).extend(commands.into_iter().map(|c| check::Command {
                txn_id: c.txn_id,
                service: c.service,
                step: c.step,
                kind: c.kind,
            }));
        }
    });
    Ok(seen)
}

/// The faults in a seeded random order.
fn fault_plan(args: &ChaosArgs) -> Vec<Fault> {
    let mut plan = Vec::new();
    plan.extend(std::iter::repeat_n(
        Fault::KillCoordinator,
        args.coordinator_kills,
    ));
    plan.extend(std::iter::repeat_n(
        Fault::KillParticipant,
        args.participant_kills,
    ));
    for i in 0..args.server_restarts {
        plan.push(if i % 2 == 0 {
            Fault::RestartServer
        } else {
            Fault::KillServer
        });
    }
    plan.extend(std::iter::repeat_n(Fault::LoseQuorum, args.quorum_losses));
    plan.extend(std::iter::repeat_n(Fault::Partition, args.partitions));
    plan.extend(std::iter::repeat_n(Fault::WipeNode, args.wipes));
    plan.extend(std::iter::repeat_n(Fault::Cut, args.cuts));
    plan.extend(std::iter::repeat_n(Fault::Delay, args.delays));
    let mut rng = XorShift::new(args.seed ^ 0x5EED);
    for i in (1..plan.len()).rev() {
        plan.swap(i, rng.index(i + 1));
    }
    plan
}

/// What the fault injector works on.
struct Injector {
    members: Members,
    /// The server, or the cluster's nodes.
    server: Arc<Mutex<Vec<NatsServer>>>,
    /// The proxies on the routes between nodes, by (from, to).
    routes: Arc<BTreeMap<(usize, usize), Proxy>>,
    js: async_nats::jetstream::Context,
    rng: XorShift,
}

/// Runs the plan: fault `j` starts once `thresholds[j]` transfers were taken, and after the
/// one before it ended.
async fn inject(
    plan: Vec<Fault>,
    thresholds: Vec<usize>,
    taken: Arc<AtomicUsize>,
    started: Arc<AtomicUsize>,
    mut inj: Injector,
) -> anyhow::Result<FaultLog> {
    let mut log = FaultLog::default();
    for (fault, at) in plan.into_iter().zip(thresholds) {
        while taken.load(Ordering::SeqCst) < at {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        started.fetch_add(1, Ordering::SeqCst);
        *log.counts.entry(fault).or_default() += 1;
        let down = Duration::from_millis(inj.rng.below(1_500));
        match fault {
            Fault::KillCoordinator => {
                let holder = lease_holder_pid(&inj.js).await;
                let coords = inj.indexes(Role::Coordinator);
                let pick = match holder {
                    Some(pid) if inj.rng.chance(75) => coords
                        .iter()
                        .copied()
                        .find(|&i| lock(&inj.members)[i].proc.pid() == Some(pid)),
                    _ => None,
                }
                .unwrap_or_else(|| coords[inj.rng.index(coords.len())]);
                if holder.is_some() && lock(&inj.members)[pick].proc.pid() == holder {
                    log.holder_kills += 1;
                }
                inj.kill_and_restart(pick, down).await?;
            }
            Fault::KillParticipant => {
                let banks = inj.indexes(Role::Bank);
                let pick = banks[inj.rng.index(banks.len())];
                inj.kill_and_restart(pick, down).await?;
            }
            Fault::RestartServer | Fault::KillServer => {
                let server = inj.server.clone();
                let kill = fault == Fault::KillServer;
                // One server: no draw, so a seed's plan is what it was before clusters.
                let nodes = lock(&inj.server).len();
                let node = if nodes > 1 { inj.rng.index(nodes) } else { 0 };
                *log.nodes_hit.entry(node).or_default() += 1;
                tokio::task::spawn_blocking(move || {
                    let mut nodes = lock(&server);
                    let s = &mut nodes[node];
                    if kill {
                        s.kill_and_restart()
                    } else {
                        s.restart()
                    }
                })
                .await?
                .context("restarting nats-server")?;
            }
            Fault::LoseQuorum => {
                let nodes = lock(&inj.server).len();
                let kept = inj.rng.index(nodes);
                for (i, node) in lock(&inj.server).iter_mut().enumerate() {
                    if i != kept {
                        node.kill();
                        *log.nodes_hit.entry(i).or_default() += 1;
                    }
                }
                tokio::time::sleep(down).await;
                let server = inj.server.clone();
                tokio::task::spawn_blocking(move || {
                    lock(&server)
                        .iter_mut()
                        .enumerate()
                        .filter(|(i, _)| *i != kept)
                        .try_for_each(|(_, node)| node.restart())
                })
                .await?
                .context("starting the killed nodes again")?;
            }
            Fault::Partition => {
                let nodes = lock(&inj.server).len();
                let alone = inj.rng.index(nodes);
                let lasting = Duration::from_millis(500 + inj.rng.below(5_500));
                *log.nodes_hit.entry(alone).or_default() += 1;
                for ((from, to), proxy) in inj.routes.iter() {
                    if *from == alone || *to == alone {
                        proxy.cut(lasting);
                    }
                }
                tokio::time::sleep(lasting).await;
            }
            Fault::WipeNode => {
                // One copy lost, not two: wait until every replica has caught up from the
                // faults before (a node restarted a moment ago may still lag).
                let began = Instant::now();
                if !in_sync(&inj.js, Duration::from_secs(120)).await {
                    log.wipes_unsynced += 1;
                    tracing::warn!(
                        "the streams' replicas were not all in sync after 120 s; wiping a node anyway"
                    );
                }
                log.wipe_waits += began.elapsed();
                let nodes = lock(&inj.server).len();
                let node = inj.rng.index(nodes);
                *log.nodes_hit.entry(node).or_default() += 1;
                tracing::info!(node, "wiping a node's store");
                let server = inj.server.clone();
                tokio::task::spawn_blocking(move || lock(&server)[node].kill_wipe_and_restart())
                    .await?
                    .context("restarting a wiped node")?;
            }
            Fault::Cut => {
                let n = lock(&inj.members).len();
                let everyone = inj.rng.chance(20);
                let one = inj.rng.index(n);
                for (i, m) in lock(&inj.members).iter().enumerate() {
                    if everyone || i == one {
                        m.proxy.cut(down);
                    }
                }
                tokio::time::sleep(down).await;
            }
            Fault::Delay => {
                let by = Duration::from_millis(100 + inj.rng.below(700));
                let lasting = Duration::from_millis(1_000 + inj.rng.below(3_000));
                let n = lock(&inj.members).len();
                let one = inj.rng.index(n);
                lock(&inj.members)[one].proxy.delay(by, lasting);
                tokio::time::sleep(lasting).await;
            }
        }
        log.last_end_ms = now_ms();
    }
    Ok(log)
}

impl Injector {
    fn indexes(&self, role: Role) -> Vec<usize> {
        lock(&self.members)
            .iter()
            .enumerate()
            .filter(|(_, m)| m.role == role)
            .map(|(i, _)| i)
            .collect()
    }

    async fn kill_and_restart(&mut self, i: usize, down: Duration) -> anyhow::Result<()> {
        {
            let mut m = lock(&self.members);
            m[i].down = true;
            m[i].proc.kill9();
        }
        tokio::time::sleep(down).await;
        let mut m = lock(&self.members);
        m[i].down = false;
        Ok(m[i].proc.restart()?)
    }
}

/// Waits (at most `limit`) until every stream, the KV buckets' included, has a leader and
/// every replica current; whether it got there.
async fn in_sync(js: &async_nats::jetstream::Context, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let infos: Result<Vec<_>, _> = js.streams().try_collect().await;
        let synced = infos.is_ok_and(|infos| {
            !infos.is_empty()
                && infos.iter().all(|info| {
                    // The replicas listed are the leader's followers.
                    info.cluster.as_ref().is_some_and(|c| {
                        c.leader.is_some()
                            && c.replicas.len() + 1 >= info.config.num_replicas
                            && c.replicas.iter().all(|r| r.current && !r.offline)
                    })
                })
        });
        if synced {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The pid in the lease bucket's holder record (`pid <n> on <host>, <uuid>`).
async fn lease_holder_pid(js: &async_nats::jetstream::Context) -> Option<u32> {
    let kv = js
        .get_key_value(txcoord::coordinator::lease::bucket_name("txn"))
        .await
        .ok()?;
    let value = kv.get("holder").await.ok()??;
    let text = String::from_utf8_lossy(&value).into_owned();
    text.strip_prefix("pid ")?.split(' ').next()?.parse().ok()
}

/// Restarts any process that exited on its own (a coordinator that lost its lease stops,
/// as it should; an operator's supervisor starts it again).
async fn supervise(members: Members, stop: Arc<tokio::sync::Notify>) {
    loop {
        tokio::select! {
            _ = stop.notified() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let mut m = lock(&members);
        for member in m.iter_mut().filter(|m| !m.down) {
            if let Some(status) = member.proc.exited() {
                tracing::info!(process = %member.proc.name, %status, "exited on its own; restarting");
                member.exits += 1;
                if let Err(e) = member.proc.restart() {
                    tracing::error!(process = %member.proc.name, error = %e, "cannot restart");
                }
            }
        }
    }
}

/// Runs `read` until it succeeds, each try cut off after 30 s, five tries at most: the
/// reads at the end of a run go to a cluster just back from its faults, and a KV key
/// listing (an ordered consumer underneath) can wait for ever on one that lost a message.
async fn patiently<T, F, Fut>(what: &str, mut read: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut last = anyhow::anyhow!("{what}: not tried");
    for attempt in 1..=5 {
        match tokio::time::timeout(Duration::from_secs(30), read()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => last = e.context(format!("{what} (try {attempt} of 5)")),
            Err(_) => last = anyhow::anyhow!("{what}: no answer in 30 s (try {attempt} of 5)"),
        }
        tracing::warn!(error = %last, "retrying");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(last)
}

/// Every record of the log, by transaction, in log order.
async fn read_log(
    js: &async_nats::jetstream::Context,
    subjects: &Subjects,
) -> anyhow::Result<HashMap<String, Vec<check::Record>>> {
    let stream = js.get_stream(subjects.events_stream()).await?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: subjects.events_all(),
            ..Default::default()
        })
        .await?;
    let mut log: HashMap<String, Vec<check::Record>> = HashMap::new();
    let mut consumer = consumer;
    if consumer.info().await?.num_pending == 0 {
        return Ok(log);
    }
    let mut messages = consumer.messages().await?;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
        let msg = msg?;
        let done = msg.info().map(|i| i.pending == 0).unwrap_or(false);
        let ev: TransactionEvent = serde_json::from_slice(&msg.payload)
            .with_context(|| format!("unreadable log record on {}", msg.subject))?;
        log.entry(ev.txn_id.clone())
            .or_default()
            .push(check::Record {
                state: ev.state,
                at_ms: ev.timestamp_ms,
            });
        if done {
            break;
        }
    }
    Ok(log)
}

/// A Rust bank's account, as far as the checks care (read only; `Table` wants both ways).
#[derive(serde::Serialize, Deserialize)]
struct AccountView {
    balance: u64,
    #[serde(default)]
    holds: BTreeMap<String, u64>,
    #[serde(default)]
    incoming: BTreeMap<String, u64>,
}

fn violations(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .map(|t| t.matches("PROTOCOL VIOLATION").count())
        .unwrap_or(0)
}

/// A Rust bank's accounts, from its KV bucket.
async fn rust_accounts(
    js: &async_nats::jetstream::Context,
    service: &str,
) -> anyhow::Result<BTreeMap<String, check::Account>> {
    let table =
        txcoord::kvtable::Table::<AccountView>::open(js, &format!("{service}_data"), 1).await?;
    Ok(table
        .all()
        .await?
        .into_iter()
        .map(|(k, a)| {
            (
                k,
                check::Account {
                    balance: a.balance,
                    held: a.holds.values().sum(),
                    incoming: a.incoming.values().sum(),
                },
            )
        })
        .collect())
}

/// A Rust bank's accounts (its KV bucket) and branches (the SDK's records).
async fn rust_bank(
    js: &async_nats::jetstream::Context,
    service: &str,
    dir: &Path,
) -> anyhow::Result<check::Bank> {
    let accounts = rust_accounts(js, service).await?;
    let store = txcoord::participant::branch_store(js, service, 1).await?;
    let keys: Vec<String> = store.keys().await?.try_collect().await?;
    let branches = futures::stream::iter(keys)
        .map(|k| {
            let store = store.clone();
            async move {
                let state = store
                    .get(&k)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|v| {
                        serde_json::from_slice::<txcoord::participant::BranchRecord>(&v).ok()
                    })
                    .map(|r| match r.state {
                        BranchState::Prepared => Branch::Prepared,
                        BranchState::Committed | BranchState::Executed => Branch::Committed,
                        _ => Branch::NotApplied,
                    });
                (k, state)
            }
        })
        .buffer_unordered(64)
        .filter_map(|(k, s)| async move { s.map(|s| (k, s)) })
        .collect()
        .await;
    Ok(check::Bank {
        accounts,
        branches,
        violations: violations(&dir.join(format!("{service}.log"))),
    })
}

#[derive(Deserialize)]
struct PyDump {
    accounts: BTreeMap<String, check::Account>,
    branches: HashMap<String, String>,
}

/// What `bank.py --dump` prints from the Python bank's SQLite file.
fn python_dump(python: &str, dir: &Path, service: &str) -> anyhow::Result<PyDump> {
    let db = dir.join(format!("{service}.sqlite"));
    let out = std::process::Command::new(python)
        .arg(bank_script())
        .arg("--db")
        .arg(&db)
        .arg("--dump")
        .output()
        .with_context(|| format!("running {python} bank.py --dump"))?;
    if !out.status.success() {
        bail!(
            "bank.py --dump failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("reading bank.py --dump")
}

/// The Python bank's accounts and branches, from its SQLite file (`bank.py --dump`).
fn python_bank(
    python: &str,
    dir: &Path,
    service: &str,
    logs: &HashMap<String, PathBuf>,
) -> anyhow::Result<check::Bank> {
    let dump = python_dump(python, dir, service)?;
    Ok(check::Bank {
        accounts: dump.accounts,
        branches: dump
            .branches
            .into_iter()
            .map(|(k, s)| {
                let b = match s.as_str() {
                    "prepared" => Branch::Prepared,
                    "committed" => Branch::Committed,
                    _ => Branch::NotApplied,
                };
                (k, b)
            })
            .collect(),
        violations: logs.get(service).map(|l| violations(l)).unwrap_or(0),
    })
}

fn report(
    args: &ChaosArgs,
    banks: &[BankSpec],
    faults: &FaultLog,
    exits: usize,
    elapsed: Duration,
    lines: &[check::Line],
    recovery_ms: u64,
) {
    let n = |f| faults.counts.get(&f).copied().unwrap_or(0);
    let names: Vec<String> = banks
        .iter()
        .map(|b| {
            format!(
                "{} ({})",
                b.service,
                if b.python {
                    "Python, raw protocol"
                } else {
                    "Rust SDK"
                }
            )
        })
        .collect();
    println!();
    println!(
        "== txcoord chaos: {} transfers across {}, {} in flight, seed {} ==",
        args.transfers,
        names.join(", "),
        args.in_flight,
        args.seed
    );
    println!(
        "faults: {} coordinator SIGKILLs ({} of the lease holder), {} participant SIGKILLs, {} nats-server restarts and {} SIGKILLs (sync_interval: always), {} connection cuts, {} delay spells; {} processes exited on their own and were restarted",
        n(Fault::KillCoordinator),
        faults.holder_kills,
        n(Fault::KillParticipant),
        n(Fault::RestartServer),
        n(Fault::KillServer),
        n(Fault::Cut),
        n(Fault::Delay),
        exits
    );
    println!("ran {:.1} s", elapsed.as_secs_f64());
    for l in lines {
        println!(
            "check {}: {} ({})",
            l.name,
            if l.ok { "ok" } else { "BROKEN" },
            l.detail
        );
    }
    let within = recovery_ms <= args.goal_secs * 1000;
    println!(
        "check time from the last fault to the last terminal transfer: {} ({:.2} s, goal {} s)",
        if within { "ok" } else { "over the goal" },
        recovery_ms as f64 / 1000.0,
        args.goal_secs
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        chaos: ChaosArgs,
    }

    /// The long run's withdrawals, all of them committed, leave most of the money in the
    /// banks, so its later transfers still commit (at full size they took out twenty times
    /// what the banks hold, and most transfers after the first thousand aborted).
    #[test]
    fn the_long_runs_withdrawals_leave_the_banks_most_of_their_money() {
        for seed in ["1", "2", "49"] {
            let args = Cli::parse_from(["chaos", "--seed", seed]).chaos;
            let banks = bank_specs(&args);
            let transfers = generate(&args, &banks);
            let opening = (banks.len() * ACCOUNTS) as u64 * OPENING_BALANCE;
            let withdrawals: Vec<u64> = transfers
                .iter()
                .filter(|t| t.to.is_none())
                .map(|t| t.amount)
                .collect();
            assert!(withdrawals.len() > transfers.len() / 10, "seed {seed}");
            let out: u64 = withdrawals.iter().sum();
            assert!(
                out < opening / 3,
                "seed {seed}: {out} of {opening} withdrawn"
            );
            // Transfers keep their full range: some overdraw an account, and abort.
            assert!(
                transfers.iter().any(|t| t.to.is_some() && t.amount > 2_000),
                "seed {seed}"
            );
        }
    }
}
