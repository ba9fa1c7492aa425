//! `txcoord-pg2pc`: two-phase commit across PostgreSQL instances, the baseline a user
//! might pick instead of txcoord, measured the way `txcoord bench` measures txcoord.
//!
//! Each of `--concurrency` clients runs transactions one after another in a closed loop.
//! A transaction changes one row in each instance: phase one sends
//! `BEGIN; UPDATE ...; PREPARE TRANSACTION '<gid>'` to every instance at once (one round
//! trip each), phase two `COMMIT PREPARED '<gid>'` to every instance at once. With
//! `--decision-log`, the client also writes its decision to a table on the first instance
//! between the phases (committed on its own), as a transaction manager that can recover
//! must; without it the figures are an upper bound for PostgreSQL-based 2PC.
//!
//! `benches/postgres.sh` installs PostgreSQL when missing, starts the instances and runs
//! this three times.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use tokio_postgres::{Client, NoTls};

#[derive(Parser, Debug)]
#[command(about = "Two-phase commit across PostgreSQL instances, in a closed loop")]
struct Args {
    /// The instances' ports on 127.0.0.1, comma separated (user postgres, database postgres).
    #[arg(long, value_delimiter = ',')]
    ports: Vec<u16>,
    /// Concurrent clients (each holds one connection per instance).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 8)]
    duration_secs: u64,
    /// Write the decision to a log table on the first instance between the phases.
    #[arg(long)]
    decision_log: bool,
    /// A label for the JSON line (the server settings, say).
    #[arg(long, default_value = "")]
    label: String,
}

async fn connect(port: u16) -> anyhow::Result<Client> {
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
        NoTls,
    )
    .await
    .with_context(|| format!("connecting to PostgreSQL on port {port}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("connection to port {port} ended: {e}");
        }
    });
    Ok(client)
}

/// One row per client in every instance, and the decision log.
async fn set_up(args: &Args) -> anyhow::Result<()> {
    for (i, &port) in args.ports.iter().enumerate() {
        let c = connect(port).await?;
        c.batch_execute(&format!(
            "DROP TABLE IF EXISTS acct; CREATE TABLE acct (id int PRIMARY KEY, n bigint NOT NULL);
             INSERT INTO acct SELECT g, 0 FROM generate_series(0, {}) g;",
            args.concurrency
        ))
        .await
        .with_context(|| format!("setting up port {port}"))?;
        // Prepared transactions left by an earlier run that was killed.
        for row in c.query("SELECT gid FROM pg_prepared_xacts", &[]).await? {
            let gid: String = row.get(0);
            c.batch_execute(&format!("ROLLBACK PREPARED '{gid}'"))
                .await?;
        }
        if i == 0 {
            c.batch_execute(
                "DROP TABLE IF EXISTS decisions; CREATE TABLE decisions (gid text PRIMARY KEY, outcome text NOT NULL);",
            )
            .await?;
        }
    }
    Ok(())
}

struct Totals {
    committed: AtomicU64,
    failed: AtomicU64,
    stop: AtomicBool,
}

async fn client(
    id: usize,
    args: Arc<Args>,
    totals: Arc<Totals>,
) -> anyhow::Result<hdrhistogram::Histogram<u64>> {
    let mut conns = Vec::new();
    for &port in &args.ports {
        conns.push(connect(port).await?);
    }
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut n = 0u64;
    while !totals.stop.load(Ordering::Relaxed) {
        n += 1;
        let gid = format!("c{id}-{n}");
        let start = Instant::now();
        let phase_one = format!(
            "BEGIN; UPDATE acct SET n = n + 1 WHERE id = {id}; PREPARE TRANSACTION '{gid}'"
        );
        let prepared =
            futures::future::join_all(conns.iter().map(|c| c.batch_execute(&phase_one))).await;
        let all_ready = prepared.iter().all(Result::is_ok);
        if all_ready && args.decision_log {
            conns[0]
                .batch_execute(&format!("INSERT INTO decisions VALUES ('{gid}', 'commit')"))
                .await?;
        }
        let verb = if all_ready { "COMMIT" } else { "ROLLBACK" };
        let finished = futures::future::join_all(conns.iter().zip(&prepared).map(|(c, p)| {
            let sql = if p.is_ok() {
                format!("{verb} PREPARED '{gid}'")
            } else {
                "ROLLBACK".to_string()
            };
            async move { c.batch_execute(&sql).await }
        }))
        .await;
        if all_ready && finished.iter().all(Result::is_ok) {
            totals.committed.fetch_add(1, Ordering::Relaxed);
            hist.record(start.elapsed().as_micros() as u64)?;
        } else {
            totals.failed.fetch_add(1, Ordering::Relaxed);
            if let Some(Err(e)) = prepared.iter().chain(&finished).find(|r| r.is_err()) {
                eprintln!("transaction {gid} failed: {e}");
            }
        }
    }
    Ok(hist)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    anyhow::ensure!(!args.ports.is_empty(), "--ports names no instance");
    set_up(&args).await?;
    let totals = Arc::new(Totals {
        committed: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|id| tokio::spawn(client(id, args.clone(), totals.clone())))
        .collect();
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration_secs)).await;
    totals.stop.store(true, Ordering::Relaxed);
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    for t in tasks {
        hist.add(t.await??)?;
    }
    let secs = start.elapsed().as_secs_f64();
    let ok = totals.committed.load(Ordering::Relaxed);
    let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
    println!(
        "{}",
        serde_json::json!({
            "baseline": "postgres-2pc",
            "label": args.label,
            "instances": args.ports.len(),
            "concurrency": args.concurrency,
            "decision_log": args.decision_log,
            "seconds": secs,
            "committed": ok,
            "failed": totals.failed.load(Ordering::Relaxed),
            "tx_per_sec": ok as f64 / secs,
            "latency_ms": {"p50": q(0.5), "p95": q(0.95), "p99": q(0.99), "max": hist.max() as f64 / 1000.0},
        })
    );
    Ok(())
}
