//! The lock table: named resources a branch (`txn_id`, `step`) holds, shared or exclusive,
//! from its prepare until its commit or abort. A service declares what a prepare must hold
//! ([`crate::Participant::locks`]); the SDK takes it here before it calls `prepare`, keeps
//! it in the branch's record while the branch is prepared (so a restarted service holds it
//! again, [`LockTable::grant`]), and releases it when the branch commits, aborts, refuses or
//! turns out read-only.
//!
//! A prepare that finds a resource taken waits its turn (first come, first served) under the
//! transaction's deadlock policy:
//!
//! - `detect`: it waits, up to the service's lock wait (never past the command's deadline),
//!   and reports a wait-for edge to each transaction it waits for, again every
//!   [`REFRESH`] while it waits and withdrawn when the wait ends, so the coordinator can
//!   find cycles across services;
//! - `wait-die`: an older transaction (smaller `lock_ts`, then smaller txn id) waits for
//!   younger ones; a younger one refuses at once;
//! - `no-wait`: any conflict refuses at once.
//!
//! A branch's wait ends early when its transaction's abort arrives ([`LockTable::cancel`]):
//! the prepare then refuses instead of taking locks for a transaction that is over.
//!
//! Branches of one transaction never block each other. Resources are taken in name order, so
//! branches of this service alone cannot deadlock among themselves.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use txcoord_proto::{DeadlockPolicy, LockConflict, LockMode};

use crate::barrier::HeldLock;

/// How often a waiting prepare reports its edges again.
pub const REFRESH: Duration = Duration::from_secs(1);

/// A branch: its transaction and step.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BranchId {
    /// The transaction.
    pub txn_id: String,
    /// The step.
    pub step: usize,
}

/// A change of one wait-for edge, for the reporter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeChange {
    /// The transaction waited for.
    pub holder: String,
    /// Its `lock_ts`.
    pub holder_ts: u64,
    /// The resource.
    pub resource: String,
    /// The wait for this holder ended.
    pub withdrawn: bool,
}

#[derive(Debug, Clone)]
struct Holder {
    branch: BranchId,
    mode: LockMode,
    ts: u64,
}

struct Waiter {
    id: u64,
    branch: BranchId,
    mode: LockMode,
    ts: u64,
    wake: Arc<Notify>,
}

#[derive(Default)]
struct Resource {
    holders: Vec<Holder>,
    queue: VecDeque<Waiter>,
}

#[derive(Default)]
struct Table {
    resources: HashMap<String, Resource>,
    /// Waiters granted while they slept, and waits cancelled, by waiter id.
    granted: std::collections::HashSet<u64>,
    cancelled: std::collections::HashSet<u64>,
    /// The waiter id of each waiting branch (for `cancel`).
    waiting: HashMap<BranchId, u64>,
    next_id: u64,
}

/// The lock table of one service process.
#[derive(Default)]
pub struct LockTable {
    table: Mutex<Table>,
}

fn compatible(a: LockMode, b: LockMode) -> bool {
    a == LockMode::Shared && b == LockMode::Shared
}

/// Older first: by `lock_ts`, then by txn id (so two transactions never tie).
fn older(a_ts: u64, a_txn: &str, b_ts: u64, b_txn: &str) -> bool {
    (a_ts, a_txn) < (b_ts, b_txn)
}

impl Resource {
    /// Whether `branch` already holds it at least as strongly as `mode`.
    fn held_by(&self, branch: &BranchId, mode: LockMode) -> bool {
        self.holders
            .iter()
            .any(|h| h.branch == *branch && (h.mode == LockMode::Exclusive || h.mode == mode))
    }

    /// The holders and queued waiters (other transactions') that `mode` must wait for; the
    /// queue counts only up to `until_id` (a waiter waits for those ahead of it).
    fn blockers(&self, txn: &str, mode: LockMode, until_id: Option<u64>) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = Vec::new();
        let mut push = |t: &str, ts: u64| {
            if t != txn && !out.iter().any(|(o, _)| o == t) {
                out.push((t.to_string(), ts));
            }
        };
        for h in &self.holders {
            if !compatible(h.mode, mode) {
                push(&h.branch.txn_id, h.ts);
            }
        }
        for w in &self.queue {
            if Some(w.id) == until_id {
                break;
            }
            if !compatible(w.mode, mode) {
                push(&w.branch.txn_id, w.ts);
            }
        }
        out
    }

    fn grantable(&self, txn: &str, mode: LockMode) -> bool {
        self.holders
            .iter()
            .all(|h| h.branch.txn_id == txn || compatible(h.mode, mode))
            && self
                .queue
                .iter()
                .all(|w| w.branch.txn_id == txn || compatible(w.mode, mode))
    }

    /// Grants queued waiters from the front while they fit; returns whom to wake.
    fn promote(&mut self, granted: &mut std::collections::HashSet<u64>) -> Vec<Arc<Notify>> {
        let mut wake = Vec::new();
        while let Some(front) = self.queue.front() {
            let fits = self
                .holders
                .iter()
                .all(|h| h.branch.txn_id == front.branch.txn_id || compatible(h.mode, front.mode));
            if !fits {
                break;
            }
            let Some(w) = self.queue.pop_front() else {
                break;
            };
            self.holders.push(Holder {
                branch: w.branch,
                mode: w.mode,
                ts: w.ts,
            });
            granted.insert(w.id);
            wake.push(w.wake);
        }
        wake
    }
}

/// The edge to `holder` (its txn id and `lock_ts`) for `resource`.
fn edge(holder: &(String, u64), resource: &str, withdrawn: bool) -> EdgeChange {
    EdgeChange {
        holder: holder.0.clone(),
        holder_ts: holder.1,
        resource: resource.to_string(),
        withdrawn,
    }
}

/// What a branch asks for: deduplicated (exclusive wins) and in name order.
fn normalized(locks: &[HeldLock]) -> Vec<HeldLock> {
    let mut by_name: std::collections::BTreeMap<&str, LockMode> = Default::default();
    for l in locks {
        let m = by_name.entry(l.resource.as_str()).or_insert(l.mode);
        if l.mode == LockMode::Exclusive {
            *m = LockMode::Exclusive;
        }
    }
    by_name
        .into_iter()
        .map(|(r, mode)| HeldLock {
            resource: r.to_string(),
            mode,
        })
        .collect()
}

impl LockTable {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // A poisoned lock only means a task panicked mid-update; the table is still sound.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives `branch` its locks without any check: a prepared branch's, restored from its
    /// record when the service starts (before any command is read).
    pub fn grant(&self, branch: &BranchId, ts: u64, locks: &[HeldLock]) {
        let mut t = self.table();
        for l in normalized(locks) {
            let res = t.resources.entry(l.resource).or_default();
            if !res.held_by(branch, l.mode) {
                res.holders.push(Holder {
                    branch: branch.clone(),
                    mode: l.mode,
                    ts,
                });
            }
        }
    }

    /// Takes every lock of `locks` for `branch` (transaction age `ts`) under `policy`,
    /// waiting no later than `until`. `report` hears every wait-for edge as it begins and
    /// ends, and each again every [`REFRESH`]. On a refusal nothing is held that this call
    /// took, and the conflict says which resource and whom.
    pub async fn acquire(
        &self,
        branch: &BranchId,
        ts: u64,
        locks: &[HeldLock],
        policy: DeadlockPolicy,
        until: Instant,
        report: &(dyn Fn(EdgeChange) + Send + Sync),
    ) -> Result<(), LockConflict> {
        let mut taken: Vec<String> = Vec::new();
        for l in normalized(locks) {
            match self
                .acquire_one(branch, ts, &l, policy, until, report)
                .await
            {
                Ok(newly) => {
                    if newly {
                        taken.push(l.resource);
                    }
                }
                Err(conflict) => {
                    self.release_some(branch, &taken);
                    return Err(conflict);
                }
            }
        }
        Ok(())
    }

    /// One resource; `Ok(true)` when this call took it, `Ok(false)` when already held.
    async fn acquire_one(
        &self,
        branch: &BranchId,
        ts: u64,
        lock: &HeldLock,
        policy: DeadlockPolicy,
        until: Instant,
        report: &(dyn Fn(EdgeChange) + Send + Sync),
    ) -> Result<bool, LockConflict> {
        let wake = Arc::new(Notify::new());
        let id = {
            let mut t = self.table();
            let t = &mut *t;
            let res = t.resources.entry(lock.resource.clone()).or_default();
            if res.held_by(branch, lock.mode) {
                return Ok(false);
            }
            if res.grantable(&branch.txn_id, lock.mode) {
                // An upgrade from shared replaces the shared hold.
                res.holders.retain(|h| h.branch != *branch);
                res.holders.push(Holder {
                    branch: branch.clone(),
                    mode: lock.mode,
                    ts,
                });
                return Ok(true);
            }
            let blockers = res.blockers(&branch.txn_id, lock.mode, None);
            let refuse = match policy {
                DeadlockPolicy::NoWait => true,
                DeadlockPolicy::WaitDie => !blockers
                    .iter()
                    .all(|(txn, bts)| older(ts, &branch.txn_id, *bts, txn)),
                DeadlockPolicy::Detect => false,
            };
            if refuse {
                return Err(LockConflict {
                    resource: lock.resource.clone(),
                    holders: blockers.into_iter().map(|(t, _)| t).collect(),
                    policy,
                });
            }
            t.next_id += 1;
            let id = t.next_id;
            res.queue.push_back(Waiter {
                id,
                branch: branch.clone(),
                mode: lock.mode,
                ts,
                wake: wake.clone(),
            });
            t.waiting.insert(branch.clone(), id);
            id
        };
        let mut reported: Vec<(String, u64)> = Vec::new();
        let outcome = loop {
            let notified = wake.notified();
            tokio::pin!(notified);
            // Registered before the state is read, so a grant in between is not missed.
            notified.as_mut().enable();
            let blockers = {
                let t = self.table();
                if t.granted.contains(&id) {
                    break Ok(true);
                }
                if t.cancelled.contains(&id) {
                    break Err(false);
                }
                t.resources
                    .get(&lock.resource)
                    .map(|r| r.blockers(&branch.txn_id, lock.mode, Some(id)))
                    .unwrap_or_default()
            };
            for gone in reported.iter().filter(|r| !blockers.contains(r)) {
                report(edge(gone, &lock.resource, true));
            }
            // Every current edge, new or not: a repeat refreshes it at the coordinator.
            for b in &blockers {
                report(edge(b, &lock.resource, false));
            }
            reported = blockers;
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(REFRESH) => {}
                _ = tokio::time::sleep_until(until) => break Err(true),
            }
        };
        for gone in &reported {
            report(edge(gone, &lock.resource, true));
        }
        let mut guard = self.table();
        let t = &mut *guard;
        t.waiting.remove(branch);
        t.cancelled.remove(&id);
        if t.granted.remove(&id) {
            // Granted just as the wait ran out: it is ours.
            return Ok(true);
        }
        match outcome {
            Ok(granted) => Ok(granted),
            Err(_timed_out) => {
                let res = t.resources.entry(lock.resource.clone()).or_default();
                let blockers = res.blockers(&branch.txn_id, lock.mode, Some(id));
                res.queue.retain(|w| w.id != id);
                let wake = res.promote(&mut t.granted);
                drop(guard);
                for w in wake {
                    w.notify_one();
                }
                Err(LockConflict {
                    resource: lock.resource.clone(),
                    holders: blockers.into_iter().map(|(t, _)| t).collect(),
                    policy: DeadlockPolicy::Detect,
                })
            }
        }
    }

    /// Ends the wait of `branch`'s prepare, if it waits: it refuses. Returns whether it
    /// waited.
    pub fn cancel(&self, branch: &BranchId) -> bool {
        let mut t = self.table();
        let Some(&id) = t.waiting.get(branch) else {
            return false;
        };
        t.cancelled.insert(id);
        let wake = t
            .resources
            .values()
            .flat_map(|r| r.queue.iter())
            .find(|w| w.id == id)
            .map(|w| w.wake.clone());
        drop(t);
        if let Some(w) = wake {
            w.notify_one();
        }
        true
    }

    /// Releases everything `branch` holds, and grants what that frees.
    pub fn release(&self, branch: &BranchId) {
        let t = self.table();
        let names: Vec<String> = t
            .resources
            .iter()
            .filter(|(_, r)| r.holders.iter().any(|h| h.branch == *branch))
            .map(|(n, _)| n.clone())
            .collect();
        drop(t);
        self.release_some(branch, &names);
    }

    fn release_some(&self, branch: &BranchId, names: &[String]) {
        let mut wake = Vec::new();
        {
            let mut t = self.table();
            let t = &mut *t;
            for name in names {
                let Some(res) = t.resources.get_mut(name) else {
                    continue;
                };
                res.holders.retain(|h| h.branch != *branch);
                wake.extend(res.promote(&mut t.granted));
                if res.holders.is_empty() && res.queue.is_empty() {
                    t.resources.remove(name);
                }
            }
        }
        for w in wake {
            w.notify_one();
        }
    }

    /// Who holds `resource` now, and how (for tests and tools).
    pub fn holders(&self, resource: &str) -> Vec<(BranchId, LockMode)> {
        self.table()
            .resources
            .get(resource)
            .map(|r| {
                r.holders
                    .iter()
                    .map(|h| (h.branch.clone(), h.mode))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How many prepares wait now.
    pub fn waiting(&self) -> usize {
        self.table().waiting.len()
    }
}

#[cfg(test)]
mod tests;
