//! What txcoord's tests, demo, benchmark and fault suite share to run real components:
//! child processes ([`process`]),
//! a nats-server launcher ([`natsserver`], single servers and clusters on free ports with
//! temporary stores), the workspace's binaries from a test ([`bins`]) and a deterministic
//! generator for seeded simulations ([`rng`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bins;
pub mod natsserver;
pub mod process;
pub mod rng;
