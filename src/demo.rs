//! `txcoord demo`: the order demo. It starts nats-server (unless given a URL), the
//! coordinator and the inventory, payment and order services as real child processes. It
//! places orders concurrently, prints a summary, checks the invariants, and stops everything.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use serde_json::{Value, json};
use txcoord::kvtable::Table;
use txcoord::natsserver::NatsServer;
use txcoord::rng::XorShift;
// The services' own record types: the demo reads what they wrote.
use txcoord_examples::inventory::Stock;
use txcoord_examples::order::{Order as OrderRecord, OrderState};
use txcoord_examples::payment::Account;

use crate::procs::{Proc, coordinator_stats, sibling, wait_consumer};
use txcoord::proto::{Reason, TransactionEvent, TxnState};

/// The demo's options.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// How many orders to place.
    #[arg(long, default_value_t = 300)]
    pub orders: usize,
    /// The nats-server binary to start (else NATS_SERVER_BIN, the project's install, PATH).
    #[arg(long)]
    pub nats_server: Option<PathBuf>,
    /// Kill the coordinator with SIGKILL mid-run and restart it.
    #[arg(long)]
    pub kill_coordinator: bool,
    /// Where to keep the server's store and the processes' logs (a temp dir otherwise).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Seed of the order generator, for a repeatable run.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Use the coordinator and services already running at --nats-url (as compose.yaml
    /// does) instead of starting them.
    #[arg(long)]
    pub external: bool,
    /// Run the orders as two-phase commits (`2pc`) or as sagas (`saga`: reserve stock, charge
    /// the card, create the order, compensating newest first when a step fails).
    #[arg(long, default_value = "2pc", value_parser = ["2pc", "saga"])]
    pub mode: String,
    /// What to run: `orders` (the order demo) or `deadlock` (transfers both ways between two
    /// lock-holding banks, with detection, with wait-die and with timeouts only).
    #[arg(long, default_value = "orders", value_parser = ["orders", "deadlock"])]
    pub scenario: String,
    /// `--scenario deadlock`: transfers per run (a third of them without detection).
    #[arg(long, default_value_t = 240)]
    pub transfers: usize,
    /// Leave out the fourth step, shipping (an HTTP service joined by `txcoord
    /// http-bridge`; it needs Python 3: TXCOORD_PYTHON, else python3).
    #[arg(long)]
    pub no_shipping: bool,
    /// With --external: the shipping service's URL (its GET /shipments is read for the
    /// invariants); without it an external run has no shipping step.
    #[arg(long)]
    pub shipping_url: Option<String>,
}

const STOCK: &[(&str, u64, u64)] = &[
    ("apple", 400, 120),
    ("pear", 150, 90),
    ("plum", 60, 300),
    ("rare", 6, 5000),
];
const ACCOUNTS: &[(&str, u64)] = &[
    ("alice", 400_000),
    ("bob", 150_000),
    ("dave", 300_000),
    ("carol", 900),
];

/// Picks from weighted choices.
fn pick<'a>(rng: &mut XorShift, weighted: &[(&'a str, u64)]) -> &'a str {
    let total: u64 = weighted.iter().map(|(_, w)| w).sum();
    let mut x = rng.below(total);
    for (v, w) in weighted {
        if x < *w {
            return v;
        }
        x -= w;
    }
    weighted[0].0
}

/// One generated order, with what it is meant to exercise.
struct Order {
    request: Value,
    sku: String,
    qty: u64,
    account: String,
    amount: u64,
}

fn generate(n: usize, seed: u64, prefix_id: &str, saga: bool, shipping: bool) -> Vec<Order> {
    let mut rng = XorShift::new(seed.wrapping_mul(0x9E3779B97F4A7C15));
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let sku = pick(
            &mut rng,
            &[("apple", 40), ("pear", 25), ("plum", 15), ("rare", 20)],
        )
        .to_string();
        let account = pick(
            &mut rng,
            &[
                ("alice", 35),
                ("bob", 25),
                ("dave", 28),
                ("carol", 9),
                ("mallory", 3),
            ],
        )
        .to_string();
        let qty = 1 + rng.below(4);
        let price = STOCK
            .iter()
            .find(|s| s.0 == sku)
            .map(|s| s.2)
            .unwrap_or(100);
        let amount = qty * price;
        // A few reuse an earlier order id (duplicate), a few carry a stale expected version,
        // a few meet a slow payment service (prepare timeout).
        let order_id = if i > 10 && rng.below(50) == 0 {
            format!("{prefix_id}-ord-{}", rng.below(i as u64))
        } else {
            format!("{prefix_id}-ord-{i}")
        };
        let mut inv = json!({"sku": sku, "qty": qty});
        if i > n / 2 && rng.below(40) == 0 {
            inv["expected_version"] = json!(0);
        }
        let mut pay = json!({"account": account, "amount": amount});
        let mut timeout_ms = 5_000;
        if i % 50 == 25 {
            pay["delay_ms"] = json!(1_500);
            timeout_ms = 700;
        }
        let order =
            json!({"order_id": order_id, "account": account, "items": [{"sku": sku, "qty": qty}]});
        let mut request = if saga {
            // A saga step has its own timeout: the slow payment times out and is compensated
            // (it may have charged), then the stock is put back.
            let mut pay_step = json!({"service": "payment", "action": "charge", "payload": pay});
            if timeout_ms != 5_000 {
                pay_step["timeout_ms"] = json!(timeout_ms);
            }
            json!({
                "txn_id": format!("{prefix_id}-txn-{i}"),
                "mode": "saga",
                "metadata": {"demo": true},
                "steps": [
                    {"service": "inventory", "action": "reserve", "payload": inv, "compensate": "restock"},
                    pay_step,
                    {"service": "order", "action": "create", "payload": order, "compensate": "cancel"},
                ],
            })
        } else {
            json!({
                "txn_id": format!("{prefix_id}-txn-{i}"),
                "mode": "2pc",
                "timeout_ms": timeout_ms,
                "metadata": {"demo": true},
                "steps": [
                    {"service": "inventory", "action": "reserve", "payload": inv},
                    {"service": "payment", "action": "charge", "payload": pay},
                    {"service": "order", "action": "create", "payload": order},
                ],
            })
        };
        // The fourth step: shipping, over HTTP.
        if shipping && let Some(steps) = request["steps"].as_array_mut() {
            let mut ship =
                json!({"service": "shipping", "action": "ship", "payload": {"order_id": order_id}});
            if saga {
                ship["compensate"] = json!("cancel");
            }
            steps.push(ship);
        }
        out.push(Order {
            request,
            sku,
            qty,
            account,
            amount,
        });
    }
    out
}

/// The processes the demo runs (none with `--external`), stopped on drop.
struct Cluster {
    server: Option<NatsServer>,
    coordinator: Option<Proc>,
    services: Vec<Proc>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(c) = &mut self.coordinator {
            c.stop();
        }
        for s in &mut self.services {
            s.stop();
        }
        if let Some(s) = &mut self.server {
            s.stop();
        }
    }
}

/// What the three services hold, read from their KV buckets.
#[derive(Debug, Clone)]
struct Snapshot {
    stock: BTreeMap<String, Stock>,
    accounts: BTreeMap<String, Account>,
    orders: BTreeMap<String, OrderRecord>,
}

struct Tables {
    stock: Table<Stock>,
    accounts: Table<Account>,
    orders: Table<OrderRecord>,
}

impl Tables {
    async fn open(js: &async_nats::jetstream::Context, suffix: &str) -> anyhow::Result<Tables> {
        Ok(Tables {
            stock: Table::open(js, &format!("inventory_data{suffix}"), 1).await?,
            accounts: Table::open(js, &format!("payment_data{suffix}"), 1).await?,
            orders: Table::open(js, &format!("order_data{suffix}"), 1).await?,
        })
    }

    async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        Ok(Snapshot {
            stock: self.stock.all().await?,
            accounts: self.accounts.all().await?,
            orders: self.orders.all().await?,
        })
    }
}

fn holds_nothing(s: &Snapshot) -> bool {
    s.stock.values().all(|x| x.holds.is_empty())
        && s.accounts.values().all(|a| a.holds.is_empty())
        && s.orders.values().all(|o| o.state == OrderState::Confirmed)
}

/// Starts (or, with `--external`, finds) nats-server, the coordinator and the services.
/// Returns the cluster, the URL, the subject prefix and the bucket suffix.
async fn start_cluster(
    args: &DemoArgs,
    nats_url: Option<String>,
    dir: &std::path::Path,
    run_id: &str,
) -> anyhow::Result<(Cluster, String, String, String, Option<String>)> {
    let mut cluster = Cluster {
        server: None,
        coordinator: None,
        services: Vec::new(),
    };
    if args.external {
        let Some(url) = nats_url else {
            bail!("--external needs --nats-url (or TXCOORD_NATS_URL)")
        };
        if args.kill_coordinator {
            bail!("--kill-coordinator needs a coordinator the demo started; drop --external");
        }
        return Ok((
            cluster,
            url,
            "txn".into(),
            String::new(),
            args.shipping_url.clone(),
        ));
    }
    let (url, prefix, suffix) = match nats_url {
        // Someone else's server: keep this run's subjects and buckets apart.
        Some(u) => (u, format!("demo-{run_id}"), format!("_{run_id}")),
        None => {
            let s =
                NatsServer::start_with(args.nats_server.as_deref(), Some(&dir.join("nats")), "")
                    .context("starting nats-server")?;
            let u = s.url();
            cluster.server = Some(s);
            (u, "txn".to_string(), String::new())
        }
    };
    let me = std::env::current_exe()?.display().to_string();
    let coord_cmd = vec![
        me,
        "serve".into(),
        "--nats-url".into(),
        url.clone(),
        "--prefix".into(),
        prefix.clone(),
        // A restarted coordinator (--kill-coordinator) waits for the dead one's lease to
        // expire: keep that short for the demo.
        "--lease-ttl-ms".into(),
        "2000".into(),
    ];
    cluster.coordinator = Some(crate::procs::spawn(
        "coordinator",
        coord_cmd,
        dir.join("coordinator.log"),
    )?);
    let seeds: [(&str, Vec<String>); 3] = [
        (
            "inventory",
            STOCK.iter().map(|(k, n, _)| format!("{k}={n}")).collect(),
        ),
        (
            "payment",
            ACCOUNTS.iter().map(|(k, n)| format!("{k}={n}")).collect(),
        ),
        ("order", Vec::new()),
    ];
    for (name, seeds) in seeds {
        let mut cmd = vec![
            sibling(&format!("txcoord-{name}"))?,
            "--nats-url".into(),
            url.clone(),
            "--prefix".into(),
            prefix.clone(),
            "--bucket".into(),
            format!("{name}_data{suffix}"),
        ];
        for s in seeds {
            cmd.push("--seed".into());
            cmd.push(s);
        }
        cluster.services.push(crate::procs::spawn(
            name,
            cmd,
            dir.join(format!("{name}.log")),
        )?);
    }
    let shipping = if args.no_shipping {
        None
    } else {
        Some(start_shipping(&mut cluster, &url, &prefix, dir)?)
    };
    Ok((cluster, url, prefix, suffix, shipping))
}

/// Starts the shipping service (Python, HTTP) and the bridge that joins it; returns its URL.
fn start_shipping(
    cluster: &mut Cluster,
    url: &str,
    prefix: &str,
    dir: &std::path::Path,
) -> anyhow::Result<String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/participants/http/shipping.py");
    if !std::path::Path::new(script).is_file() {
        bail!("{script} not found (the demo runs it from the source tree); pass --no-shipping");
    }
    let python = std::env::var("TXCOORD_PYTHON").unwrap_or_else(|_| "python3".into());
    let port = crate::procs::free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    cluster.services.push(crate::procs::spawn(
        "shipping",
        vec![
            python,
            script.into(),
            "--port".into(),
            port.to_string(),
            "--db".into(),
            dir.join("shipping.sqlite").display().to_string(),
        ],
        dir.join("shipping.log"),
    )?);
    let me = std::env::current_exe()?.display().to_string();
    cluster.services.push(crate::procs::spawn(
        "http-bridge",
        vec![
            me,
            "--nats-url".into(),
            url.into(),
            "--prefix".into(),
            prefix.into(),
            "http-bridge".into(),
            "--service".into(),
            format!("shipping={base}"),
        ],
        dir.join("http-bridge.log"),
    )?);
    Ok(base)
}

/// Every shipment the shipping service knows, by branch (`<txn_id>:<step>`).
async fn shipments(base: &str) -> anyhow::Result<BTreeMap<String, (String, u64)>> {
    let rows: Vec<Value> = reqwest::get(format!("{base}/shipments"))
        .await
        .with_context(|| format!("GET {base}/shipments"))?
        .json()
        .await
        .with_context(|| format!("GET {base}/shipments: not JSON"))?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                r["branch"].as_str().unwrap_or_default().to_string(),
                (
                    r["state"].as_str().unwrap_or_default().to_string(),
                    r["commits"].as_u64().unwrap_or(0),
                ),
            )
        })
        .collect())
}

/// Shipping's invariants: every order that went through was shipped exactly once; none
/// that did not was shipped or is still held.
fn check_shipping(
    shipped: &BTreeMap<String, (String, u64)>,
    orders: &[Order],
    committed: &[&Order],
) -> Vec<String> {
    let mut broken = Vec::new();
    let ok: HashSet<&str> = committed
        .iter()
        .filter_map(|o| o.request["txn_id"].as_str())
        .collect();
    for o in orders {
        let id = o.request["txn_id"].as_str().unwrap_or_default();
        let Some(step) = o.request["steps"]
            .as_array()
            .map(|s| s.len().saturating_sub(1))
        else {
            continue;
        };
        let rec = shipped.get(&format!("{id}:{step}"));
        match (ok.contains(id), rec) {
            (true, Some((state, 1))) if state == "shipped" => {}
            (true, other) => {
                broken.push(format!("{id} went through but its shipment is {other:?}"))
            }
            (false, Some((state, _))) if state == "shipped" || state == "held" => broken.push(
                format!("{id} did not go through but its shipment is {state}"),
            ),
            (false, _) => {}
        }
    }
    broken
}

/// Runs the demo; `Ok(true)` when every invariant holds.
/// With `--external`, the demo connects with `cfg`'s NATS credentials and submits as its
/// `submit_as` client; it reads the services' data buckets to check the invariants, so the
/// identity must be allowed to (the coordinator's is; a client's is not).
pub async fn run(
    args: DemoArgs,
    nats_url: Option<String>,
    cfg: &txcoord::config::Config,
) -> anyhow::Result<bool> {
    if args.scenario == "deadlock" {
        // It starts its own nats-server, so that its three runs cannot disturb anyone's.
        if args.external || args.kill_coordinator {
            bail!(
                "--scenario deadlock starts its own nats-server and processes: drop --external and --kill-coordinator"
            );
        }
        return crate::deadlock_demo::run(args.transfers, args.seed, args.nats_server.as_deref())
            .await;
    }
    let tmp;
    let dir: PathBuf = match &args.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("txcoord-demo-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let (mut cluster, url, prefix, suffix, shipping) =
        start_cluster(&args, nats_url, &dir, &run_id).await?;
    eprintln!("txcoord demo: NATS at {url}, logs in {}", dir.display());

    // Ready means: the coordinator's micro service answers (it registers after recovery) and
    // each service's durable consumer exists.
    let (auth, submit_as) = if args.external {
        (cfg.nats.clone(), cfg.submit_as.as_str())
    } else {
        (Default::default(), "")
    };
    let nc = txcoord::nats::connect(&url, &auth, "txcoord-demo", true).await?;
    coordinator_stats(&nc, Duration::from_secs(60))
        .await
        .context("coordinator not ready")?;
    let subjects = txcoord::proto::Subjects::new(prefix.clone());
    let js = txcoord::nats::jetstream(nc.clone(), Duration::from_secs(2));
    let names: Vec<&str> = ["inventory", "payment", "order"]
        .into_iter()
        .chain(shipping.is_some().then_some("shipping"))
        .collect();
    for name in names {
        wait_consumer(
            &js,
            &subjects.command_stream(),
            name,
            Duration::from_secs(60),
        )
        .await
        .with_context(|| format!("{name} not ready (logs in {})", dir.display()))?;
    }
    let tables = Tables::open(&js, &suffix).await?;
    // The invariants compare against what the services held before the first order.
    let before = loop {
        let s = tables.snapshot().await?;
        if !s.stock.is_empty() && !s.accounts.is_empty() {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if !holds_nothing(&before) {
        bail!(
            "the services hold unfinished transactions from earlier; let them settle and run again"
        );
    }

    let client = txcoord::client::Client::new(nc.clone(), &prefix)
        .await?
        .submitting_as(submit_as);
    let orders = generate(
        args.orders,
        args.seed,
        &run_id,
        args.mode == "saga",
        shipping.is_some(),
    );
    let requests: Vec<Value> = orders.iter().map(|o| o.request.clone()).collect();
    let bar = indicatif::ProgressBar::new(orders.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} placing orders [{bar:40}] {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut latencies = hdrhistogram::Histogram::<u64>::new(3)?;
    let kill_at = args.kill_coordinator.then_some(orders.len() as u64 / 3);
    let (kill_tx, mut kill_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut killed_after = None;
    let started = Instant::now();
    let outcomes = {
        let mut done = 0u64;
        let watch = client.submit_and_watch(requests, Duration::from_secs(300), |ev, latency| {
            done += 1;
            bar.inc(1);
            if succeeded(ev.state) {
                let _ = latencies.record(latency.as_micros() as u64);
            }
            if Some(done) == kill_at {
                let _ = kill_tx.send(());
            }
        });
        tokio::pin!(watch);
        loop {
            tokio::select! {
                out = &mut watch => break out,
                Some(()) = kill_rx.recv() => {
                    if let Some(c) = &mut cluster.coordinator {
                        bar.set_message("coordinator killed (SIGKILL), restarting");
                        c.kill9();
                        killed_after = Some(bar.position());
                        c.restart()?;
                    }
                }
            }
        }
    };
    let elapsed = started.elapsed();
    bar.finish_with_message("done");
    // After a kill, this also waits until the restarted coordinator has recovered.
    let stats = coordinator_stats(&nc, Duration::from_secs(60)).await?;

    // Aborts are final once queued for the services; give them a moment to release holds.
    let settle = Instant::now();
    let after = loop {
        let s = tables.snapshot().await?;
        if holds_nothing(&s) || settle.elapsed() > Duration::from_secs(30) {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let mut events: HashMap<String, TransactionEvent> = HashMap::new();
    let mut unfinished = 0;
    for (o, r) in orders.iter().zip(outcomes) {
        match r {
            Ok(ev) => {
                events.insert(ev.txn_id.clone(), ev);
            }
            Err(_) => {
                unfinished += 1;
                let id = o.request["txn_id"].as_str().unwrap_or_default().to_string();
                if let Some(ev) = client.last_event(&id).await {
                    events.insert(id, ev);
                }
            }
        }
    }
    let committed: Vec<&Order> = orders
        .iter()
        .filter(|o| {
            events
                .get(o.request["txn_id"].as_str().unwrap_or_default())
                .is_some_and(|e| succeeded(e.state))
        })
        .collect();

    report(
        &orders, &events, &committed, &after, unfinished, elapsed, &latencies,
    );
    if let Some(n) = killed_after {
        let resumed = stats["recovered"].as_u64().unwrap_or(0);
        println!(
            "coordinator: SIGKILLed after {n} outcomes, restarted, resumed {resumed} in-flight transactions from its log"
        );
    }
    let mut broken = check(&before, &after, &committed, &run_id);
    if let Some(base) = &shipping {
        // Phase-2 confirmations may still be on their way to the HTTP service.
        let settle = Instant::now();
        loop {
            let shipped = shipments(base).await?;
            let found = check_shipping(&shipped, &orders, &committed);
            if found.is_empty() || settle.elapsed() > Duration::from_secs(30) {
                let n = shipped.values().filter(|(s, _)| s == "shipped").count();
                println!("shipping: {n} shipped (over HTTP, through txcoord http-bridge)");
                broken.extend(found);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    if unfinished > 0 {
        broken.insert(0, format!("{unfinished} orders reached no outcome"));
    }
    println!();
    if broken.is_empty() {
        println!(
            "invariants: OK (stock = remaining + sold; money = balances + charged; every confirmed order has its reservation and charge{}; orders that did not go through left nothing; nothing held)",
            if shipping.is_some() {
                " and was shipped once"
            } else {
                ""
            }
        );
    } else {
        println!("invariants: BROKEN");
        for b in &broken {
            println!("  - {b}");
        }
    }
    drop(cluster);
    Ok(broken.is_empty())
}

/// A committed 2PC transaction or a completed saga.
fn succeeded(state: TxnState) -> bool {
    matches!(state, TxnState::Committed | TxnState::Completed)
}

/// Prints the summary a person reads at a glance.
fn report(
    orders: &[Order],
    events: &HashMap<String, TransactionEvent>,
    committed: &[&Order],
    after: &Snapshot,
    unfinished: usize,
    elapsed: Duration,
    latencies: &hdrhistogram::Histogram<u64>,
) {
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for ev in events.values().filter(|e| !succeeded(e.state)) {
        let key = match &ev.reason {
            Some(Reason::VoteAbort {
                service, message, ..
            }) => {
                format!(
                    "{service}: {}",
                    message.split(':').next().unwrap_or(message)
                )
            }
            Some(Reason::StepFailed {
                service, message, ..
            }) => {
                format!(
                    "{service}: {}",
                    message.split(':').next().unwrap_or(message)
                )
            }
            Some(Reason::CompensationFailed { service, .. }) => {
                format!("{service}: compensation failing")
            }
            Some(Reason::Timeout { services, .. }) => format!("timeout ({})", services.join(", ")),
            Some(Reason::Deadlock { how, .. }) => format!("deadlock ({how})"),
            Some(Reason::InvalidRequest { .. }) => "invalid request".into(),
            Some(Reason::LogRefused { .. }) => "log refused a record".into(),
            Some(Reason::RolledBack { .. }) => "rolled back".into(),
            Some(Reason::Operator { by, .. }) => format!("aborted by {by}"),
            None => format!("{:?}", ev.state),
        };
        *reasons.entry(key).or_default() += 1;
    }
    println!();
    let saga = events
        .values()
        .any(|e| e.mode == txcoord::proto::Mode::Saga);
    println!(
        "== txcoord order demo ({}): {} orders in {:.2}s ==",
        if saga { "saga" } else { "2pc" },
        orders.len(),
        elapsed.as_secs_f64()
    );
    let (ok, undone) = if saga {
        ("completed  ", "compensated")
    } else {
        ("committed  ", "aborted    ")
    };
    println!("{ok}{:>5}", committed.len());
    println!("{undone}{:>5}", events.len() - committed.len());
    for (k, v) in &reasons {
        println!("  {v:>5}  {k}");
    }
    if unfinished > 0 {
        println!("no outcome {unfinished:>5}");
    }
    if !latencies.is_empty() {
        println!(
            "latency of successful orders: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            latencies.value_at_quantile(0.5) as f64 / 1000.0,
            latencies.value_at_quantile(0.99) as f64 / 1000.0,
            latencies.max() as f64 / 1000.0
        );
    }
    let stock: Vec<String> = after
        .stock
        .iter()
        .map(|(k, s)| format!("{k} {} left, {} sold (v{})", s.available, s.sold, s.version))
        .collect();
    let money: Vec<String> = after
        .accounts
        .iter()
        .map(|(k, a)| format!("{k} {} (charged {})", a.balance, a.charged))
        .collect();
    println!("stock:    {}", stock.join("; "));
    println!("balances: {}", money.join("; "));
    println!(
        "orders:   {} confirmed in all",
        after
            .orders
            .values()
            .filter(|o| o.state == OrderState::Confirmed)
            .count()
    );
}

/// One record's conservation: what was free plus used at the start is free plus used plus
/// held now; nothing is still held; and what this run used is what the successful orders
/// asked for. `before` is (free, used), `after` is (free, used, held).
fn conserved(
    broken: &mut Vec<String>,
    what: &str,
    before: (u64, u64),
    after: Option<(u64, u64, u64)>,
    want: u64,
) {
    let Some((free, used, held)) = after else {
        broken.push(format!("{what} disappeared"));
        return;
    };
    let start = before.0 + before.1;
    if free + used + held != start {
        broken.push(format!(
            "{what}: {free} free + {used} used + {held} held != {start} at the start"
        ));
    }
    if held > 0 {
        broken.push(format!("{what}: {held} still held"));
    }
    let used_now = used.saturating_sub(before.1);
    if used_now != want {
        broken.push(format!(
            "{what}: {used_now} used in this run, but the successful orders took {want}"
        ));
    }
}

/// Checks the invariants between the snapshot before the run and the one after; returns
/// what is broken.
fn check(before: &Snapshot, after: &Snapshot, committed: &[&Order], run_id: &str) -> Vec<String> {
    let mut broken = Vec::new();
    let mut sold_by: BTreeMap<&str, u64> = BTreeMap::new();
    let mut charged_by: BTreeMap<&str, u64> = BTreeMap::new();
    for o in committed {
        *sold_by.entry(&o.sku).or_default() += o.qty;
        *charged_by.entry(&o.account).or_default() += o.amount;
    }
    for (sku, b) in &before.stock {
        let after = after
            .stock
            .get(sku)
            .map(|a| (a.available, a.sold, a.holds.values().sum()));
        let want = sold_by.get(sku.as_str()).copied().unwrap_or(0);
        conserved(
            &mut broken,
            &format!("stock of {sku}"),
            (b.available, b.sold),
            after,
            want,
        );
    }
    for (acct, b) in &before.accounts {
        let after = after
            .accounts
            .get(acct)
            .map(|a| (a.balance, a.charged, a.holds.values().sum()));
        let want = charged_by.get(acct.as_str()).copied().unwrap_or(0);
        conserved(
            &mut broken,
            &format!("money of {acct}"),
            (b.balance, b.charged),
            after,
            want,
        );
    }
    // Orders of this run only (an external setup keeps earlier runs' orders).
    let ours: BTreeMap<&String, &OrderRecord> = after
        .orders
        .iter()
        .filter(|(_, o)| o.txn_id.starts_with(run_id))
        .collect();
    let committed_ids: HashSet<&str> = committed
        .iter()
        .filter_map(|o| o.request["txn_id"].as_str())
        .collect();
    for (id, rec) in &ours {
        if rec.state != OrderState::Confirmed {
            broken.push(format!("order {id} left {:?}", rec.state));
        }
        if !committed_ids.contains(rec.txn_id.as_str()) {
            broken.push(format!(
                "order {id} exists but its transaction {} did not commit",
                rec.txn_id
            ));
        }
    }
    let confirmed: HashSet<&str> = ours.values().map(|o| o.txn_id.as_str()).collect();
    for id in &committed_ids {
        if !confirmed.contains(id) {
            broken.push(format!(
                "transaction {id} committed but has no confirmed order"
            ));
        }
    }
    broken
}
