//! `txcoord bench`: a closed loop of C clients driving the coordinator, with the raw
//! JetStream ceiling of the same server measured in the same run.
//!
//! - Throughput and latency come from the timed run: each client submits a transaction and
//!   waits for its outcome before submitting the next.
//! - JetStream messages per transaction come from the server's own stream sequence numbers
//!   before and after the timed run, summed over every stream (submissions, events,
//!   commands, replies, and the participants' KV buckets).
//! - Bytes per transaction come from a short accounting pass after it, with a tap on every
//!   subject that JetStream stores, so the timed run carries no tap.
//! - `--ceiling` publishes messages of the average stored size to a scratch stream, pipelined
//!   with acks, then reads them back with a durable pull consumer. Efficiency =
//!   (transactions/s × messages per transaction) / raw publishes/s.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::{Value, json};
use txcoord::client::Outcomes;
use txcoord::config::Config;
use txcoord::natsserver::{NatsCluster, NatsServer};
use txcoord::proto::{Subjects, Until};

use crate::procs::{Proc, coordinator_stats, wait_consumer};

/// The benchmark's options.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// `2pc` or `saga`.
    #[arg(long, default_value = "2pc", value_parser = ["2pc", "saga"])]
    pub mode: String,
    /// Participants (steps) per transaction, 1 to 10.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=10))]
    pub participants: u16,
    /// Concurrent clients in the closed loop.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// How long to run, in seconds (ignored with --count).
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Run this many transactions instead of a duration.
    #[arg(long)]
    pub count: Option<u64>,
    /// Payload bytes per step.
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Fraction of transactions whose last step refuses (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    pub abort_fraction: f64,
    /// Also measure the raw JetStream ceiling on the same server.
    #[arg(long)]
    pub ceiling: bool,
    /// The participants are HTTP services (a built-in no-op HTTP server, one path per
    /// service) joined by `txcoord http-bridge`, instead of NATS participants.
    #[arg(long)]
    pub http: bool,
    /// Messages the ceiling measurement publishes and reads back.
    #[arg(long, default_value_t = 50_000)]
    pub ceiling_messages: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// When starting its own nats-server: fsync every write (`sync_interval: always`).
    #[arg(long)]
    pub sync_always: bool,
    /// Start a 3-node cluster on loopback instead of one server, with every stream and KV
    /// bucket at 3 replicas.
    #[arg(long)]
    pub cluster: bool,
    /// The nats-server binary to start (else NATS_SERVER_BIN, the project's install, PATH).
    #[arg(long)]
    pub nats_server: Option<PathBuf>,
    /// Keep the store and logs here (a temp dir otherwise).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// What each client waits for: `outcome` (the default: the final event) or `decided`
    /// (the durable decision, which the coordinator sends to the inbox the submission names
    /// in `Txcoord-Decided-To`; the participants apply it afterwards).
    #[arg(long, default_value = "outcome", value_parser = crate::parse_until)]
    pub until: Until,
}

struct Setup {
    _server: Option<NatsServer>,
    _cluster: Option<NatsCluster>,
    procs: Vec<Proc>,
    url: String,
    services: Vec<String>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.stop();
        }
    }
}

/// The configuration of the processes a run starts on its own server: the user's (file and
/// `TXCOORD_*` environment), with the connection settings that server decides put back (no
/// credentials, the default subject prefix, 1 replica or 3 in a cluster). Its URL is a flag.
fn run_config(cfg: &Config, cluster: bool) -> Config {
    let defaults = Config::default();
    Config {
        nats_url: defaults.nats_url,
        nats: defaults.nats,
        subject_prefix: defaults.subject_prefix,
        stream_replicas: if cluster { 3 } else { 1 },
        ..cfg.clone()
    }
}

/// What a run's processes were configured with beyond the defaults, for the report: the
/// keys [`run_config`] sets are reported on their own, so they are left out.
fn changed_settings(cfg: &Config, cluster: bool) -> serde_json::Map<String, Value> {
    let mut changed = run_config(cfg, cluster).changed_from_default();
    changed.remove("stream_replicas");
    changed
}

async fn setup(
    args: &BenchArgs,
    nats_url: Option<String>,
    cfg: &Config,
    dir: &std::path::Path,
) -> anyhow::Result<Setup> {
    let services: Vec<String> = (0..args.participants)
        .map(|i| format!("bench{i}"))
        .collect();
    if nats_url.is_none() {
        let sync = if args.sync_always {
            "sync_interval: always"
        } else {
            ""
        };
        let (server, cluster, url) = if args.cluster {
            let c = NatsCluster::start(args.nats_server.as_deref(), 3, sync)
                .context("starting a 3-node cluster")?;
            let url = c.urls();
            (None, Some(c), url)
        } else {
            let s =
                NatsServer::start_with(args.nats_server.as_deref(), Some(&dir.join("nats")), sync)
                    .context("starting nats-server")?;
            let url = s.url();
            (Some(s), None, url)
        };
        // The coordinator and the participants get the user's settings (file and
        // environment) through a config file, with what this server decides put back.
        let config = dir.join("txcoord.toml");
        let effective = run_config(cfg, args.cluster);
        std::fs::write(
            &config,
            effective
                .to_toml()
                .context("writing the benchmark's configuration")?,
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let config = config.display().to_string();
        let me = std::env::current_exe()?.display().to_string();
        let common = |cmd: &str| {
            vec![
                me.clone(),
                cmd.to_string(),
                "--nats-url".into(),
                url.clone(),
                "--config".into(),
                config.clone(),
            ]
        };
        let mut procs = vec![crate::procs::spawn(
            "coordinator",
            common("serve"),
            dir.join("coordinator.log"),
        )?];
        if args.http {
            // One no-op HTTP server answers every service on its own path; one bridge
            // joins them all.
            let port = crate::procs::free_port()?;
            procs.push(crate::procs::spawn(
                "http-noop",
                vec![
                    me.clone(),
                    "http-noop".into(),
                    "--port".into(),
                    port.to_string(),
                ],
                dir.join("http-noop.log"),
            )?);
            let mut cmd = common("http-bridge");
            cmd.extend(["--concurrency".into(), "1024".into()]);
            for s in &services {
                cmd.push("--service".into());
                cmd.push(format!("{s}=http://127.0.0.1:{port}/{s}"));
            }
            procs.push(crate::procs::spawn(
                "http-bridge",
                cmd,
                dir.join("http-bridge.log"),
            )?);
        } else {
            for s in &services {
                let mut cmd = common("participant");
                cmd.extend([
                    "--service".into(),
                    s.clone(),
                    "--concurrency".into(),
                    "1024".into(),
                    "--quiet".into(),
                ]);
                procs.push(crate::procs::spawn(s, cmd, dir.join(format!("{s}.log")))?);
            }
        }
        return Ok(Setup {
            _server: server,
            _cluster: cluster,
            procs,
            url,
            services,
        });
    }
    // Someone else's coordinator and participants (`txcoord participant --service benchN`).
    Ok(Setup {
        _server: None,
        _cluster: None,
        procs: Vec::new(),
        url: nats_url.unwrap_or_default(),
        services,
    })
}

fn request(args: &BenchArgs, services: &[String], i: u64, pad: &str) -> Value {
    let abort =
        args.abort_fraction > 0.0 && ((i * 7919) % 10_000) as f64 / 10_000.0 < args.abort_fraction;
    let last = services.len() - 1;
    let steps: Vec<Value> = services
        .iter()
        .enumerate()
        .map(|(n, s)| {
            let mut payload = json!({"pad": pad});
            if abort && n == last {
                if args.mode == "saga" {
                    payload["execute"] = json!("fail");
                } else {
                    payload["vote"] = json!("abort");
                }
            }
            json!({"service": s, "action": "noop", "payload": payload})
        })
        .collect();
    json!({"mode": args.mode, "steps": steps, "timeout_ms": 30_000})
}

/// Sum of the last sequence of every stream: how many messages JetStream has stored. Retried:
/// on a cluster, the JetStream API answers "no responders" for a moment during an election.
async fn stored_messages(js: &async_nats::jetstream::Context) -> anyhow::Result<u64> {
    let mut last = None;
    for _ in 0..20 {
        match stored_messages_once(js).await {
            Ok(n) => return Ok(n),
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("stream stats unavailable")))
}

async fn stored_messages_once(js: &async_nats::jetstream::Context) -> anyhow::Result<u64> {
    let mut names = js.stream_names();
    let mut total = 0;
    while let Some(name) = names.next().await {
        let name = name?;
        if name == "BENCH_CEILING" {
            continue;
        }
        let info = js.get_stream(&name).await?.get_info().await?;
        total += info.state.last_sequence;
    }
    Ok(total)
}

/// What a closed loop talks to.
struct Target<'a> {
    args: &'a BenchArgs,
    js: &'a async_nats::jetstream::Context,
    services: &'a [String],
    waiters: &'a Outcomes,
}

/// How much load a closed loop applies: `count` transactions, or for `duration`.
struct Load {
    count: Option<u64>,
    duration: Duration,
    concurrency: usize,
}

/// Runs transactions in a closed loop; returns (committed, aborted, histogram in µs, elapsed).
async fn closed_loop(
    target: &Target<'_>,
    load: Load,
    progress: Option<&indicatif::ProgressBar>,
) -> anyhow::Result<(u64, u64, hdrhistogram::Histogram<u64>, Duration)> {
    let Target {
        args,
        js,
        services,
        waiters,
    } = *target;
    let until = args.until;
    let Load {
        count,
        duration,
        concurrency,
    } = load;
    let subjects = Subjects::default();
    let pad = "x".repeat(args.payload_bytes);
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (js, next, stop, waiters) = (js.clone(), next.clone(), stop.clone(), waiters.clone());
        let (args, services, pad, subjects) = (
            args.clone(),
            services.to_vec(),
            pad.clone(),
            subjects.clone(),
        );
        let bar = progress.cloned();
        tasks.push(tokio::spawn(async move {
            let mut hist =
                hdrhistogram::Histogram::<u64>::new(3).expect("3 significant figures is valid");
            let (mut ok, mut bad) = (0u64, 0u64);
            loop {
                if stop.load(Ordering::Relaxed) || started.elapsed() >= duration && count.is_none()
                {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if count.is_some_and(|c| i >= c) {
                    break;
                }
                let id = uuid::Uuid::now_v7().to_string();
                let mut req = request(&args, &services, i, &pad);
                req["txn_id"] = json!(id);
                let t0 = Instant::now();
                let body = serde_json::to_vec(&req).unwrap_or_default();
                let watch = waiters.watch_submitted(&id, until);
                let headers: Vec<(&str, &str)> = waiters.header_for(until).into_iter().collect();
                if let Err(e) = txcoord::nats::publish_durable_with(
                    &js,
                    &subjects.submit(),
                    &id,
                    &headers,
                    body.into(),
                    Default::default(),
                    Some(10),
                )
                .await
                {
                    eprintln!("submit failed: {e}");
                    continue;
                }
                let ended = watch.outcome(Duration::from_secs(60)).await.ok();
                match ended {
                    Some(ev) => {
                        let _ = hist.record(t0.elapsed().as_micros() as u64);
                        if ev.state.takes_effect() {
                            ok += 1;
                        } else {
                            bad += 1;
                        }
                        if let Some(b) = &bar {
                            b.inc(1);
                        }
                    }
                    None => {
                        eprintln!("no {} for {id} within 60 s", until.as_str());
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            }
            (ok, bad, hist)
        }));
    }
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let (mut ok, mut bad) = (0, 0);
    for t in tasks {
        let (o, b, h) = t.await?;
        ok += o;
        bad += b;
        hist.add(h)?;
    }
    Ok((ok, bad, hist, started.elapsed()))
}

/// Raw JetStream on the same server: (publishes/s, consumed/s).
async fn ceiling(
    js: &async_nats::jetstream::Context,
    size: usize,
    n: usize,
    replicas: usize,
) -> anyhow::Result<(f64, f64)> {
    use async_nats::jetstream::{consumer, stream};
    let _ = js.delete_stream("BENCH_CEILING").await;
    let s = js
        .create_stream(stream::Config {
            name: "BENCH_CEILING".into(),
            subjects: vec!["bench.ceiling".into()],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        })
        .await?;
    let body = bytes::Bytes::from(vec![b'x'; size.max(1)]);
    let window = 512;
    let t0 = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for _ in 0..n {
        pending.push_back(js.publish("bench.ceiling", body.clone()).await?);
        if pending.len() >= window
            && let Some(ack) = pending.pop_front()
        {
            ack.await?;
        }
    }
    for ack in pending {
        ack.await?;
    }
    let published = n as f64 / t0.elapsed().as_secs_f64();
    let c = s
        .create_consumer(consumer::pull::Config {
            durable_name: Some("ceiling".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let t1 = Instant::now();
    let mut messages = c.messages().await?;
    let mut read = 0;
    while read < n {
        let Some(m) = messages.next().await else {
            bail!("consumer ended after {read}")
        };
        m.map_err(|e| anyhow::anyhow!("{e}"))?
            .ack()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        read += 1;
    }
    let consumed = n as f64 / t1.elapsed().as_secs_f64();
    let _ = js.delete_stream("BENCH_CEILING").await;
    Ok((published, consumed))
}

/// Runs the benchmark and prints the report.
///
/// When it starts its own server, the coordinator and participants it starts run with `cfg`
/// (see [`run_config`]), and the report lists what differs from the defaults.
pub async fn run(args: BenchArgs, nats_url: Option<String>, cfg: &Config) -> anyhow::Result<()> {
    let tmp;
    let dir = match &args.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("txcoord-bench-")
                .tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    // Someone else's coordinator runs with settings this process cannot see.
    let settings = nats_url
        .is_none()
        .then(|| changed_settings(cfg, args.cluster));
    let setup = setup(&args, nats_url, cfg, &dir).await?;
    let nc = txcoord::nats::connect(&setup.url, &Default::default(), "txcoord-bench", true).await?;
    let js = txcoord::nats::jetstream(nc.clone(), Duration::from_secs(5));
    coordinator_stats(&nc, Duration::from_secs(60))
        .await
        .context("coordinator not ready")?;
    let subjects = Subjects::default();
    for s in &setup.services {
        wait_consumer(&js, &subjects.command_stream(), s, Duration::from_secs(60))
            .await
            .with_context(|| {
                format!("participant {s} did not start (with --data-dir, its log is kept there)")
            })?;
    }

    // One subscription delivers every outcome to its waiting client.
    let subjects = Subjects::default();
    let events = js.get_stream(subjects.events_stream()).await?;
    let waiters = Outcomes::start(&nc, subjects.clone(), events).await?;

    let target = Target {
        args: &args,
        js: &js,
        services: &setup.services,
        waiters: &waiters,
    };
    // Warm up (connections, consumers, page cache).
    closed_loop(
        &target,
        Load {
            count: Some(50),
            duration: Duration::MAX,
            concurrency: 8,
        },
        None,
    )
    .await?;

    let before = stored_messages(&js).await?;
    let bar = if args.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new_spinner()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {pos} transactions ({per_sec}) {elapsed}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let duration = Duration::from_secs(args.duration_secs);
    let (ok, bad, hist, elapsed) = closed_loop(
        &target,
        Load {
            count: args.count,
            duration,
            concurrency: args.concurrency,
        },
        Some(&bar),
    )
    .await?;
    bar.finish_and_clear();
    // Let phase-2 confirmations and final records of the last transactions land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = stored_messages(&js).await?;
    let total = ok + bad;
    let msgs_per_txn = if total > 0 {
        (after - before) as f64 / total as f64
    } else {
        0.0
    };

    // Accounting pass: exact bytes of everything JetStream stores, with a tap.
    let tapped = Arc::new(AtomicU64::new(0));
    let tapped_msgs = Arc::new(AtomicU64::new(0));
    let mut taps = Vec::new();
    for subject in ["txn.>", "$KV.>"] {
        let mut sub = nc.subscribe(subject).await?;
        let (b, m) = (tapped.clone(), tapped_msgs.clone());
        taps.push(tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let headers: usize = msg
                    .headers
                    .as_ref()
                    .map(|h| {
                        h.iter()
                            .map(|(k, v)| {
                                k.to_string().len()
                                    + v.iter().map(|x| x.to_string().len()).sum::<usize>()
                            })
                            .sum()
                    })
                    .unwrap_or(0);
                b.fetch_add(
                    (msg.payload.len() + headers + msg.subject.len()) as u64,
                    Ordering::Relaxed,
                );
                m.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    nc.flush().await?;
    let acct_n = 100;
    closed_loop(
        &target,
        Load {
            count: Some(acct_n),
            duration: Duration::MAX,
            concurrency: 4,
        },
        None,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for t in taps {
        t.abort();
    }
    let bytes_per_txn = tapped.load(Ordering::Relaxed) as f64 / acct_n as f64;
    // Core messages on txn.> that JetStream does not store (none today) would inflate this.
    let avg_size = if tapped_msgs.load(Ordering::Relaxed) > 0 {
        tapped.load(Ordering::Relaxed) as f64 / tapped_msgs.load(Ordering::Relaxed) as f64
    } else {
        0.0
    };

    let tps = total as f64 / elapsed.as_secs_f64();
    // What the server says, not what we asked for.
    let replicas = js
        .get_stream(subjects.events_stream())
        .await?
        .get_info()
        .await?
        .config
        .num_replicas;
    let ceiling = if args.ceiling {
        Some(
            ceiling(
                &js,
                avg_size as usize,
                args.ceiling_messages,
                if args.cluster { 3 } else { 1 },
            )
            .await?,
        )
    } else {
        None
    };
    let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
    let report = json!({
        "mode": args.mode,
        "participants": args.participants,
        "until": args.until,
        "concurrency": args.concurrency,
        "payload_bytes": args.payload_bytes,
        "abort_fraction": args.abort_fraction,
        "http": args.http,
        "sync_always": args.sync_always,
        "cluster": args.cluster,
        "stream_replicas": replicas,
        "settings": settings,
        "seconds": elapsed.as_secs_f64(),
        "transactions": total,
        "committed": ok,
        "aborted": bad,
        "tx_per_sec": tps,
        "committed_per_sec": ok as f64 / elapsed.as_secs_f64(),
        "latency_ms": {"p50": q(0.5), "p95": q(0.95), "p99": q(0.99), "max": hist.max() as f64 / 1000.0},
        "js_messages_per_tx": msgs_per_txn,
        "js_bytes_per_tx": bytes_per_txn,
        "avg_message_bytes": avg_size,
        "ceiling": ceiling.map(|(p, c)| json!({
            "publish_per_sec": p,
            "consume_per_sec": c,
            // The physical bound: the raw publish rate over the fewest writes a
            // transaction can make (a record per participant, an accepted record and a
            // decision: N + 2). Batching lowers messages per transaction, so the old
            // figure (messages moved / raw rate) fell as the coordinator got better.
            "lower_bound_writes_per_tx": lower_bound_writes(args.participants),
            "bound_tx_per_sec": p / lower_bound_writes(args.participants),
            "efficiency": if p > 0.0 { tps * lower_bound_writes(args.participants) / p } else { 0.0 },
            "tx_per_100_publishes": if p > 0.0 { 100.0 * tps / p } else { 0.0 },
            "message_efficiency": if p > 0.0 { tps * msgs_per_txn / p } else { 0.0 },
        })),
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "txcoord bench: {} x{} {}participants, {} clients, {}-byte payloads, abort {:.0}%{}{}",
            args.mode,
            args.participants,
            if args.http { "HTTP " } else { "" },
            args.concurrency,
            args.payload_bytes,
            args.abort_fraction * 100.0,
            if args.sync_always {
                ", sync_interval: always"
            } else {
                ""
            },
            if args.until == Until::Decided {
                ", each waits for the decision only"
            } else {
                ""
            }
        );
        match &settings {
            Some(changed) if !changed.is_empty() => println!(
                "  settings: {}",
                changed
                    .iter()
                    .map(|(k, v)| format!("{k} = {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Some(_) => {}
            None => println!("  settings: those of the coordinator already running"),
        }
        println!(
            "  {total} transactions in {:.1}s: {tps:.0} tx/s ({ok} ok, {bad} not)",
            elapsed.as_secs_f64()
        );
        println!(
            "  latency ms: p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}",
            q(0.5),
            q(0.95),
            q(0.99),
            hist.max() as f64 / 1000.0
        );
        println!(
            "  JetStream per transaction: {msgs_per_txn:.1} messages, {bytes_per_txn:.0} bytes (avg message {avg_size:.0} bytes)"
        );
        if let Some((p, c)) = ceiling {
            println!(
                "  raw JetStream ceiling ({:.0}-byte messages): {p:.0} publishes/s, {c:.0} consumed/s",
                avg_size
            );
            let w = lower_bound_writes(args.participants);
            println!(
                "  {:.2} transactions per 100 raw publishes; efficiency {:.1}% of the physical bound ({p:.0} publishes/s / {w:.0} writes = {:.0} tx/s)",
                100.0 * tps / p.max(1.0),
                100.0 * tps * w / p.max(1.0),
                p / w
            );
        }
    }
    drop(setup);
    Ok(())
}

/// The fewest JetStream writes a transaction with `participants` steps can make: a durable
/// record per participant, the accepted record and the decision (N + 2). The physical
/// bound of a run is its raw publish rate over this.
fn lower_bound_writes(participants: u16) -> f64 {
    f64::from(participants) + 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_keeps_the_users_settings_and_reports_them_without_its_own() {
        let mut user = Config {
            announce_preparing: false,
            subject_prefix: "shop".into(),
            stream_replicas: 3,
            nats_url: "nats://elsewhere:4222".into(),
            ..Config::default()
        };
        user.nats.token = Some("secret".into());
        let run = run_config(&user, false);
        assert!(!run.announce_preparing);
        assert_eq!(run.stream_replicas, 1);
        assert_eq!(run.subject_prefix, Config::default().subject_prefix);
        assert_eq!(run.nats, Config::default().nats);
        assert_eq!(run_config(&user, true).stream_replicas, 3);
        let reported = changed_settings(&user, true);
        assert_eq!(
            reported.into_iter().collect::<Vec<_>>(),
            [("announce_preparing".to_string(), json!(false))]
        );
    }
}
