//! A typed table of JSON records in a JetStream KV bucket, updated by compare-and-set on the
//! key's revision: the building block of the example services, and of any service that keeps
//! its state in JetStream. Concurrent updates to one key (two instances, two transactions)
//! never lose each other's changes: a writer that lost the race re-reads and decides again.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::TryStreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::keyed::KeyedLocks;

/// A table operation that failed for good.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The bucket could not be opened or created.
    #[error("bucket {bucket}: {message}")]
    Bucket {
        /// The bucket.
        bucket: String,
        /// Why.
        message: String,
    },
    /// A record is not valid JSON of the expected shape.
    #[error("record {key} in {bucket} is unreadable: {message}")]
    Corrupt {
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// Why.
        message: String,
    },
    /// JetStream kept failing.
    #[error("bucket {bucket}, key {key}: {message}")]
    Unavailable {
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// The last error.
        message: String,
    },
}

/// What an update does to the record.
#[derive(Debug, Clone, PartialEq)]
pub enum Change<T> {
    /// Write this value.
    Put(T),
    /// Remove the record.
    Delete,
    /// Leave it as it is.
    Keep,
}

/// A typed KV table.
#[derive(Clone)]
pub struct Table<T> {
    bucket: String,
    store: kv::Store,
    /// One lock per key being updated in this process: concurrent updates of a hot key take
    /// turns here instead of racing (and backing off) on the revision. Compare-and-set still
    /// guards against other processes.
    locks: KeyedLocks,
    _t: PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned> Table<T> {
    /// Opens `bucket`, creating it if needed.
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        replicas: usize,
    ) -> Result<Self, TableError> {
        let store = txcoord_nats::key_value(js, bucket, replicas, std::time::Duration::ZERO)
            .await
            .map_err(|message| TableError::Bucket {
                bucket: bucket.to_string(),
                message,
            })?;
        Ok(Table {
            bucket: bucket.to_string(),
            store,
            locks: KeyedLocks::default(),
            _t: PhantomData,
        })
    }

    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn unavailable(&self, key: &str, e: impl ToString) -> TableError {
        TableError::Unavailable {
            bucket: self.bucket.clone(),
            key: key.to_string(),
            message: e.to_string(),
        }
    }

    /// A record and its revision.
    pub async fn get(&self, key: &str) -> Result<Option<(T, u64)>, TableError> {
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=30 {
            match self.store.entry(key).await {
                Ok(Some(e)) if matches!(e.operation, kv::Operation::Put) => {
                    let v =
                        serde_json::from_slice(&e.value).map_err(|err| TableError::Corrupt {
                            bucket: self.bucket.clone(),
                            key: key.to_string(),
                            message: err.to_string(),
                        })?;
                    return Ok(Some((v, e.revision)));
                }
                Ok(_) => return Ok(None),
                Err(e) if attempt < 30 => {
                    tracing::debug!(bucket = %self.bucket, key, error = %e, "read failed, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(self.unavailable(key, e)),
            }
        }
        Err(self.unavailable(key, "retries exhausted"))
    }

    /// Creates the record if the key has none; returns whether it did.
    pub async fn insert_if_absent(&self, key: &str, value: T) -> Result<bool, TableError>
    where
        T: Clone,
    {
        self.update(key, |cur| match cur {
            None => (Change::Put(value.clone()), true),
            Some(_) => (Change::Keep, false),
        })
        .await
    }

    /// Read-decide-write with compare-and-set, retried until it applies. `decide` sees the
    /// current record and returns the change and a result; it may run several times, so it
    /// must only decide, not act. Any failed write (a lost race, a retried write that had
    /// landed, a server restarting) is followed by a fresh read and a fresh decision.
    pub async fn update<R>(
        &self,
        key: &str,
        mut decide: impl FnMut(Option<&T>) -> (Change<T>, R),
    ) -> Result<R, TableError> {
        let _turn = self.locks.lock(key).await;
        self.update_locked(key, &mut decide).await
    }

    async fn update_locked<R>(
        &self,
        key: &str,
        decide: &mut impl FnMut(Option<&T>) -> (Change<T>, R),
    ) -> Result<R, TableError> {
        let mut delay = Duration::from_millis(2);
        for _ in 0..1000 {
            let current = self.get(key).await?;
            let revision = current.as_ref().map(|(_, r)| *r);
            let (change, result) = decide(current.as_ref().map(|(v, _)| v));
            let written = match (change, revision) {
                (Change::Keep, _) | (Change::Delete, None) => return Ok(result),
                (Change::Put(v), None) => {
                    let body = Bytes::from(serde_json::to_vec(&v).unwrap_or_default());
                    self.store
                        .create(key, body)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
                (Change::Put(v), Some(rev)) => {
                    let body = Bytes::from(serde_json::to_vec(&v).unwrap_or_default());
                    self.store
                        .update(key, body, rev)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
                (Change::Delete, Some(rev)) => self
                    .store
                    .delete_expect_revision(key, Some(rev))
                    .await
                    .map_err(|e| e.to_string()),
            };
            match written {
                Ok(()) => return Ok(result),
                Err(e) => {
                    tracing::debug!(bucket = %self.bucket, key, error = %e, "write lost or failed; deciding again")
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(100));
        }
        Err(self.unavailable(key, "too much contention"))
    }

    /// Every record.
    ///
    /// The keys come from the stream's own subject listing (stream info with a subjects
    /// filter), which the server answers from its index, exactly. The KV `keys()` lister
    /// reads them through an ordered consumer that stops when it believes nothing is
    /// pending, and one demo run lost a key that way (see nats-server#4824 for that
    /// family of miscounts).
    pub async fn all(&self) -> Result<BTreeMap<String, T>, TableError> {
        let prefix = self.store.prefix.as_str();
        let subjects: Vec<(String, usize)> = match self
            .store
            .stream
            .info_with_subjects(format!("{prefix}>"))
            .await
        {
            Ok(s) => s
                .try_collect()
                .await
                .map_err(|e| self.unavailable("*", e))?,
            Err(e) => return Err(self.unavailable("*", e)),
        };
        let keys = subjects
            .into_iter()
            .filter_map(|(subject, _)| subject.strip_prefix(prefix).map(str::to_string));
        let mut out = BTreeMap::new();
        // A deleted or purged key still has its marker on the subject: `get` says None.
        for k in keys {
            if let Some((v, _)) = self.get(&k).await? {
                out.insert(k, v);
            }
        }
        Ok(out)
    }
}
