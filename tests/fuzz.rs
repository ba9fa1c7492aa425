//! Property-based fuzzing of everything that reads input from the bus: request parsing and
//! validation over arbitrary bytes, arbitrary JSON and mutated valid requests, the wire
//! decoders, and the reply check. Nothing may panic, every refusal must say what was wrong
//! (and, for a JSON request, where), and no made-up reply may pass the check.

use proptest::prelude::*;
use serde_json::{Value, json};
use txcoord::coordinator::replies::{ReplyKey, check};
use txcoord::proto::{
    ParticipantCommand, ParticipantReply, RequestError, RequestLimits, StatusRequest, Subjects,
    TransactionEvent, parse_request,
};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
        prop_oneof![
            Just("txn_id"),
            Just("steps"),
            Just("service"),
            Just("action"),
            Just("payload"),
            Just("mode"),
            Just("saga"),
            Just("2pc"),
            Just("timeout_ms"),
            Just("a.b"),
            Just("")
        ]
        .prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("txn_id".to_string()),
                    Just("steps".to_string()),
                    Just("service".to_string()),
                    Just("action".to_string()),
                    Just("payload".to_string()),
                    Just("mode".to_string()),
                    Just("timeout_ms".to_string()),
                    Just("metadata".to_string()),
                    Just("compensate".to_string()),
                    "[a-z_]{1,8}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A refusal says what was wrong; a JSON one that is about a field says where.
fn explains(e: &RequestError) {
    let text = e.to_string();
    assert!(!text.trim().is_empty(), "{e:?}");
    assert!(
        [
            "too_large",
            "malformed_json",
            "invalid_request",
            "duplicate_txn_id"
        ]
        .contains(&e.kind()),
        "{}",
        e.kind()
    );
    if let RequestError::Invalid { path, .. } = e {
        assert!(!path.is_empty(), "{e:?}");
    }
}

fn valid() -> Value {
    json!({"txn_id": "t-1", "mode": "2pc", "timeout_ms": 1000, "metadata": {"k": 1},
        "steps": [{"service": "inv", "action": "reserve", "payload": {"sku": "a", "qty": 1}},
                  {"service": "pay", "action": "charge", "payload": {}}]})
}

/// Replaces the value at a random place of `v` (found by walking `path` indices).
fn mutate(v: &mut Value, path: &[usize], with: Value) {
    let Some((first, rest)) = path.split_first() else {
        *v = with;
        return;
    };
    match v {
        Value::Object(m) if !m.is_empty() => {
            let key = m.keys().nth(first % m.len()).cloned().unwrap_or_default();
            if let Some(child) = m.get_mut(&key) {
                mutate(child, rest, with);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            let n = a.len();
            mutate(&mut a[first % n], rest, with);
        }
        _ => *v = with,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3_000))]

    #[test]
    fn arbitrary_bytes_never_panic_and_every_refusal_explains(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let p = parse_request(&bytes, &RequestLimits::default());
        if let Err(e) = &p.result {
            explains(e);
        }
        let _ = serde_json::from_slice::<ParticipantReply>(&bytes);
        let _ = serde_json::from_slice::<ParticipantCommand>(&bytes);
        let _ = serde_json::from_slice::<TransactionEvent>(&bytes);
        let _ = serde_json::from_slice::<StatusRequest>(&bytes);
    }

    #[test]
    fn arbitrary_json_never_panics_and_every_refusal_explains(v in json_value()) {
        let bytes = serde_json::to_vec(&v).unwrap();
        let p = parse_request(&bytes, &RequestLimits::default());
        match &p.result {
            Err(e) => {
                explains(e);
                prop_assert!(!matches!(e, RequestError::MalformedJson(_)), "valid JSON called malformed: {e}");
            }
            Ok(r) => prop_assert!(!r.steps.is_empty()),
        }
    }

    #[test]
    fn a_mutated_valid_request_is_taken_or_refused_with_a_path(
        path in prop::collection::vec(any::<usize>(), 0..4),
        with in json_value(),
    ) {
        let mut v = valid();
        mutate(&mut v, &path, with);
        let bytes = serde_json::to_vec(&v).unwrap();
        let p = parse_request(&bytes, &RequestLimits::default());
        if let Err(e) = &p.result {
            explains(e);
        }
    }

    #[test]
    fn no_made_up_reply_passes_the_check(
        subject in "[a-z.]{0,30}",
        txn in "[A-Za-z0-9_-]{1,12}",
        service in "[a-z]{1,6}",
        step in 0usize..8,
        attempt in 0u32..1000,
        token in proptest::option::of("[0-9a-f]{32}"),
    ) {
        let key = ReplyKey::random();
        let s = Subjects::new("txn");
        let reply = ParticipantReply {
            conflict: None,
            txn_id: txn.clone(),
            service: service.clone(),
            step,
            kind: txcoord::proto::CommandKind::Prepare,
            outcome: txcoord::proto::ReplyOutcome::Ready,
            reason: None,
            attempt,
            retryable: None,
            token,
        };
        for subj in [subject, format!("txn.reply.{service}.{txn}"), format!("txn.reply.{txn}")] {
            prop_assert!(check(&key, &s, &subj, &reply, false).is_err());
        }
    }
}
