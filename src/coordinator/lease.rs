//! The coordinator's lease: at most one coordinator acts for a subject prefix at a time.
//!
//! Two coordinators on one prefix would both take submissions, and a second one's recovery
//! would resume transactions the first is still running, so two engines could decide one
//! transaction differently. The lease prevents it. (Each run reads replies through a
//! consumer of its own, so a coordinator past its lease takes no reply from its successor.)
//!
//! It is one key in a KV bucket whose `max_age` is the lease time-to-live: a coordinator
//! creates the key to take the lease (create fails while another holds it) and renews it
//! with a compare-and-set on its revision every quarter of the TTL. A coordinator that dies
//! stops renewing; the server expires the key after the TTL and a standby creates it.
//!
//! Fencing is local and conservative: the lease counts as held until the time the renewal
//! request was *sent* plus the TTL minus a fifth, so it runs out here before the server can
//! expire it. Every log write and command waits for [`LeaseHandle::ready`], so a coordinator
//! that was paused or cut off past its lease writes nothing until it has renewed it. If the
//! key changed meanwhile (another holder, or expired: someone may have held it in between),
//! the handle turns [`LeaseState::Lost`] and the coordinator stops; a restart recovers from
//! the log, as after a crash.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

/// The key, in the prefix's lease bucket.
const KEY: &str = "holder";

/// Where the lease stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Held until this instant (unless renewed).
    Held {
        /// When it runs out here.
        until: Instant,
    },
    /// Another coordinator holds it: this one must stop.
    Lost,
}

/// Another coordinator took the lease.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("another coordinator took the lease")]
pub struct LeaseLost;

/// A lease failure that stops the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The lease bucket could not be created or opened.
    #[error("lease bucket {bucket}: {message}")]
    Bucket {
        /// The bucket.
        bucket: String,
        /// Why.
        message: String,
    },
    /// The process is shutting down while waiting as a standby.
    #[error("shut down while waiting for the lease")]
    Shutdown,
}

/// A cheap, cloneable view of the lease for the tasks that write.
#[derive(Debug, Clone)]
pub struct LeaseHandle {
    state: watch::Receiver<LeaseState>,
}

impl LeaseHandle {
    /// Returns once the lease is held (at once in the normal case), or `LeaseLost`.
    pub async fn ready(&self) -> Result<(), LeaseLost> {
        let mut rx = self.state.clone();
        loop {
            match *rx.borrow_and_update() {
                LeaseState::Held { until } if Instant::now() < until => return Ok(()),
                LeaseState::Lost => return Err(LeaseLost),
                LeaseState::Held { .. } => {}
            }
            // Run out here: wait for a renewal (or its failure). The timeout re-checks the
            // clock, since running out is not itself a change of the state.
            if let Ok(Err(_)) = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await
            {
                // The renewer is gone (released at shutdown): the lease will not come back.
                return Err(LeaseLost);
            }
        }
    }

    /// Whether the lease is held at this instant (no waiting).
    pub fn is_held(&self) -> bool {
        matches!(*self.state.borrow(), LeaseState::Held { until } if Instant::now() < until)
    }

    /// Completes when the lease is lost.
    pub async fn lost(&self) {
        let mut rx = self.state.clone();
        let _ = rx.wait_for(|s| *s == LeaseState::Lost).await;
    }
}

/// The lease held by this coordinator, renewed by a background task.
pub struct Lease {
    handle: LeaseHandle,
    renewer: tokio::task::JoinHandle<()>,
    store: kv::Store,
    revision: Arc<AtomicU64>,
    /// The holder string of this coordinator.
    pub holder: String,
}

/// The lease bucket's name for a subject prefix (dots are not allowed in bucket names).
pub fn bucket_name(prefix: &str) -> String {
    format!("txcoord_lease_{}", prefix.replace('.', "_"))
}

/// Takes the lease, waiting as a standby while another coordinator holds it.
pub async fn acquire(
    js: &jetstream::Context,
    prefix: &str,
    ttl: Duration,
    replicas: usize,
    shutdown: &mut (impl std::future::Future<Output = ()> + Unpin),
) -> Result<Lease, LeaseError> {
    let bucket = bucket_name(prefix);
    let store = crate::nats::key_value(js, &bucket, replicas, ttl)
        .await
        .map_err(|message| LeaseError::Bucket {
            bucket: bucket.clone(),
            message,
        })?;
    // The bucket's own max_age is the TTL that counts (it may predate our configuration).
    let ttl = match store.status().await {
        Ok(status) if status.max_age() != ttl && !status.max_age().is_zero() => {
            tracing::warn!(configured = ?ttl, bucket_ttl = ?status.max_age(), %bucket,
                "the lease bucket has another TTL; using the bucket's");
            status.max_age()
        }
        _ => ttl,
    };
    let holder = format!(
        "pid {} on {}, {}",
        std::process::id(),
        std::env::var("HOSTNAME").unwrap_or_else(|_| "this host".into()),
        uuid::Uuid::now_v7()
    );
    // A standby polls at least every second: a released lease is taken at once.
    let poll = (ttl / 4).min(Duration::from_secs(1));
    let mut announced = false;
    let (revision, until) = loop {
        let sent = Instant::now();
        match store.create(KEY, Bytes::from(holder.clone())).await {
            Ok(rev) => break (rev, valid_until(sent, ttl)),
            Err(e) if matches!(e.kind(), kv::CreateErrorKind::AlreadyExists) => {
                if !announced {
                    let other = current_holder(&store).await;
                    tracing::info!(holder = %other, "standby: another coordinator holds the lease; waiting for it to end");
                    println!("txcoord standby (the lease is held by {other})");
                    announced = true;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot reach the lease bucket, retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = &mut *shutdown => return Err(LeaseError::Shutdown),
        }
    };
    if announced {
        tracing::info!("lease taken over from the previous coordinator");
    }
    let (tx, rx) = watch::channel(LeaseState::Held { until });
    let revision = Arc::new(AtomicU64::new(revision));
    let renewer = tokio::spawn(renew(
        store.clone(),
        holder.clone(),
        ttl,
        revision.clone(),
        tx,
    ));
    Ok(Lease {
        handle: LeaseHandle { state: rx },
        renewer,
        store,
        revision,
        holder,
    })
}

impl Lease {
    /// The view the writing tasks use.
    pub fn handle(&self) -> LeaseHandle {
        self.handle.clone()
    }

    /// Gives the lease up (on a clean shutdown), so a standby takes over at once instead of
    /// after the TTL.
    pub async fn release(self) {
        self.renewer.abort();
        let rev = self.revision.load(Ordering::SeqCst);
        if let Err(e) = self.store.delete_expect_revision(KEY, Some(rev)).await {
            tracing::debug!(error = %e, "lease not released; it expires by itself");
        }
    }
}

fn valid_until(sent: Instant, ttl: Duration) -> Instant {
    sent + ttl - ttl / 5
}

async fn current_holder(store: &kv::Store) -> String {
    match store.entry(KEY).await {
        Ok(Some(e)) if matches!(e.operation, kv::Operation::Put) => {
            String::from_utf8_lossy(&e.value).into_owned()
        }
        _ => "nobody (it just ended)".into(),
    }
}

/// Renews every quarter of the TTL. A failed renewal is retried sooner; the state runs out
/// by itself if renewals keep failing, which makes the writers wait.
async fn renew(
    store: kv::Store,
    holder: String,
    ttl: Duration,
    revision: Arc<AtomicU64>,
    tx: watch::Sender<LeaseState>,
) {
    let mut wait = ttl / 4;
    loop {
        tokio::time::sleep(wait).await;
        let sent = Instant::now();
        let rev = revision.load(Ordering::SeqCst);
        let body = Bytes::from(holder.clone());
        wait = ttl / 10;
        match store.update(KEY, body.clone(), rev).await {
            Ok(new) => {
                revision.store(new, Ordering::SeqCst);
                let _ = tx.send(LeaseState::Held {
                    until: valid_until(sent, ttl),
                });
                wait = ttl / 4;
            }
            Err(e) if matches!(e.kind(), kv::UpdateErrorKind::WrongLastRevision) => {
                // Our key changed: our own retried write, an expiry (we were cut off for a
                // whole TTL), or another coordinator.
                match store.entry(KEY).await {
                    Ok(Some(entry))
                        if matches!(entry.operation, kv::Operation::Put) && entry.value == body =>
                    {
                        revision.store(entry.revision, Ordering::SeqCst);
                    }
                    Ok(Some(entry)) if matches!(entry.operation, kv::Operation::Put) => {
                        tracing::error!(holder = %String::from_utf8_lossy(&entry.value),
                            "the lease was taken by another coordinator; stopping");
                        let _ = tx.send(LeaseState::Lost);
                        return;
                    }
                    Ok(_) => {
                        // Expired: we were cut off for a whole TTL, and another coordinator
                        // may have held the lease and moved our transactions on meanwhile.
                        // Our in-memory state can no longer be trusted; a restart recovers
                        // from the log.
                        tracing::error!(
                            "the lease expired while this coordinator was cut off from NATS; stopping so that a restart recovers from the log"
                        );
                        let _ = tx.send(LeaseState::Lost);
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read the lease, retrying"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "lease renewal failed, retrying"),
        }
    }
}
