//! A complete participant in a few dozen lines: a loyalty service that awards points when an
//! order commits. Run it beside the demo's services, then add a step to a transaction:
//!
//! ```text
//! cargo run --example loyalty -- nats://127.0.0.1:4222
//! {"service": "loyalty", "action": "award", "payload": {"account": "alice", "points": 30}}
//! ```

use std::collections::BTreeMap;

use serde_json::Value;
use txcoord::kvtable::{Change, Table};
use txcoord::participant::{self, Participant, ServiceError, TxnContext, Vote};

/// Points per account: `balance` is spendable, `pending` is awarded by prepared transactions.
#[derive(Clone, Default, serde::Serialize, serde::Deserialize)]
struct Points {
    balance: u64,
    pending: BTreeMap<String, u64>,
}

struct Loyalty {
    points: Table<Points>,
}

fn points(payload: &Value) -> Option<(String, u64)> {
    Some((
        payload.get("account")?.as_str()?.to_string(),
        payload.get("points")?.as_u64()?,
    ))
}

impl Participant for Loyalty {
    async fn prepare(&self, txn: &TxnContext, _action: &str, payload: &Value) -> Vote {
        let Some((account, n)) = points(payload) else {
            return Vote::Abort("payload needs account and points".into());
        };
        if n == 0 {
            return Vote::ReadOnly; // nothing to do in phase 2
        }
        let branch = format!("{}.{}", txn.txn_id, txn.step);
        let held = self.points.update(&account, |cur| {
            let mut p = cur.cloned().unwrap_or_default();
            p.pending.insert(branch.clone(), n); // durable before we vote
            (Change::Put(p), ())
        });
        match held.await {
            Ok(()) => Vote::Ready,
            Err(e) => Vote::Abort(e.to_string()),
        }
    }

    async fn commit(&self, txn: &TxnContext) -> Result<(), ServiceError> {
        self.settle(txn, true).await
    }

    async fn abort(&self, txn: &TxnContext) -> Result<(), ServiceError> {
        self.settle(txn, false).await
    }
}

impl Loyalty {
    async fn settle(&self, txn: &TxnContext, commit: bool) -> Result<(), ServiceError> {
        let (account, _) = points(&txn.payload).ok_or_else(|| ServiceError("no account".into()))?;
        let branch = format!("{}.{}", txn.txn_id, txn.step);
        let settled = self.points.update(&account, |cur| match cur {
            Some(p) if p.pending.contains_key(&branch) => {
                let mut p = p.clone();
                let n = p.pending.remove(&branch).unwrap_or(0);
                if commit {
                    p.balance += n;
                }
                (Change::Put(p), ())
            }
            _ => (Change::Keep, ()), // already settled: a repeat is a no-op
        });
        settled.await.map_err(|e| ServiceError(e.to_string()))
    }
}

// One thread: the SDK's traffic all goes through one NATS connection task, which gathers
// writes on a single thread instead of being woken across threads for each message.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let nc = async_nats::connect(&url).await?;
    let points = Table::open(&async_nats::jetstream::new(nc.clone()), "loyalty_data", 1).await?;
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    participant::run(
        nc,
        "loyalty",
        Loyalty { points },
        Default::default(),
        shutdown,
    )
    .await?;
    Ok(())
}
