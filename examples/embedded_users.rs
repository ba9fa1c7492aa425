//! The welcome flow in one process: a new user, their first product and their first order
//! are created together or not at all. Three in-memory tables are the participants; the
//! third signup fails at the order table (a duplicate order id), so nothing of it remains.
//!
//! `cargo run --example embedded_users` (exits 1 if a table disagrees)

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use txcoord::embedded::{Config, Participant, PreparedResult, TransactionCoordinator, TxnId};

/// A table of unique keys: prepare reserves the staged key, commit inserts it.
struct Table {
    name: &'static str,
    rows: Mutex<BTreeSet<String>>,
    staged: Mutex<BTreeMap<TxnId, String>>,
}

impl Table {
    fn new(name: &'static str) -> Arc<Table> {
        Arc::new(Table {
            name,
            rows: Mutex::new(BTreeSet::new()),
            staged: Mutex::new(BTreeMap::new()),
        })
    }
    fn stage(&self, txn: TxnId, key: &str) {
        if let Ok(mut s) = self.staged.lock() {
            s.insert(txn, key.to_string());
        }
    }
    fn rows(&self) -> BTreeSet<String> {
        self.rows.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

#[async_trait::async_trait]
impl Participant for Table {
    async fn prepare(&self, txn: TxnId) -> PreparedResult {
        let (Ok(rows), Ok(staged)) = (self.rows.lock(), self.staged.lock()) else {
            return PreparedResult::Aborted("table lock poisoned".into());
        };
        match staged.get(&txn) {
            None => PreparedResult::ReadOnly,
            Some(k) if rows.contains(k) => {
                PreparedResult::Aborted(format!("{} {k:?} exists", self.name))
            }
            Some(_) => PreparedResult::Ready,
        }
    }
    async fn commit(&self, txn: TxnId) -> Result<(), String> {
        let key = self.staged.lock().map_err(|e| e.to_string())?.remove(&txn);
        if let Some(k) = key {
            self.rows.lock().map_err(|e| e.to_string())?.insert(k);
        }
        Ok(())
    }
    async fn rollback(&self, txn: TxnId) -> Result<(), String> {
        self.staged.lock().map_err(|e| e.to_string())?.remove(&txn);
        Ok(())
    }
    fn id(&self) -> Option<String> {
        Some(self.name.into())
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let coord = TransactionCoordinator::new(Config::default());
    let (users, products, orders) = (
        Table::new("user"),
        Table::new("product"),
        Table::new("order"),
    );
    let signups = [
        ("ada", "lamp", "o-1"),
        ("bob", "desk", "o-2"),
        ("cyd", "chair", "o-1"), // o-1 is taken: the whole signup rolls back
    ];
    for (user, product, order) in signups {
        let txn = match coord.begin_transaction() {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        };
        for (table, key) in [(&users, user), (&products, product), (&orders, order)] {
            table.stage(txn, key);
            if let Err(e) = coord.register_participant(txn, table.clone()) {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        }
        match coord.prepare_transaction(txn).await {
            Ok(()) => match coord.commit_transaction(txn).await {
                Ok(()) => println!("{user}: welcome ({product}, {order})"),
                Err(e) => println!("{user}: {e}"),
            },
            Err(e) => println!("{user}: not signed up: {e}"),
        }
        println!("  state: {:?}", coord.get_transaction_state(txn));
    }
    let ok = users.rows() == BTreeSet::from(["ada".into(), "bob".into()])
        && products.rows() == BTreeSet::from(["lamp".into(), "desk".into()])
        && orders.rows() == BTreeSet::from(["o-1".into(), "o-2".into()])
        && coord.unfinished() == 0;
    println!("invariants: {}", if ok { "OK" } else { "BROKEN" });
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
