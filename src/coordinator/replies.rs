//! Which participant replies the coordinator believes. Anyone with a NATS connection may be
//! able to publish on the reply subjects, so a reply counts only if:
//!
//! - its subject names the transaction it claims (`<prefix>.reply.<service>.<txn_id>`, or the
//!   older `<prefix>.reply.<txn_id>`) and, in the per-service form, the service too, so that
//!   NATS permissions can keep each service to its own replies; a reply in a batch
//!   (`<prefix>.reply.<service>.batch.<id>`) must be the subject's service's;
//! - it echoes the token of a command this coordinator sent. The token is a keyed hash
//!   (BLAKE3) of the transaction, service, step, kind and attempt under a key this process
//!   drew at random when it started: only someone who read that command can know it, so a
//!   made-up attempt, a vote for another service or a reply published ahead of the real one
//!   is refused. It is also part of the reply's `Nats-Msg-Id`, so a forger cannot take the
//!   real reply's id and have JetStream drop the real one as a duplicate.
//!
//! A reply from before a restart (another key) is refused like a forgery and costs nothing:
//! the restarted coordinator resends its commands with new attempts and new tokens.
//!
//! It also bounds what a participant can put into the log: a reason longer than
//! [`MAX_REASON_BYTES`] is cut (keeping its start and saying so).

use crate::proto::{CommandKind, ParticipantCommand, ParticipantReply, Subjects};

/// The longest participant-supplied reason kept in a log record, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;

/// The key tokens are made with; one per coordinator process.
pub struct ReplyKey([u8; 32]);

impl ReplyKey {
    /// A fresh random key.
    pub fn random() -> ReplyKey {
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        ReplyKey(key)
    }

    /// The token of one command: 32 hex characters.
    pub fn token(
        &self,
        txn_id: &str,
        service: &str,
        step: usize,
        kind: CommandKind,
        attempt: u32,
    ) -> String {
        // Each field is length-prefixed, so no two commands share an input.
        let mut hasher = blake3::Hasher::new_keyed(&self.0);
        for field in [txn_id, service, kind.as_str()] {
            hasher.update(&(field.len() as u64).to_le_bytes());
            hasher.update(field.as_bytes());
        }
        hasher.update(&(step as u64).to_le_bytes());
        hasher.update(&u64::from(attempt).to_le_bytes());
        let hash = hasher.finalize();
        hash.as_bytes()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Stamps a command before it is sent: its token and its per-service reply subject.
    pub fn stamp(&self, subjects: &Subjects, cmd: &mut ParticipantCommand) {
        cmd.token = Some(self.token(&cmd.txn_id, &cmd.service, cmd.step, cmd.kind, cmd.attempt));
        cmd.reply_to = subjects.reply_for(&cmd.service, &cmd.txn_id);
    }
}

/// Why a reply was not believed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The subject is not a reply subject of this prefix.
    #[error("subject {subject:?} is not a reply subject")]
    NotAReplySubject {
        /// The subject it came on.
        subject: String,
    },
    /// The subject names another transaction or service than the body.
    #[error(
        "subject {subject:?} does not match the reply's txn_id {txn_id:?} and service {service:?}"
    )]
    SubjectMismatch {
        /// The subject it came on.
        subject: String,
        /// The body's transaction.
        txn_id: String,
        /// The body's service.
        service: String,
    },
    /// No token, and replies without one are not accepted.
    #[error("no token (it answers no command this coordinator sent)")]
    MissingToken,
    /// The token is not the one of the command it claims to answer.
    #[error("wrong token for {kind} attempt {attempt} of step {step} (it answers no command this coordinator sent)", kind = kind.as_str())]
    BadToken {
        /// The claimed step.
        step: usize,
        /// The claimed kind.
        kind: CommandKind,
        /// The claimed attempt.
        attempt: u32,
    },
}

/// Checks a reply that arrived on `subject`; see the module doc.
pub fn check(
    key: &ReplyKey,
    subjects: &Subjects,
    subject: &str,
    reply: &ParticipantReply,
    accept_untokened: bool,
) -> Result<(), Rejected> {
    let rest = subject
        .strip_prefix(subjects.prefix())
        .and_then(|s| s.strip_prefix(".reply."))
        .ok_or_else(|| Rejected::NotAReplySubject {
            subject: subject.to_string(),
        })?;
    let matches = match rest.split_once('.') {
        // A batch of one service's replies: each must be that service's (a txn_id has no
        // dot, so this is never a transaction's own subject).
        Some((service, _)) if subjects.reply_batch_service(subject).is_some() => {
            service == reply.service
        }
        Some((service, txn_id)) => service == reply.service && txn_id == reply.txn_id,
        None => rest == reply.txn_id,
    };
    if !matches {
        return Err(Rejected::SubjectMismatch {
            subject: subject.to_string(),
            txn_id: reply.txn_id.clone(),
            service: reply.service.clone(),
        });
    }
    let Some(token) = &reply.token else {
        return if accept_untokened {
            Ok(())
        } else {
            Err(Rejected::MissingToken)
        };
    };
    let want = key.token(
        &reply.txn_id,
        &reply.service,
        reply.step,
        reply.kind,
        reply.attempt,
    );
    // Not secret-dependent timing that matters here (the key never leaves the process and
    // each token is single-use per command), but compare in full anyway.
    if token.len() != want.len() || token.bytes().zip(want.bytes()).any(|(a, b)| a != b) {
        return Err(Rejected::BadToken {
            step: reply.step,
            kind: reply.kind,
            attempt: reply.attempt,
        });
    }
    Ok(())
}

/// Cuts `text` to at most `max` bytes (at a character boundary), saying how much was cut.
pub fn bound(text: String, max: usize) -> String {
    crate::proto::cut_text(text, max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ReplyOutcome;

    fn reply(token: Option<String>) -> ParticipantReply {
        ParticipantReply {
            conflict: None,
            txn_id: "t1".into(),
            service: "pay".into(),
            step: 1,
            kind: CommandKind::Prepare,
            outcome: ReplyOutcome::Ready,
            reason: None,
            attempt: 2,
            retryable: None,
            token,
        }
    }

    #[test]
    fn only_the_token_of_a_sent_command_is_believed() {
        let key = ReplyKey::random();
        let s = Subjects::new("txn");
        let good = key.token("t1", "pay", 1, CommandKind::Prepare, 2);
        assert_eq!(good.len(), 32);
        let ok = reply(Some(good.clone()));
        assert_eq!(check(&key, &s, "txn.reply.pay.t1", &ok, false), Ok(()));
        // The older subject form still works.
        assert_eq!(check(&key, &s, "txn.reply.t1", &ok, false), Ok(()));

        // Another attempt, step, kind or service under the same token: refused.
        for forged in [
            ParticipantReply {
                attempt: 999,
                ..ok.clone()
            },
            ParticipantReply {
                step: 0,
                ..ok.clone()
            },
            ParticipantReply {
                kind: CommandKind::Commit,
                ..ok.clone()
            },
        ] {
            assert!(matches!(
                check(&key, &s, "txn.reply.pay.t1", &forged, false),
                Err(Rejected::BadToken { .. })
            ));
        }
        let other_service = ParticipantReply {
            service: "inv".into(),
            ..ok.clone()
        };
        assert!(matches!(
            check(&key, &s, "txn.reply.inv.t1", &other_service, false),
            Err(Rejected::BadToken { .. })
        ));
        // Another process's key: refused.
        assert!(check(&ReplyKey::random(), &s, "txn.reply.pay.t1", &ok, false).is_err());
        // No token: refused unless allowed.
        assert_eq!(
            check(&key, &s, "txn.reply.pay.t1", &reply(None), false),
            Err(Rejected::MissingToken)
        );
        assert_eq!(
            check(&key, &s, "txn.reply.pay.t1", &reply(None), true),
            Ok(())
        );
    }

    #[test]
    fn the_subject_must_name_the_transaction_and_service_of_the_body() {
        let key = ReplyKey::random();
        let s = Subjects::new("txn");
        let ok = reply(Some(key.token("t1", "pay", 1, CommandKind::Prepare, 2)));
        for subject in ["txn.reply.pay.t2", "txn.reply.inv.t1", "txn.reply.t2"] {
            assert!(
                matches!(
                    check(&key, &s, subject, &ok, false),
                    Err(Rejected::SubjectMismatch { .. })
                ),
                "{subject}"
            );
        }
        assert!(matches!(
            check(&key, &s, "other.reply.pay.t1", &ok, false),
            Err(Rejected::NotAReplySubject { .. })
        ));
    }

    #[test]
    fn stamping_sets_the_token_and_the_per_service_reply_subject() {
        let key = ReplyKey::random();
        let s = Subjects::new("txn");
        let mut cmd = ParticipantCommand {
            action: "charge".into(),
            reply_to: s.reply("t1"),
            attempt: 2,
            ..ParticipantCommand::new("t1".into(), "pay".into(), 1, CommandKind::Prepare)
        };
        key.stamp(&s, &mut cmd);
        assert_eq!(cmd.reply_to, "txn.reply.pay.t1");
        let answer = reply(cmd.token.clone());
        assert_eq!(check(&key, &s, &cmd.reply_to, &answer, false), Ok(()));
    }

    #[test]
    fn long_reasons_are_cut_at_a_character_boundary_and_say_so() {
        assert_eq!(bound("short".into(), 1024), "short");
        let long = "é".repeat(2000);
        let cut = bound(long, 1024);
        assert!(cut.len() <= 1024, "{}", cut.len());
        assert!(cut.ends_with("[cut: 4000 bytes in all]"), "{cut}");
        assert!(cut.starts_with("éé"));
    }
}
