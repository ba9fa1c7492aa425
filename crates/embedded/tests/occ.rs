//! Optimistic concurrency with `Versioned`, as a property: random transactions that each
//! read some shared counters and write back read + 1, prepared and committed in a random
//! interleaving, leave a serializable history. No update is lost: every counter ends at the
//! number of committed transactions that wrote it, and so does its version.

use std::sync::Arc;

use proptest::prelude::*;
use txcoord_embedded::{Config, TransactionCoordinator, TxnId, Versioned};

/// One transaction's plan: which counters it increments.
fn plans() -> impl Strategy<Value = (usize, Vec<Vec<usize>>, Vec<usize>, Vec<bool>)> {
    (1usize..4).prop_flat_map(|k| {
        (
            Just(k),
            prop::collection::vec(prop::collection::vec(0..k, 1..=k), 2..8),
        )
            .prop_flat_map(|(k, txns)| {
                let n = txns.len();
                (
                    Just(k),
                    Just(txns),
                    Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
                    prop::collection::vec(any::<bool>(), n),
                )
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn committed_history_is_serializable((k, txns, order, commit_late) in plans()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (values, committed) = rt.block_on(async {
            let coord = TransactionCoordinator::new(Config::default());
            let counters: Vec<Arc<Versioned<u64>>> = (0..k).map(|_| Versioned::new(0)).collect();
            // Every transaction reads before any prepares: they all race.
            let mut ids: Vec<TxnId> = Vec::new();
            for plan in &txns {
                let id = coord.begin_transaction().unwrap();
                let mut seen = std::collections::HashSet::new();
                for &c in plan {
                    if seen.insert(c) {
                        coord.enlist_resource(id, counters[c].clone()).unwrap();
                        let (v, _) = counters[c].read(id);
                        counters[c].write(id, v + 1);
                    }
                }
                ids.push(id);
            }
            let mut writes = vec![0u64; k];
            let mut later = Vec::new();
            for &i in &order {
                if coord.prepare_transaction(ids[i]).await.is_ok() {
                    if commit_late[i] {
                        later.push(i);
                    } else {
                        coord.commit_transaction(ids[i]).await.unwrap();
                        for c in txns[i].iter().collect::<std::collections::HashSet<_>>() {
                            writes[*c] += 1;
                        }
                    }
                }
            }
            for i in later {
                coord.commit_transaction(ids[i]).await.unwrap();
                for c in txns[i].iter().collect::<std::collections::HashSet<_>>() {
                    writes[*c] += 1;
                }
            }
            (counters.iter().map(|c| c.get()).collect::<Vec<_>>(), writes)
        });
        for (c, ((value, version), writes)) in values.iter().zip(&committed).enumerate() {
            prop_assert_eq!(*value, *writes, "counter {} lost an update", c);
            prop_assert_eq!(*version, *writes, "counter {} version", c);
        }
        // At least one transaction always commits (the first to prepare on free counters).
        prop_assert!(committed.iter().any(|w| *w > 0));
    }
}
