//! `txcoord demo --scenario deadlock`: transfers in both directions between two bank
//! services that lock each account from prepare to commit, so that cycles of waits really
//! form (T1 holds an account at bank-a and wants one at bank-b while T2 holds that one and
//! wants T1's). The same transfers run three times, each on its own coordinator and
//! services: with detection (the default policy), with wait-die, and with detection off,
//! where every cycle lasts until the prepare timeout. It prints, for each, how the
//! transfers ended, transfers/s, latency percentiles, and how fast detected deadlocks were
//! broken; the invariants are that money is conserved, nothing is left held, every transfer
//! ended, and the runs show what they are meant to (deadlocks detected, prevented, and left
//! to time out).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use txcoord::kvtable::Table;
use txcoord::natsserver::NatsServer;
use txcoord::proto::{Reason, TransactionEvent, TxnState};
use txcoord::rng::XorShift;
use txcoord_examples::bank::Account;

use crate::procs::{Proc, coordinator_stats, sibling, wait_consumer};

/// Accounts per bank: few, so that transfers collide.
const ACCOUNTS: usize = 2;
const OPENING: u64 = 1_000_000;
/// Transfers in flight at once.
const CONCURRENCY: usize = 12;
/// The services' jitter (`--jitter-ms`).
const JITTER_MS: u64 = 20;
/// Tries of one transfer before the demo gives up on it.
const MAX_TRIES: usize = 50;

/// One run's settings.
struct Policy {
    label: &'static str,
    deadlock: &'static str,
    detection: bool,
    /// The prepare timeout (and the lock wait): what a cycle costs without detection.
    timeout_ms: u64,
}

const POLICIES: [Policy; 3] = [
    Policy {
        label: "detect",
        deadlock: "detect",
        detection: true,
        timeout_ms: 10_000,
    },
    Policy {
        label: "wait-die",
        deadlock: "wait-die",
        detection: true,
        timeout_ms: 10_000,
    },
    Policy {
        label: "timeouts only",
        deadlock: "detect",
        detection: false,
        timeout_ms: 2_000,
    },
];

/// How one run went.
#[derive(Default)]
struct Outcome {
    committed: usize,
    detected: usize,
    prevented: usize,
    timeouts: usize,
    other: BTreeMap<String, usize>,
    unfinished: usize,
    /// Transfers that did not commit in [`MAX_TRIES`].
    gave_up: usize,
    elapsed: Duration,
    latency: Vec<Duration>,
    /// From a cycle forming to its victim's abort record.
    breaking: Vec<Duration>,
    problems: Vec<String>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn account(bank: &str, i: usize) -> String {
    format!("{}{i}", &bank[bank.len() - 1..])
}

/// The transfers: each moves 1–5 from an account at one bank to one at the other, half of
/// them each way.
fn transfers(n: usize, seed: u64, run: &str) -> Vec<Value> {
    let mut rng = XorShift::new(seed);
    (0..n)
        .map(|i| {
            let (from, to) = if rng.chance(50) {
                ("bank-a", "bank-b")
            } else {
                ("bank-b", "bank-a")
            };
            let amount = 1 + rng.below(5);
            let src = account(from, rng.index(ACCOUNTS));
            let dst = account(to, rng.index(ACCOUNTS));
            json!({
                "txn_id": format!("dl-{run}-{i}"),
                "mode": "2pc",
                "steps": [
                    {"service": from, "action": "debit", "payload": {"account": src, "amount": amount}},
                    {"service": to, "action": "credit", "payload": {"account": dst, "amount": amount}},
                ],
            })
        })
        .collect()
}

/// Runs the scenario; `Ok(true)` when every invariant holds.
pub async fn run(
    transfers_per_run: usize,
    seed: u64,
    nats_server: Option<&Path>,
) -> anyhow::Result<bool> {
    let dir = tempfile::Builder::new()
        .prefix("txcoord-deadlock-demo-")
        .tempdir()?;
    let mut server = NatsServer::start_with(nats_server, Some(&dir.path().join("nats")), "")
        .context("starting nats-server")?;
    let url = server.url();
    eprintln!(
        "txcoord demo --scenario deadlock: NATS at {url}, logs in {}",
        dir.path().display()
    );
    let mut results = Vec::new();
    for (i, policy) in POLICIES.iter().enumerate() {
        // Without detection every cycle costs a timeout: fewer transfers keep it short.
        let n = if policy.detection {
            transfers_per_run
        } else {
            (transfers_per_run / 3).max(CONCURRENCY)
        };
        let out = run_policy(policy, i, n, seed, &url, dir.path()).await?;
        results.push((policy, n, out));
    }
    server.stop();

    println!();
    println!(
        "{:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>11} {:>9} {:>9} {:>16}",
        "policy",
        "transfers",
        "committed",
        "deadlock",
        "prevented",
        "timeout",
        "other",
        "commits/s",
        "p50",
        "p99",
        "cycle→abort p50/p99"
    );
    let mut ok = true;
    for (policy, n, out) in &results {
        let mut lat = out.latency.clone();
        lat.sort();
        let mut brk = out.breaking.clone();
        brk.sort();
        println!(
            "{:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>11.0} {:>9.1?} {:>9.1?} {:>9}",
            policy.label,
            n,
            out.committed,
            out.detected,
            out.prevented,
            out.timeouts,
            out.other.values().sum::<usize>(),
            out.committed as f64 / out.elapsed.as_secs_f64().max(1e-9),
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            if brk.is_empty() {
                "-".to_string()
            } else {
                format!(
                    "{} ms/{} ms",
                    percentile(&brk, 0.5).as_millis(),
                    percentile(&brk, 0.99).as_millis()
                )
            },
        );
        if !out.other.is_empty() {
            println!("    other endings: {:?}", out.other);
        }
        for p in &out.problems {
            println!("    INVARIANT BROKEN ({}): {p}", policy.label);
            ok = false;
        }
    }
    println!(
        "(every aborted transfer is tried again, up to {MAX_TRIES} times, keeping its lock_ts; the abort columns count tries; timeout counts the prepare timeout and lock waits that ran out at the same deadline; latency runs from a transfer's first try to its commit)"
    );
    println!();
    if ok {
        println!(
            "invariants OK: money conserved, no holds left, every transfer ended; deadlocks detected and broken, prevented by wait-die, and left to time out without detection"
        );
    }
    Ok(ok)
}

async fn run_policy(
    policy: &Policy,
    index: usize,
    n: usize,
    seed: u64,
    url: &str,
    dir: &Path,
) -> anyhow::Result<Outcome> {
    let prefix = format!("dl{index}");
    let logs = dir.join(&prefix);
    std::fs::create_dir_all(&logs)?;
    let me = std::env::current_exe()?.display().to_string();
    let timeout = policy.timeout_ms.to_string();
    // Longer than the prepare timeout: a wait ends by a lock, the detector, or the timeout.
    let lock_wait = (policy.timeout_ms + 1_000).to_string();
    let mut procs: Vec<Proc> = Vec::new();
    procs.push(crate::procs::spawn_env(
        "coordinator",
        vec![
            me,
            "serve".into(),
            "--nats-url".into(),
            url.into(),
            "--prefix".into(),
            prefix.clone(),
            "--prepare-timeout-ms".into(),
            timeout.clone(),
        ],
        vec![
            ("TXCOORD_DEADLOCK".into(), policy.deadlock.into()),
            (
                "TXCOORD_DEADLOCK_DETECTION".into(),
                policy.detection.to_string(),
            ),
        ],
        logs.join("coordinator.log"),
    )?);
    for bank in ["bank-a", "bank-b"] {
        let mut cmd = vec![
            sibling("txcoord-bank")?,
            "--nats-url".into(),
            url.into(),
            "--prefix".into(),
            prefix.clone(),
            "--service".into(),
            bank.into(),
            "--bucket".into(),
            format!("{bank}_data_{prefix}"),
            "--lock-records".into(),
            "--lock-wait-ms".into(),
            lock_wait.clone(),
            // Commands of concurrent transfers reach the banks in different orders, as
            // over a real network: that is what makes cycles.
            "--jitter-ms".into(),
            JITTER_MS.to_string(),
        ];
        for i in 0..ACCOUNTS {
            cmd.push("--seed".into());
            cmd.push(format!("{}={OPENING}", account(bank, i)));
        }
        procs.push(crate::procs::spawn(
            bank,
            cmd,
            logs.join(format!("{bank}.log")),
        )?);
    }
    let nc = txcoord::nats::connect(url, &Default::default(), "txcoord-demo", true).await?;
    coordinator_stats(&nc, Duration::from_secs(60))
        .await
        .context("coordinator not ready")?;
    let subjects = txcoord::proto::Subjects::new(prefix.clone());
    let js = txcoord::nats::jetstream(nc.clone(), Duration::from_secs(2));
    let mut tables = Vec::new();
    for bank in ["bank-a", "bank-b"] {
        wait_consumer(
            &js,
            &subjects.command_stream(),
            bank,
            Duration::from_secs(60),
        )
        .await
        .with_context(|| format!("{bank} not ready (logs in {})", logs.display()))?;
        let t: Table<Account> = Table::open(&js, &format!("{bank}_data_{prefix}"), 1).await?;
        // Seeded before the consumer exists: wait for the accounts.
        while t.all().await?.len() < ACCOUNTS {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tables.push(t);
    }
    let client = Arc::new(txcoord::client::Client::new(nc.clone(), &prefix).await?);
    let requests = transfers(n, seed, &prefix);
    let queue = Arc::new(std::sync::Mutex::new(requests.into_iter()));
    let wait = Duration::from_millis(policy.timeout_ms * 3 + 30_000);
    eprintln!("{}: {n} transfers, {CONCURRENCY} at a time", policy.label);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (client, queue) = (client.clone(), queue.clone());
        workers.push(tokio::spawn(async move {
            let mut done: Vec<(Result<TransactionEvent, String>, Duration)> = Vec::new();
            let mut gave_up = 0usize;
            loop {
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                let Some(req) = next else { break };
                let first = req["txn_id"].as_str().unwrap_or_default().to_string();
                let sent = Instant::now();
                let mut lock_ts = None;
                let mut committed = false;
                // An aborted transfer is tried again, as a client would, keeping the first
                // try's lock_ts: under wait-die it grows older, so it cannot starve.
                for attempt in 0..MAX_TRIES {
                    let mut r = req.clone();
                    if attempt > 0 {
                        r["txn_id"] = json!(format!("{first}-r{attempt}"));
                        if let Some(ts) = lock_ts {
                            r["lock_ts"] = json!(ts);
                        }
                    }
                    let out = client
                        .submit_and_wait(vec![r], wait)
                        .await
                        .pop()
                        .map(|r| r.map_err(|e| e.to_string()))
                        .unwrap_or_else(|| Err("no result".into()));
                    if attempt == 0 {
                        lock_ts = client.history(&first).await.first().and_then(|e| e.lock_ts);
                    }
                    // Back off before the next try, as a client should: a transfer that
                    // died under wait-die would otherwise meet the same waiters again.
                    let backoff = Duration::from_millis((10 * (attempt as u64 + 1)).min(200));
                    let stop = match &out {
                        Ok(ev) => {
                            committed = ev.state == TxnState::Committed;
                            committed
                        }
                        Err(_) => true,
                    };
                    done.push((out, sent.elapsed()));
                    if stop {
                        break;
                    }
                    tokio::time::sleep(backoff).await;
                }
                if !committed {
                    gave_up += 1;
                }
            }
            (done, gave_up)
        }));
    }
    let mut out = Outcome::default();
    for w in workers {
        let (done, gave_up) = w.await?;
        out.gave_up += gave_up;
        for (result, latency) in done {
            let ev = match result {
                Ok(ev) => ev,
                Err(e) => {
                    out.unfinished += 1;
                    out.problems.push(format!("a transfer has no outcome: {e}"));
                    continue;
                }
            };
            match (&ev.state, &ev.reason) {
                (TxnState::Committed, _) => {
                    out.committed += 1;
                    out.latency.push(latency);
                }
                (TxnState::Aborted, Some(Reason::Deadlock { how, formed_ms, .. }))
                    if how == "detected" =>
                {
                    out.detected += 1;
                    if let Some(formed) = formed_ms {
                        let aborting = client
                            .history(&ev.txn_id)
                            .await
                            .into_iter()
                            .find(|e| e.state == TxnState::Aborting)
                            .map(|e| e.timestamp_ms);
                        if let Some(at) = aborting {
                            out.breaking
                                .push(Duration::from_millis(at.saturating_sub(*formed)));
                        }
                    }
                }
                (TxnState::Aborted, Some(Reason::Deadlock { .. })) => out.prevented += 1,
                (TxnState::Aborted, Some(Reason::Timeout { .. })) => out.timeouts += 1,
                // A lock wait ends at the prepare's deadline too: the same timeout, seen
                // by the participant first.
                (TxnState::Aborted, Some(Reason::VoteAbort { message, .. }))
                    if message.starts_with("lock wait for") =>
                {
                    out.timeouts += 1
                }
                (state, reason) => {
                    let key = match reason {
                        Some(Reason::VoteAbort { message, .. }) => {
                            format!(
                                "{state:?}: {}",
                                message.split(':').next().unwrap_or(message)
                            )
                        }
                        other => format!("{state:?}: {other:?}"),
                    };
                    *out.other.entry(key).or_default() += 1;
                }
            }
        }
    }
    out.elapsed = started.elapsed();
    // Settle: phase 2 confirmations may still be on their way.
    let mut holds_left = true;
    let mut total = 0u64;
    for _ in 0..100 {
        let mut accounts = Vec::new();
        for t in &tables {
            accounts.extend(t.all().await?.into_values());
        }
        holds_left = accounts
            .iter()
            .any(|a| !a.holds.is_empty() || !a.incoming.is_empty());
        total = accounts.iter().map(|a| a.balance).sum();
        if !holds_left {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let opening = OPENING * 2 * ACCOUNTS as u64;
    if total != opening {
        out.problems.push(format!(
            "money not conserved: {total} in all, {opening} at the start"
        ));
    }
    if holds_left {
        out.problems
            .push("holds or incoming amounts left after every transfer ended".into());
    }
    match (policy.detection, policy.deadlock) {
        (true, "detect") if out.detected == 0 => out
            .problems
            .push("no deadlock was detected: the transfers formed no cycle".into()),
        (true, "wait-die") if out.prevented == 0 => out
            .problems
            .push("wait-die prevented nothing: no transfer collided".into()),
        (false, _) if out.timeouts == 0 => out
            .problems
            .push("without detection no cycle timed out: none formed".into()),
        _ => {}
    }
    if policy.detection && out.gave_up > 0 {
        out.problems.push(format!(
            "{} transfers never committed in {MAX_TRIES} tries",
            out.gave_up
        ));
    }
    if policy.detection && out.timeouts > 0 {
        out.problems.push(format!(
            "{} transfers timed out although deadlocks are handled",
            out.timeouts
        ));
    }
    for p in &mut procs {
        p.stop();
    }
    if out.committed == 0 {
        bail!(
            "{}: nothing committed (logs in {})",
            policy.label,
            logs.display()
        );
    }
    Ok(out)
}
