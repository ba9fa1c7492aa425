//! [`Versioned`]: a value with a version, enlisted as a resource, with optimistic
//! concurrency done right. A transaction reads the version when it enlists the value;
//! `prepare` validates that the version is unchanged **and reserves it**, so a second
//! transaction that read the same version gets a conflict (`Ok(false)`) instead of also
//! preparing; `commit` applies the staged write and increments the version; `rollback`
//! releases the reservation. Two transactions that read one version can never both commit:
//! no lost update.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::{Resource, TxnId};

struct Pending<T> {
    /// The version this transaction read when it enlisted.
    read: u64,
    /// Its staged write, if any.
    write: Option<T>,
}

struct Inner<T> {
    value: T,
    version: u64,
    /// The transaction whose prepare reserved the current version.
    reserved: Option<TxnId>,
    pending: HashMap<TxnId, Pending<T>>,
}

/// A value with a `u64` version, for optimistic concurrency across transactions.
pub struct Versioned<T> {
    id: Option<String>,
    inner: Mutex<Inner<T>>,
}

impl<T: Clone + Send + Sync + 'static> Versioned<T> {
    /// A value at version 0.
    pub fn new(value: T) -> Arc<Versioned<T>> {
        Self::build(None, value)
    }

    /// A value at version 0 with a stable id (errors and registrations name it).
    pub fn named(id: &str, value: T) -> Arc<Versioned<T>> {
        Self::build(Some(id.to_string()), value)
    }

    fn build(id: Option<String>, value: T) -> Arc<Versioned<T>> {
        Arc::new(Versioned {
            id,
            inner: Mutex::new(Inner {
                value,
                version: 0,
                reserved: None,
                pending: HashMap::new(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<T>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The committed value and its version.
    pub fn get(&self) -> (T, u64) {
        let i = self.lock();
        (i.value.clone(), i.version)
    }

    /// What `txn` sees: its own staged write, else the committed value; and the version it
    /// read (recorded now if it did not enlist the value).
    pub fn read(&self, txn: TxnId) -> (T, u64) {
        let mut i = self.lock();
        let version = i.version;
        let p = i.pending.entry(txn).or_insert(Pending {
            read: version,
            write: None,
        });
        let read = p.read;
        let seen = p.write.clone();
        (seen.unwrap_or_else(|| i.value.clone()), read)
    }

    /// Stages `value` as `txn`'s write, applied if `txn` commits.
    pub fn write(&self, txn: TxnId, value: T) {
        let mut i = self.lock();
        let version = i.version;
        i.pending
            .entry(txn)
            .or_insert(Pending {
                read: version,
                write: None,
            })
            .write = Some(value);
    }
}

#[async_trait::async_trait]
impl<T: Clone + Send + Sync + 'static> Resource for Versioned<T> {
    async fn prepare(&self, txn: TxnId) -> Result<bool, String> {
        let mut i = self.lock();
        let Some(read) = i.pending.get(&txn).map(|p| p.read) else {
            return Err(format!("{txn} never enlisted this value"));
        };
        let free = i.reserved.is_none_or(|r| r == txn);
        if read != i.version || !free {
            return Ok(false);
        }
        i.reserved = Some(txn);
        Ok(true)
    }

    async fn commit(&self, txn: TxnId) -> Result<(), String> {
        let mut i = self.lock();
        if i.reserved != Some(txn) {
            // A repeat of a commit that already applied.
            return Ok(());
        }
        if let Some(write) = i.pending.remove(&txn).and_then(|p| p.write) {
            i.value = write;
            i.version += 1;
        }
        i.reserved = None;
        Ok(())
    }

    async fn rollback(&self, txn: TxnId) -> Result<(), String> {
        let mut i = self.lock();
        if i.reserved == Some(txn) {
            i.reserved = None;
        }
        i.pending.remove(&txn);
        Ok(())
    }

    fn enlisted(&self, txn: TxnId) {
        let mut i = self.lock();
        let version = i.version;
        i.pending.entry(txn).or_insert(Pending {
            read: version,
            write: None,
        });
    }

    fn id(&self) -> Option<String> {
        self.id.clone()
    }
}
