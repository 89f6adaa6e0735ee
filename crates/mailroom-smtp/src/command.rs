//! SMTP commands (RFC 5321 §4.1.1) and their parser.
//!
//! The server hands each line from `line::LineReader` (CRLF already removed) to
//! [`parse_command`]; a [`Command`] drives the session state machine, a [`CommandError`] is
//! answered with [`CommandError::reply`] and the session goes on. The parser is syntactic: it
//! knows nothing about the session state or the extensions the server advertised. Addresses are
//! parsed by `address`, ESMTP parameters by `params`.

use crate::address::{self, AddressError, Path, PathKind};
use crate::params::{self, MailParams, RcptParams};
use crate::reply::{EnhancedCode, Reply};
use crate::{ForwardPath, ReversePath};

/// Longest SASL mechanism name (RFC 4422 §3.1).
const MAX_SASL_MECH_LEN: usize = 20;

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `EHLO domain` (RFC 5321 §4.1.1.1).
    Ehlo {
        /// The client's claimed name or address literal, as sent.
        domain: String,
    },
    /// `HELO domain` (RFC 5321 §4.1.1.1).
    Helo {
        /// The client's claimed name, as sent.
        domain: String,
    },
    /// `MAIL FROM:<reverse-path> [params]` (RFC 5321 §4.1.1.2).
    Mail {
        /// The sender, or the null path.
        from: ReversePath,
        /// ESMTP parameters.
        params: MailParams,
    },
    /// `RCPT TO:<forward-path> [params]` (RFC 5321 §4.1.1.3).
    Rcpt {
        /// The recipient, or the bare `<Postmaster>`.
        to: ForwardPath,
        /// ESMTP parameters.
        params: RcptParams,
    },
    /// `DATA` (RFC 5321 §4.1.1.4).
    Data,
    /// `BDAT size [LAST]` (RFC 3030 §2).
    Bdat {
        /// Octets of the chunk that follows the command line.
        size: u64,
        /// `LAST` was given: this chunk ends the message.
        last: bool,
    },
    /// `RSET` (RFC 5321 §4.1.1.5).
    Rset,
    /// `NOOP [string]` (RFC 5321 §4.1.1.9); the argument is ignored.
    Noop,
    /// `QUIT` (RFC 5321 §4.1.1.10).
    Quit,
    /// `VRFY string` (RFC 5321 §4.1.1.6).
    Vrfy {
        /// The argument as sent.
        arg: String,
    },
    /// `EXPN string` (RFC 5321 §4.1.1.7).
    Expn {
        /// The argument as sent.
        arg: String,
    },
    /// `HELP [string]` (RFC 5321 §4.1.1.8).
    Help {
        /// The topic, if any.
        topic: Option<String>,
    },
    /// `STARTTLS` (RFC 3207 §4).
    StartTls,
    /// `AUTH mechanism [initial-response]` (RFC 4954 §4).
    Auth {
        /// The SASL mechanism, upper-cased.
        mechanism: String,
        /// The base64 initial response, or `=` for an empty one.
        initial_response: Option<String>,
    },
}

impl Command {
    /// The verb in upper case, for logs and metric labels.
    pub fn verb(&self) -> &'static str {
        match self {
            Command::Ehlo { .. } => "EHLO",
            Command::Helo { .. } => "HELO",
            Command::Mail { .. } => "MAIL",
            Command::Rcpt { .. } => "RCPT",
            Command::Data => "DATA",
            Command::Bdat { .. } => "BDAT",
            Command::Rset => "RSET",
            Command::Noop => "NOOP",
            Command::Quit => "QUIT",
            Command::Vrfy { .. } => "VRFY",
            Command::Expn { .. } => "EXPN",
            Command::Help { .. } => "HELP",
            Command::StartTls => "STARTTLS",
            Command::Auth { .. } => "AUTH",
        }
    }
}

/// The class of a [`CommandError`], which fixes its reply code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandErrorKind {
    /// An unknown verb: `500 5.5.2`.
    UnknownCommand,
    /// NUL, control or non-ASCII octets in the verb, NUL or invalid UTF-8 anywhere (a TLS
    /// handshake or binary garbage on the plaintext port): `500 5.5.2`.
    Garbage,
    /// Malformed arguments, missing or extra arguments: `501 5.5.4`.
    Syntax,
    /// Malformed sender address: `553 5.1.7` (RFC 3463 §3.2 X.1.7).
    BadSenderAddress,
    /// Malformed recipient address: `553 5.1.3` (RFC 3463 §3.2 X.1.3).
    BadRecipientAddress,
    /// A path longer than 256 octets: `501 5.1.3` ("501 Path too long", RFC 5321 §4.5.3.1.9).
    PathTooLong,
    /// An ESMTP parameter the parser does not know: `555 5.5.4` (RFC 5321 §4.1.1.11).
    UnknownParameter,
    /// A known parameter with an invalid value, or given twice: `501 5.5.4`.
    InvalidParameter,
}

/// Why a command line was refused; [`CommandError::reply`] is what the client gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    kind: CommandErrorKind,
    message: String,
}

impl CommandError {
    /// An error of `kind` whose reply text is `message`.
    pub fn new(kind: CommandErrorKind, message: impl Into<String>) -> Self {
        CommandError {
            kind,
            message: message.into(),
        }
    }

    /// The class of error.
    pub fn kind(&self) -> CommandErrorKind {
        self.kind
    }

    /// The reply text.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The reply to send.
    pub fn reply(&self) -> Reply {
        let (code, enhanced) = match self.kind {
            CommandErrorKind::UnknownCommand | CommandErrorKind::Garbage => {
                (500, EnhancedCode(5, 5, 2))
            }
            CommandErrorKind::Syntax | CommandErrorKind::InvalidParameter => {
                (501, EnhancedCode(5, 5, 4))
            }
            CommandErrorKind::BadSenderAddress => (553, EnhancedCode(5, 1, 7)),
            CommandErrorKind::BadRecipientAddress => (553, EnhancedCode(5, 1, 3)),
            CommandErrorKind::PathTooLong => (501, EnhancedCode(5, 1, 3)),
            CommandErrorKind::UnknownParameter => (555, EnhancedCode(5, 5, 4)),
        };
        Reply::new(code, enhanced, self.message.clone())
    }
}

fn syntax(message: &str) -> CommandError {
    CommandError::new(CommandErrorKind::Syntax, message)
}

/// Parses one command line, without its CRLF.
///
/// Verbs are case-insensitive (RFC 5321 §2.4). Trailing spaces and tabs are ignored (many
/// clients send them). Arguments may be UTF-8 (RFC 6531 §3.3); whether an internationalized
/// address is acceptable without `SMTPUTF8` is left to the server.
pub fn parse_command(line: &[u8]) -> Result<Command, CommandError> {
    let line = trim_end(line);
    if line.contains(&0) {
        return Err(CommandError::new(
            CommandErrorKind::Garbage,
            "Syntax error, NUL in command",
        ));
    }
    let (verb, args) = match memchr::memchr(b' ', line) {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &[][..]),
    };
    if !verb.iter().all(u8::is_ascii_graphic) {
        return Err(CommandError::new(
            CommandErrorKind::Garbage,
            "Syntax error, command unrecognized",
        ));
    }
    let Ok(args) = std::str::from_utf8(args) else {
        return Err(CommandError::new(
            CommandErrorKind::Garbage,
            "Syntax error, invalid UTF-8",
        ));
    };
    let verb = verb.to_ascii_uppercase();
    let command = match verb.as_slice() {
        b"EHLO" => Command::Ehlo {
            domain: hello_domain(args, "Syntax: EHLO hostname")?,
        },
        b"HELO" => Command::Helo {
            domain: hello_domain(args, "Syntax: HELO hostname")?,
        },
        b"MAIL" => parse_mail(args)?,
        b"RCPT" => parse_rcpt(args)?,
        b"DATA" => no_args(args, Command::Data, "Syntax: DATA")?,
        b"BDAT" => parse_bdat(args)?,
        b"RSET" => no_args(args, Command::Rset, "Syntax: RSET")?,
        b"NOOP" => Command::Noop,
        b"QUIT" => no_args(args, Command::Quit, "Syntax: QUIT")?,
        b"VRFY" => Command::Vrfy {
            arg: required_arg(args, "Syntax: VRFY address")?,
        },
        b"EXPN" => Command::Expn {
            arg: required_arg(args, "Syntax: EXPN list")?,
        },
        b"HELP" => {
            let topic = checked_text(args)?.trim_matches([' ', '\t']);
            Command::Help {
                topic: (!topic.is_empty()).then(|| topic.to_owned()),
            }
        }
        b"STARTTLS" => no_args(args, Command::StartTls, "Syntax: STARTTLS")?,
        b"AUTH" => parse_auth(args)?,
        _ => {
            return Err(CommandError::new(
                CommandErrorKind::UnknownCommand,
                "Syntax error, command unrecognized",
            ));
        }
    };
    Ok(command)
}

fn trim_end(line: &[u8]) -> &[u8] {
    let end = line
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(0, |i| i + 1);
    &line[..end]
}

/// Refuses control characters (other than HTAB) in arguments: CR, ESC and friends have no
/// place in a command and could end up in logs or headers.
fn checked_text(args: &str) -> Result<&str, CommandError> {
    if args.chars().any(|c| c.is_control() && c != '\t') {
        return Err(syntax("Syntax error, control character in arguments"));
    }
    Ok(args)
}

fn no_args(args: &str, command: Command, usage: &str) -> Result<Command, CommandError> {
    if args.trim_matches([' ', '\t']).is_empty() {
        Ok(command)
    } else {
        Err(syntax(usage))
    }
}

fn required_arg(args: &str, usage: &str) -> Result<String, CommandError> {
    let arg = checked_text(args)?.trim_matches([' ', '\t']);
    if arg.is_empty() {
        return Err(syntax(usage));
    }
    Ok(arg.to_owned())
}

/// `EHLO SP ( Domain / address-literal )`: one token, kept as sent; whether it is a valid or
/// truthful name is the server's (and its plugins') business (RFC 5321 §4.1.4 forbids refusing
/// a session for a HELO name that does not verify).
fn hello_domain(args: &str, usage: &str) -> Result<String, CommandError> {
    let domain = required_arg(args, usage)?;
    if domain.contains([' ', '\t']) {
        return Err(syntax(usage));
    }
    Ok(domain)
}

/// `"FROM:"` / `"TO:"` (case-insensitive), an optional single space (tolerated, RFC 5321 forbids
/// it but many clients send it), then the path.
fn strip_path_prefix<'a>(args: &'a str, prefix: &str) -> Option<&'a str> {
    let head = args.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = &args[prefix.len()..];
    Some(rest.strip_prefix(' ').unwrap_or(rest))
}

fn parse_mail(args: &str) -> Result<Command, CommandError> {
    const USAGE: &str = "Syntax: MAIL FROM:<address>";
    let rest = strip_path_prefix(args, "FROM:").ok_or_else(|| syntax(USAGE))?;
    let rest = checked_text(rest)?;
    let (path, used) = address::parse_path(rest.as_bytes(), PathKind::Reverse)
        .map_err(|e| address_error(e, CommandErrorKind::BadSenderAddress, "sender", USAGE))?;
    let from = match path {
        Path::Null => ReversePath::Null,
        Path::Mailbox(m) => ReversePath::Mailbox(m),
        Path::Postmaster => return Err(syntax(USAGE)),
    };
    let params = params::parse_mail_params(param_list(&rest[used..])?)?;
    Ok(Command::Mail { from, params })
}

fn parse_rcpt(args: &str) -> Result<Command, CommandError> {
    const USAGE: &str = "Syntax: RCPT TO:<address>";
    let rest = strip_path_prefix(args, "TO:").ok_or_else(|| syntax(USAGE))?;
    let rest = checked_text(rest)?;
    let (path, used) = address::parse_path(rest.as_bytes(), PathKind::Forward)
        .map_err(|e| address_error(e, CommandErrorKind::BadRecipientAddress, "recipient", USAGE))?;
    let to = match path {
        Path::Postmaster => ForwardPath::Postmaster,
        Path::Mailbox(m) => ForwardPath::Mailbox(m),
        Path::Null => return Err(syntax(USAGE)),
    };
    let params = params::parse_rcpt_params(param_list(&rest[used..])?)?;
    Ok(Command::Rcpt { to, params })
}

fn address_error(e: AddressError, kind: CommandErrorKind, who: &str, usage: &str) -> CommandError {
    match e {
        AddressError::MissingBrackets => syntax(usage),
        AddressError::PathTooLong => {
            CommandError::new(CommandErrorKind::PathTooLong, "Path too long")
        }
        e => CommandError::new(kind, format!("Bad {who} address syntax: {e}")),
    }
}

/// What follows the closing `>`: nothing, or SP and parameters separated by spaces
/// (RFC 5321 §4.1.2 `Mail-parameters = esmtp-param *(SP esmtp-param)`; runs of spaces are
/// tolerated).
fn param_list(rest: &str) -> Result<impl Iterator<Item = &str>, CommandError> {
    if !rest.is_empty() && !rest.starts_with(' ') {
        return Err(syntax("Syntax error, space required after the address"));
    }
    Ok(rest.split(' ').filter(|p| !p.is_empty()))
}

/// `"BDAT" SP chunk-size [ SP end-marker ]` (RFC 3030 §2).
fn parse_bdat(args: &str) -> Result<Command, CommandError> {
    const USAGE: &str = "Syntax: BDAT size [LAST]";
    let mut tokens = args.split(' ').filter(|t| !t.is_empty());
    let size = tokens
        .next()
        .and_then(parse_digits)
        .ok_or_else(|| syntax(USAGE))?;
    let last = match tokens.next() {
        None => false,
        Some(t) if t.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(syntax(USAGE)),
    };
    if tokens.next().is_some() {
        return Err(syntax(USAGE));
    }
    Ok(Command::Bdat { size, last })
}

/// `1*DIGIT` as a `u64`; `None` on anything else or overflow.
pub(crate) fn parse_digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `"AUTH" SP sasl-mech [SP initial-response]` (RFC 4954 §4).
fn parse_auth(args: &str) -> Result<Command, CommandError> {
    const USAGE: &str = "Syntax: AUTH mechanism [initial-response]";
    let mut tokens = args.split(' ').filter(|t| !t.is_empty());
    let mechanism = tokens.next().ok_or_else(|| syntax(USAGE))?;
    // sasl-mech = 1*20mech-char; mech-char = UPPER-ALPHA / DIGIT / HYPHEN / UNDERSCORE
    // (RFC 4422 §3.1), accepted in any case.
    let mech_ok = mechanism.len() <= MAX_SASL_MECH_LEN
        && mechanism
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !mech_ok {
        return Err(syntax(USAGE));
    }
    let initial_response = match tokens.next() {
        None => None,
        Some(r)
            if r.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')) =>
        {
            Some(r.to_owned())
        }
        Some(_) => return Err(syntax("Syntax error, invalid base64 initial response")),
    };
    if tokens.next().is_some() {
        return Err(syntax(USAGE));
    }
    Ok(Command::Auth {
        mechanism: mechanism.to_ascii_uppercase(),
        initial_response,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{Body, Notify, Orcpt, Ret};
    use crate::{Mailbox, ReversePath};

    fn mb(local: &str, domain: &str) -> Mailbox {
        Mailbox {
            local: local.into(),
            domain: domain.into(),
        }
    }

    fn from(local: &str, domain: &str) -> ReversePath {
        ReversePath::Mailbox(mb(local, domain))
    }

    fn to(local: &str, domain: &str) -> ForwardPath {
        ForwardPath::Mailbox(mb(local, domain))
    }

    /// Expected outcome: a command, or the reply code and enhanced code of the error.
    enum Want {
        Ok(Command),
        Err(u16, EnhancedCode),
    }
    use Want::{Err as E, Ok as O};

    const E500: (u16, EnhancedCode) = (500, EnhancedCode(5, 5, 2));
    const E501: (u16, EnhancedCode) = (501, EnhancedCode(5, 5, 4));
    const E553R: (u16, EnhancedCode) = (553, EnhancedCode(5, 1, 3));
    const E553S: (u16, EnhancedCode) = (553, EnhancedCode(5, 1, 7));
    const E555: (u16, EnhancedCode) = (555, EnhancedCode(5, 5, 4));

    fn err((code, enhanced): (u16, EnhancedCode)) -> Want {
        E(code, enhanced)
    }

    fn check(cases: &[(&[u8], Want)]) {
        for (input, want) in cases {
            let got = parse_command(input);
            let shown = String::from_utf8_lossy(input);
            match (want, got) {
                (O(c), Ok(g)) => assert_eq!(&g, c, "{shown}"),
                (E(code, enh), Err(e)) => {
                    let r = e.reply();
                    assert_eq!((r.code, r.enhanced), (*code, Some(*enh)), "{shown}: {e}");
                }
                (O(c), Err(e)) => panic!("{shown}: want {c:?}, got error {e:?}"),
                (E(code, _), Ok(g)) => panic!("{shown}: want {code}, got {g:?}"),
            }
        }
    }

    #[test]
    fn hello() {
        check(&[
            (
                b"EHLO mx.example.com",
                O(Command::Ehlo {
                    domain: "mx.example.com".into(),
                }),
            ),
            (
                b"ehlo [192.0.2.1]",
                O(Command::Ehlo {
                    domain: "[192.0.2.1]".into(),
                }),
            ),
            (b"HeLo x", O(Command::Helo { domain: "x".into() })),
            (b"EHLO x  ", O(Command::Ehlo { domain: "x".into() })),
            (b"EHLO  x", O(Command::Ehlo { domain: "x".into() })),
            (
                b"EHLO b\xc3\xbccher.de",
                O(Command::Ehlo {
                    domain: "bücher.de".into(),
                }),
            ),
            (b"EHLO", err(E501)),
            (b"EHLO ", err(E501)),
            (b"HELO", err(E501)),
            (b"EHLO a b", err(E501)),
            (b"EHLO a\rb", err(E501)),
            (b"EHLO a\x1bb", err(E501)),
            (b"EHLO a\x00", err(E500)),
            (b"EHLO \xff\xfe", err(E500)),
            (b"EHLOx", err(E500)),
        ]);
    }

    #[test]
    fn mail() {
        let p = MailParams::default;
        check(&[
            (
                b"MAIL FROM:<a@b>",
                O(Command::Mail {
                    from: from("a", "b"),
                    params: p(),
                }),
            ),
            (
                b"mail from:<a@b>",
                O(Command::Mail {
                    from: from("a", "b"),
                    params: p(),
                }),
            ),
            (
                b"MAIL FROM: <a@b>",
                O(Command::Mail {
                    from: from("a", "b"),
                    params: p(),
                }),
            ),
            (
                b"MAIL FROM:<a@b> ",
                O(Command::Mail {
                    from: from("a", "b"),
                    params: p(),
                }),
            ),
            (
                b"MAIL FROM:<>",
                O(Command::Mail {
                    from: ReversePath::Null,
                    params: p(),
                }),
            ),
            (
                b"MAIL FROM:<@a,@b:u@d>",
                O(Command::Mail {
                    from: from("u", "d"),
                    params: p(),
                }),
            ),
            (
                b"MAIL FROM:<\"a b\"@d>",
                O(Command::Mail {
                    from: from("a b", "d"),
                    params: p(),
                }),
            ),
            (
                b"MAIL FROM:<\"a\\\"b\"@d>",
                O(Command::Mail {
                    from: from("a\"b", "d"),
                    params: p(),
                }),
            ),
            (
                b"MAIL FROM:<u@[192.0.2.1]>",
                O(Command::Mail {
                    from: from("u", "[192.0.2.1]"),
                    params: p(),
                }),
            ),
            (
                b"MAIL FROM:<u@[IPv6:2001:db8::1]>",
                O(Command::Mail {
                    from: from("u", "[IPv6:2001:db8::1]"),
                    params: p(),
                }),
            ),
            (
                "MAIL FROM:<用户@例子.广告>".as_bytes(),
                O(Command::Mail {
                    from: from("用户", "例子.广告"),
                    params: p(),
                }),
            ),
            (
                b"MAIL FROM:<postmaster@d>",
                O(Command::Mail {
                    from: from("postmaster", "d"),
                    params: p(),
                }),
            ),
            (b"MAIL FROM:a@b", err(E501)),
            (b"MAIL FROM:<a@b", err(E501)),
            (b"MAIL FROM:  <a@b>", err(E501)),
            (b"MAIL FROM <a@b>", err(E501)),
            (b"MAIL TO:<a@b>", err(E501)),
            (b"MAIL", err(E501)),
            (b"MAIL FROM:<a@b>SIZE=1", err(E501)),
            (b"MAIL FROM:<Postmaster>", err(E553S)),
            (b"MAIL FROM:<a@>", err(E553S)),
            (b"MAIL FROM:<a..b@c>", err(E553S)),
            (b"MAIL FROM:<a@b..c>", err(E553S)),
            (b"MAIL FROM:<a@[1.2.3]>", err(E553S)),
            (b"MAIL FROM:<@a:>", err(E553S)),
            (b"MAIL FROM:<a@b\rc>", err(E501)),
        ]);
    }

    #[test]
    fn mail_lengths() {
        let local64 = "l".repeat(64);
        let ok = format!("MAIL FROM:<{local64}@d>");
        assert!(parse_command(ok.as_bytes()).is_ok());
        let local65 = format!("MAIL FROM:<{}@d>", "l".repeat(65));
        check(&[(local65.as_bytes(), err(E553S))]);
        let long_domain = format!(
            "RCPT TO:<a@{}.{}.{}.{}.d>",
            "x".repeat(63),
            "x".repeat(63),
            "x".repeat(63),
            "x".repeat(63)
        );
        check(&[(long_domain.as_bytes(), err(E553R))]);
        // local 64 + domain 200: each within its limit, but the path exceeds 256 octets
        let path = format!(
            "RCPT TO:<{local64}@{}.{}.{}.d>",
            "x".repeat(63),
            "x".repeat(63),
            "x".repeat(63)
        );
        check(&[(path.as_bytes(), E(501, EnhancedCode(5, 1, 3)))]);
    }

    #[test]
    fn mail_params() {
        let with = |params: MailParams| {
            O(Command::Mail {
                from: from("a", "b"),
                params,
            })
        };
        check(&[
            (
                b"MAIL FROM:<a@b> SIZE=1000",
                with(MailParams {
                    size: Some(1000),
                    ..Default::default()
                }),
            ),
            (
                b"MAIL FROM:<a@b> size=0",
                with(MailParams {
                    size: Some(0),
                    ..Default::default()
                }),
            ),
            (
                b"MAIL FROM:<a@b> SIZE=99999999999999999999999",
                with(MailParams {
                    size: Some(u64::MAX),
                    ..Default::default()
                }),
            ),
            (
                b"MAIL FROM:<a@b> BODY=8BITMIME",
                with(MailParams {
                    body: Some(Body::EightBitMime),
                    ..Default::default()
                }),
            ),
            (
                b"MAIL FROM:<a@b> body=7bit",
                with(MailParams {
                    body: Some(Body::SevenBit),
                    ..Default::default()
                }),
            ),
            (
                b"MAIL FROM:<a@b> BODY=BINARYMIME",
                with(MailParams {
                    body: Some(Body::BinaryMime),
                    ..Default::default()
                }),
            ),
            (
                b"MAIL FROM:<a@b> SMTPUTF8",
                with(MailParams {
                    smtputf8: true,
                    ..Default::default()
                }),
            ),
            (
                b"MAIL FROM:<a@b> RET=HDRS",
                with(MailParams {
                    ret: Some(Ret::Hdrs),
                    ..Default::default()
                }),
            ),
            (
                b"MAIL FROM:<a@b> ret=full",
                with(MailParams {
                    ret: Some(Ret::Full),
                    ..Default::default()
                }),
            ),
            (
                b"MAIL FROM:<a@b> ENVID=QQ+2B314",
                with(MailParams {
                    envid: Some("QQ+314".into()),
                    ..Default::default()
                }),
            ),
            (
                b"MAIL FROM:<a@b> AUTH=<>",
                with(MailParams {
                    auth: Some("<>".into()),
                    ..Default::default()
                }),
            ),
            (
                b"MAIL FROM:<a@b> AUTH=e+2Bx@d",
                with(MailParams {
                    auth: Some("e+x@d".into()),
                    ..Default::default()
                }),
            ),
            (
                b"MAIL FROM:<a@b>  SIZE=10   BODY=8BITMIME SMTPUTF8 RET=FULL ENVID=x",
                with(MailParams {
                    size: Some(10),
                    body: Some(Body::EightBitMime),
                    smtputf8: true,
                    ret: Some(Ret::Full),
                    envid: Some("x".into()),
                    auth: None,
                }),
            ),
            (b"MAIL FROM:<a@b> SIZE=", err(E501)),
            (b"MAIL FROM:<a@b> SIZE=1k", err(E501)),
            (b"MAIL FROM:<a@b> SIZE=-1", err(E501)),
            (b"MAIL FROM:<a@b> SIZE", err(E501)),
            (b"MAIL FROM:<a@b> SIZE=1 SIZE=2", err(E501)),
            (b"MAIL FROM:<a@b> SIZE=1 size=1", err(E501)),
            (b"MAIL FROM:<a@b> BODY=9BIT", err(E501)),
            (b"MAIL FROM:<a@b> SMTPUTF8=yes", err(E501)),
            (b"MAIL FROM:<a@b> RET=ALL", err(E501)),
            (b"MAIL FROM:<a@b> ENVID=a+2", err(E501)),
            (b"MAIL FROM:<a@b> ENVID=a+0D+0Ab", err(E501)),
            (b"MAIL FROM:<a@b> AUTH=a+zz", err(E501)),
            (b"MAIL FROM:<a@b> FOO=bar", err(E555)),
            (b"MAIL FROM:<a@b> XFORWARD", err(E555)),
            (b"MAIL FROM:<a@b> NOTIFY=NEVER", err(E555)),
            (b"MAIL FROM:<a@b> =x", err(E501)),
            (b"MAIL FROM:<a@b> -X=1", err(E501)),
            (b"MAIL FROM:<a@b> X_Y=1", err(E501)),
            (b"MAIL FROM:<a@b> X-Y=a=b", err(E501)),
        ]);
        let long_envid = format!("MAIL FROM:<a@b> ENVID={}", "e".repeat(101));
        check(&[(long_envid.as_bytes(), err(E501))]);
    }

    #[test]
    fn mail_utf8_without_smtputf8_is_not_a_parse_error() {
        let Ok(Command::Mail {
            from: ReversePath::Mailbox(m),
            params,
        }) = parse_command("MAIL FROM:<jösé@exämple.de>".as_bytes())
        else {
            panic!("should parse");
        };
        assert!(!m.is_ascii());
        assert!(!params.smtputf8);
    }

    #[test]
    fn rcpt() {
        let p = RcptParams::default;
        let notify = |never, success, failure, delay| RcptParams {
            notify: Some(Notify {
                never,
                success,
                failure,
                delay,
            }),
            orcpt: None,
        };
        check(&[
            (
                b"RCPT TO:<a@b>",
                O(Command::Rcpt {
                    to: to("a", "b"),
                    params: p(),
                }),
            ),
            (
                b"rcpt to: <a@b>",
                O(Command::Rcpt {
                    to: to("a", "b"),
                    params: p(),
                }),
            ),
            (
                b"RCPT TO:<Postmaster>",
                O(Command::Rcpt {
                    to: ForwardPath::Postmaster,
                    params: p(),
                }),
            ),
            (
                b"RCPT TO:<POSTMASTER>",
                O(Command::Rcpt {
                    to: ForwardPath::Postmaster,
                    params: p(),
                }),
            ),
            (
                b"RCPT TO:<@x.y:a@b>",
                O(Command::Rcpt {
                    to: to("a", "b"),
                    params: p(),
                }),
            ),
            (
                b"RCPT TO:<a@b> NOTIFY=NEVER",
                O(Command::Rcpt {
                    to: to("a", "b"),
                    params: notify(true, false, false, false),
                }),
            ),
            (
                b"RCPT TO:<a@b> notify=success,Failure,DELAY",
                O(Command::Rcpt {
                    to: to("a", "b"),
                    params: notify(false, true, true, true),
                }),
            ),
            (
                b"RCPT TO:<a@b> NOTIFY=FAILURE",
                O(Command::Rcpt {
                    to: to("a", "b"),
                    params: notify(false, false, true, false),
                }),
            ),
            (
                b"RCPT TO:<a@b> ORCPT=rfc822;x+2By@z",
                O(Command::Rcpt {
                    to: to("a", "b"),
                    params: RcptParams {
                        notify: None,
                        orcpt: Some(Orcpt {
                            addr_type: "rfc822".into(),
                            addr: "x+y@z".into(),
                        }),
                    },
                }),
            ),
            (
                "RCPT TO:<a@b> ORCPT=utf-8;jöse@z".as_bytes(),
                O(Command::Rcpt {
                    to: to("a", "b"),
                    params: RcptParams {
                        notify: None,
                        orcpt: Some(Orcpt {
                            addr_type: "utf-8".into(),
                            addr: "jöse@z".into(),
                        }),
                    },
                }),
            ),
            (b"RCPT TO:<>", err(E553R)),
            (b"RCPT TO:a@b", err(E501)),
            (b"RCPT TO:<a@b", err(E501)),
            (b"RCPT FROM:<a@b>", err(E501)),
            (b"RCPT TO:<a b@c>", err(E553R)),
            (b"RCPT TO:<a@b> NOTIFY=NEVER,SUCCESS", err(E501)),
            (b"RCPT TO:<a@b> NOTIFY=", err(E501)),
            (b"RCPT TO:<a@b> NOTIFY=SUCCESS,", err(E501)),
            (b"RCPT TO:<a@b> NOTIFY=SOMETIMES", err(E501)),
            (b"RCPT TO:<a@b> NOTIFY=DELAY NOTIFY=DELAY", err(E501)),
            (b"RCPT TO:<a@b> ORCPT=x@y", err(E501)),
            (b"RCPT TO:<a@b> ORCPT=;x@y", err(E501)),
            (b"RCPT TO:<a@b> ORCPT=rfc822;", err(E501)),
            (b"RCPT TO:<a@b> ORCPT=rfc822;a+0Ab", err(E501)),
            (b"RCPT TO:<a@b> SIZE=10", err(E555)),
            (b"RCPT TO:<a@b> FOO", err(E555)),
        ]);
    }

    #[test]
    fn data_and_bdat() {
        check(&[
            (b"DATA", O(Command::Data)),
            (b"data ", O(Command::Data)),
            (b"DATA x", err(E501)),
            (
                b"BDAT 0",
                O(Command::Bdat {
                    size: 0,
                    last: false,
                }),
            ),
            (
                b"BDAT 1000 LAST",
                O(Command::Bdat {
                    size: 1000,
                    last: true,
                }),
            ),
            (
                b"bdat 12 last",
                O(Command::Bdat {
                    size: 12,
                    last: true,
                }),
            ),
            (
                b"BDAT 18446744073709551615",
                O(Command::Bdat {
                    size: u64::MAX,
                    last: false,
                }),
            ),
            (b"BDAT 18446744073709551616", err(E501)),
            (b"BDAT", err(E501)),
            (b"BDAT x", err(E501)),
            (b"BDAT -1", err(E501)),
            (b"BDAT 1 FIRST", err(E501)),
            (b"BDAT 1 LAST x", err(E501)),
        ]);
    }

    #[test]
    fn simple_verbs() {
        check(&[
            (b"RSET", O(Command::Rset)),
            (b"RSET now", err(E501)),
            (b"NOOP", O(Command::Noop)),
            (b"noop whatever you like", O(Command::Noop)),
            (b"QUIT", O(Command::Quit)),
            (b"QUIT now", err(E501)),
            (b"STARTTLS", O(Command::StartTls)),
            (b"starttls", O(Command::StartTls)),
            (b"STARTTLS x", err(E501)),
            (
                b"VRFY postmaster",
                O(Command::Vrfy {
                    arg: "postmaster".into(),
                }),
            ),
            (
                b"VRFY <a@b>",
                O(Command::Vrfy {
                    arg: "<a@b>".into(),
                }),
            ),
            (b"VRFY", err(E501)),
            (
                b"EXPN staff",
                O(Command::Expn {
                    arg: "staff".into(),
                }),
            ),
            (b"EXPN", err(E501)),
            (b"HELP", O(Command::Help { topic: None })),
            (
                b"HELP MAIL",
                O(Command::Help {
                    topic: Some("MAIL".into()),
                }),
            ),
            (b"HELP   ", O(Command::Help { topic: None })),
        ]);
    }

    #[test]
    fn auth() {
        let auth = |m: &str, r: Option<&str>| {
            O(Command::Auth {
                mechanism: m.into(),
                initial_response: r.map(Into::into),
            })
        };
        check(&[
            (b"AUTH PLAIN", auth("PLAIN", None)),
            (
                b"auth plain AGZvbwBiYXI=",
                auth("PLAIN", Some("AGZvbwBiYXI=")),
            ),
            (b"AUTH PLAIN =", auth("PLAIN", Some("="))),
            (b"AUTH SCRAM-SHA-256", auth("SCRAM-SHA-256", None)),
            (b"AUTH", err(E501)),
            (b"AUTH PLAIN a b", err(E501)),
            (b"AUTH PLAIN a!b", err(E501)),
            (b"AUTH PL.AIN", err(E501)),
            (b"AUTH ABCDEFGHIJKLMNOPQRSTU", err(E501)),
        ]);
    }

    #[test]
    fn garbage() {
        check(&[
            (b"", err(E500)),
            (b"TURN", err(E500)),
            (b"GET / HTTP/1.1", err(E500)),
            (b"MAIL\x00 FROM:<a@b>", err(E500)),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", err(E500)),
            (b"M\xc3\xa4IL FROM:<a@b>", err(E500)),
            (b"MAIL FROM:<a@b> \xff", err(E500)),
            (b"\tMAIL FROM:<a@b>", err(E500)),
            (b" MAIL FROM:<a@b>", err(E500)),
        ]);
    }

    #[test]
    fn error_reply_text() {
        let Err(e) = parse_command(b"RCPT TO:<a@b> FOO=1") else {
            panic!("should fail")
        };
        assert_eq!(e.kind(), CommandErrorKind::UnknownParameter);
        assert_eq!(
            e.reply().to_bytes(),
            b"555 5.5.4 Unsupported parameter FOO\r\n"
        );
        assert_eq!(parse_command(b"RSET").map(|c| c.verb()), Ok("RSET"));
    }
}
