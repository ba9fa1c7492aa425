//! The fault suite's short runs: a few hundred transfers across two SDK banks and the Python
//! raw-protocol bank while coordinators, banks and nats-server (one server, or one node of a
//! 3-node cluster at a time) are killed and connections cut and delayed. Every correctness
//! check must pass; the time to recover is reported, not asserted (timing goals belong in
//! RELIABILITY.md's long run).

#[test]
fn a_short_chaos_run_passes_every_check() {
    let stdout = short_run(&["--sagas", "--seed", "11"]);
    some_saga_completed(&stdout);
}

/// Every other transfer between the two Rust banks ran as a saga, and some completed.
fn some_saga_completed(stdout: &str) {
    let sagas = stdout
        .lines()
        .find_map(|l| l.strip_prefix("sagas: "))
        .unwrap_or_else(|| panic!("no sagas line in:\n{stdout}"));
    let completed: usize = sagas
        .split_once("sagas: ")
        .and_then(|(_, rest)| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(completed > 0, "no saga completed: {sagas}");
}

#[test]
fn a_short_chaos_run_on_a_three_node_cluster_passes_every_check() {
    let stdout = short_run(&[
        "--cluster",
        "--quorum-losses",
        "1",
        "--partitions",
        "2",
        "--sagas",
        "--seed",
        "3",
    ]);
    let cluster = stdout
        .lines()
        .find_map(|l| l.strip_prefix("cluster: "))
        .unwrap_or_else(|| panic!("no cluster line in:\n{stdout}"));
    assert!(
        cluster.starts_with(
            "3 nodes, the log at 3 replicas; 1 quorum losses (two nodes SIGKILLed at once), 2 partitions (one node cut off from the others); server faults by node: n"
        ),
        "{cluster}"
    );
    some_saga_completed(&stdout);
}

/// One run at a time: each starts its own servers and a dozen processes on a small machine,
/// and the faults should meet the load the long run has, not twice that.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `txcoord chaos` with the short run's faults and `extra` flags, checks every line of
/// its report, and returns the report.
fn short_run(extra: &[&str]) -> String {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("run");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_txcoord"))
        .args([
            "chaos",
            "--transfers",
            "300",
            "--coordinator-kills",
            "4",
            "--participant-kills",
            "4",
            "--server-restarts",
            "2",
            "--cuts",
            "3",
            "--delays",
            "3",
            "--settle-secs",
            "180",
        ])
        .args(extra)
        .arg("--data-dir")
        .arg(&data)
        .env("TXCOORD_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "chaos failed:\n{stdout}\n{stderr}\nlogs in {}",
        data.display()
    );
    for check in [
        "check every transfer terminal: ok (300 of 300",
        "check atomicity, branch by branch: ok",
        "check money conserved exactly: ok (",
        "check nothing left held: ok",
        "check one outcome per txn_id, no record after a terminal record: ok",
        "check no command contradicts a branch's outcome: ok",
        "check every decision a client was told is durable and kept: ok",
        "check time from the last fault to the last terminal transfer:",
        "chaos: PASSED",
    ] {
        assert!(stdout.contains(check), "no {check:?} in:\n{stdout}");
    }
    // The coordinators told the run's inbox decisions to commit, under the same faults.
    let told = stdout
        .lines()
        .find_map(|l| l.split_once("decisions told (").map(|(_, rest)| rest))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no decisions line in:\n{stdout}"));
    assert!(told > 0, "no decision to commit was told:\n{stdout}");
    // Withdrawals ran in one phase at the SDK banks, under the same faults.
    let one_phase = stdout
        .lines()
        .find_map(|l| l.strip_prefix("one phase: "))
        .unwrap_or_else(|| panic!("no one-phase line in:\n{stdout}"));
    let sent: usize = one_phase
        .split(", ")
        .nth(1)
        .and_then(|p| p.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(sent > 0, "no commit_one_phase was sent: {one_phase}");
    // Every planned fault happened, and all three banks took part.
    assert!(
        stdout.contains("faults: 4 coordinator SIGKILLs")
            && stdout.contains("4 participant SIGKILLs")
            && stdout.contains("1 nats-server restarts and 1 SIGKILLs")
            && stdout.contains("3 connection cuts, 3 delay spells"),
        "{stdout}"
    );
    assert!(
        stdout.contains("bank-py (Python, raw protocol)"),
        "{stdout}"
    );
    stdout.into_owned()
}
