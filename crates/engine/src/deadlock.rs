//! The deadlock detector: a global wait-for graph over the coordinator's transactions, as
//! pure code (edges in, victims out, time as an input).
//!
//! Participants report each wait of a prepare for a lock (`waiter → holder`, at a service,
//! for a resource) and refresh it while it lasts. On every new edge the graph looks for a
//! path back from the holder to the waiter: with the new edge, that path is a cycle, and no
//! transaction in it can go on. The victim is the youngest transaction in the cycle (the
//! largest `lock_ts`, then the largest txn id) that is not decided; the runtime aborts it
//! through the engine ([`crate::twopc::TwoPc::deadlock_victim`]) and its abort releases its
//! locks. If the engine says it has decided after all, the runtime says so
//! ([`WaitGraph::not_a_victim`]) and the next youngest is chosen.
//!
//! An edge goes away when it is withdrawn, when either of its transactions is decided
//! ([`WaitGraph::decided`]), or when it has not been refreshed for the TTL (a waiter that
//! crashed leaves no ghost edge).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use txcoord_proto::{Reason, WaitEdge};

/// One wait: who waits for whom, where, for what.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EdgeKey {
    /// The waiting transaction.
    pub waiter: String,
    /// The transaction waited for.
    pub holder: String,
    /// The service of the lock table.
    pub service: String,
    /// The resource.
    pub resource: String,
}

#[derive(Debug, Clone)]
struct Edge {
    expires_ms: u64,
    since_ms: u64,
}

/// A cycle of waits, starting with the victim: `txns[i]` waits for `txns[i + 1]` (and the
/// last for the first) at `services[i]` for `resources[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cycle {
    /// The transactions.
    pub txns: Vec<String>,
    /// The service of each wait.
    pub services: Vec<String>,
    /// The resource of each wait.
    pub resources: Vec<String>,
    /// When the cycle formed: the latest start of its waits (Unix ms, as reported).
    pub formed_ms: u64,
}

impl Cycle {
    /// The `deadlock` reason the victim aborts with.
    pub fn reason(&self) -> Reason {
        let waits: Vec<String> = (0..self.txns.len())
            .map(|i| {
                format!(
                    "{} waits for {} ({} at {})",
                    self.txns[i],
                    self.txns[(i + 1) % self.txns.len()],
                    self.resources[i],
                    self.services[i]
                )
            })
            .collect();
        Reason::Deadlock {
            how: "detected".into(),
            txns: self.txns.clone(),
            services: self.services.clone(),
            resources: self.resources.clone(),
            message: format!(
                "deadlock of {} transactions; this one, the youngest undecided, was aborted: {}",
                self.txns.len(),
                waits.join("; ")
            ),
            formed_ms: (self.formed_ms > 0).then_some(self.formed_ms),
        }
    }
}

/// The detector's decision: abort `txn`, which closes `cycle`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Victim {
    /// The transaction to abort.
    pub txn: String,
    /// The cycle, starting with it.
    pub cycle: Cycle,
}

/// The wait-for graph.
#[derive(Debug, Clone)]
pub struct WaitGraph {
    ttl_ms: u64,
    edges: BTreeMap<EdgeKey, Edge>,
    /// Out-edges by waiter.
    out: HashMap<String, BTreeSet<EdgeKey>>,
    /// Each transaction's `lock_ts`, as reported.
    ts: HashMap<String, u64>,
    /// Decided transactions (never victims), with when to forget them.
    decided: HashMap<String, u64>,
    /// Victims chosen and not yet known to be aborted, with when to forget them: a cycle
    /// reported again meanwhile (its edges are refreshed until the abort arrives) picks
    /// the same victim, not a second one.
    chosen: HashMap<String, u64>,
}

/// How long a decided transaction or a chosen victim is remembered, in TTLs.
const REMEMBER_TTLS: u64 = 4;

impl WaitGraph {
    /// An empty graph whose edges expire `ttl_ms` after their last report.
    pub fn new(ttl_ms: u64) -> WaitGraph {
        WaitGraph {
            ttl_ms: ttl_ms.max(1),
            edges: BTreeMap::new(),
            out: HashMap::new(),
            ts: HashMap::new(),
            decided: HashMap::new(),
            chosen: HashMap::new(),
        }
    }

    /// How many edges it holds.
    pub fn len(&self) -> usize {
        self.edges.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.edges.is_empty()
    }

    /// Applies a reported edge (a new wait, a refresh, or a withdrawal) at `now`; a wait
    /// that closes cycles returns their victims (one edge can close several: each gets one,
    /// and a transaction already chosen counts as gone, as its abort will make it).
    pub fn report(&mut self, now: u64, edge: &WaitEdge) -> Vec<Victim> {
        self.expire(now);
        let key = EdgeKey {
            waiter: edge.waiter.clone(),
            holder: edge.holder.clone(),
            service: edge.service.clone(),
            resource: edge.resource.clone(),
        };
        if edge.withdrawn {
            self.remove(&key);
            return Vec::new();
        }
        if edge.waiter == edge.holder
            || self.decided.contains_key(&edge.waiter)
            || self.decided.contains_key(&edge.holder)
        {
            return Vec::new();
        }
        if edge.waiter_ts > 0 {
            self.ts.insert(edge.waiter.clone(), edge.waiter_ts);
        }
        if edge.holder_ts > 0 {
            self.ts.insert(edge.holder.clone(), edge.holder_ts);
        }
        let expires_ms = now.saturating_add(self.ttl_ms);
        self.out
            .entry(key.waiter.clone())
            .or_default()
            .insert(key.clone());
        // A refresh can close a cycle too: the first report of one of its edges may have
        // been lost, or its victim turned out decided.
        let since_ms = match self.edges.get(&key) {
            Some(e) => e.since_ms,
            None => edge.since_ms,
        };
        self.edges.insert(
            key.clone(),
            Edge {
                expires_ms,
                since_ms,
            },
        );
        self.victims_through(now, &key)
    }

    /// Victims for every cycle through `key`, until none is left.
    fn victims_through(&mut self, now: u64, key: &EdgeKey) -> Vec<Victim> {
        let mut victims = Vec::new();
        while !self.chosen.contains_key(&key.waiter) && !self.chosen.contains_key(&key.holder) {
            let Some(path) = self.cycle_through(key) else {
                break;
            };
            victims.push(self.choose(now, path));
        }
        victims
    }

    /// The transaction is decided (or gone): it is never a victim, and its edges go.
    pub fn decided(&mut self, now: u64, txn: &str) {
        // Remembered (so that a late refresh of its waits adds nothing) only if it took part:
        // the runtime reports every transaction's decision.
        if self.ts.contains_key(txn) || self.chosen.contains_key(txn) {
            self.decided.insert(
                txn.to_string(),
                now.saturating_add(self.ttl_ms.saturating_mul(REMEMBER_TTLS)),
            );
        }
        self.chosen.remove(txn);
        let touching: Vec<EdgeKey> = self
            .edges
            .keys()
            .filter(|k| k.waiter == txn || k.holder == txn)
            .cloned()
            .collect();
        for k in touching {
            self.remove(&k);
        }
    }

    /// The runtime could not abort `txn` (its engine had decided, or it runs nowhere): it
    /// is decided from now on, and its edges go. (A decided transaction waits for nothing,
    /// so the cycle was made of a stale edge and is gone with it; the other members' edges
    /// are looked at again all the same, so that no cycle is left unbroken.)
    pub fn not_a_victim(&mut self, now: u64, txn: &str, cycle: &Cycle) -> Vec<Victim> {
        self.decided(now, txn);
        let mut victims = Vec::new();
        for waiter in &cycle.txns {
            let keys: Vec<EdgeKey> = self
                .out
                .get(waiter)
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            for k in keys {
                victims.extend(self.victims_through(now, &k));
            }
        }
        victims
    }

    /// Drops the edges not refreshed within the TTL, and forgets old decisions.
    pub fn expire(&mut self, now: u64) {
        let stale: Vec<EdgeKey> = self
            .edges
            .iter()
            .filter(|(_, e)| e.expires_ms <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            self.remove(&k);
        }
        self.decided.retain(|_, until| *until > now);
        self.chosen.retain(|_, until| *until > now);
        let live: HashSet<&String> = self
            .edges
            .keys()
            .flat_map(|k| [&k.waiter, &k.holder])
            .collect();
        self.ts.retain(|t, _| live.contains(t));
    }

    fn remove(&mut self, key: &EdgeKey) {
        self.edges.remove(key);
        if let Some(set) = self.out.get_mut(&key.waiter) {
            set.remove(key);
            if set.is_empty() {
                self.out.remove(&key.waiter);
            }
        }
    }

    /// A cycle that `key` closes: a path of edges from its holder back to its waiter
    /// (breadth first, so the shortest), then `key`. Chosen victims count as gone.
    fn cycle_through(&self, key: &EdgeKey) -> Option<Vec<EdgeKey>> {
        let target = &key.waiter;
        let mut came_by: HashMap<&str, &EdgeKey> = HashMap::new();
        let mut frontier: Vec<&str> = vec![key.holder.as_str()];
        let mut seen: HashSet<&str> = HashSet::from([key.holder.as_str()]);
        while !frontier.is_empty() {
            let mut next = Vec::new();
            for node in frontier {
                if node == target {
                    // Walk back from the waiter to the holder.
                    let mut path = vec![key.clone()];
                    let mut at = node;
                    while at != key.holder.as_str() {
                        let e = came_by.get(at)?;
                        path.push((*e).clone());
                        at = e.waiter.as_str();
                    }
                    // path: key, then edges ending at the waiter going backwards; put it
                    // in wait order starting with key.
                    let mut ordered = vec![path[0].clone()];
                    ordered.extend(path[1..].iter().rev().cloned());
                    return Some(ordered);
                }
                for e in self.out.get(node).into_iter().flatten() {
                    if self.chosen.contains_key(&e.holder) {
                        continue;
                    }
                    if seen.insert(e.holder.as_str()) {
                        came_by.insert(e.holder.as_str(), e);
                        next.push(e.holder.as_str());
                    }
                }
            }
            frontier = next;
        }
        None
    }

    /// The victim of a cycle (edges in wait order): its youngest member. (Decided ones
    /// have no edges, so every member is undecided.)
    fn choose(&mut self, now: u64, path: Vec<EdgeKey>) -> Victim {
        let youngest = path
            .iter()
            .enumerate()
            .max_by(|(_, a), (_, b)| {
                let ta = self.ts.get(&a.waiter).copied().unwrap_or(0);
                let tb = self.ts.get(&b.waiter).copied().unwrap_or(0);
                (ta, &a.waiter).cmp(&(tb, &b.waiter))
            })
            .map(|(i, _)| i)
            .unwrap_or(0);
        let n = path.len();
        let rotated: Vec<&EdgeKey> = (0..n).map(|i| &path[(youngest + i) % n]).collect();
        let cycle = Cycle {
            txns: rotated.iter().map(|e| e.waiter.clone()).collect(),
            services: rotated.iter().map(|e| e.service.clone()).collect(),
            resources: rotated.iter().map(|e| e.resource.clone()).collect(),
            formed_ms: rotated
                .iter()
                .filter_map(|e| self.edges.get(e).map(|x| x.since_ms))
                .max()
                .unwrap_or(0),
        };
        let txn = cycle.txns[0].clone();
        self.chosen.insert(
            txn.clone(),
            now.saturating_add(self.ttl_ms.saturating_mul(REMEMBER_TTLS)),
        );
        Victim { txn, cycle }
    }
}

#[cfg(test)]
mod tests;
