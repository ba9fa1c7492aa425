//! txcoord: a distributed-transaction orchestrator that runs two-phase commit across
//! independent services over NATS JetStream.
//!
//! - [`proto`]: the wire contract (JSON messages, subjects, request validation).
//! - [`engine`]: the sans-IO state machines.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod engine;
pub mod proto;
