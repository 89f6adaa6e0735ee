//! AUTH PLAIN and LOGIN (RFC 4954, RFC 4616), offered and accepted only over TLS. A failed
//! attempt counts as an error towards the session's error limit.

use crate::conn::SmtpStream;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use mailroom_smtp::Reply;

use super::{Flow, Input, Session, reply};
use crate::metrics;

enum Step {
    Value(String),
    Cancelled,
    Invalid,
    Closed(&'static str),
}

impl<S: SmtpStream> Session<S> {
    /// Sends a 334 challenge and reads the client's base64 answer.
    async fn challenge(&mut self, prompt: &str) -> Step {
        self.send_ok(Reply {
            code: 334,
            enhanced: None,
            lines: vec![prompt.to_string()],
        });
        match self.next_line(self.ctx.timeouts.command).await {
            Input::Closed(why) => Step::Closed(why),
            Input::Line(l) => decode(&l),
        }
    }

    pub(crate) async fn auth(&mut self, mechanism: String, initial: Option<String>) -> Flow {
        if !self.info.tls {
            // RFC 4954 §4 / §6: 538 when the mechanism needs encryption.
            self.send(reply(
                538,
                (5, 7, 11),
                "Encryption required for requested authentication mechanism",
            ));
            return Flow::Continue;
        }
        let Some(users) = self.ctx.users.clone() else {
            self.send(reply(502, (5, 5, 1), "AUTH not available on this listener"));
            return Flow::Continue;
        };
        if self.info.auth_user.is_some() {
            self.send(reply(503, (5, 5, 1), "Already authenticated"));
            return Flow::Continue;
        }
        if self.tx.is_some() {
            self.send(reply(
                503,
                (5, 5, 1),
                "AUTH not allowed during a mail transaction",
            ));
            return Flow::Continue;
        }
        if !self.ctx.auth_mechanisms.contains(&mechanism.as_str()) {
            self.send(reply(504, (5, 5, 4), "Unrecognized authentication type"));
            return Flow::Continue;
        }
        let credentials = match mechanism.as_str() {
            "PLAIN" => self.plain(initial).await,
            _ => self.login(initial).await,
        };
        let (user, password) = match credentials {
            Ok(c) => c,
            Err(flow) => return flow,
        };
        if users.verify(&user, &password).await {
            tracing::info!(listener = %self.ctx.name, user = %user, client = %self.info.client_ip(), "authenticated");
            self.info.auth_user = Some(user);
            self.send_ok(reply(235, (2, 7, 0), "Authentication successful"));
        } else {
            metrics::PROTOCOL_ERRORS
                .with_label_values(&[&self.ctx.name, "auth_failed"])
                .inc();
            tracing::warn!(listener = %self.ctx.name, user = %user, client = %self.info.client_ip(), "authentication failed");
            self.send(reply(535, (5, 7, 8), "Authentication credentials invalid"));
        }
        Flow::Continue
    }

    fn step_failed(&mut self, step: Step) -> Flow {
        match step {
            Step::Closed(why) => Flow::Close(why),
            Step::Cancelled => {
                self.send(reply(501, (5, 0, 0), "Authentication cancelled"));
                Flow::Continue
            }
            Step::Invalid | Step::Value(_) => {
                self.send(reply(501, (5, 5, 2), "Invalid authentication data"));
                Flow::Continue
            }
        }
    }

    async fn plain(&mut self, initial: Option<String>) -> Result<(String, String), Flow> {
        let step = match initial {
            Some(i) if i == "=" => Step::Value(String::new()),
            Some(i) => decode(i.as_bytes()),
            None => self.challenge("").await,
        };
        let Step::Value(text) = step else {
            return Err(self.step_failed(step));
        };
        // authzid NUL authcid NUL passwd (RFC 4616 §2).
        let mut parts = text.split('\0');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(authz), Some(user), Some(pass), None)
                if !user.is_empty() && (authz.is_empty() || authz == user) =>
            {
                Ok((user.to_string(), pass.to_string()))
            }
            _ => Err(self.step_failed(Step::Invalid)),
        }
    }

    async fn login(&mut self, initial: Option<String>) -> Result<(String, String), Flow> {
        let step = match initial {
            Some(i) => decode(i.as_bytes()),
            None => self.challenge("VXNlcm5hbWU6").await,
        };
        let Step::Value(user) = step else {
            return Err(self.step_failed(step));
        };
        let step = self.challenge("UGFzc3dvcmQ6").await;
        let Step::Value(password) = step else {
            return Err(self.step_failed(step));
        };
        Ok((user, password))
    }
}

fn decode(line: &[u8]) -> Step {
    if line == b"*" {
        return Step::Cancelled;
    }
    match B64
        .decode(line)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
    {
        Some(s) => Step::Value(s),
        None => Step::Invalid,
    }
}
