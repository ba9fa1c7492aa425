//! The operator's read side: `txcoord list`, `show` and `watch`. Everything here reads the
//! coordinator's log (the events stream), never its memory, so it works while no
//! coordinator runs.
//!
//! `list` walks the log backwards from its newest record: the first record met of a
//! transaction is its latest state, and the filters apply to that. A page ends after
//! `limit` transactions and says where the next one starts (`--before <seq>`); on a later
//! page a transaction is listed only if the record met there is still its latest, so a page
//! never shows an old state of a transaction that moved on.

pub mod time;

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;

use crate::proto::{Mode, Subjects, TransactionEvent, TxnState};

/// Which transactions an operator asks for (`--state`, `--stuck`, `--older-than`,
/// `--service`, `--mode`, `--since`, `--until`). Every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// Its latest state is one of these (any, when empty).
    pub states: Vec<TxnState>,
    /// It is flagged stuck (phase 2 or a compensation unconfirmed past the limit).
    pub stuck: bool,
    /// Its latest record is older than this: it has not moved for that long.
    pub older_than: Option<Duration>,
    /// One of its steps is this service's.
    pub service: Option<String>,
    /// 2PC or saga.
    pub mode: Option<Mode>,
    /// Its latest record is from this time (Unix ms) or later.
    pub since_ms: Option<u64>,
    /// Its latest record is from this time (Unix ms) or earlier.
    pub until_ms: Option<u64>,
}

impl Filter {
    /// Whether a transaction whose latest record is `ev` is wanted, at time `now_ms`.
    pub fn matches(&self, ev: &TransactionEvent, now_ms: u64) -> bool {
        (self.states.is_empty() || self.states.contains(&ev.state))
            && (!self.stuck || ev.stuck)
            && self
                .older_than
                .is_none_or(|d| ev.timestamp_ms.saturating_add(d.as_millis() as u64) <= now_ms)
            && self
                .service
                .as_ref()
                .is_none_or(|s| ev.steps.iter().any(|st| &st.service == s))
            && self.mode.is_none_or(|m| ev.mode == m)
            && self.since_ms.is_none_or(|t| ev.timestamp_ms >= t)
            && self.until_ms.is_none_or(|t| ev.timestamp_ms <= t)
    }
}

/// Parses a state name as the wire writes it.
pub fn parse_state(name: &str) -> Result<TxnState, String> {
    serde_json::from_value(serde_json::Value::String(name.trim().to_string())).map_err(|_| {
        format!(
            "{name:?} is not a state: accepted, preparing, committing, aborting, committed, aborted, rejected, prepared, executing, compensating, completed, compensated or failed"
        )
    })
}

/// One transaction in a listing: its latest record and where that is in the log.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The record's stream sequence.
    pub seq: u64,
    /// The record.
    pub event: TransactionEvent,
}

/// One page of `list`.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// Newest first.
    pub items: Vec<Listed>,
    /// Where the next page starts (`--before`), when the log goes on.
    pub next_before: Option<u64>,
    /// Records read for this page.
    pub scanned: u64,
    /// The scan stopped at its limit before the log's start or `since`.
    pub cut_short: bool,
}

/// Why the log could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// The events stream could not be asked about.
    #[error("cannot read the log ({stream}): {message}")]
    Stream {
        /// The stream.
        stream: String,
        /// What went wrong.
        message: String,
    },
}

/// How many records `list` reads at once.
const READ_AHEAD: usize = 64;

/// Lists the transactions whose latest record matches `filter`, newest first: at most
/// `limit`, from the records before sequence `before` (the newest when `None`), reading at
/// most `scan_max` records.
pub async fn list(
    events: &jetstream::stream::Stream,
    subjects: &Subjects,
    filter: &Filter,
    limit: usize,
    before: Option<u64>,
    scan_max: u64,
) -> Result<Page, ListError> {
    let info = events.get_info().await.map_err(|e| ListError::Stream {
        stream: subjects.events_stream(),
        message: e.to_string(),
    })?;
    let first = info.state.first_sequence.max(1);
    let top = match before {
        Some(b) => b.saturating_sub(1).min(info.state.last_sequence),
        None => info.state.last_sequence,
    };
    let now = crate::proto::now_ms();
    let mut seen: HashSet<String> = HashSet::new();
    let mut page = Page::default();
    if top < first || info.state.messages == 0 {
        return Ok(page);
    }
    let seqs = (first..=top).rev();
    // Pipelined reads, in order.
    let mut reads = futures::stream::iter(seqs)
        .map(|seq| async move { (seq, events.direct_get(seq).await) })
        .buffered(READ_AHEAD);
    let mut lowest = top + 1;
    while let Some((seq, got)) = reads.next().await {
        lowest = seq;
        page.scanned += 1;
        let Ok(msg) = got else { continue };
        let Some(txn_id) = subjects.events_txn(&msg.subject) else {
            continue;
        };
        if !seen.insert(txn_id.to_string()) {
            continue;
        }
        // Foreign messages in a log are not records; its real records are further down.
        let Ok(event) = serde_json::from_slice::<TransactionEvent>(&msg.payload) else {
            seen.remove(txn_id);
            continue;
        };
        if event.txn_id != txn_id {
            seen.remove(txn_id);
            continue;
        }
        // Past `since` (records are in time order): nothing older can match.
        if filter.since_ms.is_some_and(|t| event.timestamp_ms < t) {
            page.next_before = None;
            return Ok(page);
        }
        if !filter.matches(&event, now) {
            continue;
        }
        if before.is_some() && !is_latest(events, subjects, txn_id, seq).await {
            continue;
        }
        page.items.push(Listed { seq, event });
        if page.items.len() >= limit {
            page.next_before = (seq > first).then_some(seq);
            return Ok(page);
        }
        if page.scanned >= scan_max {
            break;
        }
    }
    if lowest > first {
        page.cut_short = true;
        page.next_before = Some(lowest);
    }
    Ok(page)
}

/// Whether the record at `seq` is `txn_id`'s latest.
async fn is_latest(
    events: &jetstream::stream::Stream,
    subjects: &Subjects,
    txn_id: &str,
    seq: u64,
) -> bool {
    match crate::client::log_tail(events, subjects, txn_id).await {
        Ok(tail) => tail.record.is_some_and(|r| r.seq == seq),
        Err(_) => true,
    }
}

/// One line of a listing: id, mode, state, when its latest record was written and how
/// long ago, its services, why it ended or waits.
pub fn list_line(ev: &TransactionEvent, now_ms: u64) -> String {
    let mode = match ev.mode {
        Mode::TwoPc => "2pc",
        Mode::Saga => "saga",
    };
    let mut state = ev.state.as_str().to_string();
    if ev.stuck {
        state.push_str(" STUCK");
    }
    let services: Vec<&str> = ev.steps.iter().map(|s| s.service.as_str()).collect();
    let ago = time::human(Duration::from_millis(
        now_ms.saturating_sub(ev.timestamp_ms),
    ));
    let why = ev.reason.as_ref().map(reason_text).unwrap_or_default();
    format!(
        "{:<38} {:<4} {:<18} {} ({ago} ago)  {}  {}",
        ev.txn_id,
        mode,
        state,
        time::rfc3339(ev.timestamp_ms),
        services.join(","),
        why
    )
    .trim_end()
    .to_string()
}

/// A reason in one line: its kind and its text or what it names.
pub fn reason_text(r: &crate::proto::Reason) -> String {
    let v = serde_json::to_value(r).unwrap_or_default();
    let kind = v["kind"].as_str().unwrap_or("?").to_string();
    let detail = ["message", "service", "services", "how"]
        .iter()
        .filter_map(|k| match &v[*k] {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(format!("{k}={s}")),
            other => Some(format!("{k}={other}")),
        })
        .collect::<Vec<_>>()
        .join(" ");
    let text = if detail.is_empty() {
        kind
    } else {
        format!("{kind}: {detail}")
    };
    crate::proto::cut_text(text, 200)
}

/// The timeline of one transaction (`txcoord show`): every record with the time since the
/// first, what changed in it, then each step and the durations.
pub fn timeline(events: &[TransactionEvent]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let (Some(first), Some(last)) = (events.first(), events.last()) else {
        return out;
    };
    let mode = match first.mode {
        Mode::TwoPc => "2pc",
        Mode::Saga => "saga",
    };
    let _ = writeln!(
        out,
        "transaction {} ({mode}, {} steps): {}{}",
        first.txn_id,
        last.steps.len().max(first.steps.len()),
        last.state.as_str(),
        if last.stuck { ", STUCK" } else { "" }
    );
    if let Some(m) = &first.metadata {
        let _ = writeln!(out, "metadata: {m}");
    }
    let _ = writeln!(out, "\ntimeline:");
    let mut prev: Option<&TransactionEvent> = None;
    for ev in events {
        let at = ev.timestamp_ms.saturating_sub(first.timestamp_ms);
        let mut what = Vec::new();
        for s in &ev.steps {
            let before = prev.and_then(|p| p.steps.get(s.step));
            if s.vote.is_some() && before.is_none_or(|b| b.vote != s.vote) {
                what.push(format!(
                    "step {} {} voted {}",
                    s.step,
                    s.service,
                    serde_json::to_value(s.vote)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                ));
            }
            if s.done && before.is_none_or(|b| !b.done) {
                what.push(format!("step {} {} done", s.step, s.service));
            }
            if let (Some(st), Some(b)) = (&s.saga, before.and_then(|b| b.saga.as_ref()))
                && st.state != b.state
            {
                what.push(format!(
                    "step {} {} {}",
                    s.step,
                    s.service,
                    serde_json::to_value(st.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                ));
            }
        }
        if let Some(r) = &ev.reason
            && prev.is_none_or(|p| p.reason.as_ref() != Some(r))
        {
            what.push(format!("reason {}", reason_text(r)));
        }
        if ev.stuck && prev.is_none_or(|p| !p.stuck) {
            what.push("flagged stuck".into());
        }
        let _ = writeln!(
            out,
            "  +{:<9} {}  {:<13} {}",
            time::human(Duration::from_millis(at)),
            time::rfc3339(ev.timestamp_ms),
            ev.state.as_str(),
            what.join("; ")
        );
        prev = Some(ev);
    }
    let _ = writeln!(out, "\nsteps:");
    for s in &last.steps {
        let vote = s
            .vote
            .and_then(|v| serde_json::to_value(v).ok())
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "-".into());
        let saga = s
            .saga
            .as_ref()
            .and_then(|g| serde_json::to_value(g.state).ok())
            .and_then(|v| v.as_str().map(str::to_owned));
        let where_ = s.url.as_deref().unwrap_or("");
        let _ = writeln!(
            out,
            "  {} {:<16} {:<16} vote {:<9} {}prepare attempts {}, decision attempts {}{} {where_}",
            s.step,
            s.service,
            s.action,
            vote,
            saga.map(|g| format!("{g}, ")).unwrap_or_default(),
            s.prepare_attempt,
            s.decision_attempt,
            if s.done { ", done" } else { "" },
        );
    }
    let decided = events.iter().find(|e| {
        matches!(
            e.state,
            TxnState::Committing | TxnState::Aborting | TxnState::Compensating
        ) || e.state.is_terminal()
    });
    let _ = writeln!(out);
    if let Some(d) = decided {
        let _ = writeln!(
            out,
            "decided after {} ({})",
            time::human(Duration::from_millis(
                d.timestamp_ms.saturating_sub(first.timestamp_ms)
            )),
            d.state.as_str()
        );
    }
    let total = time::human(Duration::from_millis(
        last.timestamp_ms.saturating_sub(first.timestamp_ms),
    ));
    if last.state.is_terminal() {
        let _ = writeln!(out, "finished after {total}");
    } else {
        let _ = writeln!(out, "not finished; last change after {total}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Reason, StepStatus, Vote};

    fn ev(id: &str, state: TxnState, at: u64, services: &[&str]) -> TransactionEvent {
        TransactionEvent {
            steps: services
                .iter()
                .enumerate()
                .map(|(i, s)| StepStatus {
                    step: i,
                    service: (*s).into(),
                    url: None,
                    action: "act".into(),
                    vote: None,
                    done: false,
                    prepare_attempt: 1,
                    decision_attempt: 0,
                    payload: None,
                    saga: None,
                    compensate: None,
                    timeout_ms: None,
                })
                .collect(),
            timeout_ms: Some(5000),
            ..TransactionEvent::new(id.into(), state, Mode::TwoPc, at)
        }
    }

    #[test]
    fn every_condition_of_a_filter_must_hold() {
        let now = 1_000_000;
        let mut stuck = ev("t1", TxnState::Committing, now - 120_000, &["inv", "pay"]);
        stuck.stuck = true;
        let done = ev("t2", TxnState::Committed, now - 1_000, &["inv"]);
        let any = Filter::default();
        assert!(any.matches(&stuck, now) && any.matches(&done, now));
        let f = Filter {
            stuck: true,
            ..Filter::default()
        };
        assert!(f.matches(&stuck, now) && !f.matches(&done, now));
        let f = Filter {
            older_than: Some(Duration::from_secs(60)),
            ..Filter::default()
        };
        assert!(f.matches(&stuck, now) && !f.matches(&done, now));
        let f = Filter {
            service: Some("pay".into()),
            ..Filter::default()
        };
        assert!(f.matches(&stuck, now) && !f.matches(&done, now));
        let f = Filter {
            states: vec![TxnState::Committed, TxnState::Aborted],
            ..Filter::default()
        };
        assert!(!f.matches(&stuck, now) && f.matches(&done, now));
        let f = Filter {
            mode: Some(Mode::Saga),
            ..Filter::default()
        };
        assert!(!f.matches(&stuck, now));
        let f = Filter {
            since_ms: Some(now - 60_000),
            until_ms: Some(now),
            ..Filter::default()
        };
        assert!(!f.matches(&stuck, now) && f.matches(&done, now));
        let f = Filter {
            stuck: true,
            service: Some("inv".into()),
            states: vec![TxnState::Committed],
            ..Filter::default()
        };
        assert!(!f.matches(&stuck, now), "all conditions, not any");
    }

    #[test]
    fn states_parse_by_their_wire_names() {
        assert_eq!(parse_state("committed"), Ok(TxnState::Committed));
        assert_eq!(parse_state(" compensating "), Ok(TxnState::Compensating));
        assert!(parse_state("done").unwrap_err().contains("not a state"));
    }

    #[test]
    fn a_timeline_shows_each_change_once() {
        let t0 = 1_796_169_000_000;
        let accepted = ev("t9", TxnState::Accepted, t0, &["inv", "pay"]);
        let mut preparing = ev("t9", TxnState::Preparing, t0 + 2, &["inv", "pay"]);
        preparing.steps[0].vote = Some(Vote::Ready);
        let mut aborting = preparing.clone();
        aborting.state = TxnState::Aborting;
        aborting.timestamp_ms = t0 + 40;
        aborting.steps[1].vote = Some(Vote::Abort);
        aborting.reason = Some(Reason::VoteAbort {
            service: "pay".into(),
            step: 1,
            message: "card declined".into(),
        });
        let mut aborted = aborting.clone();
        aborted.state = TxnState::Aborted;
        aborted.timestamp_ms = t0 + 95;
        aborted.steps[0].done = true;
        let text = timeline(&[accepted, preparing, aborting, aborted]);
        assert!(
            text.starts_with("transaction t9 (2pc, 2 steps): aborted\n"),
            "{text}"
        );
        assert_eq!(text.matches("step 0 inv voted ready").count(), 1, "{text}");
        assert_eq!(text.matches("step 1 pay voted abort").count(), 1, "{text}");
        assert_eq!(text.matches("card declined").count(), 1, "{text}");
        assert!(text.contains("step 0 inv done"), "{text}");
        assert!(text.contains("decided after 40ms (aborting)"), "{text}");
        assert!(text.contains("finished after 95ms"), "{text}");
        assert!(text.contains("2026-12-01T23:50:00Z"), "{text}");
        assert!(timeline(&[]).is_empty());
    }

    #[test]
    fn a_listing_line_says_what_an_operator_looks_for() {
        let now = 1_796_169_000_000;
        let mut e = ev("t3", TxnState::Committing, now - 125_000, &["inv", "pay"]);
        e.stuck = true;
        let line = list_line(&e, now);
        assert!(line.starts_with("t3 "), "{line}");
        assert!(line.contains("committing STUCK"), "{line}");
        assert!(line.contains("(2m05s ago)"), "{line}");
        assert!(line.contains("inv,pay"), "{line}");
        e.reason = Some(Reason::Timeout {
            services: vec!["pay".into()],
            steps: vec![1],
        });
        assert!(list_line(&e, now).contains("timeout: services=[\"pay\"]"));
    }
}
