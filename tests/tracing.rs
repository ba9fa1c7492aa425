//! OpenTelemetry across processes: the coordinator and SDK participants export their spans
//! over OTLP/HTTP to a collector (here a real HTTP server in the test that decodes the
//! protobuf requests), and one transaction's spans, in every process, share one trace id:
//! the client's when its request carried a `traceparent`, the coordinator's own otherwise.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use common::{Proc, System, request, step};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;
use serde_json::json;
use txcoord::proto::TxnState;

/// One exported span: its process's service name, trace id (hex), name, and txn_id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Seen {
    service: String,
    trace_id: String,
    name: String,
    txn_id: String,
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        _ => String::new(),
    }
}

/// A collector on a random port; what it received.
async fn collector() -> (String, Arc<Mutex<Vec<Seen>>>) {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let store = seen.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let store = store.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut got = store.lock().unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .map(|a| text(&a.value))
                        .unwrap_or_default();
                    for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                        let txn_id = span
                            .attributes
                            .iter()
                            .find(|a| a.key == "txcoord.txn_id")
                            .map(|a| text(&a.value))
                            .unwrap_or_default();
                        let trace_id: String =
                            span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                        got.push(Seen {
                            service: service.clone(),
                            trace_id,
                            name: span.name,
                            txn_id,
                        });
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

/// Waits until the spans of `txn_id` include, for each of `services`, both a prepare and a
/// commit span, and the coordinator's; returns them.
async fn spans_of(seen: &Mutex<Vec<Seen>>, txn_id: &str, services: &[&str]) -> Vec<Seen> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mine: Vec<Seen> = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.txn_id == txn_id)
            .cloned()
            .collect();
        let complete = services.iter().all(|svc| {
            ["prepare", "commit"].iter().all(|k| {
                mine.iter()
                    .any(|s| s.service == *svc && s.name == format!("{svc} {k}"))
            })
        }) && mine
            .iter()
            .any(|s| s.service == "txcoord" && s.name == "txcoord transaction");
        if complete {
            return mine;
        }
        assert!(
            Instant::now() < deadline,
            "spans of {txn_id} incomplete after 60 s: {mine:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_spans_of_coordinator_and_participants_share_one_trace_id() {
    let (endpoint, seen) = collector().await;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let mut sys = System::start(&[], &otel).await;
    let url = sys.nats.url();
    let mut env = vec![("TXCOORD_NATS_URL", url.as_str())];
    env.extend_from_slice(&otel);
    // One participant reads batches (its batched commands carry the trace in their
    // bodies), one reads each command alone (the trace in the message's header).
    for (name, extra) in [("a", None), ("b", Some("--no-batch"))] {
        let mut args = vec!["participant", "--service", name];
        args.extend(extra);
        let p = Proc::spawn(sys.dir.path(), name, &args, &env);
        p.wait_for("participant ready", Duration::from_secs(30))
            .await;
        sys.participants.push((name.to_string(), p));
    }

    // With the client's traceparent: everything is in the client's trace.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut req = request("traced", vec![step("a", json!({})), step("b", json!({}))]);
    req["traceparent"] = json!(format!("00-{client_trace}-00f067aa0ba902b7-01"));
    sys.submit(&req, "traced").await;
    let ev = sys.wait_state("traced", |e| e.state.is_terminal()).await;
    assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
    let spans = spans_of(&seen, "traced", &["a", "b"]).await;
    let traces: BTreeSet<&str> = spans.iter().map(|s| s.trace_id.as_str()).collect();
    assert_eq!(traces, BTreeSet::from([client_trace]), "{spans:#?}");
    for svc in ["txcoord", "a", "b"] {
        assert!(spans.iter().any(|s| s.service == svc), "{svc}: {spans:#?}");
    }

    // Without one: the coordinator's transaction span starts the trace, and the
    // participants' spans are in it.
    let req = request("untraced", vec![step("a", json!({})), step("b", json!({}))]);
    sys.submit(&req, "untraced").await;
    let ev = sys.wait_state("untraced", |e| e.state.is_terminal()).await;
    assert_eq!(ev.state, TxnState::Committed, "{ev:?}");
    let spans = spans_of(&seen, "untraced", &["a", "b"]).await;
    let traces: BTreeSet<&str> = spans.iter().map(|s| s.trace_id.as_str()).collect();
    assert_eq!(traces.len(), 1, "one trace: {spans:#?}");
    assert!(!traces.contains(client_trace), "{spans:#?}");
}
