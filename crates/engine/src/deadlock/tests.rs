//! The wait-for graph: cycles of every length found, none where there is none (random
//! graphs against a reference search), the victim's choice, and the ways an edge goes.

use std::collections::{BTreeSet, HashSet};

use proptest::prelude::*;
use txcoord_proto::{Reason, WaitEdge};

use super::{Cycle, WaitGraph};

const TTL: u64 = 5_000;

fn edge(waiter: &str, holder: &str, waiter_ts: u64, holder_ts: u64) -> WaitEdge {
    WaitEdge {
        waiter: waiter.into(),
        waiter_step: 0,
        waiter_ts,
        holder: holder.into(),
        holder_ts,
        resource: format!("r-{holder}"),
        service: format!("svc-{waiter}"),
        attempt: 1,
        token: None,
        withdrawn: false,
        since_ms: 0,
    }
}

/// The first victim a report yields (most close one cycle).
fn first(g: &mut WaitGraph, now: u64, e: &WaitEdge) -> Option<super::Victim> {
    g.report(now, e).into_iter().next()
}

fn name(i: usize) -> String {
    format!("t{i:02}")
}

/// The cycle's waits, as (waiter, holder) pairs.
fn pairs(c: &Cycle) -> Vec<(String, String)> {
    (0..c.txns.len())
        .map(|i| (c.txns[i].clone(), c.txns[(i + 1) % c.txns.len()].clone()))
        .collect()
}

#[test]
fn cycles_of_two_to_ten_transactions_are_found_with_the_youngest_as_victim() {
    for n in 2..=10 {
        let mut g = WaitGraph::new(TTL);
        // t0 waits for t1, ..., t(n-1) waits for t0; t(k) is k ms younger than t0.
        for i in 0..n - 1 {
            assert_eq!(
                first(
                    &mut g,
                    0,
                    &edge(&name(i), &name(i + 1), 100 + i as u64, 101 + i as u64)
                ),
                None,
                "no cycle before the last edge (n = {n})"
            );
        }
        let v = first(
            &mut g,
            0,
            &edge(&name(n - 1), &name(0), 100 + n as u64 - 1, 100),
        )
        .unwrap_or_else(|| panic!("the cycle of {n} is found"));
        assert_eq!(v.txn, name(n - 1), "the youngest");
        assert_eq!(v.cycle.txns.len(), n);
        assert_eq!(v.cycle.txns[0], v.txn, "the cycle starts with the victim");
        for (w, h) in pairs(&v.cycle) {
            let wi: usize = w[1..].parse().unwrap();
            let hi: usize = h[1..].parse().unwrap();
            assert_eq!(hi, (wi + 1) % n, "each waits for the next: {:?}", v.cycle);
        }
        assert_eq!(v.cycle.resources[0], format!("r-{}", name(0)));
        assert_eq!(v.cycle.services[0], format!("svc-{}", name(n - 1)));
        match v.cycle.reason() {
            Reason::Deadlock { how, txns, .. } => {
                assert_eq!(how, "detected");
                assert_eq!(txns.len(), n);
            }
            other => panic!("not a deadlock reason: {other:?}"),
        }
    }
}

#[test]
fn a_chain_and_a_diamond_are_no_deadlock() {
    let mut g = WaitGraph::new(TTL);
    for (w, h) in [("a", "b"), ("b", "c"), ("a", "d"), ("d", "c"), ("c", "e")] {
        assert_eq!(first(&mut g, 0, &edge(w, h, 1, 2)), None);
    }
    assert_eq!(g.len(), 5);
}

#[test]
fn ties_in_age_are_broken_by_txn_id() {
    let mut g = WaitGraph::new(TTL);
    first(&mut g, 0, &edge("a", "b", 7, 7));
    let v = first(&mut g, 0, &edge("b", "a", 7, 7)).unwrap();
    assert_eq!(v.txn, "b");
}

#[test]
fn a_victim_being_aborted_is_not_chosen_twice_and_its_abort_clears_its_edges() {
    let mut g = WaitGraph::new(TTL);
    first(&mut g, 0, &edge("old", "young", 1, 2));
    let v = first(&mut g, 0, &edge("young", "old", 2, 1)).unwrap();
    assert_eq!(v.txn, "young");
    // The waits are refreshed until the abort lands: no second victim.
    assert_eq!(first(&mut g, 1000, &edge("old", "young", 1, 2)), None);
    assert_eq!(first(&mut g, 1000, &edge("young", "old", 2, 1)), None);
    g.decided(1100, "young");
    assert!(g.is_empty(), "the victim's edges are gone");
    // A late refresh of an edge of the decided victim adds nothing.
    assert_eq!(first(&mut g, 1200, &edge("young", "old", 2, 1)), None);
    assert!(g.is_empty());
}

#[test]
fn a_decided_transaction_is_never_the_victim_the_next_youngest_is() {
    let mut g = WaitGraph::new(TTL);
    // Two cycles through a: a <-> b and a <-> c. b is the youngest.
    first(&mut g, 0, &edge("a", "b", 1, 3));
    first(&mut g, 0, &edge("a", "c", 1, 2));
    first(&mut g, 0, &edge("c", "a", 2, 1)).unwrap();
    // (c was the victim of a <-> c; say its abort landed.)
    g.decided(0, "c");
    let v = first(&mut g, 0, &edge("b", "a", 3, 1)).unwrap();
    assert_eq!(v.txn, "b");
    // The runtime found b decided (its commit was already durable): a is the only one left
    // in no cycle, so nobody else is chosen.
    assert_eq!(g.not_a_victim(0, "b", &v.cycle), Vec::new());
}

#[test]
fn a_second_cycle_through_a_victim_being_aborted_waits_for_that_abort() {
    let mut g = WaitGraph::new(TTL);
    first(&mut g, 0, &edge("a", "b", 1, 3));
    assert_eq!(
        first(&mut g, 0, &edge("b", "a", 3, 1)).map(|v| v.txn),
        Some("b".into())
    );
    // c and b wait for each other too; b's abort breaks this cycle as well.
    first(&mut g, 0, &edge("c", "b", 2, 3));
    assert_eq!(first(&mut g, 0, &edge("b", "c", 3, 2)), None);
    g.decided(10, "b");
    assert!(g.is_empty());
    // A cycle without the victim gets its own.
    first(&mut g, 20, &edge("c", "d", 2, 4));
    assert_eq!(
        first(&mut g, 20, &edge("d", "c", 4, 2)).map(|v| v.txn),
        Some("d".into())
    );
}

#[test]
fn withdrawn_and_expired_edges_close_no_cycle() {
    let mut g = WaitGraph::new(TTL);
    first(&mut g, 0, &edge("a", "b", 1, 2));
    first(
        &mut g,
        10,
        &WaitEdge {
            withdrawn: true,
            ..edge("a", "b", 1, 2)
        },
    );
    assert_eq!(first(&mut g, 20, &edge("b", "a", 2, 1)), None, "withdrawn");
    // A waiter that died: its edge is not refreshed and expires.
    let mut g = WaitGraph::new(TTL);
    first(&mut g, 0, &edge("a", "b", 1, 2));
    assert_eq!(
        first(&mut g, TTL, &edge("b", "a", 2, 1)),
        None,
        "expired at its TTL"
    );
    // Refreshed in time, it stays.
    let mut g = WaitGraph::new(TTL);
    first(&mut g, 0, &edge("a", "b", 1, 2));
    first(&mut g, TTL - 1, &edge("a", "b", 1, 2));
    assert!(first(&mut g, TTL + 100, &edge("b", "a", 2, 1)).is_some());
}

#[test]
fn a_self_wait_is_ignored() {
    let mut g = WaitGraph::new(TTL);
    assert_eq!(first(&mut g, 0, &edge("a", "a", 1, 1)), None);
    assert!(g.is_empty());
}

/// The reference: is `to` reachable from `from` over `edges`?
fn reaches(edges: &BTreeSet<(usize, usize)>, from: usize, to: usize) -> bool {
    let mut seen = HashSet::from([from]);
    let mut stack = vec![from];
    while let Some(n) = stack.pop() {
        if n == to {
            return true;
        }
        for &(w, h) in edges {
            if w == n && seen.insert(h) {
                stack.push(h);
            }
        }
    }
    false
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Random waits among up to 8 transactions, the victim of each cycle aborted as the
    /// runtime would: a cycle is reported exactly when the reference finds one, the cycle
    /// is made of edges that exist, the victim is its youngest, and the graph is left
    /// without a cycle.
    #[test]
    fn matches_a_reference_search_on_random_graphs(
        waits in proptest::collection::vec((0usize..8, 0usize..8), 1..60),
        ages in proptest::collection::vec(1u64..1000, 8),
    ) {
        let mut g = WaitGraph::new(TTL);
        let mut reference: BTreeSet<(usize, usize)> = BTreeSet::new();
        let mut decided: HashSet<usize> = HashSet::new();
        for (w, h) in waits {
            let ignored = w == h || decided.contains(&w) || decided.contains(&h);
            let closes = !ignored && !reference.contains(&(w, h)) && reaches(&reference, h, w);
            let got = g.report(0, &edge(&name(w), &name(h), ages[w], ages[h]));
            prop_assert_eq!(!got.is_empty(), closes, "edge {} -> {}", w, h);
            if !ignored {
                reference.insert((w, h));
            }
            for v in got {
                let members: Vec<usize> = v.cycle.txns.iter().map(|t| t[1..].parse().unwrap()).collect();
                for (i, &m) in members.iter().enumerate() {
                    let next = members[(i + 1) % members.len()];
                    prop_assert!(reference.contains(&(m, next)), "{} -> {} is an edge", m, next);
                }
                let youngest = members.iter().max_by_key(|&&m| (ages[m], name(m))).copied();
                prop_assert_eq!(Some(v.txn.clone()), youngest.map(name));
                // The runtime aborts it: decided, its edges gone.
                let victim: usize = v.txn[1..].parse().unwrap();
                g.decided(0, &v.txn);
                decided.insert(victim);
                reference.retain(|&(a, b)| a != victim && b != victim);
            }
            for &(a, b) in &reference {
                prop_assert!(!reaches(&reference, b, a), "a cycle was left: {} -> {}", a, b);
            }
        }
        prop_assert_eq!(g.len(), reference.len());
    }
}
