//! The web console in a real browser: headless Chromium (Debian's `chromium`, installed by
//! `./dev test` when missing) driven through chromedriver's W3C WebDriver protocol over
//! HTTP. The test starts the system, runs transactions (one stuck), opens the console, and
//! checks the list, a filter typed into the form, the transaction page reached by a click,
//! and one resolve action clicked through its confirmation. It saves a screenshot of the
//! list (`target/tmp/console.png`; the README's `docs/console.png` is one of them).

mod common;

use std::time::{Duration, Instant};

use common::{Proc, System, request, step};
use serde_json::{Value, json};
use txcoord::proto::TxnState;

/// A WebDriver session.
struct Browser {
    http: reqwest::Client,
    base: String,
}

impl Browser {
    async fn start(driver: &str) -> Browser {
        let http = reqwest::Client::new();
        // chromedriver answers /status once it listens.
        let deadline = Instant::now() + Duration::from_secs(30);
        while http.get(format!("{driver}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                         "--disable-gpu", "--window-size=1280,900"]
            }
        }}});
        let v: Value = http
            .post(format!("{driver}/session"))
            .json(&caps)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("JSON");
        let id = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        Browser {
            http,
            base: format!("{driver}/session/{id}"),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req
            .send()
            .await
            .expect("WebDriver")
            .json()
            .await
            .expect("JSON");
        assert!(
            v["value"].get("error").is_none(),
            "WebDriver {path}: {}",
            v["value"]
        );
        v["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    async fn find_all(&self, css: &str) -> Vec<String> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v.as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e.as_object()?.values().next()?.as_str().map(str::to_owned))
            .collect()
    }

    async fn find(&self, css: &str) -> String {
        self.find_all(css)
            .await
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no element {css}"))
    }

    async fn text(&self, css: &str) -> String {
        let e = self.find(css).await;
        self.call(reqwest::Method::GET, &format!("/element/{e}/text"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Clicks what leads to another page, and waits until that page has replaced this one
    /// and is loaded (a click on a submit button may return before the browser navigates).
    async fn click_to_page(&self, css: &str) {
        let old = self.find("html").await;
        self.click(css).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v: Value = self
                .http
                .get(format!("{}/element/{old}/name", self.base))
                .send()
                .await
                .expect("WebDriver")
                .json()
                .await
                .expect("JSON");
            if v["value"]["error"] == "stale element reference" {
                let ready = self
                    .call(
                        reqwest::Method::POST,
                        "/execute/sync",
                        Some(json!({"script": "return document.readyState", "args": []})),
                    )
                    .await;
                if ready == "complete" {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{css}: no new page after the click"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    async fn screenshot(&self) -> Vec<u8> {
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        base64_decode(v.as_str().unwrap())
    }

    async fn quit(&self) {
        let _ = self.http.delete(&self.base).send().await;
    }
}

/// Standard base64, as WebDriver sends screenshots.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|c| !matches!(c, b'=' | b'\n' | b'\r'))
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &c)| acc | u32::from(val(c)) << (18 - 6 * i));
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_in_a_real_browser() {
    let console = format!("127.0.0.1:{}", txcoord::natsserver::free_port().unwrap());
    let env = [
        ("TXCOORD_STUCK_AFTER_MS", "300"),
        ("TXCOORD_RETRY_BASE_MS", "100"),
        ("TXCOORD_CONSOLE_LISTEN", console.as_str()),
        ("TXCOORD_CONSOLE_ADMIN_TOKEN", "sekret"),
    ];
    let mut sys = System::start(&["inventory", "payment"], &env).await;
    for i in 1..=4 {
        let ev = sys
            .run(request(
                &format!("order-{i}"),
                vec![step("inventory", json!({})), step("payment", json!({}))],
            ))
            .await;
        assert_eq!(ev.state, TxnState::Committed);
    }
    let declined = sys
        .run(request(
            "order-5",
            vec![
                step("inventory", json!({})),
                step(
                    "payment",
                    json!({"vote": "abort", "reason": "card declined"}),
                ),
            ],
        ))
        .await;
    assert_eq!(declined.state, TxnState::Aborted);
    sys.stuck_commit("order-6", "inventory", "payment").await;

    let port = txcoord::natsserver::free_port().unwrap();
    let _driver = Proc::spawn_bin(
        "chromedriver",
        sys.dir.path(),
        "chromedriver",
        &[&format!("--port={port}")],
        &[],
    );
    let b = Browser::start(&format!("http://127.0.0.1:{port}")).await;
    let base = format!("http://{console}");

    // The list.
    b.go(&format!("{base}/")).await;
    assert_eq!(b.find_all("tr.txn").await.len(), 6);
    assert!(b.text("tr.txn").await.starts_with("order-6"));
    assert!(b.text("tr.txn td.stuck").await.contains("STUCK"));
    assert_eq!(b.find_all("#charts svg").await.len(), 2);
    let png = b.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console.png");
    std::fs::write(&shot, &png).unwrap();

    // A filter typed into the form.
    b.type_into("input[name=state]", "aborted").await;
    b.click_to_page("form.filters button").await;
    let rows = b.find_all("tr.txn").await;
    assert_eq!(rows.len(), 1);
    assert!(b.text("tr.txn").await.contains("card declined"));

    // The stuck one's page, by a click; then mark-done through the confirmation.
    b.go(&format!("{base}/?stuck=on")).await;
    b.click_to_page("tr.txn a").await;
    assert!(b.text("#timeline").await.contains("flagged stuck"));
    b.click("select[name=action] option[value=mark-done]").await;
    b.type_into("input[name=step]", "1").await;
    b.type_into("input[name=reason]", "refund done by hand")
        .await;
    b.type_into("input[name=token]", "sekret").await;
    b.click_to_page("#resolve button").await;
    b.click_to_page("#confirm button").await;
    assert!(
        b.text("#done").await.contains("order-6 is committed"),
        "{}",
        b.text("body").await
    );
    b.quit().await;
    let last = sys.client.last_event("order-6").await.unwrap();
    assert_eq!(last.state, TxnState::Committed);
    assert!(last.resolved.is_some());
}
