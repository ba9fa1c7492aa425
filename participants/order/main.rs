//! `txcoord-order`: the order service ([`txcoord_examples::order`]). See README.md beside
//! this file.

use std::process::ExitCode;

// One thread: the SDK's traffic all goes through one NATS connection task, which gathers
// writes on a single thread instead of being woken across threads for each message.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    txcoord_examples::order::main().await
}
