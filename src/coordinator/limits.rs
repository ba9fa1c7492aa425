//! Fair shares of the coordinator: besides the global `max_in_flight`, each service may be in
//! at most `max_in_flight_per_service` running transactions, and each client may have at most
//! `max_in_flight_per_client` running, so neither a flood of transactions to one service (a
//! slow one, or one that does not exist, with long timeouts) nor a flood from one client can
//! take every slot and starve the rest. A submission that would pass a share waits in the
//! submit stream (it is handed back and comes again shortly). A client is known by the
//! subject it submits on (`<prefix>.submit.<client>`), which NATS permissions can fix per
//! user (`txcoord auth` does); submissions on plain `<prefix>.submit` name no client and
//! have no client share (only the service shares and `max_in_flight`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Running transactions per name (of a service, or of a client).
pub struct Shares {
    max: usize,
    counts: Mutex<HashMap<String, usize>>,
}

/// A running transaction's place in some shares; given back on drop.
pub struct Held {
    limits: Arc<Shares>,
    services: Vec<String>,
}

impl Shares {
    /// Limits of `max` transactions per name (0: none).
    pub fn new(max: usize) -> Arc<Shares> {
        Arc::new(Shares {
            max,
            counts: Mutex::new(HashMap::new()),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place for each distinct name (a transaction's services, or its client), or
    /// names the first whose share is full (and takes nothing).
    pub fn try_take(
        self: &Arc<Self>,
        services: impl IntoIterator<Item = String>,
    ) -> Result<Held, String> {
        let mut services: Vec<String> = services.into_iter().collect();
        services.sort();
        services.dedup();
        let mut counts = self.counts();
        if self.max > 0
            && let Some(full) = services
                .iter()
                .find(|s| counts.get(*s).copied().unwrap_or(0) >= self.max)
        {
            return Err(full.clone());
        }
        for s in &services {
            *counts.entry(s.clone()).or_default() += 1;
        }
        Ok(Held {
            limits: self.clone(),
            services,
        })
    }

    /// How many running transactions hold a place under `name`.
    pub fn in_flight(&self, name: &str) -> usize {
        self.counts().get(name).copied().unwrap_or(0)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut counts = self.limits.counts();
        for s in &self.services {
            if let Some(n) = counts.get_mut(s) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.remove(s);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_service_blocks_only_transactions_that_involve_it() {
        let l = Shares::new(2);
        let a1 = l.try_take(["ghost".to_string()]).unwrap();
        let _a2 = l
            .try_take(["ghost".to_string(), "ghost".to_string()])
            .unwrap();
        assert_eq!(l.in_flight("ghost"), 2, "a service named twice counts once");
        assert_eq!(
            l.try_take(["pay".to_string(), "ghost".to_string()]).err(),
            Some("ghost".to_string())
        );
        assert_eq!(l.in_flight("pay"), 0, "a refused take takes nothing");
        let _p = l.try_take(["pay".to_string()]).unwrap();
        drop(a1);
        assert_eq!(l.in_flight("ghost"), 1);
        assert!(l.try_take(["ghost".to_string()]).is_ok());
        let unlimited = Shares::new(0);
        let _many: Vec<_> = (0..100)
            .map(|_| unlimited.try_take(["x".to_string()]).unwrap())
            .collect();
        assert_eq!(unlimited.in_flight("x"), 100);
    }
}
