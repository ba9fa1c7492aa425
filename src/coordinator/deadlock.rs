//! The deadlock detector's runtime: it reads wait-for edges from `<prefix>.waits`, believes
//! only those that carry the token of the waiting prepare this coordinator sent (so nobody
//! can make a transaction look like it waits), feeds them to the engine's pure
//! [`WaitGraph`], and hands each victim to its transaction's task, which aborts it through
//! the engine (or answers that it has decided, and the graph is told).
//!
//! Transactions' tasks report every decision here, so a decided transaction's edges go at
//! once. The graph runs with the lease: only the active coordinator reads edges.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;

use super::Shared;
use super::txn::TxnMsg;
use crate::engine::deadlock::{Cycle, Victim, WaitGraph};
use crate::proto::{CommandKind, WaitEdge, now_ms};

/// What the detector hears besides edges.
#[derive(Debug)]
pub enum DetectorMsg {
    /// A transaction left `preparing` (decided, or finished, or stopped here).
    Decided(String),
    /// A victim's engine refused the abort: it had decided.
    NotAVictim(String, Cycle),
}

/// Whether `edge` names a prepare (or a one-phase commit, which prepares first) this
/// coordinator sent to that service (its token), or carries none and untokened messages
/// are accepted. A one-phase waiter is never the victim (its participant decides), but its
/// edges close cycles whose other transactions can be.
fn believed(shared: &Shared, edge: &WaitEdge) -> bool {
    match &edge.token {
        Some(token) => [CommandKind::Prepare, CommandKind::CommitOnePhase]
            .into_iter()
            .any(|kind| {
                *token
                    == shared.reply_key.token(
                        &edge.waiter,
                        &edge.service,
                        edge.waiter_step,
                        kind,
                        edge.attempt,
                    )
            }),
        None => shared.accept_untokened_replies,
    }
}

/// Runs the detector until the subscription ends.
pub async fn run(
    shared: Arc<Shared>,
    mut edges: async_nats::Subscriber,
    mut rx: mpsc::UnboundedReceiver<DetectorMsg>,
    ttl: Duration,
) {
    let mut graph = WaitGraph::new(ttl.as_millis() as u64);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        let victims = tokio::select! {
            msg = edges.next() => {
                let Some(msg) = msg else { return };
                let edge: WaitEdge = match serde_json::from_slice(&msg.payload) {
                    Ok(e) => e,
                    Err(e) => {
                        shared.metrics.rejected_edges.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(subject = %msg.subject, error = %e, "malformed wait-for edge ignored");
                        continue;
                    }
                };
                if !believed(&shared, &edge) {
                    let n = shared.metrics.rejected_edges.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::warn!(waiter = %edge.waiter, service = %edge.service, step = edge.waiter_step,
                        attempt = edge.attempt, total = n,
                        "wait-for edge rejected: its token is not the one of a prepare this coordinator sent");
                    continue;
                }
                // Only waits of transactions running here can be part of a cycle we can break.
                if !edge.withdrawn && shared.router.get(&edge.waiter).is_none() {
                    tracing::debug!(waiter = %edge.waiter, "wait-for edge of a transaction not running here; ignored");
                    continue;
                }
                graph.report(now_ms(), &edge)
            }
            msg = rx.recv() => match msg {
                Some(DetectorMsg::Decided(txn)) => {
                    graph.decided(now_ms(), &txn);
                    Vec::new()
                }
                Some(DetectorMsg::NotAVictim(txn, cycle)) => graph.not_a_victim(now_ms(), &txn, &cycle),
                None => return,
            },
            _ = tick.tick() => {
                graph.expire(now_ms());
                Vec::new()
            }
        };
        for victim in victims {
            hand_over(&shared, &mut graph, victim).await;
        }
    }
}

/// Sends a victim to its transaction's task; one that runs nowhere here is no victim.
async fn hand_over(shared: &Shared, graph: &mut WaitGraph, victim: Victim) {
    let mut next = vec![victim];
    while let Some(v) = next.pop() {
        shared.metrics.deadlocks.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(victim = %v.txn, cycle = ?v.cycle.txns, services = ?v.cycle.services,
            resources = ?v.cycle.resources, "deadlock: aborting the youngest transaction of the cycle");
        match shared.router.get(&v.txn) {
            Some(tx) => {
                let _ = tx.send(TxnMsg::Deadlock(v.cycle)).await;
            }
            None => next.extend(graph.not_a_victim(now_ms(), &v.txn, &v.cycle)),
        }
    }
}
