//! The web console (`console_listen`) over real HTTP: the list with the CLI's filters and
//! its paging link, a transaction's page, a resolve action behind its confirmation (also one
//! naming the outcome of a one-phase transaction whose participant is silent) and the
//! admin credential (a wrong one refused, a rule that refuses it named), the audit record;
//! and a standby's console, which lists from the log with its actions disabled.

mod common;

use common::{System, request, step};
use serde_json::json;
use txcoord::proto::{ResolveAction, TxnState};

fn port() -> u16 {
    txcoord::natsserver::free_port().expect("a free port")
}

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.expect("GET");
    (r.status().as_u16(), r.text().await.expect("a body"))
}

async fn post(url: &str, form: &[(&str, &str)]) -> (u16, String) {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                b => format!("%{b:02X}"),
            })
            .collect()
    };
    let body: Vec<String> = form
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect();
    let r = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.join("&"))
        .send()
        .await
        .expect("POST");
    (r.status().as_u16(), r.text().await.expect("a body"))
}

/// The transaction ids listed on a console page, in order.
fn listed(page: &str) -> Vec<String> {
    page.split("data-txn=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_lists_shows_and_resolves_behind_a_confirmation() {
    let addr = format!("127.0.0.1:{}", port());
    let env = [
        ("TXCOORD_STUCK_AFTER_MS", "300"),
        ("TXCOORD_RETRY_BASE_MS", "100"),
        ("TXCOORD_CONSOLE_LISTEN", addr.as_str()),
        ("TXCOORD_CONSOLE_ADMIN_TOKEN", "sekret"),
    ];
    let mut sys = System::start(&["a", "b"], &env).await;
    let base = format!("http://{addr}");
    let ok = sys
        .run(request(
            "c-ok",
            vec![step("a", json!({})), step("b", json!({}))],
        ))
        .await;
    assert_eq!(ok.state, TxnState::Committed);
    let no = sys
        .run(request(
            "c-no",
            vec![
                step("a", json!({})),
                step("b", json!({"vote": "abort", "reason": "<b>no</b>"})),
            ],
        ))
        .await;
    assert_eq!(no.state, TxnState::Aborted);
    sys.stuck_commit("c-stuck", "a", "b").await;

    // The list and its filters.
    let (status, page) = get(&format!("{base}/")).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(listed(&page), ["c-stuck", "c-no", "c-ok"]);
    assert!(page.contains("id=\"charts\""), "{page}");
    assert!(
        page.contains("&lt;b&gt;no&lt;/b&gt;") && !page.contains("<b>no</b>"),
        "escaped"
    );
    assert_eq!(
        listed(&get(&format!("{base}/?stuck=on")).await.1),
        ["c-stuck"]
    );
    assert_eq!(
        listed(&get(&format!("{base}/?state=aborted")).await.1),
        ["c-no"]
    );
    assert_eq!(
        listed(&get(&format!("{base}/?service=b&mode=2pc&since=1h")).await.1).len(),
        3
    );
    let (status, page) = get(&format!("{base}/?limit=1")).await;
    assert_eq!(listed(&page), ["c-stuck"]);
    let next = page
        .split("id=\"next\" href=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("a link to the next page")
        .replace("&amp;", "&");
    assert_eq!(status, 200);
    assert_eq!(listed(&get(&format!("{base}{next}")).await.1), ["c-no"]);
    let (status, page) = get(&format!("{base}/?older_than=5")).await;
    assert_eq!(status, 400);
    assert!(page.contains("older than"), "{page}");

    // A transaction's page.
    let (status, page) = get(&format!("{base}/txn/c-stuck")).await;
    assert_eq!(status, 200);
    assert!(
        page.contains("id=\"timeline\"") && page.contains("flagged stuck"),
        "{page}"
    );
    assert!(page.contains("id=\"resolve\""), "{page}");
    assert_eq!(get(&format!("{base}/txn/c-none")).await.0, 404);

    // Actions: the credential, the rules, the confirmation.
    let url = format!("{base}/txn/c-stuck/resolve");
    let (status, _) = post(
        &url,
        &[("action", "retry-now"), ("reason", "x"), ("token", "guess")],
    )
    .await;
    assert_eq!(status, 403);
    let (status, page) = post(
        &url,
        &[("action", "abort"), ("reason", "x"), ("token", "sekret")],
    )
    .await;
    assert_eq!(status, 409);
    assert!(page.contains("break atomicity"), "{page}");
    let fields = [
        ("action", "mark-done"),
        ("step", "1"),
        ("reason", "b fixed by hand"),
        ("token", "sekret"),
    ];
    let (status, page) = post(&url, &fields).await;
    assert_eq!(status, 200);
    assert!(page.contains("id=\"confirm\""), "{page}");
    assert_eq!(
        sys.client.last_event("c-stuck").await.map(|e| e.state),
        Some(TxnState::Committing),
        "nothing happens before the confirmation"
    );
    let mut confirmed = fields.to_vec();
    confirmed.push(("confirm", "yes"));
    let (status, page) = post(&url, &confirmed).await;
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("mark-done carried out; c-stuck is committed"),
        "{page}"
    );
    let audit = sys
        .client
        .history("c-stuck")
        .await
        .into_iter()
        .find_map(|e| e.resolved)
        .expect("the audit record");
    assert_eq!(audit.action, ResolveAction::MarkDone);
    assert_eq!(audit.by, "console (admin)");

    // An outcome is only for a one-phase transaction waiting for its participant.
    let mut with_outcome = fields.to_vec();
    with_outcome.push(("outcome", "aborted"));
    let (status, page) = post(&format!("{base}/txn/c-no/resolve"), &with_outcome).await;
    assert_eq!(status, 409, "{page}");
    with_outcome.pop();
    with_outcome.push(("outcome", "maybe"));
    let (status, page) = post(&url, &with_outcome).await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("not an outcome"), "{page}");
    // One that is (a lone step of a service heard from: one phase), whose service sleeps
    // past the deadline: the page offers the outcome, refused until the deadline, then
    // carried out behind its confirmation.
    let mut slow = request("c-1pc", vec![step("a", json!({"delay_ms": 6000}))]);
    slow["timeout_ms"] = json!(1500);
    sys.submit(&slow, "c-1pc").await;
    sys.wait_state("c-1pc", |e| e.state == TxnState::Preparing)
        .await;
    let (_, page) = get(&format!("{base}/txn/c-1pc")).await;
    assert!(page.contains("name=\"outcome\""), "{page}");
    let url = format!("{base}/txn/c-1pc/resolve");
    let fields = [
        ("action", "mark-done"),
        ("outcome", "aborted"),
        ("reason", "its service shows nothing"),
        ("token", "sekret"),
    ];
    let since = std::time::Instant::now();
    let page = loop {
        let (status, page) = post(&url, &fields).await;
        if status == 200 {
            break page;
        }
        assert_eq!(status, 409, "{page}");
        assert!(page.contains("may still be deciding"), "{page}");
        assert!(
            since.elapsed() < std::time::Duration::from_secs(20),
            "{page}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(page.contains("(outcome aborted)"), "{page}");
    let mut confirmed = fields.to_vec();
    confirmed.push(("confirm", "yes"));
    let (status, page) = post(&url, &confirmed).await;
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("mark-done carried out; c-1pc is aborted"),
        "{page}"
    );

    // A standby's console: the list from the log, no actions.
    let standby_addr = format!("127.0.0.1:{}", port());
    let _standby = sys
        .spawn_standby(
            &[("TXCOORD_CONSOLE_LISTEN", standby_addr.as_str())],
            "web console",
        )
        .await;
    let (status, page) = get(&format!("http://{standby_addr}/")).await;
    assert_eq!(status, 200);
    assert_eq!(listed(&page), ["c-1pc", "c-stuck", "c-no", "c-ok"]);
    assert!(page.contains("standby"), "{page}");
    let (_, page) = get(&format!("http://{standby_addr}/txn/c-no")).await;
    assert!(page.contains("nothing is left to do"), "{page}");
}
