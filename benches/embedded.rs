//! The embedded coordinator: committed in-process transactions per second with three no-op
//! participants (begin, register three, prepare, commit), one at a time and 64 at once on a
//! two-thread runtime. Run: cargo bench --bench embedded

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use txcoord::embedded::{Config, Participant, PreparedResult, TransactionCoordinator, TxnId};

struct Noop;

#[async_trait::async_trait]
impl Participant for Noop {
    async fn prepare(&self, _txn: TxnId) -> PreparedResult {
        PreparedResult::Ready
    }
    async fn commit(&self, _txn: TxnId) -> Result<(), String> {
        Ok(())
    }
    async fn rollback(&self, _txn: TxnId) -> Result<(), String> {
        Ok(())
    }
}

async fn one(coord: &TransactionCoordinator, parts: &[Arc<dyn Participant>]) {
    let id = coord.begin_transaction().expect("begin");
    for p in parts {
        coord.register_participant(id, p.clone()).expect("register");
    }
    coord.prepare_transaction(id).await.expect("prepare");
    coord.commit_transaction(id).await.expect("commit");
}

fn embedded(c: &mut Criterion) {
    let parts: Vec<Arc<dyn Participant>> = (0..3).map(|_| Arc::new(Noop) as _).collect();
    let mut g = c.benchmark_group("embedded");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));
    let serial = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    g.bench_function("3 participants, one at a time", |b| {
        let coord = TransactionCoordinator::new(Config {
            max_concurrent: 100_000,
            ..Config::default()
        });
        b.iter_custom(|iters| {
            serial.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    one(&coord, &parts).await;
                }
                start.elapsed()
            })
        })
    });
    let parallel = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    g.bench_function("3 participants, 64 at once", |b| {
        let coord = TransactionCoordinator::new(Config {
            max_concurrent: 100_000,
            ..Config::default()
        });
        b.iter_custom(|iters| {
            parallel.block_on(async {
                let start = Instant::now();
                let tasks: Vec<_> = (0..64)
                    .map(|w| {
                        let (coord, parts) = (coord.clone(), parts.clone());
                        tokio::spawn(async move {
                            let mine = iters / 64 + u64::from(w < iters % 64);
                            for _ in 0..mine {
                                one(&coord, &parts).await;
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.expect("worker");
                }
                start.elapsed()
            })
        })
    });
    g.finish();
}

criterion_group!(benches, embedded);
criterion_main!(benches);
