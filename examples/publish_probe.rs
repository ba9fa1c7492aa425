//! What one stored JetStream write costs, and what group commit could save: publishes
//! records the way the coordinator writes its log (a subject per record, with
//! `Nats-Expected-Last-Subject-Sequence`) in three ways, and reports the server's and this
//! process's CPU per stored message:
//!
//! - `acked`: one PubAck per message, 256 in flight, each with a `Nats-Msg-Id` (what
//!   txcoord does today);
//! - `unacked`: the same messages with no reply subject, so no PubAck at all: the most
//!   that any acknowledgement batching (JetStream's fast batch included) could save;
//! - `atomic-K`: JetStream atomic batches (ADR-50) of K messages, one PubAck per batch.
//!   Atomic batches refuse `Nats-Msg-Id`, so these messages carry none.
//!
//! Run it with `bash benches/publish_probe.sh`, which starts its own nats-server; by hand:
//! `cargo run --release --example publish_probe -- <nats-url> <nats-server-pid>`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use futures::StreamExt;

/// Messages per mode.
const MESSAGES: usize = 48_000;
/// Bytes per message body: about a coordinator record.
const BODY: usize = 500;

/// User plus system CPU seconds of process `pid`, from `/proc`.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 2..])
        .with_context(|| format!("no command name in {path}"))?;
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .with_context(|| format!("{path} has no field {i}"))?
            .parse::<f64>()
            .with_context(|| format!("field {i} of {path} is not a number"))
    };
    // utime and stime, in clock ticks (100 per second on Linux).
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// One mode's result.
struct Measured {
    mode: String,
    per_sec: f64,
    server_us: f64,
    client_us: f64,
}

async fn fresh_stream(js: &jetstream::Context, name: &str) -> Result<stream::Stream> {
    let _ = js.delete_stream(name).await;
    js.create_stream(stream::Config {
        name: name.to_string(),
        subjects: vec![format!("{name}.>")],
        allow_atomic_publish: true,
        ..Default::default()
    })
    .await
    .with_context(|| format!("creating stream {name}"))
}

fn record_headers(i: usize, with_id: bool) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Nats-Expected-Last-Subject-Sequence", "0");
    if with_id {
        h.insert("Nats-Msg-Id", format!("probe-{i}").as_str());
    }
    h
}

async fn acked(js: &jetstream::Context, name: &str, body: bytes::Bytes) -> Result<()> {
    let mut acks = futures::stream::iter(0..MESSAGES)
        .map(|i| {
            let (js, body) = (js.clone(), body.clone());
            async move {
                js.publish_with_headers(format!("{name}.{i}"), record_headers(i, true), body)
                    .await?
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(256);
    while let Some(r) = acks.next().await {
        r.context("acked publish")?;
    }
    Ok(())
}

async fn unacked(nc: &async_nats::Client, name: &str, body: bytes::Bytes) -> Result<()> {
    for i in 0..MESSAGES {
        nc.publish_with_headers(format!("{name}.{i}"), record_headers(i, true), body.clone())
            .await
            .context("publish without reply")?;
    }
    nc.flush().await.context("flush")?;
    Ok(())
}

async fn atomic(nc: &async_nats::Client, name: &str, k: usize, body: bytes::Bytes) -> Result<()> {
    let batches = MESSAGES / k;
    let mut done = futures::stream::iter(0..batches)
        .map(|b| {
            let (nc, body) = (nc.clone(), body.clone());
            async move {
                let id = format!("probe-{b}");
                for j in 0..k {
                    let i = b * k + j;
                    let mut h = record_headers(i, false);
                    h.insert("Nats-Batch-Id", id.as_str());
                    h.insert("Nats-Batch-Sequence", (j + 1).to_string().as_str());
                    let subject = format!("{name}.{i}");
                    if j + 1 == k {
                        h.insert("Nats-Batch-Commit", "1");
                    }
                    if j == 0 || j + 1 == k {
                        // The first message opens the batch, the last commits it: both are
                        // requests, whose replies carry any error.
                        let reply = nc.request_with_headers(subject, h, body.clone()).await?;
                        if reply.payload.windows(5).any(|w| w == b"error") {
                            bail!("batch {id}: {}", String::from_utf8_lossy(&reply.payload));
                        }
                    } else {
                        nc.publish_with_headers(subject, h, body.clone()).await?;
                    }
                }
                anyhow::Ok(())
            }
        })
        // At most 50 batches may be open on one stream (the server's default limit).
        .buffer_unordered((256 / k).clamp(1, 40));
    while let Some(r) = done.next().await {
        r.context("atomic batch")?;
    }
    Ok(())
}

async fn measure(
    nc: &async_nats::Client,
    js: &jetstream::Context,
    server: u32,
    mode: &str,
) -> Result<Measured> {
    let name = format!("PROBE_{}", mode.replace('-', "_").to_uppercase());
    let stream = fresh_stream(js, &name).await?;
    let body = bytes::Bytes::from(vec![b'x'; BODY]);
    let (server0, client0) = (cpu_seconds(server)?, cpu_seconds(std::process::id())?);
    let start = Instant::now();
    match mode {
        "acked" => acked(js, &name, body).await?,
        "unacked" => unacked(nc, &name, body).await?,
        _ => {
            let k: usize = mode
                .strip_prefix("atomic-")
                .and_then(|k| k.parse().ok())
                .with_context(|| format!("unknown mode {mode}"))?;
            atomic(nc, &name, k, body).await?
        }
    }
    // Done when every message is stored (the unacked mode learns it only this way).
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut stream = stream;
    loop {
        let stored = stream.info().await.context("stream info")?.state.messages;
        if stored as usize >= MESSAGES {
            break;
        }
        if Instant::now() > deadline {
            bail!("{mode}: only {stored} of {MESSAGES} messages stored after two minutes");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let per_msg = |before: f64, after: f64| (after - before) * 1e6 / MESSAGES as f64;
    let measured = Measured {
        mode: mode.to_string(),
        per_sec: MESSAGES as f64 / secs,
        server_us: per_msg(server0, cpu_seconds(server)?),
        client_us: per_msg(client0, cpu_seconds(std::process::id())?),
    };
    js.delete_stream(&name).await.ok();
    Ok(measured)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(pid)) = (args.next(), args.next()) else {
        bail!("usage: publish_probe <nats-url> <nats-server-pid>");
    };
    let server: u32 = pid
        .parse()
        .with_context(|| format!("nats-server pid {pid:?} is not a number"))?;
    let nc = async_nats::connect(&url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let js = jetstream::new(nc.clone());
    println!("{MESSAGES} messages of {BODY} bytes per mode, each on its own subject");
    println!(
        "{:<10} {:>12} {:>16} {:>16}",
        "mode", "stored/s", "server µs/msg", "client µs/msg"
    );
    for mode in [
        "acked",
        "unacked",
        "atomic-4",
        "atomic-16",
        "atomic-64",
        "acked",
    ] {
        let m = measure(&nc, &js, server, mode).await?;
        println!(
            "{:<10} {:>12.0} {:>16.1} {:>16.1}",
            m.mode, m.per_sec, m.server_us, m.client_us
        );
    }
    Ok(())
}
