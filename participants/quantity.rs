//! The rules inventory and payment share: a record holds a quantity (a SKU's stock, an
//! account's money) that 2PC branches hold and settle, and saga steps take and give back.
//! Every function decides a [`Change`] for [`txcoord_participant::kvtable::Table::update`], so the effect
//! and its per-branch marker are one compare-and-set write.

use txcoord_participant::kvtable::Change;

/// The parts of a record that holds a quantity for transactions: a SKU's stock, an
/// account's money. Inventory and payment share every rule below; only names differ.
pub struct Parts<'a> {
    /// Not held, not used (`available`, `balance`).
    pub free: &'a mut u64,
    /// Used by committed transactions or executed saga steps (`sold`, `charged`).
    pub used: &'a mut u64,
    /// Held by prepared 2PC branches, by `<txn_id>.<step>`.
    pub holds: &'a mut std::collections::BTreeMap<String, u64>,
    /// Taken by executed saga steps, by `<txn_id>.<step>`: the exactly-once marker.
    pub sagas: &'a mut std::collections::BTreeMap<String, u64>,
    /// Bumped by every committed change.
    pub version: &'a mut u64,
    /// The prepared branch whose `expected_version` reserved the version, if any.
    pub version_holder: &'a mut Option<String>,
}

/// A record with [`Parts`].
pub trait Quantity: Clone {
    /// Mutable access to the parts.
    fn parts(&mut self) -> Parts<'_>;
}

/// What a branch asks of a record, and how to say no.
pub struct Want<'a> {
    /// The record's key (a SKU, an account).
    pub key: &'a str,
    /// How much.
    pub amount: u64,
    /// The version the client last saw, if it cares.
    pub expected_version: Option<u64>,
    /// "unknown sku", "unknown account".
    pub unknown: &'a str,
    /// The refusal when too little is free: (key, free, amount) -> text.
    pub short: fn(&str, u64, u64) -> String,
}

/// Checks what `branch` wants against a record; `Err` is the refusal.
///
/// Optimistic concurrency: a change that names `expected_version` must find the record at
/// that version with no other change prepared (one would move the version before ours
/// commits), and its hold reserves the version: until it settles, every other change is
/// refused. So two transactions that read the same version cannot both commit.
fn check<T: Quantity>(cur: Option<&T>, want: &Want<'_>, branch: &str) -> Result<T, String> {
    let Some(rec) = cur else {
        return Err(format!("{}: {:?}", want.unknown, want.key));
    };
    let mut next = rec.clone();
    let p = next.parts();
    if p.version_holder.as_deref().is_some_and(|h| h != branch) {
        return Err(format!(
            "version_conflict: {} at version {} is reserved by a prepared transaction that expects it",
            want.key, p.version
        ));
    }
    if let Some(v) = want.expected_version {
        if v != *p.version {
            return Err(format!(
                "version_conflict: {} is at version {}, expected {v}",
                want.key, p.version
            ));
        }
        if p.holds.keys().any(|h| h != branch) {
            return Err(format!(
                "version_conflict: {} at version {} has prepared changes that will move it",
                want.key, p.version
            ));
        }
    }
    if *p.free < want.amount {
        return Err((want.short)(want.key, *p.free, want.amount));
    }
    Ok(next)
}

/// Where a record keeps its saga markers (for [`crate::sweep`]).
pub fn saga_markers<T: Quantity>(record: &mut T) -> &mut std::collections::BTreeMap<String, u64> {
    record.parts().sagas
}

/// 2PC prepare: moves `amount` from free into a hold for `branch` (a repeat is a no-op).
pub fn hold<T: Quantity>(
    cur: Option<&T>,
    branch: &str,
    want: &Want<'_>,
) -> (Change<T>, Result<(), String>) {
    if let Some(rec) = cur
        && rec.clone().parts().holds.contains_key(branch)
    {
        return (Change::Keep, Ok(()));
    }
    match check(cur, want, branch) {
        Ok(mut next) => {
            let p = next.parts();
            *p.free -= want.amount;
            p.holds.insert(branch.to_string(), want.amount);
            if want.expected_version.is_some() {
                *p.version_holder = Some(branch.to_string());
            }
            (Change::Put(next), Ok(()))
        }
        Err(reason) => (Change::Keep, Err(reason)),
    }
}

/// 2PC commit (`commit`) or abort: the hold becomes used, or free again. A no-op when the
/// hold is already gone (a repeated call).
pub fn settle<T: Quantity>(cur: Option<&T>, branch: &str, commit: bool) -> (Change<T>, ()) {
    let Some(rec) = cur else {
        return (Change::Keep, ());
    };
    let mut next = rec.clone();
    let p = next.parts();
    let Some(amount) = p.holds.remove(branch) else {
        return (Change::Keep, ());
    };
    if p.version_holder.as_deref() == Some(branch) {
        *p.version_holder = None;
    }
    if commit {
        *p.used += amount;
        *p.version += 1;
    } else {
        *p.free += amount;
    }
    (Change::Put(next), ())
}

/// Saga execute: takes `amount` at once and marks the branch, in one write (a repeat is a
/// no-op).
pub fn take<T: Quantity>(
    cur: Option<&T>,
    branch: &str,
    want: &Want<'_>,
) -> (Change<T>, Result<(), String>) {
    if let Some(rec) = cur
        && rec.clone().parts().sagas.contains_key(branch)
    {
        return (Change::Keep, Ok(()));
    }
    match check(cur, want, branch) {
        Ok(mut next) => {
            let p = next.parts();
            *p.free -= want.amount;
            *p.used += want.amount;
            *p.version += 1;
            p.sagas.insert(branch.to_string(), want.amount);
            (Change::Put(next), Ok(()))
        }
        Err(reason) => (Change::Keep, Err(reason)),
    }
}

/// Saga compensate: gives back what the branch took and removes its marker (a no-op when it
/// took nothing or was already given back).
pub fn give_back<T: Quantity>(cur: Option<&T>, branch: &str) -> (Change<T>, ()) {
    let Some(rec) = cur else {
        return (Change::Keep, ());
    };
    let mut next = rec.clone();
    let p = next.parts();
    let Some(amount) = p.sagas.remove(branch) else {
        return (Change::Keep, ());
    };
    *p.free += amount;
    *p.used -= amount;
    *p.version += 1;
    (Change::Put(next), ())
}

/// Maps a table update's result to a vote.
pub fn vote(
    result: Result<Result<(), String>, txcoord_participant::kvtable::TableError>,
) -> txcoord_participant::Vote {
    use txcoord_participant::Vote;
    match result {
        Ok(Ok(())) => Vote::Ready,
        Ok(Err(reason)) => Vote::Abort(reason),
        Err(e) => Vote::Abort(format!("store unavailable: {e}")),
    }
}

/// Maps a table update's result to a saga step result (a store outage is retryable).
pub fn step_result(
    result: Result<Result<(), String>, txcoord_participant::kvtable::TableError>,
) -> txcoord_participant::StepResult {
    use txcoord_participant::StepResult;
    match result {
        Ok(Ok(())) => StepResult::Done,
        Ok(Err(reason)) => StepResult::Failed {
            reason,
            retryable: false,
        },
        Err(e) => StepResult::Failed {
            reason: format!("store unavailable: {e}"),
            retryable: true,
        },
    }
}

/// A participant over a table of [`Quantity`] records: inventory and payment are this with
/// different names and messages.
pub struct QuantityService<T> {
    /// The records.
    pub table: txcoord_participant::kvtable::Table<T>,
    /// The service's one action (`reserve`, `charge`).
    pub action: &'static str,
    /// The payload field naming the record (`sku`, `account`).
    pub key_field: &'static str,
    /// The payload field with the amount (`qty`, `amount`).
    pub amount_field: &'static str,
    /// "unknown sku", "unknown account".
    pub unknown: &'static str,
    /// The refusal when too little is free.
    pub short: fn(&str, u64, u64) -> String,
}

/// A parsed request: the record's key, the amount, the expected version.
struct Ask {
    key: String,
    amount: u64,
    expected_version: Option<u64>,
}

impl<T> QuantityService<T>
where
    T: Quantity + serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    fn ask(&self, action: &str, payload: &serde_json::Value) -> Result<Ask, String> {
        if action != self.action {
            return Err(format!(
                "unknown action {action:?}; this service knows {:?}",
                self.action
            ));
        }
        let key = payload
            .get(self.key_field)
            .and_then(serde_json::Value::as_str);
        let amount = payload
            .get(self.amount_field)
            .and_then(serde_json::Value::as_u64);
        let (Some(key), Some(amount)) = (key, amount) else {
            return Err(format!(
                "invalid payload: needs {:?} (a string) and {:?} (a whole number)",
                self.key_field, self.amount_field
            ));
        };
        if amount == 0 {
            return Err(format!(
                "invalid payload: {} must be at least 1",
                self.amount_field
            ));
        }
        let expected_version = payload
            .get("expected_version")
            .and_then(serde_json::Value::as_u64);
        Ok(Ask {
            key: key.to_string(),
            amount,
            expected_version,
        })
    }

    fn want<'a>(&self, ask: &'a Ask) -> Want<'a> {
        Want {
            key: &ask.key,
            amount: ask.amount,
            expected_version: ask.expected_version,
            unknown: self.unknown,
            short: self.short,
        }
    }

    fn key_of(&self, txn: &txcoord_participant::TxnContext) -> Option<String> {
        txn.payload
            .get(self.key_field)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    }

    async fn change(
        &self,
        txn: &txcoord_participant::TxnContext,
        f: impl Fn(Option<&T>, &str) -> (Change<T>, ()),
    ) -> Result<(), txcoord_participant::ServiceError> {
        // Commit only follows a recorded ready vote, whose payload had the key. An abort or
        // compensate may come for a branch that never ran: without a key it holds nothing.
        let Some(key) = self.key_of(txn) else {
            return Ok(());
        };
        let branch = crate::common::hold_key(txn);
        self.table
            .update(&key, |cur| f(cur, &branch))
            .await
            .map_err(|e| txcoord_participant::ServiceError(e.to_string()))
    }
}

impl<T> txcoord_participant::Participant for QuantityService<T>
where
    T: Quantity + serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    async fn prepare(
        &self,
        txn: &txcoord_participant::TxnContext,
        action: &str,
        payload: &serde_json::Value,
    ) -> txcoord_participant::Vote {
        let ask = match self.ask(action, payload) {
            Ok(a) => a,
            Err(e) => return txcoord_participant::Vote::Abort(e),
        };
        crate::common::demo_delay(payload).await;
        let (want, branch) = (self.want(&ask), crate::common::hold_key(txn));
        vote(
            self.table
                .update(&ask.key, |cur| hold(cur, &branch, &want))
                .await,
        )
    }

    async fn commit(
        &self,
        txn: &txcoord_participant::TxnContext,
    ) -> Result<(), txcoord_participant::ServiceError> {
        self.change(txn, |cur, branch| settle(cur, branch, true))
            .await
    }

    async fn abort(
        &self,
        txn: &txcoord_participant::TxnContext,
    ) -> Result<(), txcoord_participant::ServiceError> {
        self.change(txn, |cur, branch| settle(cur, branch, false))
            .await
    }

    async fn execute(
        &self,
        txn: &txcoord_participant::TxnContext,
        action: &str,
        payload: &serde_json::Value,
    ) -> txcoord_participant::StepResult {
        let ask = match self.ask(action, payload) {
            Ok(a) => a,
            Err(reason) => {
                return txcoord_participant::StepResult::Failed {
                    reason,
                    retryable: false,
                };
            }
        };
        crate::common::demo_delay(payload).await;
        let (want, branch) = (self.want(&ask), crate::common::hold_key(txn));
        step_result(
            self.table
                .update(&ask.key, |cur| take(cur, &branch, &want))
                .await,
        )
    }

    async fn compensate(
        &self,
        txn: &txcoord_participant::TxnContext,
    ) -> Result<(), txcoord_participant::ServiceError> {
        self.change(txn, give_back).await
    }
}
