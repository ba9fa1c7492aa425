//! txcoord: a distributed-transaction orchestrator that runs two-phase commit across
//! independent services over NATS JetStream.
//!
//! - [`proto`]: the wire contract (JSON messages, subjects, request validation).
//! - [`engine`]: the sans-IO state machines.
//! - [`coordinator`]: the runtime that drives them over JetStream (`txcoord serve`).
//! - [`participant`]: the SDK a service uses to take part.
//! - [`client`]: submit requests and read outcomes.
//! - [`kvtable`]: typed records in a KV bucket with compare-and-set updates.
//! - [`config`], [`nats`], [`natsserver`], [`scripted`]: configuration, NATS plumbing, a
//!   local nats-server launcher, and a payload-scripted participant.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

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
pub mod scripted;
