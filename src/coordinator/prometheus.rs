//! An optional Prometheus endpoint (`metrics_listen`): `GET /metrics` answers the
//! coordinator's counters in the text exposition format. The same counters are in the
//! micro service's `$SRV.STATS.txcoord`; this is for scrapers that speak HTTP.
//!
//! The server is deliberately tiny: one request per connection, the request line read with
//! a size and time limit, anything but `GET /metrics` answered 404.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::Shared;

/// Renders the counters in the Prometheus text format.
pub fn render(shared: &Shared) -> String {
    let m = shared.metrics.to_json(shared.router.len());
    let get = |k: &str| m.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP txcoord_transactions_total Transactions that reached an outcome, by outcome."
    );
    let _ = writeln!(out, "# TYPE txcoord_transactions_total counter");
    for outcome in [
        "committed",
        "aborted",
        "completed",
        "compensated",
        "rejected",
    ] {
        let _ = writeln!(
            out,
            "txcoord_transactions_total{{outcome=\"{outcome}\"}} {}",
            get(outcome)
        );
    }
    histograms(&mut out, &shared.metrics);
    let _ = writeln!(
        out,
        "# HELP txcoord_ended_by_reason_total Aborted transactions and compensated sagas, by the kind of their reason."
    );
    let _ = writeln!(out, "# TYPE txcoord_ended_by_reason_total counter");
    let by_reason = shared
        .metrics
        .ended_by_reason
        .lock()
        .map(|m| m.clone())
        .unwrap_or_else(|p| p.into_inner().clone());
    for kind in [
        "vote_abort",
        "timeout",
        "deadlock",
        "step_failed",
        "log_refused",
        "operator",
    ] {
        if !by_reason.contains_key(kind) {
            let _ = writeln!(out, "txcoord_ended_by_reason_total{{reason=\"{kind}\"}} 0");
        }
    }
    for (kind, n) in &by_reason {
        let _ = writeln!(
            out,
            "txcoord_ended_by_reason_total{{reason=\"{kind}\"}} {n}"
        );
    }
    for (name, key, help) in [
        (
            "txcoord_accepted_total",
            "accepted",
            "Transactions accepted (their accepted record written).",
        ),
        (
            "txcoord_duplicates_total",
            "duplicates",
            "Submissions of a txn_id that already had a transaction.",
        ),
        (
            "txcoord_rejected_replies_total",
            "rejected_replies",
            "Participant replies refused: wrong subject, no token, or a token of no command sent.",
        ),
        (
            "txcoord_refused_api_requests_total",
            "refused_api_requests",
            "API requests not answered because their reply subject is not an inbox.",
        ),
        (
            "txcoord_deadlocks_total",
            "deadlocks",
            "Deadlock victims chosen: cycles of waits across services broken by an abort.",
        ),
        (
            "txcoord_rejected_edges_total",
            "rejected_edges",
            "Wait-for edges refused: malformed, or without the token of a prepare sent.",
        ),
        (
            "txcoord_alerts_total",
            "alerts",
            "Alerts published on <prefix>.alerts (stuck, failed, deadlock, resolved).",
        ),
        (
            "txcoord_command_batches_total",
            "command_batches",
            "Command batches sent (many commands for one service in one message).",
        ),
        (
            "txcoord_batched_commands_total",
            "batched_commands",
            "Commands sent inside command batches.",
        ),
        (
            "txcoord_one_phase_total",
            "one_phase",
            "Transactions of one step started in one phase (commit_one_phase): no decision record.",
        ),
        (
            "txcoord_contradicted_total",
            "contradicted",
            "Late one-phase answers contradicting an operator's recorded outcome: the service and the log disagree; a person must reconcile them.",
        ),
        (
            "txcoord_held_back_total",
            "held_back",
            "Submissions handed back to wait because a service was at its in-flight share.",
        ),
        (
            "txcoord_foreign_log_messages_total",
            "foreign_log_messages",
            "Messages in a transaction's log that are not its records (skipped).",
        ),
        (
            "txcoord_log_refusals_total",
            "log_refusals",
            "Records the log refused for good (the transaction then ends or goes on with compact records).",
        ),
        (
            "txcoord_recovered",
            "recovered",
            "Transactions resumed from the log at the last start.",
        ),
    ] {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {}", get(key));
    }
    let _ = writeln!(out, "# HELP txcoord_in_flight Transactions running now.");
    let _ = writeln!(out, "# TYPE txcoord_in_flight gauge");
    let _ = writeln!(out, "txcoord_in_flight {}", get("in_flight"));
    let _ = writeln!(
        out,
        "# HELP txcoord_lease_held Whether this coordinator holds the lease (1) or not (0)."
    );
    let _ = writeln!(out, "# TYPE txcoord_lease_held gauge");
    let _ = writeln!(
        out,
        "txcoord_lease_held {}",
        u8::from(shared.lease.is_held())
    );
    out
}

/// `txcoord_transaction_duration_seconds`: acceptance to outcome, by outcome, for the
/// transactions this coordinator started.
fn histograms(out: &mut String, m: &super::Metrics) {
    use std::sync::atomic::Ordering::Relaxed;
    let name = "txcoord_transaction_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time from acceptance to the outcome, by outcome (transactions this coordinator started)."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (state, h) in super::OUTCOMES.iter().zip(&m.durations) {
        let outcome = state.as_str();
        let mut total = 0u64;
        for (bound, b) in super::BUCKETS_S.iter().zip(&h.buckets) {
            total += b.load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{outcome=\"{outcome}\",le=\"{bound}\"}} {total}"
            );
        }
        total += h.over.load(Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{outcome=\"{outcome}\",le=\"+Inf\"}} {total}"
        );
        let _ = writeln!(
            out,
            "{name}_sum{{outcome=\"{outcome}\"}} {}",
            h.sum_us.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{outcome=\"{outcome}\"}} {total}");
    }
}

/// Serves `GET /metrics` on `listener` forever.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (mut stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let mut len = 0;
            // Read up to the end of the request line, within a second and 1 KiB.
            let read = tokio::time::timeout(Duration::from_secs(1), async {
                while len < buf.len() && !buf[..len].contains(&b'\n') {
                    match stream.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => len += n,
                    }
                }
            })
            .await;
            if read.is_err() {
                tracing::debug!(%peer, "metrics endpoint: request too slow");
                return;
            }
            let line = String::from_utf8_lossy(&buf[..len]);
            let first = line.lines().next().unwrap_or("");
            let response = if first.starts_with("GET /metrics ") || first == "GET /metrics" {
                let body = render(&shared);
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                let body = "only GET /metrics is served here\n";
                format!(
                    "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
