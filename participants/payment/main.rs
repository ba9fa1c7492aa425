//! The payment service: account balances. `prepare charge {account, amount}` holds the
//! funds, commit debits them, abort releases them. See README.md beside this file.

#[path = "../common.rs"]
mod common;

use std::collections::BTreeMap;
use std::process::ExitCode;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use txcoord::kvtable::{Change, Table};
use txcoord::participant::{Participant, ServiceError, StepResult, TxnContext, Vote};

/// One account. `version` counts committed changes; the KV revision guards every write.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Account {
    /// Money not held and not charged.
    balance: u64,
    /// Money debited by committed transactions.
    charged: u64,
    /// Money held by prepared transactions, by `<txn_id>.<step>`.
    #[serde(default)]
    holds: BTreeMap<String, u64>,
    /// Money charged by saga steps, by `<txn_id>.<step>` (exactly-once marker, written with
    /// the effect).
    #[serde(default)]
    sagas: BTreeMap<String, u64>,
    /// Bumped by every commit.
    version: u64,
}

#[derive(Deserialize)]
struct Charge {
    account: String,
    amount: u64,
    #[serde(default)]
    expected_version: Option<u64>,
}

struct Payment {
    accounts: Table<Account>,
}

impl Participant for Payment {
    async fn prepare(&self, txn: &TxnContext, action: &str, payload: &Value) -> Vote {
        if action != "charge" {
            return Vote::Abort(format!(
                "unknown action {action:?}; payment knows \"charge\""
            ));
        }
        let req: Charge = match common::parse_payload(payload) {
            Ok(r) => r,
            Err(e) => return Vote::Abort(e),
        };
        common::demo_delay(payload).await;
        let hold = common::hold_key(txn);
        let decided = self
            .accounts
            .update(&req.account, |cur| {
                let Some(a) = cur else {
                    return (
                        Change::Keep,
                        Vote::Abort(format!("unknown account: {:?}", req.account)),
                    );
                };
                if a.holds.contains_key(&hold) {
                    return (Change::Keep, Vote::Ready);
                }
                if let Some(v) = req.expected_version
                    && v != a.version
                {
                    return (
                        Change::Keep,
                        Vote::Abort(format!(
                            "version_conflict: {} is at version {}, expected {v}",
                            req.account, a.version
                        )),
                    );
                }
                if a.balance < req.amount {
                    return (
                        Change::Keep,
                        Vote::Abort(format!(
                            "insufficient funds: {} has {}, charge is {}",
                            req.account, a.balance, req.amount
                        )),
                    );
                }
                let mut next = a.clone();
                next.balance -= req.amount;
                next.holds.insert(hold.clone(), req.amount);
                (Change::Put(next), Vote::Ready)
            })
            .await;
        decided.unwrap_or_else(|e| Vote::Abort(format!("account store unavailable: {e}")))
    }

    async fn commit(&self, txn: &TxnContext) -> Result<(), ServiceError> {
        self.settle(txn, true).await
    }

    async fn abort(&self, txn: &TxnContext) -> Result<(), ServiceError> {
        self.settle(txn, false).await
    }

    async fn execute(&self, txn: &TxnContext, action: &str, payload: &Value) -> StepResult {
        if action != "charge" {
            return StepResult::Failed {
                reason: format!("unknown action {action:?}"),
                retryable: false,
            };
        }
        let req: Charge = match common::parse_payload(payload) {
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
        let done = self.accounts.update(&req.account, |cur| {
            let Some(a) = cur else {
                return (
                    Change::Keep,
                    fail(format!("unknown account: {:?}", req.account)),
                );
            };
            if a.sagas.contains_key(&branch) {
                return (Change::Keep, StepResult::Done);
            }
            if a.balance < req.amount {
                return (
                    Change::Keep,
                    fail(format!(
                        "insufficient funds: {} has {}, charge is {}",
                        req.account, a.balance, req.amount
                    )),
                );
            }
            let mut next = a.clone();
            next.balance -= req.amount;
            next.charged += req.amount;
            next.version += 1;
            next.sagas.insert(branch.clone(), req.amount);
            (Change::Put(next), StepResult::Done)
        });
        done.await.unwrap_or_else(|e| StepResult::Failed {
            reason: e.to_string(),
            retryable: true,
        })
    }

    async fn compensate(&self, txn: &TxnContext) -> Result<(), ServiceError> {
        let account = txn
            .payload
            .get("account")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let branch = common::hold_key(txn);
        self.accounts
            .update(&account, |cur| match cur {
                Some(a) if a.sagas.contains_key(&branch) => {
                    let mut next = a.clone();
                    let amount = next.sagas.remove(&branch).unwrap_or(0);
                    next.balance += amount;
                    next.charged -= amount;
                    next.version += 1;
                    (Change::Put(next), ())
                }
                _ => (Change::Keep, ()),
            })
            .await
            .map_err(|e| ServiceError(e.to_string()))
    }
}

impl Payment {
    /// Turns the hold into a debit (commit) or gives it back (abort); a no-op when the hold
    /// is already gone (a repeated call).
    async fn settle(&self, txn: &TxnContext, commit: bool) -> Result<(), ServiceError> {
        let account = txn
            .payload
            .get("account")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ServiceError(format!(
                    "branch {}.{} has no account in its payload",
                    txn.txn_id, txn.step
                ))
            })?;
        let hold = common::hold_key(txn);
        self.accounts
            .update(account, |cur| match cur {
                Some(a) if a.holds.contains_key(&hold) => {
                    let mut next = a.clone();
                    let amount = next.holds.remove(&hold).unwrap_or(0);
                    if commit {
                        next.charged += amount;
                        next.version += 1;
                    } else {
                        next.balance += amount;
                    }
                    (Change::Put(next), ())
                }
                _ => (Change::Keep, ()),
            })
            .await
            .map_err(|e| ServiceError(e.to_string()))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    common::main(
        "payment",
        Some(|n| Account {
            balance: n,
            charged: 0,
            holds: BTreeMap::new(),
            sagas: BTreeMap::new(),
            version: 0,
        }),
        |accounts| Payment { accounts },
    )
    .await
}
