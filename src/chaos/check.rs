//! The end checks of `txcoord chaos`, as pure functions over what the run collected: the
//! transfers it asked for, every record of the coordinator's log, the commands it saw on the
//! bus, and what each bank holds at the end. Each check gives one line of the report.

use std::collections::{BTreeMap, HashMap};

use txcoord::proto::{CommandKind, TxnState};

/// One transfer: a debit (step 0) at one bank, a credit (step 1) at another (or the same).
#[derive(Debug, Clone)]
pub struct Transfer {
    /// The transaction id.
    pub id: String,
    /// (bank, account) debited.
    pub from: (String, String),
    /// (bank, account) credited; `None`: a withdrawal, the money leaves the banks. A
    /// withdrawal is a transaction of one step, which a bank on the SDK commits in one phase.
    pub to: Option<(String, String)>,
    /// How much.
    pub amount: u64,
    /// Run as a saga (between two Rust banks): execute the debit, then the credit; a step
    /// that fails or times out has the executed ones compensated. `completed` counts as
    /// committed, `compensated` as aborted, and an executed step as a committed branch.
    pub saga: bool,
}

/// One record of the log, in log order.
#[derive(Debug, Clone)]
pub struct Record {
    /// Its state.
    pub state: TxnState,
    /// When the coordinator made it, Unix milliseconds.
    pub at_ms: u64,
}

/// One command seen on `<prefix>.cmd.>`.
#[derive(Debug, Clone)]
pub struct Command {
    /// The transaction.
    pub txn_id: String,
    /// The service it was sent to.
    pub service: String,
    /// The branch's step.
    pub step: usize,
    /// What it asked.
    pub kind: CommandKind,
}

/// A decision or outcome a coordinator sent to the run's inbox (`Txcoord-Decided-To`,
/// `Txcoord-Outcome-To`).
#[derive(Debug, Clone)]
pub struct Notice {
    /// The transaction (or, for a message that was no event, its text).
    pub txn_id: String,
    /// The state it announced; `None`: the message was not a transaction event.
    pub state: Option<TxnState>,
}

/// Where a bank's branch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Branch {
    /// Voted ready, no decision applied.
    Prepared,
    /// Committed: the money moved.
    Committed,
    /// Aborted, refused, or aborted before any prepare: nothing moved.
    NotApplied,
}

/// One account at the end.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct Account {
    /// Spendable money.
    pub balance: u64,
    /// Held by prepared debits.
    pub held: u64,
    /// Waiting in prepared credits.
    pub incoming: u64,
}

/// One bank at the end.
#[derive(Debug, Clone, Default)]
pub struct Bank {
    /// Accounts by name.
    pub accounts: BTreeMap<String, Account>,
    /// Branches by `<txn_id>.<step>`.
    pub branches: HashMap<String, Branch>,
    /// Protocol violations it logged.
    pub violations: usize,
}

/// Everything the checks look at.
pub struct Evidence<'a> {
    /// The transfers asked for.
    pub transfers: &'a [Transfer],
    /// Every record of the log, by transaction, in log order.
    pub log: &'a HashMap<String, Vec<Record>>,
    /// Every command seen.
    pub commands: &'a [Command],
    /// Every decision and outcome sent to the run's inbox.
    pub notices: &'a [Notice],
    /// Each bank's end state, by service.
    pub banks: &'a BTreeMap<String, Bank>,
    /// Each account's balance before the run, by (bank, account).
    pub initial: &'a BTreeMap<(String, String), u64>,
    /// When the last fault ended, Unix milliseconds.
    pub last_fault_ms: u64,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Line {
    /// Short name.
    pub name: &'static str,
    /// Passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

fn line(name: &'static str, problems: &[String], fine: String) -> Line {
    if problems.is_empty() {
        return Line {
            name,
            ok: true,
            detail: fine,
        };
    }
    let mut detail = format!("{} problem(s): ", problems.len());
    detail.push_str(
        &problems
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("; "),
    );
    if problems.len() > 5 {
        detail.push_str("; ...");
    }
    Line {
        name,
        ok: false,
        detail,
    }
}

/// The outcome a transaction's log ends with: committed or completed (true), aborted or
/// compensated (false), or none.
pub fn outcome(records: Option<&Vec<Record>>) -> Option<bool> {
    match records?.last()?.state {
        TxnState::Committed | TxnState::Completed => Some(true),
        TxnState::Aborted | TxnState::Rejected | TxnState::Compensated => Some(false),
        _ => None,
    }
}

/// Runs every correctness check, in report order.
pub fn all(e: &Evidence<'_>) -> Vec<Line> {
    vec![
        terminal(e),
        atomicity(e),
        money(e),
        nothing_held(e),
        one_outcome(e),
        no_contradiction(e),
        decisions_kept(e),
    ]
}

/// Every decision a client was told is a record of the log (so it was durable) and agrees
/// with the transaction's outcome: `committing` ends `committed`, `aborting` ends aborted;
/// an outcome told is the log's too.
fn decisions_kept(e: &Evidence<'_>) -> Line {
    let mut problems = Vec::new();
    let (mut commits, mut aborts, mut outcomes) = (0, 0, 0);
    for n in e.notices {
        let Some(state) = n.state else {
            problems.push(format!("not a transaction event: {:?}", n.txn_id));
            continue;
        };
        if !state.is_decided() {
            problems.push(format!(
                "{}: told {state:?}, which decides nothing",
                n.txn_id
            ));
            continue;
        }
        let log = e.log.get(&n.txn_id);
        if !log.is_some_and(|l| l.iter().any(|r| r.state == state)) {
            problems.push(format!(
                "{}: told {state:?}, which the log does not hold",
                n.txn_id
            ));
        }
        let promised = state.takes_effect();
        match outcome(log) {
            Some(ended) if ended == promised => {}
            ended => problems.push(format!(
                "{}: told {state:?}, but the outcome is {}",
                n.txn_id,
                match ended {
                    Some(true) => "committed",
                    Some(false) => "aborted",
                    None => "missing",
                }
            )),
        }
        if promised {
            commits += 1;
        } else {
            aborts += 1;
        }
        if state.is_outcome() {
            outcomes += 1;
        }
    }
    line(
        "every decision a client was told is durable and kept",
        &problems,
        format!(
            "{} decisions told ({commits} to commit, {aborts} to abort), {outcomes} of them outcomes",
            e.notices.len()
        ),
    )
}

fn terminal(e: &Evidence<'_>) -> Line {
    let (mut committed, mut aborted) = (0, 0);
    let mut problems = Vec::new();
    for t in e.transfers {
        match outcome(e.log.get(&t.id)) {
            Some(true) => committed += 1,
            Some(false) => aborted += 1,
            None => problems.push(format!(
                "{} ended {}",
                t.id,
                e.log
                    .get(&t.id)
                    .and_then(|r| r.last())
                    .map(|r| format!("{:?}", r.state))
                    .unwrap_or_else(|| "with no record".into())
            )),
        }
    }
    line(
        "every transfer terminal",
        &problems,
        format!(
            "{} of {} ({committed} committed, {aborted} aborted)",
            committed + aborted,
            e.transfers.len()
        ),
    )
}

fn branch(e: &Evidence<'_>, bank: &str, txn: &str, step: usize) -> Option<Branch> {
    e.banks
        .get(bank)?
        .branches
        .get(&format!("{txn}.{step}"))
        .copied()
}

fn atomicity(e: &Evidence<'_>) -> Line {
    let mut problems = Vec::new();
    let mut checked = 0;
    for t in e.transfers {
        let Some(committed) = outcome(e.log.get(&t.id)) else {
            continue;
        };
        checked += 1;
        let steps = std::iter::once((0, &t.from)).chain(t.to.as_ref().map(|to| (1, to)));
        for (step, (bank, _)) in steps {
            let b = branch(e, bank, &t.id, step);
            let fine = if committed {
                b == Some(Branch::Committed)
            } else {
                b != Some(Branch::Committed)
            };
            if !fine {
                problems.push(format!(
                    "{} {} but its branch {step} at {bank} is {b:?}",
                    t.id,
                    if committed { "committed" } else { "aborted" }
                ));
            }
        }
    }
    line(
        "atomicity, branch by branch",
        &problems,
        format!("{checked} transfers, both branches match the outcome"),
    )
}

fn money(e: &Evidence<'_>) -> Line {
    let mut want: BTreeMap<(String, String), i128> = e
        .initial
        .iter()
        .map(|(k, v)| (k.clone(), i128::from(*v)))
        .collect();
    // What committed withdrawals took out of the banks.
    let mut withdrawn = 0i128;
    for t in e.transfers {
        if outcome(e.log.get(&t.id)) == Some(true) {
            *want.entry(t.from.clone()).or_default() -= i128::from(t.amount);
            match &t.to {
                Some(to) => *want.entry(to.clone()).or_default() += i128::from(t.amount),
                None => withdrawn += i128::from(t.amount),
            }
        }
    }
    let mut problems = Vec::new();
    let (mut total_now, mut total_before) = (0i128, 0i128);
    for ((bank, acct), w) in &want {
        let have = e
            .banks
            .get(bank)
            .and_then(|b| b.accounts.get(acct))
            // A pending credit is not money yet; a held debit still is.
            .map(|a| i128::from(a.balance + a.held));
        total_before += e
            .initial
            .get(&(bank.clone(), acct.clone()))
            .copied()
            .map(i128::from)
            .unwrap_or(0);
        match have {
            Some(h) => {
                total_now += h;
                if h != *w {
                    problems.push(format!(
                        "{bank}/{acct} has {h}, the committed transfers leave {w}"
                    ));
                }
            }
            None => problems.push(format!("{bank}/{acct} is missing")),
        }
    }
    if total_now != total_before - withdrawn {
        problems.insert(
            0,
            format!("{total_now} in all, {total_before} at the start less {withdrawn} withdrawn"),
        );
    }
    line(
        "money conserved exactly",
        &problems,
        format!(
            "{total_now} in all, as at the start less the committed withdrawals ({withdrawn}); every account as the committed transfers leave it"
        ),
    )
}

fn nothing_held(e: &Evidence<'_>) -> Line {
    let mut problems = Vec::new();
    for (bank, b) in e.banks {
        for (name, a) in &b.accounts {
            if a.held > 0 || a.incoming > 0 {
                problems.push(format!(
                    "{bank}/{name} holds {} out, {} in",
                    a.held, a.incoming
                ));
            }
        }
        let prepared = b
            .branches
            .values()
            .filter(|s| **s == Branch::Prepared)
            .count();
        if prepared > 0 {
            problems.push(format!("{bank} has {prepared} branches still prepared"));
        }
    }
    line(
        "nothing left held",
        &problems,
        "no hold, no pending credit, no prepared branch".into(),
    )
}

fn one_outcome(e: &Evidence<'_>) -> Line {
    let mut problems = Vec::new();
    let mut records = 0;
    for (id, log) in e.log {
        records += log.len();
        let terminals: Vec<usize> = log
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state.is_terminal())
            .map(|(i, _)| i)
            .collect();
        if terminals.len() > 1 {
            problems.push(format!("{id} has {} terminal records", terminals.len()));
        }
        if let Some(first) = terminals.first()
            && *first + 1 != log.len()
        {
            problems.push(format!(
                "{id}: {} record(s) after its terminal record ({:?}), the next {:?}",
                log.len() - first - 1,
                log[*first].state,
                log[first + 1].state
            ));
        }
        // A saga that began to compensate never completes.
        let decisions: Vec<TxnState> = log
            .iter()
            .map(|r| r.state)
            .filter(|s| {
                matches!(
                    s,
                    TxnState::Committing
                        | TxnState::Committed
                        | TxnState::Completed
                        | TxnState::Aborting
                        | TxnState::Aborted
                        | TxnState::Compensating
                        | TxnState::Compensated
                )
            })
            .collect();
        let commits = decisions.iter().any(|s| {
            matches!(
                s,
                TxnState::Committing | TxnState::Committed | TxnState::Completed
            )
        });
        let aborts = decisions.iter().any(|s| {
            matches!(
                s,
                TxnState::Aborting
                    | TxnState::Aborted
                    | TxnState::Compensating
                    | TxnState::Compensated
            )
        });
        if commits && aborts {
            problems.push(format!("{id} was decided both ways: {decisions:?}"));
        }
    }
    line(
        "one outcome per txn_id, no record after a terminal record",
        &problems,
        format!("{} transactions, {records} records", e.log.len()),
    )
}

fn no_contradiction(e: &Evidence<'_>) -> Line {
    let mut problems = Vec::new();
    for c in e.commands {
        let Some(committed) = outcome(e.log.get(&c.txn_id)) else {
            continue;
        };
        let contradicts = match c.kind {
            CommandKind::Commit => !committed,
            CommandKind::Abort | CommandKind::Compensate => committed,
            _ => false,
        };
        if contradicts {
            problems.push(format!(
                "{:?} sent to {} for {} step {}, which {}",
                c.kind,
                c.service,
                c.txn_id,
                c.step,
                if committed { "committed" } else { "aborted" }
            ));
        }
    }
    for (bank, b) in e.banks {
        if b.violations > 0 {
            problems.push(format!(
                "{bank} refused {} command(s) as protocol violations",
                b.violations
            ));
        }
    }
    line(
        "no command contradicts a branch's outcome",
        &problems,
        format!(
            "{} commands seen, none contradicting; no participant saw a protocol violation",
            e.commands.len()
        ),
    )
}

/// The time from the end of the last fault to the last terminal record, in milliseconds
/// (0 if everything ended before the last fault did).
pub fn recovery_ms(e: &Evidence<'_>) -> u64 {
    let last_terminal = e
        .transfers
        .iter()
        .filter_map(|t| e.log.get(&t.id)?.last())
        .filter(|r| r.state.is_terminal())
        .map(|r| r.at_ms)
        .max()
        .unwrap_or(0);
    last_terminal.saturating_sub(e.last_fault_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(state: TxnState) -> Record {
        Record { state, at_ms: 0 }
    }

    struct World {
        transfers: Vec<Transfer>,
        log: HashMap<String, Vec<Record>>,
        commands: Vec<Command>,
        notices: Vec<Notice>,
        banks: BTreeMap<String, Bank>,
        initial: BTreeMap<(String, String), u64>,
    }

    impl World {
        /// Two accounts with 100 each; t1 moves 30 from a/x to b/y and committed; t2 tried
        /// 500 and aborted. Every check passes on it.
        fn good() -> World {
            let k = |b: &str, a: &str| (b.to_string(), a.to_string());
            let transfers = vec![
                Transfer {
                    id: "t1".into(),
                    from: k("a", "x"),
                    to: Some(k("b", "y")),
                    amount: 30,
                    saga: false,
                },
                Transfer {
                    id: "t2".into(),
                    from: k("b", "y"),
                    to: Some(k("a", "x")),
                    amount: 500,
                    saga: false,
                },
                // A withdrawal, committed in one phase: no decision record.
                Transfer {
                    id: "t3".into(),
                    from: k("b", "y"),
                    to: None,
                    amount: 20,
                    saga: false,
                },
            ];
            let mut log = HashMap::new();
            log.insert(
                "t1".into(),
                vec![
                    rec(TxnState::Accepted),
                    rec(TxnState::Preparing),
                    rec(TxnState::Committing),
                    rec(TxnState::Committed),
                ],
            );
            log.insert(
                "t3".into(),
                vec![
                    rec(TxnState::Accepted),
                    rec(TxnState::Preparing),
                    rec(TxnState::Committed),
                ],
            );
            log.insert(
                "t2".into(),
                vec![
                    rec(TxnState::Accepted),
                    rec(TxnState::Preparing),
                    rec(TxnState::Aborting),
                    rec(TxnState::Aborted),
                ],
            );
            let cmd = |t: &str, s: &str, step, kind| Command {
                txn_id: t.into(),
                service: s.into(),
                step,
                kind,
            };
            let commands = vec![
                cmd("t1", "a", 0, CommandKind::Prepare),
                cmd("t1", "a", 0, CommandKind::Commit),
                cmd("t1", "b", 1, CommandKind::Commit),
                cmd("t2", "b", 0, CommandKind::Abort),
                cmd("t3", "b", 0, CommandKind::CommitOnePhase),
            ];
            let bank = |acct: &str, balance, branches: &[(&str, Branch)]| Bank {
                accounts: [(
                    acct.to_string(),
                    Account {
                        balance,
                        ..Default::default()
                    },
                )]
                .into(),
                branches: branches.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                violations: 0,
            };
            let banks = [
                (
                    "a".to_string(),
                    bank(
                        "x",
                        70,
                        &[("t1.0", Branch::Committed), ("t2.1", Branch::NotApplied)],
                    ),
                ),
                (
                    "b".to_string(),
                    bank(
                        "y",
                        110,
                        &[
                            ("t1.1", Branch::Committed),
                            ("t2.0", Branch::NotApplied),
                            ("t3.0", Branch::Committed),
                        ],
                    ),
                ),
            ]
            .into();
            let initial = [(k("a", "x"), 100), (k("b", "y"), 100)].into();
            let notice = |t: &str, state| Notice {
                txn_id: t.into(),
                state: Some(state),
            };
            let notices = vec![
                notice("t1", TxnState::Committing),
                notice("t2", TxnState::Aborting),
                notice("t3", TxnState::Committed),
            ];
            World {
                transfers,
                log,
                commands,
                notices,
                banks,
                initial,
            }
        }

        fn check(&self) -> Vec<Line> {
            all(&Evidence {
                transfers: &self.transfers,
                log: &self.log,
                commands: &self.commands,
                notices: &self.notices,
                banks: &self.banks,
                initial: &self.initial,
                last_fault_ms: 0,
            })
        }

        fn failing(&self) -> Vec<&'static str> {
            self.check()
                .into_iter()
                .filter(|l| !l.ok)
                .map(|l| l.name)
                .collect()
        }
    }

    #[test]
    fn a_clean_run_passes_every_check() {
        let w = World::good();
        let lines = w.check();
        assert!(lines.iter().all(|l| l.ok), "{lines:?}");
        assert_eq!(lines.len(), 7);
    }

    #[test]
    fn a_decision_told_but_not_kept_or_not_in_the_log_is_caught() {
        const KEPT: &str = "every decision a client was told is durable and kept";
        // Told to commit, but it aborted.
        let mut w = World::good();
        w.notices.push(Notice {
            txn_id: "t2".into(),
            state: Some(TxnState::Committing),
        });
        assert_eq!(w.failing(), [KEPT]);
        // Told a decision the log never held (a refused, fenced write's phantom).
        let mut w = World::good();
        w.log
            .get_mut("t1")
            .unwrap()
            .retain(|r| r.state != TxnState::Committing);
        assert_eq!(w.failing(), [KEPT]);
        // Told something that decides nothing, or something that is no event at all.
        for state in [Some(TxnState::Preparing), None] {
            let mut w = World::good();
            w.notices.push(Notice {
                txn_id: "t1".into(),
                state,
            });
            assert_eq!(w.failing(), [KEPT]);
        }
    }

    #[test]
    fn a_record_after_the_terminal_one_is_caught() {
        let mut w = World::good();
        w.log.get_mut("t1").unwrap().push(rec(TxnState::Preparing));
        // The transfer no longer ends terminal either, so its money is unaccounted for, and
        // the commit its client was told has no outcome.
        assert_eq!(
            w.failing(),
            [
                "every transfer terminal",
                "money conserved exactly",
                "one outcome per txn_id, no record after a terminal record",
                "every decision a client was told is durable and kept"
            ]
        );
    }

    #[test]
    fn a_transaction_decided_both_ways_is_caught() {
        let mut w = World::good();
        w.log
            .get_mut("t2")
            .unwrap()
            .insert(2, rec(TxnState::Committing));
        assert_eq!(
            w.failing(),
            ["one outcome per txn_id, no record after a terminal record"]
        );
    }

    #[test]
    fn an_abort_sent_for_a_committed_branch_is_caught() {
        let mut w = World::good();
        w.commands.push(Command {
            txn_id: "t1".into(),
            service: "b".into(),
            step: 1,
            kind: CommandKind::Abort,
        });
        assert_eq!(w.failing(), ["no command contradicts a branch's outcome"]);
        let mut w = World::good();
        w.banks.get_mut("a").unwrap().violations = 1;
        assert_eq!(w.failing(), ["no command contradicts a branch's outcome"]);
    }

    #[test]
    fn half_applied_transfers_and_lost_money_are_caught() {
        // The credit of a committed transfer never applied: money vanished.
        let mut w = World::good();
        let b = w.banks.get_mut("b").unwrap();
        b.branches.insert("t1.1".into(), Branch::NotApplied);
        b.accounts.get_mut("y").unwrap().balance = 80;
        assert_eq!(
            w.failing(),
            ["atomicity, branch by branch", "money conserved exactly"]
        );
        // A debit of an aborted transfer applied.
        let mut w = World::good();
        w.banks
            .get_mut("b")
            .unwrap()
            .branches
            .insert("t2.0".into(), Branch::Committed);
        assert_eq!(w.failing(), ["atomicity, branch by branch"]);
    }

    #[test]
    fn a_withdrawal_is_one_branch_and_the_money_it_took_out() {
        // Committed, but its one branch never applied: the money is still in the bank.
        let mut w = World::good();
        let b = w.banks.get_mut("b").unwrap();
        b.branches.insert("t3.0".into(), Branch::NotApplied);
        b.accounts.get_mut("y").unwrap().balance = 130;
        assert_eq!(
            w.failing(),
            ["atomicity, branch by branch", "money conserved exactly"]
        );
    }

    /// `good()` with two sagas: t4 moved 10 from a/x to b/y and completed; t5 took 40 from
    /// b/y, its credit timed out, and both steps were compensated.
    fn with_sagas() -> World {
        let mut w = World::good();
        let k = |b: &str, a: &str| (b.to_string(), a.to_string());
        for (id, from, to, amount) in [
            ("t4", k("a", "x"), k("b", "y"), 10),
            ("t5", k("b", "y"), k("a", "x"), 40),
        ] {
            w.transfers.push(Transfer {
                id: id.into(),
                from,
                to: Some(to),
                amount,
                saga: true,
            });
        }
        w.log.insert(
            "t4".into(),
            vec![
                rec(TxnState::Accepted),
                rec(TxnState::Executing),
                rec(TxnState::Completed),
            ],
        );
        w.log.insert(
            "t5".into(),
            vec![
                rec(TxnState::Accepted),
                rec(TxnState::Executing),
                rec(TxnState::Compensating),
                rec(TxnState::Compensating),
                rec(TxnState::Compensated),
            ],
        );
        let a = w.banks.get_mut("a").unwrap();
        a.accounts.get_mut("x").unwrap().balance -= 10;
        a.branches.insert("t4.0".into(), Branch::Committed);
        a.branches.insert("t5.1".into(), Branch::NotApplied);
        let b = w.banks.get_mut("b").unwrap();
        b.accounts.get_mut("y").unwrap().balance += 10;
        b.branches.insert("t4.1".into(), Branch::Committed);
        b.branches.insert("t5.0".into(), Branch::NotApplied);
        for (service, step) in [("b", 0), ("a", 1)] {
            w.commands.push(Command {
                txn_id: "t5".into(),
                service: service.into(),
                step,
                kind: CommandKind::Compensate,
            });
        }
        w.notices.push(Notice {
            txn_id: "t4".into(),
            state: Some(TxnState::Completed),
        });
        w
    }

    #[test]
    fn sagas_count_completed_as_committed_and_compensated_as_aborted() {
        let w = with_sagas();
        let lines = w.check();
        assert!(lines.iter().all(|l| l.ok), "{lines:?}");
        assert!(
            lines[0].detail.contains("(3 committed, 2 aborted)"),
            "{lines:?}"
        );
        // A compensation sent to a step of a completed saga.
        let mut w = with_sagas();
        w.commands.push(Command {
            txn_id: "t4".into(),
            service: "b".into(),
            step: 1,
            kind: CommandKind::Compensate,
        });
        assert_eq!(w.failing(), ["no command contradicts a branch's outcome"]);
        // A saga that completed after it had begun to compensate.
        let mut w = with_sagas();
        w.log
            .get_mut("t4")
            .unwrap()
            .insert(2, rec(TxnState::Compensating));
        assert_eq!(
            w.failing(),
            ["one outcome per txn_id, no record after a terminal record"]
        );
        // A completed saga whose credit never executed: the money vanished.
        let mut w = with_sagas();
        let b = w.banks.get_mut("b").unwrap();
        b.branches.insert("t4.1".into(), Branch::NotApplied);
        b.accounts.get_mut("y").unwrap().balance -= 10;
        assert_eq!(
            w.failing(),
            ["atomicity, branch by branch", "money conserved exactly"]
        );
        // A compensated saga whose debit was never given back.
        let mut w = with_sagas();
        w.banks
            .get_mut("b")
            .unwrap()
            .branches
            .insert("t5.0".into(), Branch::Committed);
        w.banks
            .get_mut("b")
            .unwrap()
            .accounts
            .get_mut("y")
            .unwrap()
            .balance -= 40;
        assert_eq!(
            w.failing(),
            ["atomicity, branch by branch", "money conserved exactly"]
        );
    }

    #[test]
    fn holds_and_prepared_branches_left_behind_are_caught() {
        let mut w = World::good();
        let x = w.banks.get_mut("a").unwrap().accounts.get_mut("x").unwrap();
        x.balance -= 5;
        x.held = 5;
        assert_eq!(w.failing(), ["nothing left held"]);
        let mut w = World::good();
        w.banks
            .get_mut("a")
            .unwrap()
            .branches
            .insert("t9.0".into(), Branch::Prepared);
        assert_eq!(w.failing(), ["nothing left held"]);
    }

    #[test]
    fn recovery_time_runs_from_the_last_fault_to_the_last_terminal_record() {
        let mut w = World::good();
        w.log.get_mut("t1").unwrap().last_mut().unwrap().at_ms = 9_000;
        w.log.get_mut("t2").unwrap().last_mut().unwrap().at_ms = 12_500;
        let e = |last_fault_ms| Evidence {
            transfers: &w.transfers,
            log: &w.log,
            commands: &w.commands,
            notices: &w.notices,
            banks: &w.banks,
            initial: &w.initial,
            last_fault_ms,
        };
        assert_eq!(recovery_ms(&e(10_000)), 2_500);
        assert_eq!(recovery_ms(&e(20_000)), 0);
    }
}
