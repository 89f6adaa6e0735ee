//! What one delivery attempt of a domain entry decided, per recipient, and what the worker does
//! with the lease afterwards. Pure logic: the worker feeds it the replies it got.
//!
//! Rules (RFC 5321 §4.2.1, §4.5.4): a 2xx reply to the final dot delivers every recipient whose
//! RCPT got 2xx; a 5xx to RCPT (or to the final dot) fails the recipient permanently; a 4xx, a
//! connection failure, a timeout or a TLS policy failure defers it. An entry whose recipients
//! all have a final outcome is acked; otherwise it is deferred with the recipients still
//! pending, unless it has expired, in which case they are returned to the sender too.

use mailroom_queue::Recipient;

/// A final or transient outcome for one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecipientOutcome {
    /// Accepted by the receiving server.
    Delivered {
        /// The server's reply (to the final dot), e.g. `250 2.0.0 Ok: queued as 4Xyz`.
        response: String,
    },
    /// To be tried again later.
    Transient {
        /// Why: a 4xx reply or a connection-level error, readable by an operator.
        response: String,
    },
    /// Will never succeed: returned to the sender.
    Permanent {
        /// Why: a 5xx reply or a local reason (null MX, message too large, ...).
        response: String,
        /// Enhanced status code for the DSN (`5.1.1`, ...).
        status: (u8, u16, u16),
    },
}

impl RecipientOutcome {
    /// The outcome of an SMTP reply with `code` (and its enhanced code, if the server sent one).
    pub fn from_reply(code: u16, enhanced: Option<(u8, u16, u16)>, text: String) -> Self {
        match code {
            200..=299 => RecipientOutcome::Delivered { response: text },
            500..=599 => RecipientOutcome::Permanent {
                response: text,
                status: enhanced.filter(|e| e.0 == 5).unwrap_or((5, 0, 0)),
            },
            _ => RecipientOutcome::Transient { response: text },
        }
    }

    /// The response text.
    pub fn response(&self) -> &str {
        match self {
            RecipientOutcome::Delivered { response }
            | RecipientOutcome::Transient { response }
            | RecipientOutcome::Permanent { response, .. } => response,
        }
    }
}

/// What happens to the lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Every recipient has a final outcome: ack. `bounced` lists the recipients to report to
    /// the sender (with their outcome).
    Done {
        /// Recipients that failed permanently (or expired).
        bounced: Vec<(Recipient, RecipientOutcome)>,
    },
    /// Some recipients are to be retried: defer with them; `bounced` are reported now.
    Retry {
        /// Recipients still pending.
        pending: Vec<Recipient>,
        /// The response to remember (the first transient one).
        response: String,
        /// Recipients that failed permanently in this attempt.
        bounced: Vec<(Recipient, RecipientOutcome)>,
    },
}

/// Decides the lease's fate from each recipient's outcome. When `expired`, transient outcomes
/// become permanent (`4.4.7`, "message expired" with the last transient response), so nothing
/// waits any longer.
pub fn decide(outcomes: Vec<(Recipient, RecipientOutcome)>, expired: bool) -> Disposition {
    let mut pending = Vec::new();
    let mut bounced = Vec::new();
    let mut first_transient: Option<String> = None;
    for (recipient, outcome) in outcomes {
        match outcome {
            RecipientOutcome::Delivered { .. } => {}
            RecipientOutcome::Permanent { .. } => bounced.push((recipient, outcome)),
            RecipientOutcome::Transient { response } if expired => bounced.push((
                recipient,
                RecipientOutcome::Permanent {
                    response: format!("message expired in the queue; last attempt: {response}"),
                    status: (4, 4, 7),
                },
            )),
            RecipientOutcome::Transient { response } => {
                first_transient.get_or_insert(response);
                pending.push(recipient);
            }
        }
    }
    match first_transient {
        Some(response) if !pending.is_empty() => Disposition::Retry {
            pending,
            response,
            bounced,
        },
        _ => Disposition::Done { bounced },
    }
}

/// The same outcome for every recipient (a connection-level result).
pub fn all(
    recipients: &[Recipient],
    outcome: &RecipientOutcome,
) -> Vec<(Recipient, RecipientOutcome)> {
    recipients
        .iter()
        .map(|r| (r.clone(), outcome.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rcpt(address: &str) -> Recipient {
        Recipient {
            address: address.into(),
            domain: "d.example".into(),
            notify: None,
            orcpt: None,
        }
    }

    #[test]
    fn reply_classes() {
        assert!(matches!(
            RecipientOutcome::from_reply(250, None, "250 ok".into()),
            RecipientOutcome::Delivered { .. }
        ));
        assert_eq!(
            RecipientOutcome::from_reply(550, Some((5, 1, 1)), "550 5.1.1 unknown".into()),
            RecipientOutcome::Permanent {
                response: "550 5.1.1 unknown".into(),
                status: (5, 1, 1)
            }
        );
        // An enhanced code of the wrong class is not trusted.
        assert_eq!(
            RecipientOutcome::from_reply(554, Some((4, 7, 1)), "554 4.7.1 odd".into()),
            RecipientOutcome::Permanent {
                response: "554 4.7.1 odd".into(),
                status: (5, 0, 0)
            }
        );
        assert!(matches!(
            RecipientOutcome::from_reply(451, None, "451 later".into()),
            RecipientOutcome::Transient { .. }
        ));
    }

    #[test]
    fn mixed_outcomes_retry_the_transient_and_bounce_the_permanent() {
        let outcomes = vec![
            (
                rcpt("a@d.example"),
                RecipientOutcome::Delivered {
                    response: "250".into(),
                },
            ),
            (
                rcpt("b@d.example"),
                RecipientOutcome::Transient {
                    response: "451 greylisted".into(),
                },
            ),
            (
                rcpt("c@d.example"),
                RecipientOutcome::Permanent {
                    response: "550 no".into(),
                    status: (5, 1, 1),
                },
            ),
            (
                rcpt("d@d.example"),
                RecipientOutcome::Transient {
                    response: "452 full".into(),
                },
            ),
        ];
        match decide(outcomes, false) {
            Disposition::Retry {
                pending,
                response,
                bounced,
            } => {
                assert_eq!(
                    pending
                        .iter()
                        .map(|r| r.address.as_str())
                        .collect::<Vec<_>>(),
                    ["b@d.example", "d@d.example"]
                );
                assert_eq!(response, "451 greylisted");
                assert_eq!(bounced.len(), 1);
                assert_eq!(bounced[0].0.address, "c@d.example");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn expired_transients_become_bounces() {
        let outcomes = vec![
            (
                rcpt("a@d.example"),
                RecipientOutcome::Transient {
                    response: "451 later".into(),
                },
            ),
            (
                rcpt("b@d.example"),
                RecipientOutcome::Delivered {
                    response: "250".into(),
                },
            ),
        ];
        match decide(outcomes, true) {
            Disposition::Done { bounced } => {
                assert_eq!(bounced.len(), 1);
                let RecipientOutcome::Permanent { response, status } = &bounced[0].1 else {
                    panic!("{bounced:?}")
                };
                assert_eq!(*status, (4, 4, 7));
                assert!(response.contains("451 later"), "{response}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn all_delivered_is_done_without_bounces() {
        let outcomes = all(
            &[rcpt("a@d.example"), rcpt("b@d.example")],
            &RecipientOutcome::Delivered {
                response: "250 ok".into(),
            },
        );
        assert_eq!(
            decide(outcomes, false),
            Disposition::Done { bounced: vec![] }
        );
    }
}
