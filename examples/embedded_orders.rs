//! Orders, stock and balances in one process with the embedded coordinator: each order is
//! one transaction over the order book (a participant) and two `Versioned` values, the
//! SKU's stock and the buyer's balance. Orders run concurrently; those that read a version
//! another order reserved first conflict and are retried from a fresh read. At the end the
//! invariants hold: stock sold = units ordered by committed orders, money charged = their
//! prices, nothing reserved.
//!
//! `cargo run --example embedded_orders` (exits 1 if an invariant is broken)

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use txcoord::embedded::{
    Config, Participant, PreparedResult, TransactionCoordinator, TxnError, TxnId, Versioned,
};

/// The order book: an order is pending while prepared, confirmed on commit, gone on rollback.
#[derive(Default)]
struct Orders {
    pending: Mutex<BTreeMap<TxnId, String>>,
    confirmed: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Participant for Orders {
    async fn prepare(&self, _txn: TxnId) -> PreparedResult {
        PreparedResult::Ready
    }
    async fn commit(&self, txn: TxnId) -> Result<(), String> {
        if let Some(o) = self.pending.lock().map_err(|e| e.to_string())?.remove(&txn) {
            self.confirmed.lock().map_err(|e| e.to_string())?.push(o);
        }
        Ok(())
    }
    async fn rollback(&self, txn: TxnId) -> Result<(), String> {
        self.pending.lock().map_err(|e| e.to_string())?.remove(&txn);
        Ok(())
    }
    fn id(&self) -> Option<String> {
        Some("orders".into())
    }
}

/// Places one order; `Ok(false)` when stock or money is short (rolled back).
async fn place(
    coord: &TransactionCoordinator,
    orders: &Arc<Orders>,
    stock: &Arc<Versioned<u64>>,
    balance: &Arc<Versioned<u64>>,
    name: &str,
    qty: u64,
    price: u64,
) -> Result<bool, TxnError> {
    loop {
        let txn = coord.begin_transaction()?;
        coord.register_participant(txn, orders.clone())?;
        coord.enlist_resource(txn, stock.clone())?;
        coord.enlist_resource(txn, balance.clone())?;
        let ((units, _), (money, _)) = (stock.read(txn), balance.read(txn));
        if units < qty || money < qty * price {
            coord.rollback_transaction(txn).await?;
            return Ok(false);
        }
        stock.write(txn, units - qty);
        balance.write(txn, money - qty * price);
        if let Ok(mut p) = orders.pending.lock() {
            p.insert(txn, format!("{name}: {qty} x {price}"));
        }
        match coord.prepare_transaction(txn).await {
            Ok(()) => {
                coord.commit_transaction(txn).await?;
                return Ok(true);
            }
            // Another order reserved the version we read: read again and retry.
            Err(TxnError::PrepareRefused { reason, .. }) if reason.contains("conflict") => {
                tokio::task::yield_now().await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let coord = TransactionCoordinator::new(Config::default());
    let orders = Arc::new(Orders::default());
    let stock = Versioned::named("stock:apple", 100u64);
    let balance = Versioned::named("balance:alice", 5_000u64);
    let mut tasks = Vec::new();
    for i in 0..40u64 {
        let (coord, orders, stock, balance) = (
            coord.clone(),
            orders.clone(),
            stock.clone(),
            balance.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let qty = 1 + i % 5;
            let placed = place(
                &coord,
                &orders,
                &stock,
                &balance,
                &format!("order-{i}"),
                qty,
                30,
            )
            .await;
            (qty, placed)
        }));
    }
    let (mut units, mut placed, mut short) = (0, 0, 0);
    for t in tasks {
        match t.await {
            Ok((qty, Ok(true))) => {
                units += qty;
                placed += 1;
            }
            Ok((_, Ok(false))) => short += 1,
            Ok((_, Err(e))) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        }
    }
    let ((left, stock_v), (money, balance_v)) = (stock.get(), balance.get());
    let confirmed = orders.confirmed.lock().map(|c| c.len()).unwrap_or(0);
    println!("{placed} orders placed ({units} units), {short} refused for want of stock or money");
    println!(
        "stock {left} (version {stock_v}), balance {money} (version {balance_v}), {confirmed} confirmed"
    );
    let ok = left == 100 - units
        && money == 5_000 - units * 30
        && confirmed == placed
        && stock_v == placed as u64
        && coord.unfinished() == 0;
    println!("invariants: {}", if ok { "OK" } else { "BROKEN" });
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
