//! Per-key async locks: work on one key takes turns inside this process, while different
//! keys run in parallel. Entries are dropped when nobody holds or waits for them, so the map
//! stays as small as the set of keys in use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

type Slot = Arc<tokio::sync::Mutex<()>>;

/// A set of per-key locks.
#[derive(Clone, Default)]
pub struct KeyedLocks {
    map: Arc<Mutex<HashMap<String, Slot>>>,
}

/// Holds one key's lock until dropped.
pub struct KeyGuard {
    map: Arc<Mutex<HashMap<String, Slot>>>,
    key: String,
    slot: Slot,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    /// Waits for `key`'s turn.
    pub async fn lock(&self, key: &str) -> KeyGuard {
        let slot = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.to_string()).or_default().clone()
        };
        let guard = slot.clone().lock_owned().await;
        KeyGuard {
            map: self.map.clone(),
            key: key.to_string(),
            slot,
            guard: Some(guard),
        }
    }

    /// How many keys are locked or awaited (for tests).
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no key is in use.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // References: the map's, ours, and (while held) the owned guard's; 2 means idle.
        if Arc::strong_count(&self.slot) <= 2 {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_key_takes_turns_and_the_map_empties() {
        let locks = KeyedLocks::default();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..4 {
            let (locks, order) = (locks.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _g = locks.lock("k").await;
                order.lock().unwrap().push(format!("in{i}"));
                tokio::time::sleep(Duration::from_millis(5)).await;
                order.lock().unwrap().push(format!("out{i}"));
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        for pair in order.chunks(2) {
            assert_eq!(
                pair[0].replace("in", ""),
                pair[1].replace("out", ""),
                "interleaved: {order:?}"
            );
        }
        assert!(locks.is_empty());
    }

    #[tokio::test]
    async fn different_keys_do_not_wait_for_each_other() {
        let locks = KeyedLocks::default();
        let _a = locks.lock("a").await;
        let b = tokio::time::timeout(Duration::from_millis(100), locks.lock("b")).await;
        assert!(b.is_ok());
    }
}
