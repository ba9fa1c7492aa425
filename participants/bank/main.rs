//! `txcoord-bank`: the bank service ([`txcoord_examples::bank`]). See README.md beside
//! this file.

use std::process::ExitCode;

// One thread: the SDK's traffic all goes through one NATS connection task, which gathers
// writes on a single thread instead of being woken across threads for each message.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    txcoord_examples::bank::main().await
}
