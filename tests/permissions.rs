//! The identities `txcoord auth` generates, on a real nats-server: the coordinator, two
//! scripted services and a client each connect with their own user, transactions commit and
//! abort as their votes say, and every forgery the permissions are for is refused by the
//! server (a client publishing a vote, a record or a command; a service voting on another's
//! subject or reading another's commands) or by the coordinator (a service that votes for
//! another with its own token). The Python raw-protocol ledger joins under its own identity.

mod common;

use std::time::Duration;

use common::{Proc, python, request, service_bin, step};
use futures::StreamExt;
use serde_json::{Value, json};
use txcoord::authgen::{Generated, Identity};
use txcoord::client::Client;
use txcoord::config::NatsAuth;
use txcoord::natsserver::NatsServer;
use txcoord::proto::{Reason, TxnState};

fn env_of<'a>(url: &'a str, id: &'a Identity) -> Vec<(String, String)> {
    let mut env = id.env();
    env.push(("TXCOORD_NATS_URL".into(), url.to_string()));
    env
}

async fn connect(url: &str, g: &Generated, name: &str) -> async_nats::Client {
    let id = g.get(name).unwrap();
    let auth = NatsAuth {
        user: Some(id.user.clone()),
        password: Some(id.password.clone()),
        inbox_prefix: Some(id.inbox_prefix.clone()),
        ..Default::default()
    };
    txcoord::nats::connect(url, &auth, name, false)
        .await
        .expect("connect")
}

/// A JetStream publish the server must refuse (no stream ever acknowledges it).
async fn refused(nc: &async_nats::Client, subject: &str, body: &Value) {
    let js = txcoord::nats::jetstream(nc.clone(), Duration::from_millis(500));
    let stored = async {
        js.publish(subject.to_string(), body.to_string().into())
            .await?
            .await
    }
    .await;
    assert!(stored.is_err(), "{subject} was stored: {stored:?}");
}

/// A nats-server loading the generated block, with the coordinator running under its own
/// identity; processes are started under the identity they name.
struct Secured {
    g: Generated,
    nats: NatsServer,
    url: String,
    dir: tempfile::TempDir,
    coordinator: Proc,
}

impl Secured {
    async fn start(g: Generated) -> Secured {
        let nats = NatsServer::start_configured(None, None, "", &g.server_block()).expect("nats");
        let url = nats.url();
        let dir = tempfile::tempdir().unwrap();
        let coordinator = spawn_as(&url, &dir, &g, "coordinator", &["serve"], "coordinator");
        coordinator
            .wait_for("coordinator ready", Duration::from_secs(30))
            .await;
        Secured {
            g,
            nats,
            url,
            dir,
            coordinator,
        }
    }

    /// `txcoord <args>` as identity `id`, logged under `name`.
    fn spawn(&self, name: &str, args: &[&str], id: &str) -> Proc {
        spawn_as(&self.url, &self.dir, &self.g, name, args, id)
    }
}

fn spawn_as(
    url: &str,
    dir: &tempfile::TempDir,
    g: &Generated,
    name: &str,
    args: &[&str],
    id: &str,
) -> Proc {
    let env = env_of(url, g.get(id).unwrap());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Proc::spawn(dir.path(), name, args, &env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_identities_run_transactions_and_stop_forgeries() {
    let g = txcoord::authgen::generate(
        "txn",
        &["a".into(), "b".into(), "ledger".into()],
        &["shop".into()],
    )
    .unwrap();
    let sys = Secured::start(g).await;
    let (g, nats, url, dir, coordinator) =
        (&sys.g, &sys.nats, &sys.url, &sys.dir, &sys.coordinator);
    let spawn = |name: &str, args: &[&str], id: &str| sys.spawn(name, args, id);
    let pa = spawn("a", &["participant", "--service", "a"], "a");
    let pb = spawn("b", &["participant", "--service", "b"], "b");
    let ledger = {
        let script = format!(
            "{}/participants/python/ledger.py",
            env!("CARGO_MANIFEST_DIR")
        );
        let env = env_of(url, g.get("ledger").unwrap());
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Proc::spawn_bin(
            &python(),
            dir.path(),
            "ledger",
            &[&script, "--nats-url", url],
            &env,
        )
    };
    for p in [&pa, &pb, &ledger] {
        p.wait_for("participant ready", Duration::from_secs(30))
            .await;
    }

    let shop = connect(url, g, "shop").await;
    let client = Client::new(shop.clone(), "txn")
        .await
        .expect("client")
        .as_client("shop");
    // Good transactions, as the client identity.
    let out = client
        .submit_and_wait(
            vec![
                request(
                    "ok-1",
                    vec![
                        step("a", json!({})),
                        step("b", json!({})),
                        step("ledger", json!({"line": "sold 1 pear"})),
                    ],
                ),
                request(
                    "no-1",
                    vec![
                        step("a", json!({})),
                        step("b", json!({"vote": "abort", "reason": "closed"})),
                    ],
                ),
            ],
            Duration::from_secs(30),
        )
        .await;
    let states: Vec<TxnState> = out
        .iter()
        .map(|r| r.as_ref().expect("outcome").state)
        .collect();
    assert_eq!(
        states,
        [TxnState::Committed, TxnState::Aborted],
        "coordinator:\n{}\na:\n{}\nledger:\n{}",
        coordinator.log_text(),
        pa.log_text(),
        ledger.log_text()
    );

    // The CLI under the client's identity (its file sets submit_as, so it submits on the
    // one subject the client may publish on).
    let file = dir.path().join("cli-1.json");
    std::fs::write(
        &file,
        request("cli-1", vec![step("a", json!({}))]).to_string(),
    )
    .unwrap();
    let mut cli = spawn("cli", &["submit", file.to_str().unwrap()], "shop");
    let status = cli.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "txcoord submit as shop: {status:?}\n{}",
        cli.log_text()
    );
    assert_eq!(
        client.last_event("cli-1").await.map(|e| e.state),
        Some(TxnState::Committed)
    );
    // Waiting for the decision only: the coordinator sends it to the client's own inbox
    // (`_INBOX_shop...`), the one place the client may subscribe.
    let file = dir.path().join("cli-2.json");
    std::fs::write(
        &file,
        request("cli-2", vec![step("a", json!({})), step("b", json!({}))]).to_string(),
    )
    .unwrap();
    let mut cli = spawn(
        "cli-decided",
        &["submit", "--until", "decided", file.to_str().unwrap()],
        "shop",
    );
    let status = cli.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "txcoord submit --until decided as shop: {status:?}\n{}",
        cli.log_text()
    );

    // The API as the client: execute under its own name submits on its own subject (its
    // share); plain execute, which would escape the share, is not the client's to call.
    let answer = shop
        .request(
            "txn.api.execute.shop",
            request("api-1", vec![step("a", json!({}))])
                .to_string()
                .into(),
        )
        .await
        .expect("an answer");
    let ev: txcoord::proto::TransactionEvent =
        serde_json::from_slice(&answer.payload).expect("an outcome");
    assert_eq!(ev.state, TxnState::Committed);
    // (Read back through the coordinator's identity.)
    let operator = connect(url, g, "coordinator").await;
    let submits = txcoord::nats::jetstream(operator, Duration::from_secs(2))
        .get_stream("TXN_SUBMIT")
        .await
        .unwrap();
    let last = submits
        .direct_get_last_for_subject("txn.submit.shop")
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&last.payload).contains("api-1"),
        "the API submitted as shop"
    );
    let plain = tokio::time::timeout(
        Duration::from_secs(2),
        shop.request(
            "txn.api.execute",
            request("api-2", vec![step("a", json!({}))])
                .to_string()
                .into(),
        ),
    )
    .await;
    assert!(
        !matches!(plain, Ok(Ok(_))),
        "a client called plain execute: {plain:?}"
    );

    // A slow abort from b, and forgeries while it is on its way.
    let id = "forged-perm";
    let slow = request(
        id,
        vec![
            step("a", json!({})),
            step(
                "b",
                json!({"vote": "abort", "reason": "real refusal", "delay_ms": 1500}),
            ),
        ],
    );
    let svc_a = connect(url, g, "a").await;
    // Service a tries to read b's commands: the server refuses the subscription, so it
    // never sees b's token.
    let mut snoop = svc_a.subscribe("txn.cmd.b.>").await.unwrap();
    // What service a legitimately reads (its own commands, tokens included), watched here
    // through the coordinator's identity.
    let admin = connect(url, g, "coordinator").await;
    let mut a_cmds = admin.subscribe("txn.cmd.a.>").await.unwrap();
    admin.flush().await.unwrap();
    let submit = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .submit_and_wait(vec![slow], Duration::from_secs(30))
                .await
        })
    };
    let vote = json!({"txn_id": id, "service": "b", "step": 1, "kind": "prepare",
        "outcome": "ready", "attempt": 1});
    // The client may not vote, write the log or send commands.
    refused(&shop, &format!("txn.reply.b.{id}"), &vote).await;
    refused(&shop, &format!("txn.reply.{id}"), &vote).await;
    refused(
        &shop,
        &format!("txn.log.{id}"),
        &json!({"txn_id": id, "state": "committed"}),
    )
    .await;
    refused(
        &shop,
        &format!("txn.cmd.b.{id}"),
        &json!({"kind": "commit"}),
    )
    .await;
    // Nor submit as another client (or as nobody), to spend someone else's share.
    refused(&shop, "txn.submit.other", &request("as-other", vec![])).await;
    refused(&shop, "txn.submit", &request("as-nobody", vec![])).await;
    // Nor reach the micro-service endpoints, which answer any reply subject.
    assert!(
        shop.send_request(
            "$SRV.STATS.txcoord",
            async_nats::Request::new()
                .payload("".into())
                .timeout(Some(Duration::from_secs(1)))
        )
        .await
        .is_err(),
        "a client reached $SRV"
    );
    // Service a may not vote on b's subject, nor on the shared old one.
    refused(&svc_a, &format!("txn.reply.b.{id}"), &vote).await;
    refused(&svc_a, &format!("txn.reply.{id}"), &vote).await;
    // On its own subject it may publish, and it knows its own token (it reads its own
    // commands), but that token does not make a vote for b.
    let msg = tokio::time::timeout(Duration::from_secs(10), a_cmds.next())
        .await
        .expect("a's prepare")
        .unwrap();
    let cmd: txcoord::proto::ParticipantCommand = serde_json::from_slice(&msg.payload).unwrap();
    let mut forged = vote.clone();
    forged["token"] = json!(cmd.token.expect("a token"));
    let js = txcoord::nats::jetstream(svc_a.clone(), Duration::from_secs(2));
    js.publish(format!("txn.reply.a.{id}"), forged.to_string().into())
        .await
        .unwrap()
        .await
        .expect("a may publish on its own reply subject");
    let out = submit.await.unwrap().remove(0).expect("outcome");
    assert_eq!(out.state, TxnState::Aborted, "{out:?}");
    assert_eq!(
        out.reason,
        Some(Reason::VoteAbort {
            service: "b".into(),
            step: 1,
            message: "real refusal".into()
        })
    );
    // The coordinator reads the forged reply (it may land after the outcome) and refuses it.
    let start = std::time::Instant::now();
    loop {
        let stats = admin
            .request("$SRV.STATS.txcoord", "".into())
            .await
            .expect("stats");
        let stats: Value = serde_json::from_slice(&stats.payload).unwrap();
        if stats["endpoints"][0]["data"]["rejected_replies"].as_u64() >= Some(1) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // b's prepare, its resends and its abort went out meanwhile: none reached service a.
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), snoop.next()).await {
        panic!("service a read b's command on {}", m.subject);
    }
    let log = nats_log(nats);
    assert!(
        log.contains("Violation"),
        "the server refused the forgeries:\n{log}"
    );
}

fn nats_log(nats: &NatsServer) -> String {
    std::fs::read_to_string(nats.store().join("nats.log")).unwrap_or_default()
}

/// What compose.yaml does, without containers: `txcoord auth` writes the files, nats-server
/// loads the block, every process starts with `--config <its file>`, and the order demo
/// (with the coordinator's identity, as compose runs it) places its orders and its
/// invariants hold; the operator's file lists them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_demo_runs_under_the_generated_files() {
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("auth");
    let auth_dir = auth.to_str().unwrap();
    let mut gen_auth = Proc::spawn(
        dir.path(),
        "auth",
        &[
            "auth",
            "--service",
            "inventory",
            "--service",
            "payment",
            "--service",
            "order",
            "--client",
            "shop",
            "--operator",
            "ops",
            "--out",
            auth_dir,
        ],
        &[],
    );
    assert!(gen_auth.wait_exit(Duration::from_secs(30)).await.success());
    let block = std::fs::read_to_string(auth.join("nats-auth.conf")).unwrap();
    let nats = NatsServer::start_configured(None, None, "", &block).expect("nats");
    let url = nats.url();
    let config = |name: &str| format!("{auth_dir}/{name}.toml");
    let env = [("TXCOORD_NATS_URL", url.as_str())];
    let coordinator = Proc::spawn(
        dir.path(),
        "coordinator",
        &["--config", &config("coordinator"), "serve"],
        &env,
    );
    coordinator
        .wait_for("coordinator ready", Duration::from_secs(30))
        .await;
    let service = |name: &str, bin: &str, seeds: &[&str]| {
        let file = config(name);
        let mut args = vec!["--config", file.as_str()];
        for s in seeds {
            args.extend(["--seed", s]);
        }
        Proc::spawn_bin(bin, dir.path(), name, &args, &env)
    };
    let services = [
        service(
            "inventory",
            &service_bin("txcoord-inventory"),
            &["apple=400", "pear=150", "plum=60", "rare=6"],
        ),
        service(
            "payment",
            &service_bin("txcoord-payment"),
            &["alice=400000", "bob=150000", "dave=300000", "carol=900"],
        ),
        service("order", &service_bin("txcoord-order"), &[]),
    ];
    let demo = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_txcoord"))
            .args([
                "--config",
                &config("coordinator"),
                "demo",
                "--external",
                "--orders",
                "40",
            ])
            .env("TXCOORD_NATS_URL", &url)
            .env("TXCOORD_LOG", "warn")
            .output(),
    )
    .await
    .expect("the demo finishes")
    .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&demo.stdout);
    let logs: Vec<String> = services.iter().map(|p| p.log_text()).collect();
    assert!(
        demo.status.success() && stdout.contains("invariants: OK"),
        "demo: {:?}\n{stdout}\n{}\ncoordinator:\n{}\nservices:\n{}",
        demo.status,
        String::from_utf8_lossy(&demo.stderr),
        coordinator.log_text(),
        logs.join("\n")
    );
    // The operator's file (as compose generates it): readable by its owner only, and
    // enough to list what the demo did.
    let ops = auth.join("ops.toml");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&ops).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "{}", ops.display());
    let list = tokio::process::Command::new(env!("CARGO_BIN_EXE_txcoord"))
        .args(["--config", &config("ops"), "list", "--limit", "5"])
        .env("TXCOORD_NATS_URL", &url)
        .env("TXCOORD_LOG", "warn")
        .output()
        .await
        .expect("list runs");
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.status.success() && listed.lines().count() >= 5,
        "list as the operator: {:?}\n{listed}\n{}",
        list.status,
        String::from_utf8_lossy(&list.stderr)
    );
    assert!(
        !nats_log(&nats).contains("Permissions Violation"),
        "something in the compose setup needs a permission it lacks:\n{}",
        nats_log(&nats)
    );
}

/// The `txcoord` CLI as one generated identity: its output, with a bound on the wait.
async fn cli_as(url: &str, id: &Identity, args: &[&str]) -> std::process::Output {
    tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_txcoord"))
            .args(args)
            .envs(env_of(url, id))
            .env("TXCOORD_LOG", "warn")
            .output(),
    )
    .await
    .expect("the CLI finishes")
    .expect("the CLI runs")
}

/// An operator identity (`txcoord auth --operator`) does an operator's work without the
/// coordinator's password: lists, shows and reads transactions, asks `$SRV` for the
/// coordinator's stats, and aborts an undecided transaction with `txcoord resolve`, whose
/// audit record names it. The server refuses every write outside that: a record, a
/// submission, an execute, a command, a vote, and deleting the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_reads_and_resolves_and_writes_nothing_else() {
    let g = txcoord::authgen::generate_with_operators(
        "txn",
        &["a".into()],
        &["shop".into()],
        &["ana".into()],
    )
    .unwrap();
    let sys = Secured::start(g).await;
    let (g, nats, url) = (&sys.g, &sys.nats, &sys.url);
    let spawn = |name: &str, args: &[&str], id: &str| sys.spawn(name, args, id);
    let pa = spawn("a", &["participant", "--service", "a"], "a");
    pa.wait_for("participant ready", Duration::from_secs(30))
        .await;
    let shop = connect(url, g, "shop").await;
    let client = Client::new(shop.clone(), "txn")
        .await
        .expect("client")
        .as_client("shop");
    let out = client
        .submit_and_wait(
            vec![request("op-ok", vec![step("a", json!({}))])],
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(out[0].as_ref().expect("outcome").state, TxnState::Committed);
    let ana = g.get("ana").unwrap();

    // Reading: list, show and status, from the log and the API.
    let list = cli_as(url, ana, &["list", "--json"]).await;
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.status.success() && listed.contains("op-ok"),
        "list as an operator: {:?}\n{listed}\n{}",
        list.status,
        String::from_utf8_lossy(&list.stderr)
    );
    let show = cli_as(url, ana, &["show", "op-ok", "--json"]).await;
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.status.success() && shown.contains("\"committed\""),
        "show as an operator: {:?}\n{shown}\n{}",
        show.status,
        String::from_utf8_lossy(&show.stderr)
    );
    let status = cli_as(url, ana, &["status", "op-ok"]).await;
    let ev: txcoord::proto::TransactionEvent = serde_json::from_slice(&status.stdout)
        .unwrap_or_else(|e| {
            panic!(
                "status as an operator: {e}\n{}",
                String::from_utf8_lossy(&status.stderr)
            )
        });
    assert_eq!(ev.state, TxnState::Committed);
    let op = connect(url, g, "ana").await;
    let stats = op
        .request("$SRV.STATS.txcoord", "".into())
        .await
        .expect("an operator reads the coordinator's stats");
    let stats: Value = serde_json::from_slice(&stats.payload).unwrap();
    assert!(
        stats["endpoints"][0]["data"]["committed"].as_u64() >= Some(1),
        "{stats}"
    );

    // Acting: an undecided transaction (its second step is slow to vote; two steps, so it
    // runs both phases) aborted by the operator; the outcome names who asked and why.
    let slow = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .submit_and_wait(
                    vec![request(
                        "op-slow",
                        vec![step("a", json!({})), step("a", json!({"delay_ms": 4000}))],
                    )],
                    Duration::from_secs(30),
                )
                .await
        })
    };
    let start = std::time::Instant::now();
    while client.last_event("op-slow").await.map(|e| e.state) != Some(TxnState::Preparing) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "op-slow never prepared"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resolve = cli_as(
        url,
        ana,
        &[
            "resolve",
            "op-slow",
            "abort",
            "--reason",
            "customer cancelled",
            "--by",
            "ana",
        ],
    )
    .await;
    assert!(
        resolve.status.success(),
        "resolve as an operator: {:?}\n{}\n{}",
        resolve.status,
        String::from_utf8_lossy(&resolve.stdout),
        String::from_utf8_lossy(&resolve.stderr)
    );
    let out = slow.await.unwrap().remove(0).expect("outcome");
    assert_eq!(out.state, TxnState::Aborted, "{out:?}");
    assert_eq!(
        out.reason,
        Some(Reason::Operator {
            by: "ana".into(),
            message: "customer cancelled".into()
        })
    );

    // Writing anything else is refused by the server.
    let id = "op-forged";
    refused(
        &op,
        &format!("txn.log.{id}"),
        &json!({"txn_id": id, "state": "committed"}),
    )
    .await;
    refused(
        &op,
        "txn.submit.shop",
        &request(id, vec![step("a", json!({}))]),
    )
    .await;
    refused(&op, "txn.submit", &request(id, vec![step("a", json!({}))])).await;
    refused(&op, &format!("txn.cmd.a.{id}"), &json!({"kind": "commit"})).await;
    refused(
        &op,
        &format!("txn.reply.a.{id}"),
        &json!({"txn_id": id, "service": "a", "step": 0, "kind": "prepare", "outcome": "ready"}),
    )
    .await;
    for subject in ["txn.api.execute.shop", "$JS.API.STREAM.DELETE.TXN_EVENTS"] {
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            op.request(subject, request(id, vec![]).to_string().into()),
        )
        .await;
        assert!(
            !matches!(answer, Ok(Ok(_))),
            "an operator got an answer on {subject}: {answer:?}"
        );
    }
    let js = txcoord::nats::jetstream(op.clone(), Duration::from_secs(2));
    assert!(
        js.get_stream("TXN_EVENTS").await.is_ok(),
        "the log is still there"
    );
    // The server refused exactly those, and nothing the operator's reading and resolving
    // needed (a missing permission there would show as a violation too).
    let log = nats_log(nats);
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("user:operator-ana") && l.contains("Violation"))
        .filter_map(|l| l.split(" - Subject ").nth(1))
        .collect();
    assert_eq!(
        refusals,
        [
            "\"txn.log.op-forged\"",
            "\"txn.submit.shop\"",
            "\"txn.submit\"",
            "\"txn.cmd.a.op-forged\"",
            "\"txn.reply.a.op-forged\"",
            "\"txn.api.execute.shop\"",
            "\"$JS.API.STREAM.DELETE.TXN_EVENTS\"",
        ],
        "{log}"
    );
}
