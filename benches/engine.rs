//! The sans-IO engines alone: events per second through the state machines, so the
//! coordinator's own CPU cost per transaction is visible apart from NATS.
//! Run: cargo bench --bench engine

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;
use txcoord::engine::{Command, EngineConfig, Event, Machine};
use txcoord::proto::{
    CommandKind, Mode, ParticipantReply, ReplyOutcome, StepRequest, TransactionRequest,
};

fn request(mode: Mode, n: usize) -> TransactionRequest {
    TransactionRequest {
        lock_ts: None,
        txn_id: Some("bench".into()),
        mode,
        steps: (0..n)
            .map(|i| StepRequest {
                url: None,
                service: format!("s{i}"),
                action: "noop".into(),
                payload: json!({"pad": "x".repeat(64)}),
                compensate: None,
                timeout_ms: None,
            })
            .collect(),
        timeout_ms: None,
        metadata: None,
        traceparent: None,
    }
}

fn reply(step: usize, kind: CommandKind, outcome: ReplyOutcome) -> Event {
    Event::Reply(ParticipantReply {
        conflict: None,
        txn_id: "bench".into(),
        service: format!("s{step}"),
        step,
        kind,
        outcome,
        reason: None,
        attempt: 1,
        retryable: None,
        token: None,
    })
}

/// One whole transaction; returns how many events went in.
fn run(mode: Mode, n: usize, out: &mut Vec<Command>) -> u64 {
    let req = request(mode, n);
    let mut m = Machine::start(
        "bench".into(),
        &req,
        None,
        "r".into(),
        EngineConfig::default(),
        0,
        out,
    );
    let mut events = 1;
    match mode {
        Mode::TwoPc => {
            for i in 0..n {
                let _ = m.handle(1, reply(i, CommandKind::Prepare, ReplyOutcome::Ready), out);
            }
            for i in 0..n {
                let _ = m.handle(2, reply(i, CommandKind::Commit, ReplyOutcome::Done), out);
            }
            events += 2 * n as u64;
        }
        Mode::Saga => {
            for i in 0..n {
                let _ = m.handle(1, reply(i, CommandKind::Execute, ReplyOutcome::Done), out);
            }
            events += n as u64;
        }
    }
    out.clear();
    events
}

fn engines(c: &mut Criterion) {
    let mut out = Vec::with_capacity(64);
    for (mode, n, name) in [
        (Mode::TwoPc, 3, "2pc, 3 participants"),
        (Mode::TwoPc, 10, "2pc, 10 participants"),
        (Mode::Saga, 2, "saga, 2 steps"),
    ] {
        let events = run(mode, n, &mut out);
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Elements(events));
        g.bench_function("whole transaction", |b| b.iter(|| run(mode, n, &mut out)));
        g.finish();
    }
}

criterion_group!(benches, engines);
criterion_main!(benches);
