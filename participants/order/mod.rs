//! The order service: orders. `prepare create {order_id, items, account}` records a pending
//! order, commit confirms it, abort removes it (an aborted order leaves nothing behind).
//! See README.md beside this file.

use std::process::ExitCode;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use txcoord_participant::kvtable::{Change, Table};
use txcoord_participant::{Participant, ServiceError, StepResult, TxnContext, Vote};

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderState {
    /// Prepared, waiting for the transaction's outcome.
    Pending,
    /// The transaction committed.
    Confirmed,
}

/// One order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Order {
    /// Pending until the transaction commits.
    pub state: OrderState,
    /// The branch (`<txn_id>.<step>`) that created it.
    pub branch: String,
    /// The transaction that created it.
    pub txn_id: String,
    /// What was ordered, as the request gave it.
    pub items: Value,
    /// The paying account.
    pub account: String,
    /// Bumped by every commit.
    pub version: u64,
}

#[derive(Deserialize)]
struct Create {
    order_id: String,
    #[serde(default)]
    items: Value,
    account: String,
}

/// Parses a step's payload, or says what is wrong with it.
fn parse_payload<T: serde::de::DeserializeOwned>(payload: &Value) -> Result<T, String> {
    serde_json::from_value(payload.clone()).map_err(|e| format!("invalid payload: {e}"))
}

struct Orders {
    orders: Table<Order>,
}

fn order_id(txn: &TxnContext) -> Result<String, ServiceError> {
    txn.payload
        .get("order_id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| {
            ServiceError(format!(
                "branch {}.{} has no order_id in its payload",
                txn.txn_id, txn.step
            ))
        })
}

impl Participant for Orders {
    async fn prepare(&self, txn: &TxnContext, action: &str, payload: &Value) -> Vote {
        if action != "create" {
            return Vote::Abort(format!("unknown action {action:?}; order knows \"create\""));
        }
        let req: Create = match parse_payload(payload) {
            Ok(r) => r,
            Err(e) => return Vote::Abort(e),
        };
        if !txcoord_proto::is_token(&req.order_id, 128) {
            return Vote::Abort(format!(
                "invalid payload: order_id {:?} must be 1 to 128 of A-Z a-z 0-9 _ -",
                req.order_id
            ));
        }
        crate::common::demo_delay(payload).await;
        let branch = crate::common::hold_key(txn);
        let decided = self
            .orders
            .update(&req.order_id, |cur| match cur {
                Some(o) if o.branch == branch => (Change::Keep, Vote::Ready),
                Some(_) => (
                    Change::Keep,
                    Vote::Abort(format!("duplicate order_id: {}", req.order_id)),
                ),
                None => (
                    Change::Put(Order {
                        state: OrderState::Pending,
                        branch: branch.clone(),
                        txn_id: txn.txn_id.clone(),
                        items: req.items.clone(),
                        account: req.account.clone(),
                        version: 0,
                    }),
                    Vote::Ready,
                ),
            })
            .await;
        decided.unwrap_or_else(|e| Vote::Abort(format!("order store unavailable: {e}")))
    }

    async fn commit(&self, txn: &TxnContext) -> Result<(), ServiceError> {
        let id = order_id(txn)?;
        let branch = crate::common::hold_key(txn);
        self.orders
            .update(&id, |cur| match cur {
                Some(o) if o.branch == branch && o.state == OrderState::Pending => {
                    let mut next = o.clone();
                    next.state = OrderState::Confirmed;
                    next.version += 1;
                    (Change::Put(next), ())
                }
                _ => (Change::Keep, ()),
            })
            .await
            .map_err(|e| ServiceError(e.to_string()))
    }

    async fn execute(&self, txn: &TxnContext, action: &str, payload: &Value) -> StepResult {
        if action != "create" {
            return StepResult::Failed {
                reason: format!("unknown action {action:?}"),
                retryable: false,
            };
        }
        let req: Create = match parse_payload(payload) {
            Ok(r) => r,
            Err(e) => {
                return StepResult::Failed {
                    reason: e,
                    retryable: false,
                };
            }
        };
        crate::common::demo_delay(payload).await;
        let branch = crate::common::hold_key(txn);
        let done = self.orders.update(&req.order_id, |cur| match cur {
            Some(o) if o.branch == branch => (Change::Keep, StepResult::Done),
            Some(_) => (
                Change::Keep,
                StepResult::Failed {
                    reason: format!("duplicate order_id: {}", req.order_id),
                    retryable: false,
                },
            ),
            None => (
                Change::Put(Order {
                    state: OrderState::Confirmed,
                    branch: branch.clone(),
                    txn_id: txn.txn_id.clone(),
                    items: req.items.clone(),
                    account: req.account.clone(),
                    version: 1,
                }),
                StepResult::Done,
            ),
        });
        done.await.unwrap_or_else(|e| StepResult::Failed {
            reason: e.to_string(),
            retryable: true,
        })
    }

    async fn compensate(&self, txn: &TxnContext) -> Result<(), ServiceError> {
        // Without an order id this branch cannot have created anything: nothing to undo.
        let Ok(id) = order_id(txn) else {
            return Ok(());
        };
        let branch = crate::common::hold_key(txn);
        self.orders
            .update(&id, |cur| match cur {
                Some(o) if o.branch == branch => (Change::Delete, ()),
                _ => (Change::Keep, ()),
            })
            .await
            .map_err(|e| ServiceError(e.to_string()))
    }

    async fn abort(&self, txn: &TxnContext) -> Result<(), ServiceError> {
        // Without an order id this branch cannot have created anything: nothing to undo.
        let Ok(id) = order_id(txn) else {
            return Ok(());
        };
        let branch = crate::common::hold_key(txn);
        self.orders
            .update(&id, |cur| match cur {
                Some(o) if o.branch == branch && o.state == OrderState::Pending => {
                    (Change::Delete, ())
                }
                _ => (Change::Keep, ()),
            })
            .await
            .map_err(|e| ServiceError(e.to_string()))
    }
}

/// Runs the service until SIGINT or SIGTERM (the binary `txcoord-order`).
pub async fn main() -> ExitCode {
    // Orders are not seeded: every order comes from a transaction.
    crate::common::main::<Order, _>("order", None, None, |orders| Orders { orders }).await
}
