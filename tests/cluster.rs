//! On a 3-node cluster: reads that must see the latest write. A KV bucket on several
//! replicas refuses direct gets (which any replica, a lagging one included, may answer), so
//! every read goes to the stream's leader; on one replica direct gets stay.

use std::time::Duration;

use txcoord::natsserver::NatsCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_on_three_replicas_is_read_from_its_leader() {
    let cluster = NatsCluster::start(None, 3, "").unwrap();
    let nc = txcoord::nats::connect(&cluster.urls(), &Default::default(), "test", true)
        .await
        .unwrap();
    let js = txcoord::nats::jetstream(nc, Duration::from_secs(5));

    let store = txcoord::nats::key_value(&js, "probe3", 3, Duration::ZERO)
        .await
        .unwrap();
    let config = stream_config(&js, "KV_probe3").await;
    assert_eq!(config.num_replicas, 3);
    assert!(!config.allow_direct, "{config:?}");
    // Reads and compare-and-set work through the leader.
    let rev = store.create("k", "one".into()).await.unwrap();
    store.update("k", "two".into(), rev).await.unwrap();
    let read = store.get("k").await.unwrap();
    assert_eq!(read.as_deref(), Some(&b"two"[..]));
    // Opened again (another process, a restart): still so.
    let again = txcoord::nats::key_value(&js, "probe3", 3, Duration::ZERO)
        .await
        .unwrap();
    let read = again.get("k").await.unwrap();
    assert_eq!(read.as_deref(), Some(&b"two"[..]));

    // One replica: its only copy answers, so direct gets stay.
    txcoord::nats::key_value(&js, "probe1", 1, Duration::ZERO)
        .await
        .unwrap();
    let config = stream_config(&js, "KV_probe1").await;
    assert!(config.allow_direct, "{config:?}");
}

/// The stream's configuration as the server has it now.
async fn stream_config(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> async_nats::jetstream::stream::Config {
    js.get_stream(name)
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .config
}
