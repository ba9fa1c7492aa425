//! The payment service: account balances. `prepare charge {account, amount}` holds the
//! funds, commit debits them, abort releases them. See README.md beside this file.

use std::collections::BTreeMap;
use std::process::ExitCode;

use serde::{Deserialize, Serialize};

/// One account. `version` counts committed changes; the KV revision guards every write.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Account {
    /// Money not held and not charged.
    pub balance: u64,
    /// Money debited by committed transactions.
    pub charged: u64,
    /// Money held by prepared transactions, by `<txn_id>.<step>`.
    #[serde(default)]
    pub holds: BTreeMap<String, u64>,
    /// Money charged by saga steps, by `<txn_id>.<step>` (exactly-once marker, written with
    /// the effect).
    #[serde(default)]
    pub sagas: BTreeMap<String, u64>,
    /// Bumped by every commit.
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
            used: &mut self.charged,
            holds: &mut self.holds,
            sagas: &mut self.sagas,
            version: &mut self.version,
            version_holder: &mut self.version_holder,
        }
    }
}

fn insufficient(account: &str, balance: u64, amount: u64) -> String {
    format!("insufficient funds: {account} has {balance}, charge is {amount}")
}

/// Runs the service until SIGINT or SIGTERM (the binary `txcoord-payment`).
pub async fn main() -> ExitCode {
    crate::common::main(
        "payment",
        Some(|n| Account {
            balance: n,
            charged: 0,
            holds: BTreeMap::new(),
            sagas: BTreeMap::new(),
            version: 0,
            version_holder: None,
        }),
        Some(crate::quantity::saga_markers),
        |table| crate::quantity::QuantityService {
            table,
            action: "charge",
            key_field: "account",
            amount_field: "amount",
            unknown: "unknown account",
            short: insufficient,
        },
    )
    .await
}
