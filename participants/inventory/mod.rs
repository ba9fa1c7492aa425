//! The inventory service: stock per SKU. `prepare reserve {sku, qty}` holds the quantity,
//! commit makes it permanent (sold), abort releases it. See README.md beside this file.

use std::collections::BTreeMap;
use std::process::ExitCode;

use serde::{Deserialize, Serialize};

/// One SKU. `version` counts committed changes (optimistic concurrency for clients);
/// the KV revision guards every write against lost updates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stock {
    /// Units neither held nor sold.
    pub available: u64,
    /// Units sold by committed transactions.
    pub sold: u64,
    /// Units held by prepared transactions, by `<txn_id>.<step>`.
    #[serde(default)]
    pub holds: BTreeMap<String, u64>,
    /// Units sold by saga steps, by `<txn_id>.<step>`: the marker that makes a saga's execute
    /// and compensate exactly-once, written in the same record as the effect.
    #[serde(default)]
    pub sagas: BTreeMap<String, u64>,
    /// Bumped by every commit.
    pub version: u64,
    /// The prepared branch (`<txn_id>.<step>`) whose `expected_version` reserved the version:
    /// nothing else may change the record until it settles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_holder: Option<String>,
}

impl crate::quantity::Quantity for Stock {
    fn parts(&mut self) -> crate::quantity::Parts<'_> {
        crate::quantity::Parts {
            free: &mut self.available,
            used: &mut self.sold,
            holds: &mut self.holds,
            sagas: &mut self.sagas,
            version: &mut self.version,
            version_holder: &mut self.version_holder,
        }
    }
}

fn out_of_stock(sku: &str, available: u64, qty: u64) -> String {
    format!("out of stock: {sku} has {available} available, asked for {qty}")
}

/// Runs the service until SIGINT or SIGTERM (the binary `txcoord-inventory`).
pub async fn main() -> ExitCode {
    crate::common::main(
        "inventory",
        Some(|n| Stock {
            available: n,
            sold: 0,
            holds: BTreeMap::new(),
            sagas: BTreeMap::new(),
            version: 0,
            version_holder: None,
        }),
        Some(crate::quantity::saga_markers),
        |table| crate::quantity::QuantityService {
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
