//! EHLO and HELO (RFC 5321 §4.1.1.1): greet, reset the transaction, and list the extensions
//! this session may use. STARTTLS is offered only before TLS; AUTH only over TLS.

use crate::conn::SmtpStream;
use mailroom_smtp::Reply;

use super::{Flow, Session};

impl<S: SmtpStream> Session<S> {
    pub(crate) async fn ehlo(&mut self, domain: String, esmtp: bool) -> Flow {
        let verdict = self.ctx.plugins.helo(&self.info, &domain).await;
        if let Some(flow) = self.refused(verdict) {
            return flow;
        }
        self.reset_transaction();
        let client_ip = self.info.client_ip();
        self.info.helo = Some(domain.clone());
        self.info.esmtp = esmtp;
        let greeting = format!("{} Hello {} [{}]", self.ctx.hostname, domain, client_ip);
        if !esmtp {
            // RFC 2034 §3: no enhanced code on HELO/EHLO replies.
            self.send_ok(Reply {
                code: 250,
                enhanced: None,
                lines: vec![greeting],
            });
            return Flow::Continue;
        }
        let mut lines = vec![
            greeting,
            "PIPELINING".to_string(),
            format!("SIZE {}", self.ctx.limits.max_message_size),
            "8BITMIME".to_string(),
            "SMTPUTF8".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
            "CHUNKING".to_string(),
            "BINARYMIME".to_string(),
            "DSN".to_string(),
        ];
        if self.ctx.tls.is_some() && !self.info.tls {
            lines.push("STARTTLS".to_string());
        }
        if self.info.tls && self.ctx.users.is_some() && !self.ctx.auth_mechanisms.is_empty() {
            lines.push(format!("AUTH {}", self.ctx.auth_mechanisms.join(" ")));
        }
        lines.push("HELP".to_string());
        self.send_ok(Reply {
            code: 250,
            enhanced: None,
            lines,
        });
        Flow::Continue
    }
}
