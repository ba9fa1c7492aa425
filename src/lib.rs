//! txcoord: a distributed-transaction orchestrator that runs two-phase commit and sagas
//! across independent services over NATS JetStream. This crate is the coordinator's
//! runtime, its client, its configuration and the `txcoord` CLI; the layers under it are
//! their own crates, re-exported here under their old paths:
//!
//! - [`proto`] (`txcoord-proto`): the wire contract (JSON messages, subjects, validation).
//! - [`engine`] (`txcoord-engine`): the sans-IO state machines.
//! - [`embedded`] (`txcoord-embedded`): the in-process coordinator on the same engine.
//! - [`participant`], [`kvtable`], [`keyed`] (`txcoord-participant`): the SDK a service uses.
//! - [`nats`] (`txcoord-nats`, plus what configuration adds): NATS plumbing.
//! - [`natsserver`], [`rng`] (`txcoord-testkit`): a local nats-server launcher and a
//!   deterministic generator.
//!
//! Here: [`coordinator`] (the runtime that drives the engines over JetStream, `txcoord
//! serve`), [`client`] (submit requests and read outcomes), [`config`], [`authgen`]
//! (`txcoord auth`) and [`scripted`] (a payload-scripted participant).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod authgen;
pub mod client;
pub mod config;
pub mod coordinator;
pub mod nats;
pub mod ops;
pub mod scripted;

pub use txcoord_embedded as embedded;
pub use txcoord_engine as engine;
pub use txcoord_participant as participant;
pub use txcoord_participant::{keyed, kvtable};
pub use txcoord_proto as proto;
pub use txcoord_testkit::{natsserver, rng};

pub use txcoord_participant::{init_logging, trace};
