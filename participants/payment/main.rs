//! The payment service: account balances. `prepare charge {account, amount}` holds the
//! funds, commit debits them, abort releases them. See README.md beside this file.

#[path = "../common.rs"]
mod common;
#[path = "../quantity.rs"]
mod quantity;

use std::collections::BTreeMap;
use std::process::ExitCode;

use serde::{Deserialize, Serialize};

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

impl quantity::Quantity for Account {
    fn parts(&mut self) -> quantity::Parts<'_> {
        quantity::Parts {
            free: &mut self.balance,
            used: &mut self.charged,
            holds: &mut self.holds,
            sagas: &mut self.sagas,
            version: &mut self.version,
        }
    }
}

fn insufficient(account: &str, balance: u64, amount: u64) -> String {
    format!("insufficient funds: {account} has {balance}, charge is {amount}")
}

// One thread: the SDK's traffic all goes through one NATS connection task, which gathers
// writes on a single thread instead of being woken across threads for each message.
#[tokio::main(flavor = "current_thread")]
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
        |table| quantity::QuantityService {
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
