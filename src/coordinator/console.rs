//! The web console (`console_listen`): server-rendered pages, no script and no build step.
//!
//! - `GET /`: transactions from the log, newest first, a page at a time, with the CLI's
//!   filters as query parameters (`state`, `stuck`, `older_than`, `service`, `mode`,
//!   `since`, `until`, `before`, `limit`); above them, throughput, time to outcome and
//!   abort reasons over the last minutes, as charts.
//! - `GET /txn/{id}`: one transaction's timeline and steps, and the resolve actions.
//! - `POST /txn/{id}/resolve`: an action (`action`, `step`, `reason`, `token`). The first
//!   post answers a confirmation page (the rules checked by a dry run); only the confirmed
//!   post (`confirm=yes`) asks the engine to carry it out.
//!
//! The list and the pages read the log, so a standby's console shows them too; actions need
//! the active coordinator and the admin credential (`console_admin_token`): without one
//! configured they are disabled, and a wrong one is refused.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};

use super::http::Readiness;
use crate::ops::time::{human, parse_duration, parse_time, rfc3339};
use crate::ops::{Filter, list, parse_state, reason_text, timeline};
use crate::proto::{MAX_TXN_ID_LEN, Mode, ResolveAction, Subjects, is_token, now_ms};

/// What the console serves from.
#[derive(Clone)]
pub struct Console {
    /// The log.
    pub events: jetstream::stream::Stream,
    /// The subjects.
    pub subjects: Subjects,
    /// The active coordinator, once this one is.
    pub ready: Readiness,
    /// The admin credential; actions are disabled without one.
    pub admin_token: Option<String>,
    /// The counters sampled every few seconds, for the charts.
    pub samples: Arc<Mutex<VecDeque<Sample>>>,
}

/// The counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// When, Unix ms.
    pub at_ms: u64,
    /// Transactions that reached an outcome so far.
    pub outcomes: u64,
    /// Sum of the times to outcome so far, µs, and how many.
    pub duration_us: u64,
    /// How many durations.
    pub durations: u64,
    /// Aborts and compensations by reason kind so far.
    pub reasons: BTreeMap<String, u64>,
}

/// How often the charts are sampled, and how many samples they keep (10 minutes).
const EVERY: Duration = Duration::from_secs(5);
const KEEP: usize = 120;

/// Samples the active coordinator's counters for the charts, forever.
pub async fn sample(ready: Readiness, samples: Arc<Mutex<VecDeque<Sample>>>) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tick.tick().await;
        let Some(active) = ready.borrow().clone() else {
            continue;
        };
        let m = &active.shared.metrics;
        let json = m.to_json(0);
        let count = |k: &str| json.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        let s = Sample {
            at_ms: now_ms(),
            outcomes: ["committed", "aborted", "completed", "compensated"]
                .iter()
                .map(|k| count(k))
                .sum(),
            duration_us: m.durations.iter().map(|h| h.sum_us.load(Relaxed)).sum(),
            durations: m
                .durations
                .iter()
                .map(|h| {
                    h.over.load(Relaxed) + h.buckets.iter().map(|b| b.load(Relaxed)).sum::<u64>()
                })
                .sum(),
            reasons: m
                .ended_by_reason
                .lock()
                .map(|r| r.clone())
                .unwrap_or_else(|p| p.into_inner().clone()),
        };
        let mut all = samples.lock().unwrap_or_else(|p| p.into_inner());
        all.push_back(s);
        while all.len() > KEEP {
            all.pop_front();
        }
    }
}

/// Serves the console on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, console: Console) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/", get(index))
        .route("/txn/{id}", get(transaction))
        .route("/txn/{id}/resolve", post(resolve))
        .fallback(|| async { page(StatusCode::NOT_FOUND, "Not found", "<p>No such page.</p>") })
        .with_state(console);
    axum::serve(listener, app).await
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t} · txcoord</title><style>\
         body{{font-family:system-ui,sans-serif;margin:1.5em;color:#222}}\
         table{{border-collapse:collapse}}td,th{{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:left;font-size:.9em}}\
         .stuck{{color:#b00;font-weight:bold}}.err{{color:#b00}}pre{{background:#f6f6f6;padding:1em;overflow:auto}}\
         form.filters input,form.filters select{{margin-right:.6em}}svg{{background:#fafafa;border:1px solid #ddd;margin-right:1em}}\
         </style></head><body><h1><a href=\"/\">txcoord</a> · {t}</h1>{body}</body></html>",
        t = esc(title)
    );
    (status, Html(html)).into_response()
}

/// The list's query: the CLI's filters, as text.
#[derive(Debug, Default, serde::Deserialize)]
struct ListQuery {
    #[serde(default)]
    state: String,
    #[serde(default)]
    stuck: String,
    #[serde(default)]
    older_than: String,
    #[serde(default)]
    service: String,
    #[serde(default)]
    mode: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    before: Option<u64>,
    limit: Option<usize>,
}

impl ListQuery {
    fn filter(&self) -> Result<Filter, String> {
        let now = now_ms();
        let opt = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
        let states = self
            .state
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(parse_state)
            .collect::<Result<Vec<_>, _>>()?;
        let time = |name: &str, v: &str| {
            opt(v)
                .map(|t| parse_time(&t, now).map_err(|e| format!("{name}: {e}")))
                .transpose()
        };
        Ok(Filter {
            states,
            stuck: matches!(self.stuck.as_str(), "on" | "true" | "1" | "yes"),
            older_than: opt(&self.older_than)
                .map(|d| parse_duration(&d).map_err(|e| format!("older than: {e}")))
                .transpose()?,
            service: opt(&self.service),
            mode: match self.mode.as_str() {
                "2pc" => Some(Mode::TwoPc),
                "saga" => Some(Mode::Saga),
                "" => None,
                other => return Err(format!("mode {other:?}: 2pc or saga")),
            },
            since_ms: time("since", &self.since)?,
            until_ms: time("until", &self.until)?,
        })
    }

    /// The query string of these filters, with `before`.
    fn with_before(&self, before: u64) -> String {
        let mut q = form_urlencoded(&[
            ("state", &self.state),
            ("stuck", &self.stuck),
            ("older_than", &self.older_than),
            ("service", &self.service),
            ("mode", &self.mode),
            ("since", &self.since),
            ("until", &self.until),
        ]);
        let _ = write!(q, "&before={before}&limit={}", self.limit.unwrap_or(50));
        q
    }
}

fn form_urlencoded(pairs: &[(&str, &String)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                b' ' => "+".into(),
                b => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

async fn index(State(c): State<Console>, Query(q): Query<ListQuery>) -> Response {
    let mut body = String::new();
    body.push_str(&charts(&c));
    let _ = write!(
        body,
        "<form class=\"filters\" method=\"get\" action=\"/\">\
         state <input name=\"state\" size=\"18\" value=\"{}\" placeholder=\"committing,aborted\">\
         <label><input type=\"checkbox\" name=\"stuck\" value=\"on\"{}> stuck</label> \
         older than <input name=\"older_than\" size=\"5\" value=\"{}\" placeholder=\"5m\">\
         service <input name=\"service\" size=\"10\" value=\"{}\">\
         mode <select name=\"mode\"><option value=\"\">any</option><option{}>2pc</option><option{}>saga</option></select>\
         since <input name=\"since\" size=\"10\" value=\"{}\" placeholder=\"1h\">\
         until <input name=\"until\" size=\"10\" value=\"{}\">\
         <button type=\"submit\">Filter</button></form>",
        esc(&q.state),
        if q.stuck.is_empty() { "" } else { " checked" },
        esc(&q.older_than),
        esc(&q.service),
        if q.mode == "2pc" { " selected" } else { "" },
        if q.mode == "saga" { " selected" } else { "" },
        esc(&q.since),
        esc(&q.until),
    );
    let filter = match q.filter() {
        Ok(f) => f,
        Err(e) => {
            let _ = write!(body, "<p class=\"err\" id=\"error\">{}</p>", esc(&e));
            return page(StatusCode::BAD_REQUEST, "Transactions", &body);
        }
    };
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let listed = list(&c.events, &c.subjects, &filter, limit, q.before, 200_000).await;
    let listed = match listed {
        Ok(p) => p,
        Err(e) => {
            let _ = write!(body, "<p class=\"err\">{}</p>", esc(&e.to_string()));
            return page(StatusCode::SERVICE_UNAVAILABLE, "Transactions", &body);
        }
    };
    let now = now_ms();
    let _ = write!(
        body,
        "<table id=\"transactions\"><tr><th>transaction</th><th>mode</th><th>state</th><th>last change</th><th>services</th><th>reason</th></tr>"
    );
    for item in &listed.items {
        let ev = &item.event;
        let services: Vec<&str> = ev.steps.iter().map(|s| s.service.as_str()).collect();
        let _ = write!(
            body,
            "<tr class=\"txn\" data-txn=\"{id}\"><td><a href=\"/txn/{id}\">{id}</a></td><td>{mode}</td><td{cls}>{state}{stuck}</td><td title=\"{at}\">{ago} ago</td><td>{svc}</td><td>{why}</td></tr>",
            id = esc(&ev.txn_id),
            mode = if ev.mode == Mode::Saga { "saga" } else { "2pc" },
            cls = if ev.stuck { " class=\"stuck\"" } else { "" },
            state = esc(ev.state.as_str()),
            stuck = if ev.stuck { " STUCK" } else { "" },
            at = rfc3339(ev.timestamp_ms),
            ago = human(Duration::from_millis(now.saturating_sub(ev.timestamp_ms))),
            svc = esc(&services.join(", ")),
            why = esc(&ev.reason.as_ref().map(reason_text).unwrap_or_default()),
        );
    }
    body.push_str("</table>");
    if listed.items.is_empty() {
        body.push_str("<p id=\"empty\">No transaction matches.</p>");
    }
    if let Some(b) = listed.next_before {
        let _ = write!(
            body,
            "<p><a id=\"next\" href=\"/?{}\">Older →</a></p>",
            q.with_before(b)
        );
    }
    page(StatusCode::OK, "Transactions", &body)
}

/// Throughput, time to outcome and abort reasons over the sampled minutes.
fn charts(c: &Console) -> String {
    let samples: Vec<Sample> = c
        .samples
        .lock()
        .map(|s| s.iter().cloned().collect())
        .unwrap_or_default();
    let in_flight = c
        .ready
        .borrow()
        .as_ref()
        .map(|a| a.shared.router.len().to_string())
        .unwrap_or_else(|| "– (this coordinator is a standby)".into());
    let mut out = format!("<p>In flight now: <b id=\"in-flight\">{in_flight}</b></p>");
    let pairs: Vec<(&Sample, &Sample)> = samples.iter().zip(samples.iter().skip(1)).collect();
    let rate: Vec<f64> = pairs
        .iter()
        .map(|(a, b)| {
            let secs = (b.at_ms.saturating_sub(a.at_ms)) as f64 / 1000.0;
            b.outcomes.saturating_sub(a.outcomes) as f64 / secs.max(0.001)
        })
        .collect();
    let latency: Vec<f64> = pairs
        .iter()
        .map(|(a, b)| {
            let n = b.durations.saturating_sub(a.durations);
            if n == 0 {
                0.0
            } else {
                b.duration_us.saturating_sub(a.duration_us) as f64 / n as f64 / 1000.0
            }
        })
        .collect();
    out.push_str("<div id=\"charts\">");
    out.push_str(&sparkline("throughput", "outcomes/s", &rate));
    out.push_str(&sparkline("latency", "mean ms to outcome", &latency));
    out.push_str("</div>");
    if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
        let mut rows = String::new();
        for (kind, n) in &last.reasons {
            let d = n.saturating_sub(first.reasons.get(kind).copied().unwrap_or(0));
            if d > 0 {
                let _ = write!(rows, "<tr><td>{}</td><td>{d}</td></tr>", esc(kind));
            }
        }
        let span = human(Duration::from_millis(
            last.at_ms.saturating_sub(first.at_ms),
        ));
        if rows.is_empty() {
            let _ = write!(out, "<p id=\"reasons\">No aborts in the last {span}.</p>");
        } else {
            let _ = write!(
                out,
                "<table id=\"reasons\"><tr><th>aborts in the last {span}, by reason</th><th>count</th></tr>{rows}</table>"
            );
        }
    }
    out
}

/// A small SVG line chart of `values`, titled.
fn sparkline(id: &str, title: &str, values: &[f64]) -> String {
    let (w, h) = (360.0, 80.0);
    let max = values.iter().cloned().fold(0.0_f64, f64::max);
    let last = values.last().copied().unwrap_or(0.0);
    let n = values.len().max(2) as f64 - 1.0;
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let x = i as f64 / n * w;
            let y = if max > 0.0 {
                h - v / max * (h - 10.0)
            } else {
                h
            };
            format!("{x:.1},{y:.1}")
        })
        .collect();
    format!(
        "<svg id=\"{id}\" width=\"{w}\" height=\"{hh}\" viewBox=\"0 0 {w} {hh}\"><title>{t}</title>\
         <text x=\"4\" y=\"12\" font-size=\"11\">{t}: {last:.1} (max {max:.1})</text>\
         <polyline fill=\"none\" stroke=\"#36c\" stroke-width=\"1.5\" points=\"{p}\"/></svg>",
        hh = h + 4.0,
        t = esc(title),
        p = points.join(" ")
    )
}

async fn transaction(State(c): State<Console>, Path(id): Path<String>) -> Response {
    if !is_token(&id, MAX_TXN_ID_LEN) {
        return page(
            StatusCode::BAD_REQUEST,
            "Transaction",
            &format!("<p class=\"err\">{} is not a txn_id.</p>", esc(&id)),
        );
    }
    let history = history(&c, &id).await;
    if history.is_empty() {
        return page(
            StatusCode::NOT_FOUND,
            "Transaction",
            &format!(
                "<p class=\"err\">No transaction {} in the log.</p>",
                esc(&id)
            ),
        );
    }
    let mut body = String::new();
    let last = &history[history.len() - 1];
    let _ = write!(
        body,
        "<p id=\"state\">{}{}</p><pre id=\"timeline\">{}</pre>",
        esc(last.state.as_str()),
        if last.stuck {
            " <span class=\"stuck\">STUCK</span>"
        } else {
            ""
        },
        esc(&timeline(&history))
    );
    body.push_str("<h2>Resolve</h2>");
    if last.state.is_terminal() {
        body.push_str("<p>It is finished: nothing is left to do.</p>");
    } else if c.admin_token.is_none() {
        body.push_str(
            "<p id=\"resolve-disabled\">Actions are disabled: the console was started without an admin credential (console_admin_token).</p>",
        );
    } else {
        // A one-phase transaction waiting for its participant: only an outcome named by the
        // operator ends it (mark-done --outcome).
        // (`accepted` when the coordinator writes no `preparing` record.)
        let waiting_one_phase = last.one_phase
            && matches!(
                last.state,
                crate::proto::TxnState::Accepted | crate::proto::TxnState::Preparing
            );
        let outcome = if waiting_one_phase {
            " outcome <select name=\"outcome\"><option value=\"\">(none)</option><option value=\"committed\">committed</option><option value=\"aborted\">aborted</option></select>"
        } else {
            ""
        };
        let rule = if waiting_one_phase {
            "It commits in one phase: its participant decides. Past its deadline, mark-done with the outcome its service shows ends it so (a heuristic decision: make sure the service will not act on it later)."
        } else {
            "Abort only before a decision is durable; mark-done only for a step of a decided transaction that you applied by hand."
        };
        let _ = write!(
            body,
            "<form id=\"resolve\" method=\"post\" action=\"/txn/{id}/resolve\">\
             <select name=\"action\"><option value=\"retry-now\">retry-now</option><option value=\"abort\">abort</option><option value=\"mark-done\">mark-done</option></select> \
             step <input name=\"step\" size=\"3\">{outcome} reason <input name=\"reason\" size=\"40\" required> \
             admin token <input type=\"password\" name=\"token\" required> \
             <button type=\"submit\">Continue…</button></form>\
             <p>{rule} You confirm on the next page.</p>",
            id = esc(&id)
        );
    }
    page(StatusCode::OK, &format!("Transaction {id}"), &body)
}

async fn history(c: &Console, id: &str) -> Vec<crate::proto::TransactionEvent> {
    let all: Vec<crate::proto::TransactionEvent> =
        crate::client::read_log(&c.events, &c.subjects.events(id)).await;
    all.into_iter().filter(|e| e.txn_id == id).collect()
}

#[derive(Debug, serde::Deserialize)]
struct ResolveForm {
    action: String,
    #[serde(default)]
    step: String,
    #[serde(default)]
    outcome: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    token: String,
    #[serde(default)]
    confirm: String,
}

async fn resolve(
    State(c): State<Console>,
    Path(id): Path<String>,
    axum::Form(f): axum::Form<ResolveForm>,
) -> Response {
    let title = format!("Resolve {id}");
    let fail = |status, msg: String| {
        page(
            status,
            &title,
            &format!(
                "<p class=\"err\" id=\"refused\">{}</p><p><a href=\"/txn/{}\">Back</a></p>",
                esc(&msg),
                esc(&id)
            ),
        )
    };
    let Some(want) = &c.admin_token else {
        return fail(
            StatusCode::FORBIDDEN,
            "actions are disabled: no console_admin_token is configured".into(),
        );
    };
    if !constant_time_eq(f.token.as_bytes(), want.as_bytes()) {
        return fail(StatusCode::FORBIDDEN, "wrong admin token".into());
    }
    let Ok(action) =
        serde_json::from_value::<ResolveAction>(serde_json::Value::String(f.action.clone()))
    else {
        return fail(
            StatusCode::BAD_REQUEST,
            format!("{:?} is not an action", f.action),
        );
    };
    let step = match f.step.trim() {
        "" => None,
        s => match s.parse() {
            Ok(n) => Some(n),
            Err(_) => {
                return fail(
                    StatusCode::BAD_REQUEST,
                    format!("step {s:?} is not a number"),
                );
            }
        },
    };
    let outcome = match f.outcome.trim() {
        "" => None,
        "committed" => Some(crate::proto::ConfirmedOutcome::Committed),
        "aborted" => Some(crate::proto::ConfirmedOutcome::Aborted),
        o => {
            return fail(
                StatusCode::BAD_REQUEST,
                format!("{o:?} is not an outcome: committed or aborted"),
            );
        }
    };
    let Some(active) = c.ready.borrow().clone() else {
        return fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "this coordinator is a standby: act on the console of the one holding the lease".into(),
        );
    };
    let confirmed = f.confirm == "yes";
    let request = crate::proto::ResolveRequest {
        txn_id: id.clone(),
        resolution: crate::proto::Resolution {
            action,
            step,
            outcome,
            reason: f.reason.clone(),
            by: "console (admin)".into(),
            at_ms: 0,
        },
        dry_run: !confirmed,
    };
    match super::api::resolve_request(&active.shared, request).await {
        Err(e) => fail(StatusCode::CONFLICT, format!("refused: {e}")),
        Ok(v) if !confirmed => {
            let state = v["state"].as_str().unwrap_or("?");
            let body = format!(
                "<p>{}{} on {} (now {}) with reason “{}”: the rules allow it.</p>\
                 <form id=\"confirm\" method=\"post\" action=\"/txn/{id}/resolve\">\
                 <input type=\"hidden\" name=\"action\" value=\"{a}\"><input type=\"hidden\" name=\"step\" value=\"{s}\">\
                 <input type=\"hidden\" name=\"outcome\" value=\"{o}\">\
                 <input type=\"hidden\" name=\"reason\" value=\"{r}\"><input type=\"hidden\" name=\"token\" value=\"{t}\">\
                 <input type=\"hidden\" name=\"confirm\" value=\"yes\">\
                 <button type=\"submit\">Confirm {a}</button> <a href=\"/txn/{id}\">Cancel</a></form>",
                esc(action.as_str()),
                outcome
                    .map(|o| format!(" (outcome {})", o.as_str()))
                    .unwrap_or_default(),
                esc(&id),
                esc(state),
                esc(&f.reason),
                id = esc(&id),
                a = esc(action.as_str()),
                s = esc(&f.step),
                o = outcome.map(|o| o.as_str()).unwrap_or_default(),
                r = esc(&f.reason),
                t = esc(&f.token),
            );
            page(StatusCode::OK, &title, &body)
        }
        Ok(v) => {
            let state = v["state"].as_str().unwrap_or("?");
            let body = format!(
                "<p id=\"done\">{} carried out; {} is {}.</p><p><a href=\"/txn/{id}\">Back to the transaction</a></p>",
                esc(action.as_str()),
                esc(&id),
                esc(state),
                id = esc(&id),
            );
            page(StatusCode::OK, &title, &body)
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::TxnState;

    #[test]
    fn text_is_escaped_and_queries_are_encoded() {
        assert_eq!(
            esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
        let state = "committing,aborted".to_string();
        let since = "1 h&x".to_string();
        assert_eq!(
            form_urlencoded(&[
                ("state", &state),
                ("since", &since),
                ("mode", &String::new())
            ]),
            "state=committing%2Caborted&since=1+h%26x"
        );
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn the_query_becomes_the_cli_filter() {
        let q = ListQuery {
            state: "committing, aborted".into(),
            stuck: "on".into(),
            service: " pay ".into(),
            mode: "saga".into(),
            ..Default::default()
        };
        let f = q.filter().unwrap();
        assert_eq!(f.states, vec![TxnState::Committing, TxnState::Aborted]);
        assert!(f.stuck);
        assert_eq!(f.service.as_deref(), Some("pay"));
        assert_eq!(f.mode, Some(Mode::Saga));
        let bad = ListQuery {
            older_than: "5".into(),
            ..Default::default()
        };
        assert!(bad.filter().unwrap_err().contains("older than"));
        assert!(sparkline("x", "t", &[1.0, 3.0, 2.0]).contains("polyline"));
    }
}
