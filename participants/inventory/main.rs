//! The inventory service: stock per SKU. `prepare reserve {sku, qty}` holds the quantity,
//! commit makes it permanent (sold), abort releases it. See README.md beside this file.

#[path = "../common.rs"]
mod common;
#[path = "../quantity.rs"]
mod quantity;

use std::collections::BTreeMap;
use std::process::ExitCode;

use serde::{Deserialize, Serialize};

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

impl quantity::Quantity for Stock {
    fn parts(&mut self) -> quantity::Parts<'_> {
        quantity::Parts {
            free: &mut self.available,
            used: &mut self.sold,
            holds: &mut self.holds,
            sagas: &mut self.sagas,
            version: &mut self.version,
        }
    }
}

fn out_of_stock(sku: &str, available: u64, qty: u64) -> String {
    format!("out of stock: {sku} has {available} available, asked for {qty}")
}

// One thread: the SDK's traffic all goes through one NATS connection task, which gathers
// writes on a single thread instead of being woken across threads for each message.
#[tokio::main(flavor = "current_thread")]
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
        |table| quantity::QuantityService {
            table,
            action: "reserve",
            key_field: "sku",
            amount_field: "qty",
            unknown: "unknown sku",
            short: out_of_stock,
        },
    )
    .await
}
