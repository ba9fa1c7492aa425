//! Forgetting the saga markers of finished sagas. A saga step that takes a quantity
//! ([`crate::quantity::take`]) leaves a marker in the record (`sagas`, by
//! `<txn_id>.<step>`): it makes a repeated execute a no-op and tells a compensation what to
//! give back. Nothing removed the marker of a step whose saga completed, so every completed
//! saga grew its records for good: an account or a stock line used by tens of thousands of
//! sagas would pass the server's message size limit, and every write carries the whole
//! record.
//!
//! A marker is needed for as long as its step can still be executed or compensated, which
//! ends when the saga's log ends: once the last record of `<prefix>.events.<txn_id>` is
//! terminal, no command for it is ever sent again, and a redelivered execute is answered
//! from the SDK's own branch record without calling the service. So a sweep, every
//! `--sweep-secs`, reads each marker's log and removes the markers of finished sagas with
//! a compare-and-set that changes nothing else (not the balance, not the record's
//! `version`). A log that cannot be read, or a read from a replica that lags, keeps the
//! marker until the next sweep: the sweep can only be late, never early.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_nats::jetstream;
use serde::Serialize;
use serde::de::DeserializeOwned;
use txcoord_participant::kvtable::{Change, Table, TableError};
use txcoord_proto::{Subjects, TransactionEvent};

/// Where a record keeps its saga markers.
pub type Markers<T> = fn(&mut T) -> &mut BTreeMap<String, u64>;

/// Sweeps `table` every `every` until the process ends.
pub async fn run<T>(
    js: jetstream::Context,
    subjects: Subjects,
    table: Table<T>,
    markers: Markers<T>,
    every: Duration,
) where
    T: Serialize + DeserializeOwned + Clone,
{
    let mut events = None;
    loop {
        tokio::time::sleep(every).await;
        if events.is_none() {
            match js.get_stream(subjects.events_stream()).await {
                Ok(s) => events = Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "saga marker sweep: the log cannot be opened; trying again later");
                    continue;
                }
            }
        }
        let Some(log) = &events else { continue };
        match sweep_once(log, &subjects, &table, markers).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "saga markers of finished sagas removed"),
            Err(e) => {
                tracing::warn!(error = %e, "saga marker sweep: the records cannot be read; trying again later")
            }
        }
    }
}

/// One sweep over every record; returns how many markers it removed.
pub async fn sweep_once<T>(
    log: &jetstream::stream::Stream,
    subjects: &Subjects,
    table: &Table<T>,
    markers: Markers<T>,
) -> Result<usize, TableError>
where
    T: Serialize + DeserializeOwned + Clone,
{
    let mut finished: HashMap<String, bool> = HashMap::new();
    let mut removed = 0;
    for (key, mut record) in table.all().await? {
        let mut done = Vec::new();
        for branch in markers(&mut record).keys() {
            let Some((txn_id, _step)) = branch.rsplit_once('.') else {
                continue;
            };
            if !finished.contains_key(txn_id) {
                let ended = log_ended(log, subjects, txn_id).await;
                finished.insert(txn_id.to_string(), ended);
            }
            if finished.get(txn_id) == Some(&true) {
                done.push(branch.clone());
            }
        }
        if done.is_empty() {
            continue;
        }
        removed += table
            .update(&key, |cur| {
                let Some(cur) = cur else {
                    return (Change::Keep, 0);
                };
                let mut next = cur.clone();
                let m = markers(&mut next);
                let n = done.iter().filter(|b| m.remove(*b).is_some()).count();
                if n == 0 {
                    (Change::Keep, 0)
                } else {
                    (Change::Put(next), n)
                }
            })
            .await?;
    }
    Ok(removed)
}

/// Whether the last record of `txn_id`'s log is terminal. Anything else (no log, an
/// unreadable one, a foreign message last) is false: the marker stays.
async fn log_ended(log: &jetstream::stream::Stream, subjects: &Subjects, txn_id: &str) -> bool {
    match log
        .direct_get_last_for_subject(subjects.events(txn_id))
        .await
    {
        Ok(msg) => serde_json::from_slice::<TransactionEvent>(&msg.payload)
            .is_ok_and(|ev| ev.txn_id == txn_id && ev.state.is_terminal()),
        Err(_) => false,
    }
}
