//! Credentials from configuration reach NATS: against a server that requires a token, the
//! coordinator and a participant configured with TXCOORD_NATS__TOKEN run a transaction, an
//! example service starts with the same variable, and
//! the CLI with a wrong token fails with a clear error instead of hanging.

mod common;

use std::time::Duration;

use common::{Proc, request, service_bin, step};
use serde_json::json;
use txcoord::config::NatsAuth;
use txcoord::natsserver::NatsServer;
use txcoord::proto::TxnState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_protected_server_works_with_the_configured_token() {
    let nats = NatsServer::start_configured(None, None, "", "authorization { token: \"s3cret\" }")
        .expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let url = nats.url();
    let env = [
        ("TXCOORD_NATS_URL", url.as_str()),
        ("TXCOORD_NATS__TOKEN", "s3cret"),
    ];
    let coordinator = Proc::spawn(dir.path(), "coordinator", &["serve"], &env);
    let participant = Proc::spawn(dir.path(), "a", &["participant", "--service", "a"], &env);
    // An example service takes its credentials from the same configuration.
    let order = Proc::spawn_bin(
        &service_bin("txcoord-order"),
        dir.path(),
        "order",
        &[],
        &env,
    );
    coordinator
        .wait_for("coordinator ready", Duration::from_secs(30))
        .await;
    participant
        .wait_for("participant ready", Duration::from_secs(30))
        .await;
    order
        .wait_for("participant ready", Duration::from_secs(30))
        .await;

    let auth = NatsAuth {
        token: Some("s3cret".into()),
        ..Default::default()
    };
    let nc = txcoord::nats::connect(&url, &auth, "test", false)
        .await
        .unwrap();
    let client = txcoord::client::Client::new(nc, "txn").await.unwrap();
    let out = client
        .submit_and_wait(
            vec![request("auth-1", vec![step("a", json!({}))])],
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(
        out[0].as_ref().map(|e| e.state).ok(),
        Some(TxnState::Committed),
        "{out:?}"
    );

    let denied = std::process::Command::new(env!("CARGO_BIN_EXE_txcoord"))
        .args(["status", "auth-1", "--nats-url", &url])
        .env("TXCOORD_NATS__TOKEN", "wrong")
        .env("TXCOORD_LOG", "error")
        .output()
        .unwrap();
    assert_eq!(denied.status.code(), Some(2));
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(err.contains("cannot connect to NATS"), "{err}");
}
