//! One test per row of the barrier's table, and the answers and undo rules around it.

use super::*;
use BranchState as S;

const NOW: Facts = Facts {
    now_ms: 1_000,
    deadline_ms: 2_000,
    has_payload: true,
    finished_records_expire: false,
};

fn rec(state: BranchState) -> BranchRecord {
    BranchRecord {
        url: None,
        state,
        action: "reserve".into(),
        payload: serde_json::json!({"sku": "apple"}),
        reason: (state == S::VotedAbort).then(|| "out of stock".into()),
        updated_ms: 1,
        conflict: None,
        locks: Vec::new(),
        lock_ts: None,
    }
}

fn plan(kind: CommandKind, state: Option<BranchState>) -> Plan {
    decide(kind, state.map(rec).as_ref(), &NOW)
}

fn run(call: Option<Call>, write: Write, target: Target) -> Plan {
    Plan::Run {
        call,
        write,
        target,
    }
}

const ALL: [BranchState; 10] = [
    S::Prepared,
    S::ReadOnly,
    S::VotedAbort,
    S::Committed,
    S::Aborted,
    S::AbortedBeforePrepare,
    S::Executed,
    S::ExecuteFailed,
    S::Compensated,
    S::CompensatedBeforeExecute,
];

#[test]
fn prepare_with_a_record_answers_the_recorded_vote() {
    for s in ALL {
        assert_eq!(
            plan(CommandKind::Prepare, Some(s)),
            Plan::Answer(AnswerFrom::Vote)
        );
    }
    let ans = |s| answer_from(AnswerFrom::Vote, Some(&rec(s)));
    assert_eq!(ans(S::Prepared).outcome, ReplyOutcome::Ready);
    assert_eq!(ans(S::Committed).outcome, ReplyOutcome::Ready);
    assert_eq!(ans(S::ReadOnly).outcome, ReplyOutcome::ReadOnly);
    assert_eq!(
        ans(S::VotedAbort),
        Answer::because(ReplyOutcome::Abort, "out of stock")
    );
    assert_eq!(ans(S::AbortedBeforePrepare).outcome, ReplyOutcome::Abort);
    assert_eq!(
        ans(S::Executed).outcome,
        ReplyOutcome::Abort,
        "a saga branch"
    );
}

#[test]
fn prepare_past_its_deadline_releases_and_votes_abort() {
    let late = Facts {
        now_ms: 3_000,
        ..NOW
    };
    assert_eq!(
        decide(CommandKind::Prepare, None, &late),
        run(
            Some(Call::Abort),
            Write::Create,
            Target::VotedAbort("prepare arrived after its deadline".into())
        )
    );
    // No deadline: never late.
    let none = Facts {
        deadline_ms: 0,
        ..late
    };
    assert_eq!(
        decide(CommandKind::Prepare, None, &none),
        run(Some(Call::Prepare), Write::Create, Target::Vote)
    );
}

#[test]
fn prepare_without_a_record_calls_prepare_and_stores_the_vote() {
    assert_eq!(
        plan(CommandKind::Prepare, None),
        run(Some(Call::Prepare), Write::Create, Target::Vote)
    );
    let settle = |v| Target::Vote.settle(Some(Call::Prepare), Returned::Voted(v));
    assert_eq!(settle(Vote::Ready), Settled::Store(S::Prepared, None));
    assert_eq!(settle(Vote::ReadOnly), Settled::Store(S::ReadOnly, None));
    assert_eq!(
        settle(Vote::Abort("no".into())),
        Settled::Store(S::VotedAbort, Some("no".into()))
    );
}

#[test]
fn commit_of_a_committed_or_read_only_branch_is_done() {
    for s in [S::Committed, S::ReadOnly] {
        assert_eq!(
            plan(CommandKind::Commit, Some(s)),
            Plan::Answer(AnswerFrom::Done)
        );
    }
}

#[test]
fn commit_of_a_prepared_branch_calls_commit_and_advances() {
    assert_eq!(
        plan(CommandKind::Commit, Some(S::Prepared)),
        run(
            Some(Call::Commit),
            Write::Advance,
            Target::State(S::Committed)
        )
    );
    // A commit the service cannot do now is retried, never recorded as done.
    assert_eq!(
        Target::State(S::Committed).settle(
            Some(Call::Commit),
            Returned::Did(Err(ServiceError("db down".into())))
        ),
        Settled::Retry("db down".into())
    );
}

#[test]
fn commit_of_any_other_branch_is_a_protocol_violation() {
    for s in ALL
        .into_iter()
        .filter(|s| !matches!(s, S::Committed | S::ReadOnly | S::Prepared))
    {
        assert!(
            matches!(plan(CommandKind::Commit, Some(s)), Plan::Refuse(ref w) if w.contains(&format!("{s:?}"))),
            "{s:?}"
        );
    }
}

#[test]
fn commit_without_a_record_is_done_only_when_records_expire() {
    let expiring = Facts {
        finished_records_expire: true,
        ..NOW
    };
    assert_eq!(
        decide(CommandKind::Commit, None, &expiring),
        Plan::Answer(AnswerFrom::Done)
    );
    assert!(matches!(
        plan(CommandKind::Commit, None),
        Plan::Refuse(w) if w.contains("never prepared")
    ));
}

#[test]
fn abort_of_a_prepared_branch_calls_abort_and_advances() {
    assert_eq!(
        plan(CommandKind::Abort, Some(S::Prepared)),
        run(Some(Call::Abort), Write::Advance, Target::State(S::Aborted))
    );
}

#[test]
fn abort_of_a_committed_branch_is_a_protocol_violation() {
    assert!(matches!(
        plan(CommandKind::Abort, Some(S::Committed)),
        Plan::Refuse(w) if w.contains("committed")
    ));
}

#[test]
fn abort_of_any_other_branch_is_done() {
    for s in ALL
        .into_iter()
        .filter(|s| !matches!(s, S::Prepared | S::Committed))
    {
        assert_eq!(
            plan(CommandKind::Abort, Some(s)),
            Plan::Answer(AnswerFrom::Done),
            "{s:?}"
        );
    }
}

#[test]
fn abort_without_a_record_releases_and_records_it_came_first() {
    assert_eq!(
        plan(CommandKind::Abort, None),
        run(
            Some(Call::Abort),
            Write::Create,
            Target::State(S::AbortedBeforePrepare)
        )
    );
    // An old coordinator's abort carries no payload: nothing to find the branch by.
    let bare = Facts {
        has_payload: false,
        ..NOW
    };
    assert_eq!(
        decide(CommandKind::Abort, None, &bare),
        run(None, Write::Create, Target::State(S::AbortedBeforePrepare))
    );
}

#[test]
fn execute_with_a_record_answers_the_recorded_result() {
    for s in ALL {
        assert_eq!(
            plan(CommandKind::Execute, Some(s)),
            Plan::Answer(AnswerFrom::Step)
        );
    }
    let ans = |s| answer_from(AnswerFrom::Step, Some(&rec(s)));
    assert_eq!(ans(S::Executed).outcome, ReplyOutcome::Done);
    assert_eq!(ans(S::ExecuteFailed).retryable, Some(false));
    // Hanging prevention: after a compensation, never.
    for s in [S::Compensated, S::CompensatedBeforeExecute] {
        assert!(
            ans(s)
                .reason
                .is_some_and(|r| r.contains("after its compensation"))
        );
    }
    assert_eq!(ans(S::Prepared).outcome, ReplyOutcome::Failed);
}

#[test]
fn execute_without_a_record_calls_execute_and_stores_all_but_a_retryable_failure() {
    assert_eq!(
        plan(CommandKind::Execute, None),
        run(Some(Call::Execute), Write::Create, Target::Step)
    );
    let settle = |r| Target::Step.settle(Some(Call::Execute), Returned::Stepped(r));
    assert_eq!(settle(StepResult::Done), Settled::Store(S::Executed, None));
    assert_eq!(
        settle(StepResult::Failed {
            reason: "declined".into(),
            retryable: false
        }),
        Settled::Store(S::ExecuteFailed, Some("declined".into()))
    );
    assert_eq!(
        settle(StepResult::Failed {
            reason: "busy".into(),
            retryable: true
        }),
        Settled::Answer(Answer::failed("busy", true))
    );
}

#[test]
fn compensate_of_an_executed_branch_calls_compensate_and_advances() {
    assert_eq!(
        plan(CommandKind::Compensate, Some(S::Executed)),
        run(
            Some(Call::Compensate),
            Write::Advance,
            Target::State(S::Compensated)
        )
    );
    // A compensation that fails is answered failed (retryable), not recorded.
    assert_eq!(
        Target::State(S::Compensated).settle(
            Some(Call::Compensate),
            Returned::Did(Err(ServiceError("locked".into())))
        ),
        Settled::Answer(Answer::failed("locked", true))
    );
}

#[test]
fn compensate_of_a_failed_execute_records_it_without_a_call() {
    assert_eq!(
        plan(CommandKind::Compensate, Some(S::ExecuteFailed)),
        run(None, Write::Advance, Target::State(S::Compensated))
    );
}

#[test]
fn compensate_of_any_other_branch_is_done() {
    for s in ALL
        .into_iter()
        .filter(|s| !matches!(s, S::Executed | S::ExecuteFailed))
    {
        assert_eq!(
            plan(CommandKind::Compensate, Some(s)),
            Plan::Answer(AnswerFrom::Done),
            "{s:?}"
        );
    }
}

#[test]
fn compensate_without_a_record_undoes_and_records_it_came_first() {
    assert_eq!(
        plan(CommandKind::Compensate, None),
        run(
            Some(Call::Compensate),
            Write::Create,
            Target::State(S::CompensatedBeforeExecute)
        )
    );
}

#[test]
fn a_lost_create_is_undone_only_where_the_winner_contradicts_it() {
    assert_eq!(
        undo_after_lost_create(S::Prepared, S::AbortedBeforePrepare),
        Some(Call::Abort)
    );
    assert_eq!(
        undo_after_lost_create(S::Executed, S::CompensatedBeforeExecute),
        Some(Call::Compensate)
    );
    // A twin instance that recorded the same vote: nothing to undo.
    assert_eq!(undo_after_lost_create(S::Prepared, S::Prepared), None);
    assert_eq!(
        undo_after_lost_create(S::VotedAbort, S::AbortedBeforePrepare),
        None
    );
}

#[test]
fn written_records_answer_by_command_kind() {
    assert_eq!(
        answer_of(CommandKind::Prepare, &rec(S::Prepared)).outcome,
        ReplyOutcome::Ready
    );
    assert_eq!(
        answer_of(CommandKind::Execute, &rec(S::ExecuteFailed)).outcome,
        ReplyOutcome::Failed
    );
    for kind in [
        CommandKind::Commit,
        CommandKind::Abort,
        CommandKind::Compensate,
    ] {
        assert_eq!(
            answer_of(kind, &rec(S::Compensated)).outcome,
            ReplyOutcome::Done
        );
    }
}

#[test]
fn one_phase_without_a_record_prepares_and_a_prepared_record_goes_on_to_commit() {
    assert_eq!(
        plan(CommandKind::CommitOnePhase, None),
        run(Some(Call::Prepare), Write::Create, Target::Vote)
    );
    // Its own prepare recorded (or a crash between the prepare and the commit): commit.
    assert!(continues(CommandKind::CommitOnePhase, S::Prepared));
    assert_eq!(
        plan(CommandKind::CommitOnePhase, Some(S::Prepared)),
        run(
            Some(Call::Commit),
            Write::Advance,
            Target::State(S::Committed)
        )
    );
    // Every other write ends its command: a prepare's `prepared` waits for the decision.
    for s in ALL {
        assert!(!continues(CommandKind::Prepare, s));
        assert_eq!(
            continues(CommandKind::CommitOnePhase, s),
            s == S::Prepared,
            "{s:?}"
        );
    }
}

#[test]
fn one_phase_past_its_deadline_releases_and_votes_abort() {
    let late = Facts {
        now_ms: 3_000,
        ..NOW
    };
    assert_eq!(
        decide(CommandKind::CommitOnePhase, None, &late),
        run(
            Some(Call::Abort),
            Write::Create,
            Target::VotedAbort("commit arrived after its deadline".into())
        )
    );
    // A prepared record past the deadline still commits: only the participant decides,
    // and it decided when it prepared.
    assert_eq!(
        decide(CommandKind::CommitOnePhase, Some(&rec(S::Prepared)), &late),
        run(
            Some(Call::Commit),
            Write::Advance,
            Target::State(S::Committed)
        )
    );
}

#[test]
fn one_phase_with_any_other_record_answers_its_outcome() {
    for s in ALL.into_iter().filter(|s| *s != S::Prepared) {
        assert_eq!(
            plan(CommandKind::CommitOnePhase, Some(s)),
            Plan::Answer(AnswerFrom::OnePhase),
            "{s:?}"
        );
    }
    let ans = |s| answer_from(AnswerFrom::OnePhase, Some(&rec(s)));
    assert_eq!(ans(S::Committed), Answer::of(ReplyOutcome::Done));
    assert_eq!(ans(S::ReadOnly), Answer::of(ReplyOutcome::ReadOnly));
    assert_eq!(
        ans(S::VotedAbort),
        Answer::because(ReplyOutcome::Abort, "out of stock")
    );
    for s in [
        S::Aborted,
        S::AbortedBeforePrepare,
        S::Executed,
        S::ExecuteFailed,
        S::Compensated,
        S::CompensatedBeforeExecute,
    ] {
        assert_eq!(ans(s).outcome, ReplyOutcome::Abort, "{s:?}");
    }
    // After a write the answer is the same: `done` once committed.
    assert_eq!(
        answer_of(CommandKind::CommitOnePhase, &rec(S::Committed)).outcome,
        ReplyOutcome::Done
    );
    assert_eq!(
        answer_of(CommandKind::CommitOnePhase, &rec(S::VotedAbort)).outcome,
        ReplyOutcome::Abort
    );
}

#[test]
fn only_a_first_decision_soon_after_its_own_prepare_skips_the_read() {
    let soon = std::time::Duration::from_millis(20);
    assert!(trust_own_record(1, true, soon));
    // A redelivery or a resend may come after another instance changed the record.
    assert!(!trust_own_record(1, false, soon));
    assert!(!trust_own_record(2, true, soon));
    assert!(
        !trust_own_record(0, true, soon),
        "the in-doubt resolver reads"
    );
    // Late enough for a resend to have gone elsewhere: read.
    assert!(!trust_own_record(1, true, OWN_RECORD_TRUSTED_FOR));
}
