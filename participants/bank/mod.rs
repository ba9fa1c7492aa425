//! The bank service: accounts that send and receive money in two-step transfers, the
//! workload of `txcoord chaos`. `prepare debit {account, amount}` holds the money,
//! `prepare credit {account, amount}` records an incoming amount; commit moves it, abort
//! gives it back. As saga steps, `execute debit` takes the money at once and `execute
//! credit` pays it in at once, each with a marker that its compensation reverses. Run
//! several with `--service` (bank-a, bank-b, ...). See README.md beside this file.

use std::collections::BTreeMap;
use std::process::ExitCode;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use txcoord_participant::kvtable::{Change, Table};
use txcoord_participant::{Participant, ServiceError, StepResult, TxnContext, Vote};

/// One account. The KV revision guards every write; holds and incoming amounts are kept in
/// the record, keyed by branch, so effect and marker are one compare-and-set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Account {
    /// Money the account can send.
    pub balance: u64,
    /// Sent by committed transfers, in all.
    pub debited: u64,
    /// Received by committed transfers, in all.
    pub credited: u64,
    /// Outgoing money held by prepared debits, by `<txn_id>.<step>`.
    #[serde(default)]
    pub holds: BTreeMap<String, u64>,
    /// Incoming money of prepared credits, by `<txn_id>.<step>`: not spendable until commit.
    #[serde(default)]
    pub incoming: BTreeMap<String, u64>,
    /// What each executed saga step took out (a debit) or paid in (a credit), by
    /// `<txn_id>.<step>`: the marker that makes a repeated execute a no-op and tells the
    /// compensation what to reverse.
    #[serde(default)]
    pub sagas: BTreeMap<String, u64>,
    /// Bumped by every committed change.
    pub version: u64,
    /// The prepared branch (`<txn_id>.<step>`) whose `expected_version` reserved the version:
    /// nothing else may change the record until it settles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_holder: Option<String>,
}

impl crate::quantity::Quantity for Account {
    fn parts(&mut self) -> crate::quantity::Parts<'_> {
        crate::quantity::Parts {
            free: &mut self.balance,
            used: &mut self.debited,
            holds: &mut self.holds,
            sagas: &mut self.sagas,
            version: &mut self.version,
            version_holder: &mut self.version_holder,
        }
    }
}

fn insufficient(account: &str, balance: u64, amount: u64) -> String {
    format!("insufficient funds: {account} has {balance}, debit is {amount}")
}

/// What a debit of `amount` from `account` needs (a 2PC hold or a saga's taking).
fn debit(account: &str, amount: u64) -> crate::quantity::Want<'_> {
    crate::quantity::Want {
        key: account,
        amount,
        expected_version: None,
        unknown: "unknown account",
        short: insufficient,
    }
}

/// The two actions a transfer step can take here.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    Debit,
    Credit,
}

struct Bank {
    accounts: Table<Account>,
}

/// A parsed step: action, account, amount.
fn parse(action: &str, payload: &Value) -> Result<(Action, String, u64), String> {
    let action = match action {
        "debit" => Action::Debit,
        "credit" => Action::Credit,
        other => {
            return Err(format!(
                "unknown action {other:?}; a bank knows \"debit\" and \"credit\""
            ));
        }
    };
    let account = payload.get("account").and_then(Value::as_str);
    let amount = payload.get("amount").and_then(Value::as_u64);
    match (account, amount) {
        (Some(a), Some(n)) if n > 0 => Ok((action, a.to_string(), n)),
        _ => Err("invalid payload: needs \"account\" (a string) and \"amount\" (a whole number, at least 1)".into()),
    }
}

/// A credit of `amount` to `account` for `branch`, once (a repeat is a no-op); the account
/// must exist. As a 2PC prepare (`now` false) the amount waits in `incoming`, not spendable
/// until the commit; as a saga execute (`now`) it joins the balance at once, with its
/// marker in `sagas`.
fn credit(
    cur: Option<&Account>,
    branch: &str,
    account: &str,
    amount: u64,
    now: bool,
) -> (Change<Account>, Result<(), String>) {
    let Some(rec) = cur else {
        return (Change::Keep, Err(format!("unknown account: {account:?}")));
    };
    let done = if now { &rec.sagas } else { &rec.incoming };
    if done.contains_key(branch) {
        return (Change::Keep, Ok(()));
    }
    let mut next = rec.clone();
    if now {
        next.balance += amount;
        next.credited += amount;
        next.version += 1;
        next.sagas.insert(branch.to_string(), amount);
    } else {
        next.incoming.insert(branch.to_string(), amount);
    }
    (Change::Put(next), Ok(()))
}

/// Commit or abort of a credit: the incoming amount joins the balance, or is dropped. A
/// no-op when it is already gone (a repeated call).
fn settle_credit(cur: Option<&Account>, branch: &str, commit: bool) -> (Change<Account>, ()) {
    let Some(rec) = cur else {
        return (Change::Keep, ());
    };
    let mut next = rec.clone();
    let Some(amount) = next.incoming.remove(branch) else {
        return (Change::Keep, ());
    };
    if commit {
        next.balance += amount;
        next.credited += amount;
        next.version += 1;
    }
    (Change::Put(next), ())
}

/// Saga compensation of a credit: takes back what the step paid in and removes its marker
/// (a no-op without one). If the account has spent it meanwhile, the compensation fails and
/// the coordinator retries it: money is never made up.
fn take_back(cur: Option<&Account>, branch: &str) -> (Change<Account>, Result<(), String>) {
    let Some(rec) = cur else {
        return (Change::Keep, Ok(()));
    };
    let Some(&amount) = rec.sagas.get(branch) else {
        return (Change::Keep, Ok(()));
    };
    if rec.balance < amount {
        return (
            Change::Keep,
            Err(format!(
                "cannot take back {amount}: the account has {} left",
                rec.balance
            )),
        );
    }
    let mut next = rec.clone();
    next.sagas.remove(branch);
    next.balance -= amount;
    next.credited -= amount;
    next.version += 1;
    (Change::Put(next), Ok(()))
}

impl Bank {
    /// A step's effect: as a 2PC prepare (`saga` false) a debit is held and a credit waits;
    /// as a saga execute both apply at once. One compare-and-set on the account.
    async fn apply(
        &self,
        txn: &TxnContext,
        action: Action,
        account: &str,
        amount: u64,
        saga: bool,
    ) -> Result<Result<(), String>, txcoord_participant::kvtable::TableError> {
        let branch = crate::common::hold_key(txn);
        match action {
            Action::Debit => {
                let want = debit(account, amount);
                self.accounts
                    .update(account, |cur| {
                        if saga {
                            crate::quantity::take(cur, &branch, &want)
                        } else {
                            crate::quantity::hold(cur, &branch, &want)
                        }
                    })
                    .await
            }
            Action::Credit => {
                self.accounts
                    .update(account, |cur| credit(cur, &branch, account, amount, saga))
                    .await
            }
        }
    }

    async fn settle(&self, txn: &TxnContext, commit: bool) -> Result<(), ServiceError> {
        // Commit only follows a recorded ready vote, whose payload parsed. An abort may come
        // for a branch that never prepared: one that does not parse holds nothing.
        let Ok((action, account, _)) = parse(&txn.action, &txn.payload) else {
            return Ok(());
        };
        let branch = crate::common::hold_key(txn);
        let result = match action {
            Action::Debit => {
                self.accounts
                    .update(&account, |cur| {
                        crate::quantity::settle(cur, &branch, commit)
                    })
                    .await
            }
            Action::Credit => {
                self.accounts
                    .update(&account, |cur| settle_credit(cur, &branch, commit))
                    .await
            }
        };
        result.map_err(|e| ServiceError(e.to_string()))
    }
}

impl Participant for Bank {
    async fn prepare(&self, txn: &TxnContext, action: &str, payload: &Value) -> Vote {
        let (action, account, amount) = match parse(action, payload) {
            Ok(p) => p,
            Err(e) => return Vote::Abort(e),
        };
        let result = self.apply(txn, action, &account, amount, false).await;
        crate::quantity::vote(result)
    }

    async fn commit(&self, txn: &TxnContext) -> Result<(), ServiceError> {
        self.settle(txn, true).await
    }

    async fn abort(&self, txn: &TxnContext) -> Result<(), ServiceError> {
        self.settle(txn, false).await
    }

    async fn execute(&self, txn: &TxnContext, action: &str, payload: &Value) -> StepResult {
        let (action, account, amount) = match parse(action, payload) {
            Ok(p) => p,
            Err(reason) => {
                return StepResult::Failed {
                    reason,
                    retryable: false,
                };
            }
        };
        let result = self.apply(txn, action, &account, amount, true).await;
        crate::quantity::step_result(result)
    }

    async fn compensate(&self, txn: &TxnContext) -> Result<(), ServiceError> {
        // A step whose payload does not parse never executed: nothing to undo.
        let Ok((action, account, _)) = parse(&txn.action, &txn.payload) else {
            return Ok(());
        };
        let branch = crate::common::hold_key(txn);
        let result = match action {
            Action::Debit => {
                self.accounts
                    .update(&account, |cur| {
                        let (change, ()) = crate::quantity::give_back(cur, &branch);
                        (change, Ok(()))
                    })
                    .await
            }
            Action::Credit => {
                self.accounts
                    .update(&account, |cur| take_back(cur, &branch))
                    .await
            }
        };
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(ServiceError(reason)),
            Err(e) => Err(ServiceError(e.to_string())),
        }
    }
}

/// Runs the service until SIGINT or SIGTERM (the binary `txcoord-bank`).
pub async fn main() -> ExitCode {
    crate::common::main(
        "bank",
        Some(|n| Account {
            balance: n,
            debited: 0,
            credited: 0,
            holds: BTreeMap::new(),
            incoming: BTreeMap::new(),
            sagas: BTreeMap::new(),
            version: 0,
            version_holder: None,
        }),
        Some(crate::quantity::saga_markers),
        |accounts| Bank { accounts },
    )
    .await
}
