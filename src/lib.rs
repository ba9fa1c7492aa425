//! txcoord: a distributed-transaction orchestrator that runs two-phase commit across
//! independent services over NATS JetStream.
//!
//! - [`proto`]: the wire contract (JSON messages, subjects, request validation).
//! - [`engine`]: the sans-IO state machines.
//! - [`coordinator`]: the runtime that drives them over JetStream (`txcoord serve`).
//! - [`participant`]: the SDK a service uses to take part.
//! - [`client`]: submit requests and read outcomes.
//! - [`kvtable`]: typed records in a KV bucket with compare-and-set updates.
//! - [`config`], [`nats`], [`natsserver`], [`scripted`], [`keyed`], [`rng`]: configuration,
//!   NATS plumbing, a local nats-server launcher, a payload-scripted participant, per-key
//!   locks, and a deterministic generator.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod authgen;
pub mod client;
pub mod config;
pub mod coordinator;
pub mod engine;
pub mod keyed;
pub mod kvtable;
pub mod nats;
pub mod natsserver;
pub mod participant;
pub mod proto;
pub mod rng;
pub mod scripted;

/// Sets up logging for the binaries: `TXCOORD_LOG` (a tracing filter) or
/// `info,async_nats=warn`, on standard error, in colour only on a terminal.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TXCOORD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
