//! MAIL FROM and RCPT TO (RFC 5321 §4.1.1.2-3). The core checks come first and no plugin can
//! override them: sequence, authentication on submission listeners, SIZE, SMTPUTF8, the
//! recipient limit, and the relay rule (never an open relay: a recipient outside the
//! listener's domains needs an authenticated client or a relay network, else `550 5.7.1`).

use crate::conn::SmtpStream;
use mailroom_plugins::Transaction;
use mailroom_smtp::{ForwardPath, MailParams, RcptParams, ReversePath};

use super::{Flow, Session, reply};
use crate::metrics;

impl<S: SmtpStream> Session<S> {
    pub(crate) async fn mail(&mut self, from: ReversePath, params: MailParams) -> Flow {
        if self.info.helo.is_none() {
            self.send(reply(503, (5, 5, 1), "Send HELO/EHLO first"));
            return Flow::Continue;
        }
        if self.tx.is_some() || self.bdat.is_some() {
            self.send(reply(503, (5, 5, 1), "Nested MAIL command"));
            return Flow::Continue;
        }
        if self.ctx.submission && self.info.auth_user.is_none() {
            self.send(reply(530, (5, 7, 0), "Authentication required"));
            return Flow::Continue;
        }
        if self.messages >= self.ctx.limits.max_messages_per_connection {
            self.send_ok(reply(
                421,
                (4, 7, 0),
                format!(
                    "{} Too many messages on one connection; reconnect",
                    self.ctx.hostname
                ),
            ));
            return Flow::Close("message_limit");
        }
        if let Some(size) = params.size
            && size > self.ctx.limits.max_message_size
        {
            self.send(reply(
                552,
                (5, 3, 4),
                "Message size exceeds fixed maximum message size",
            ));
            return Flow::Continue;
        }
        if let ReversePath::Mailbox(m) = &from
            && !params.smtputf8
            && !m.is_ascii()
        {
            self.send(reply(
                553,
                (5, 6, 7),
                "Non-ASCII address requires the SMTPUTF8 parameter",
            ));
            return Flow::Continue;
        }
        let tx = Transaction::new(from, params);
        let verdict = self.ctx.plugins.mail(&self.info, &tx).await;
        if let Some(flow) = self.refused(verdict) {
            return flow;
        }
        self.tx = Some(tx);
        self.send_ok(reply(250, (2, 1, 0), "Ok"));
        Flow::Continue
    }

    pub(crate) async fn rcpt(&mut self, to: ForwardPath, params: RcptParams) -> Flow {
        let Some(tx) = self.tx.as_ref() else {
            self.send(reply(503, (5, 5, 1), "Need MAIL command first"));
            return Flow::Continue;
        };
        let reject = |reason: &str| {
            metrics::RECIPIENTS_REJECTED
                .with_label_values(&[&self.ctx.name, reason])
                .inc()
        };
        if tx.recipients.len() >= self.ctx.limits.max_recipients {
            reject("too_many");
            // RFC 5321 §4.5.3.1.10: 452 for too many recipients.
            self.send(reply(452, (4, 5, 3), "Too many recipients"));
            return Flow::Continue;
        }
        if let ForwardPath::Mailbox(m) = &to {
            if !tx.mail_params.smtputf8 && !m.is_ascii() {
                reject("smtputf8");
                self.send(reply(
                    553,
                    (5, 6, 7),
                    "Non-ASCII address requires the SMTPUTF8 parameter",
                ));
                return Flow::Continue;
            }
            let local_domain = !m.domain.starts_with('[') && self.ctx.accepts_domain(&m.domain);
            let authenticated = self.info.auth_user.is_some();
            if !local_domain && !self.ctx.may_relay(self.info.client_ip(), authenticated) {
                reject("relay_denied");
                self.send(reply(
                    550,
                    (5, 7, 1),
                    format!("<{}@{}>: Relay access denied", m.local, m.domain),
                ));
                return Flow::Continue;
            }
        }
        let verdict = self.ctx.plugins.rcpt(&self.info, tx, &to, &params).await;
        if !verdict.is_pass() {
            reject("plugin");
        }
        if let Some(flow) = self.refused(verdict) {
            return flow;
        }
        if let Some(tx) = self.tx.as_mut() {
            tx.recipients.push((to, params));
        }
        self.send_ok(reply(250, (2, 1, 5), "Ok"));
        Flow::Continue
    }
}
