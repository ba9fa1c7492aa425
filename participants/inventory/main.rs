//! The inventory service: stock per SKU. `prepare reserve {sku, qty}` holds the quantity,
//! commit makes it permanent (sold), abort releases it. See README.md beside this file.

#[path = "../common.rs"]
mod common;

use std::collections::BTreeMap;
use std::process::ExitCode;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use txcoord::kvtable::{Change, Table};
use txcoord::participant::{Participant, ServiceError, StepResult, TxnContext, Vote};

/// One SKU. `version` counts committed changes (optimistic concurrency for clients);
/// the KV revision guards every write against lost updates.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stock {
    /// Units neither held nor sold.
    available: u64,
    /// Units sold by committed transactions.
    sold: u64,
    /// Units held by prepared transactions, by `<txn_id>.<step>`.
    #[serde(default)]
    holds: BTreeMap<String, u64>,
    /// Units sold by saga steps, by `<txn_id>.<step>`: the marker that makes a saga's execute
    /// and compensate exactly-once, written in the same record as the effect.
    #[serde(default)]
    sagas: BTreeMap<String, u64>,
    /// Bumped by every commit.
    version: u64,
}

#[derive(Deserialize)]
struct Reserve {
    sku: String,
    qty: u64,
    #[serde(default)]
    expected_version: Option<u64>,
}

struct Inventory {
    stock: Table<Stock>,
}

impl Participant for Inventory {
    async fn prepare(&self, txn: &TxnContext, action: &str, payload: &Value) -> Vote {
        if action != "reserve" {
            return Vote::Abort(format!(
                "unknown action {action:?}; inventory knows \"reserve\""
            ));
        }
        let req: Reserve = match common::parse_payload(payload) {
            Ok(r) => r,
            Err(e) => return Vote::Abort(e),
        };
        if req.qty == 0 {
            return Vote::Abort("invalid payload: qty must be at least 1".into());
        }
        common::demo_delay(payload).await;
        let hold = common::hold_key(txn);
        let decided = self
            .stock
            .update(&req.sku, |cur| {
                let Some(s) = cur else {
                    return (
                        Change::Keep,
                        Vote::Abort(format!("unknown sku: {:?}", req.sku)),
                    );
                };
                if s.holds.contains_key(&hold) {
                    return (Change::Keep, Vote::Ready);
                }
                if let Some(v) = req.expected_version
                    && v != s.version
                {
                    return (
                        Change::Keep,
                        Vote::Abort(format!(
                            "version_conflict: {} is at version {}, expected {v}",
                            req.sku, s.version
                        )),
                    );
                }
                if s.available < req.qty {
                    return (
                        Change::Keep,
                        Vote::Abort(format!(
                            "out of stock: {} has {} available, asked for {}",
                            req.sku, s.available, req.qty
                        )),
                    );
                }
                let mut next = s.clone();
                next.available -= req.qty;
                next.holds.insert(hold.clone(), req.qty);
                (Change::Put(next), Vote::Ready)
            })
            .await;
        decided.unwrap_or_else(|e| Vote::Abort(format!("stock store unavailable: {e}")))
    }

    async fn commit(&self, txn: &TxnContext) -> Result<(), ServiceError> {
        let sku = sku_of(txn)?;
        let hold = common::hold_key(txn);
        self.stock
            .update(&sku, |cur| match cur {
                Some(s) if s.holds.contains_key(&hold) => {
                    let mut next = s.clone();
                    let qty = next.holds.remove(&hold).unwrap_or(0);
                    next.sold += qty;
                    next.version += 1;
                    (Change::Put(next), ())
                }
                // Already committed (a repeated call after a crash).
                _ => (Change::Keep, ()),
            })
            .await
            .map_err(|e| ServiceError(e.to_string()))
    }

    async fn execute(&self, txn: &TxnContext, action: &str, payload: &Value) -> StepResult {
        if action != "reserve" {
            return StepResult::Failed {
                reason: format!("unknown action {action:?}"),
                retryable: false,
            };
        }
        self.sell(txn, payload).await
    }

    async fn compensate(&self, txn: &TxnContext) -> Result<(), ServiceError> {
        let sku = sku_of(txn)?;
        let branch = common::hold_key(txn);
        self.stock
            .update(&sku, |cur| match cur {
                Some(s) if s.sagas.contains_key(&branch) => {
                    let mut next = s.clone();
                    let qty = next.sagas.remove(&branch).unwrap_or(0);
                    next.available += qty;
                    next.sold -= qty;
                    next.version += 1;
                    (Change::Put(next), ())
                }
                _ => (Change::Keep, ()),
            })
            .await
            .map_err(|e| ServiceError(e.to_string()))
    }

    async fn abort(&self, txn: &TxnContext) -> Result<(), ServiceError> {
        let sku = sku_of(txn)?;
        let hold = common::hold_key(txn);
        self.stock
            .update(&sku, |cur| match cur {
                Some(s) if s.holds.contains_key(&hold) => {
                    let mut next = s.clone();
                    let qty = next.holds.remove(&hold).unwrap_or(0);
                    next.available += qty;
                    (Change::Put(next), ())
                }
                _ => (Change::Keep, ()),
            })
            .await
            .map_err(|e| ServiceError(e.to_string()))
    }
}

impl Inventory {
    /// Saga: sells the quantity at once (no hold), or says why not.
    async fn sell(&self, txn: &TxnContext, payload: &Value) -> StepResult {
        let req: Reserve = match common::parse_payload(payload) {
            Ok(r) => r,
            Err(e) => {
                return StepResult::Failed {
                    reason: e,
                    retryable: false,
                };
            }
        };
        common::demo_delay(payload).await;
        let branch = common::hold_key(txn);
        let fail = |reason: String| StepResult::Failed {
            reason,
            retryable: false,
        };
        let done = self.stock.update(&req.sku, |cur| {
            let Some(s) = cur else {
                return (Change::Keep, fail(format!("unknown sku: {:?}", req.sku)));
            };
            if s.sagas.contains_key(&branch) {
                return (Change::Keep, StepResult::Done);
            }
            if let Some(v) = req.expected_version
                && v != s.version
            {
                return (
                    Change::Keep,
                    fail(format!(
                        "version_conflict: {} is at version {}, expected {v}",
                        req.sku, s.version
                    )),
                );
            }
            if s.available < req.qty {
                return (
                    Change::Keep,
                    fail(format!(
                        "out of stock: {} has {} available, asked for {}",
                        req.sku, s.available, req.qty
                    )),
                );
            }
            let mut next = s.clone();
            next.available -= req.qty;
            next.sold += req.qty;
            next.version += 1;
            next.sagas.insert(branch.clone(), req.qty);
            (Change::Put(next), StepResult::Done)
        });
        done.await.unwrap_or_else(|e| StepResult::Failed {
            reason: e.to_string(),
            retryable: true,
        })
    }
}

fn sku_of(txn: &TxnContext) -> Result<String, ServiceError> {
    txn.payload
        .get("sku")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| {
            ServiceError(format!(
                "branch {}.{} has no sku in its payload",
                txn.txn_id, txn.step
            ))
        })
}

#[tokio::main]
async fn main() -> ExitCode {
    common::main(
        "inventory",
        Some(|n| Stock {
            available: n,
            sold: 0,
            holds: BTreeMap::new(),
            sagas: BTreeMap::new(),
            version: 0,
        }),
        |stock| Inventory { stock },
    )
    .await
}
