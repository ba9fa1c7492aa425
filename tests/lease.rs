//! The coordinator's lease: a second coordinator on the same prefix waits as a standby and
//! takes over when the first dies; a coordinator whose lease is taken stops.

mod common;

use std::time::Duration;

use common::{Proc, System, request, step};
use futures::TryStreamExt as _;
use serde_json::json;
use txcoord::coordinator::REPLY_CONSUMER;
use txcoord::proto::TxnState;

const TTL: (&str, &str) = ("TXCOORD_LEASE_TTL_MS", "2000");

async fn commit(sys: &System, txn_id: &str) {
    let req = request(txn_id, vec![step("a", json!({}))]);
    sys.client
        .submit_raw(serde_json::to_vec(&req).unwrap().into(), txn_id)
        .await
        .unwrap();
    let ev = sys.wait_state(txn_id, |e| e.state.is_terminal()).await;
    assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_active_coordinator_is_killed() {
    let mut sys = System::start(&["a"], &[TTL]).await;
    let url = sys.nats.url();
    let standby = Proc::spawn(
        sys.dir.path(),
        "standby",
        &["serve"],
        &[("TXCOORD_NATS_URL", &url), TTL],
    );
    standby
        .wait_for(
            "standby: another coordinator holds the lease",
            Duration::from_secs(20),
        )
        .await;
    commit(&sys, "lease-1").await;
    assert!(
        !standby.log_text().contains("coordinator ready"),
        "the standby must not act while the lease is held"
    );
    sys.coordinator.kill9();
    // Submitted while nobody holds the lease: it waits in the stream for the standby.
    commit(&sys, "lease-2").await;
    standby
        .wait_for("lease taken over", Duration::from_secs(1))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_whose_lease_is_taken_stops() {
    let mut sys = System::start(&["a"], &[TTL]).await;
    commit(&sys, "steal-1").await;
    let js = async_nats::jetstream::new(sys.nc.clone());
    let kv = js
        .get_key_value(txcoord::coordinator::lease::bucket_name("txn"))
        .await
        .unwrap();
    kv.put("holder", "an intruder".into()).await.unwrap();
    let status = sys.coordinator.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success(), "{status:?}");
    assert!(
        sys.coordinator
            .log_text()
            .contains("the lease was taken by another coordinator"),
        "{}",
        sys.coordinator.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_hands_the_lease_over_at_once() {
    let mut sys = System::start(&["a"], &[("TXCOORD_LEASE_TTL_MS", "60000")]).await;
    let url = sys.nats.url();
    let standby = Proc::spawn(
        sys.dir.path(),
        "standby",
        &["serve"],
        &[("TXCOORD_NATS_URL", &url)],
    );
    standby
        .wait_for(
            "standby: another coordinator holds the lease",
            Duration::from_secs(20),
        )
        .await;
    sys.coordinator.terminate();
    // Well inside the 60 s TTL: the released lease is taken on the standby's next poll.
    standby
        .wait_for("coordinator ready", Duration::from_secs(30))
        .await;
    commit(&sys, "handover-1").await;
}

/// Sends `signal` (STOP, CONT) to the process.
fn signal(proc: &Proc, signal: &str) {
    let pid = proc.pid().expect("the process runs").to_string();
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}: {status:?}");
}

/// A coordinator that freezes (SIGSTOP: a stalled VM, a long pause) keeps its pull
/// requests at the server until they expire. Its successor must still hear every reply to
/// its own commands: each run reads replies through a consumer of its own. When the runs
/// shared one consumer, the frozen process's older requests were served first, so the
/// successor heard no vote for about 30 s and these transactions aborted at their deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_coordinator_takes_no_reply_meant_for_its_successor() {
    let mut sys = System::start(&["a"], &[TTL]).await;
    let standby = sys
        .spawn_standby(&[TTL], "standby: another coordinator holds the lease")
        .await;
    // The active coordinator is reading replies: it has pull requests at the server.
    commit(&sys, "frozen-0").await;
    // The one consumer older versions shared: the next lease holder removes it.
    let js = async_nats::jetstream::new(sys.nc.clone());
    let replies = js.get_stream("TXN_REPLY").await.unwrap();
    replies
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some(REPLY_CONSUMER.into()),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    signal(&sys.coordinator, "STOP");
    standby
        .wait_for("coordinator ready", Duration::from_secs(30))
        .await;
    standby
        .wait_for(
            "removed the reply consumer an older txcoord shared",
            Duration::from_secs(10),
        )
        .await;
    let names: Vec<String> = replies.consumer_names().try_collect().await.unwrap();
    assert_eq!(names.len(), 2, "the two runs' own consumers: {names:?}");
    assert!(
        names
            .iter()
            .all(|n| n.starts_with(&format!("{REPLY_CONSUMER}-"))),
        "{names:?}"
    );
    let ids: Vec<String> = (1..=4).map(|i| format!("frozen-{i}")).collect();
    for id in &ids {
        let mut req = request(id, vec![step("a", json!({}))]);
        // A vote lost would be asked for again after 10 s, and the transaction aborted
        // after 20.
        req["timeout_ms"] = json!(20_000);
        sys.submit(&req, id).await;
    }
    for id in &ids {
        let ev = sys.wait_state(id, |e| e.state.is_terminal()).await;
        assert_eq!(ev.state, TxnState::Committed, "{id}: {ev:?}");
        assert_eq!(
            ev.steps[0].prepare_attempt, 1,
            "{id}: the first vote was heard, no resend was needed: {ev:?}"
        );
    }
    // Thawed, the old coordinator finds its lease taken and stops.
    signal(&sys.coordinator, "CONT");
    let status = sys.coordinator.wait_exit(Duration::from_secs(30)).await;
    assert!(!status.success(), "{status:?}");
}
