//! `recipients`: accepts only the known recipients of the domains it covers (Haraka's
//! `rcpt_to.in_host_list` / `qmail-deliverable`, Postfix's `reject_unlisted_recipient` with
//! `virtual_alias_maps`). For a recipient of a covered domain it asks, in order:
//!
//! 1. the spec's `addresses` and `aliases`, then the `file`'s addresses and aliases;
//! 2. `postmaster@<domain>`, always known (RFC 5321 §4.5.1);
//! 3. the `http` lookup;
//! 4. the catch-all of the domain (the spec's, then the file's).
//!
//! None knows it: `550 5.1.1 <address>: Recipient address rejected: user unknown`. An alias or
//! a catch-all is accepted at RCPT and noted in the transaction; at the data hook the plugin
//! asks the server to queue the targets instead ([`MessageEdits::rewrite_recipient`]).
//! Addresses are compared case-insensitively, local part included (what users expect, though
//! RFC 5321 §2.4 lets a server tell `User` from `user`).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode, Uri};
use mailroom_config::{FailMode, RecipientsPluginSpec};
use mailroom_smtp::{ForwardPath, Mailbox, RcptParams};
use mailroom_telemetry::register;
use prometheus::{IntCounterVec, Opts};
use serde::Deserialize;

use crate::http::{HttpClient, excerpt, exchange, http_client};
use crate::{Env, MessageEdits, Plugin, PluginError, SessionInfo, Transaction, Verdict};

/// Recipients looked up, by outcome.
static LOOKUPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "mailroom_plugin_recipients_lookups_total",
                "Recipients the recipients plugin looked up, by listener and outcome (known, \
                 alias, catch_all, unknown, error).",
            ),
            &["listener", "outcome"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}")),
    )
});

/// How often, at most, the file's modification time is looked at.
const RELOAD_CHECK: Duration = Duration::from_secs(2);
/// Largest answer read from the lookup service.
const MAX_ANSWER: usize = 64 * 1024;

/// What a source knows about one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Found {
    /// A mailbox: deliver as addressed.
    Known,
    /// An alias: deliver to these addresses instead.
    Alias(Vec<String>),
    /// Not known, but the domain's catch-all takes it.
    CatchAll(String),
    /// Nobody.
    Unknown,
}

impl Found {
    fn label(&self) -> &'static str {
        match self {
            Found::Known => "known",
            Found::Alias(_) => "alias",
            Found::CatchAll(_) => "catch_all",
            Found::Unknown => "unknown",
        }
    }
}

/// The comparison key of an address: `local@domain`, both lower-cased.
fn key(m: &Mailbox) -> String {
    format!(
        "{}@{}",
        m.local.to_lowercase(),
        m.domain_lowercase().trim_end_matches('.')
    )
}

fn parse_address(text: &str) -> Result<Mailbox, String> {
    Mailbox::parse(text.trim()).map_err(|e| format!("{:?} is not an address: {e}", text.trim()))
}

/// Addresses, aliases and catch-alls from one source (the spec or the file).
#[derive(Debug, Default)]
struct Table {
    known: HashSet<String>,
    aliases: HashMap<String, Vec<String>>,
    catch_all: HashMap<String, String>,
}

impl Table {
    fn add_address(&mut self, address: &str) -> Result<(), String> {
        self.known.insert(key(&parse_address(address)?));
        Ok(())
    }

    fn add_alias(&mut self, address: &str, targets: &[&str]) -> Result<(), String> {
        let alias = key(&parse_address(address)?);
        if targets.is_empty() {
            return Err(format!("alias {address:?} has no target"));
        }
        let targets = targets
            .iter()
            .map(|t| parse_address(t).map(|m| m.to_string()))
            .collect::<Result<_, _>>()?;
        self.aliases.insert(alias, targets);
        Ok(())
    }

    fn add_catch_all(&mut self, domain: &str, target: &str) -> Result<(), String> {
        let domain = domain.trim().trim_end_matches('.').to_lowercase();
        if domain.is_empty() || domain.contains(|c: char| c.is_whitespace() || c == '@') {
            return Err(format!("{domain:?} is not a domain"));
        }
        let target = parse_address(target)?.to_string();
        self.catch_all.insert(domain, target);
        Ok(())
    }

    /// Parses the file format: `user@example.com`, `alias@example.com: a@x, b@y`,
    /// `@example.com: target@x`; empty lines and lines starting with `#` are skipped.
    fn parse(text: &str) -> Result<Table, String> {
        let mut table = Table::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let added = match line.split_once(':') {
                None => table.add_address(line),
                Some((left, right)) => {
                    let targets: Vec<&str> = right
                        .split(',')
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .collect();
                    match left.trim().strip_prefix('@') {
                        Some(domain) => match targets.as_slice() {
                            [target] => table.add_catch_all(domain, target),
                            _ => Err(format!("the catch-all of {domain} needs one target")),
                        },
                        None => table.add_alias(left, &targets),
                    }
                }
            };
            added.map_err(|e| format!("line {}: {e}", n + 1))?;
        }
        Ok(table)
    }

    fn exact(&self, key: &str) -> Option<Found> {
        if let Some(targets) = self.aliases.get(key) {
            return Some(Found::Alias(targets.clone()));
        }
        self.known.contains(key).then_some(Found::Known)
    }

    fn catch_all(&self, domain: &str) -> Option<Found> {
        self.catch_all
            .get(domain)
            .map(|target| Found::CatchAll(target.clone()))
    }
}

/// The recipients file, re-read when its modification time or size changes.
#[derive(Debug)]
struct FileSource {
    path: PathBuf,
    state: Mutex<FileState>,
}

#[derive(Debug)]
struct FileState {
    /// When the file was last looked at (None: never; look now).
    checked: Option<Instant>,
    /// Modification time and size of the version last read.
    stamp: Option<(SystemTime, u64)>,
    table: Arc<Table>,
}

fn stamp(meta: &std::fs::Metadata) -> Option<(SystemTime, u64)> {
    meta.modified().ok().map(|t| (t, meta.len()))
}

impl FileSource {
    /// Reads the file now (`load`) or leaves it for the first lookup.
    fn new(path: &str, load: bool) -> Result<Self, String> {
        let mut state = FileState {
            checked: None,
            stamp: None,
            table: Arc::default(),
        };
        if load {
            let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {path}: {e}"))?;
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
            state.table = Arc::new(Table::parse(&text).map_err(|e| format!("{path}: {e}"))?);
            state.stamp = stamp(&meta);
            state.checked = Some(Instant::now());
        }
        Ok(Self {
            path: PathBuf::from(path),
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FileState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current table; looks at the file when the last look is [`RELOAD_CHECK`] old. A
    /// file that vanished or does not parse leaves the last good table in use.
    async fn table(&self) -> Arc<Table> {
        let last_stamp = {
            let mut state = self.lock();
            if state.checked.is_some_and(|t| t.elapsed() < RELOAD_CHECK) {
                return Arc::clone(&state.table);
            }
            state.checked = Some(Instant::now());
            state.stamp
        };
        let path = self.path.display();
        let meta = match tokio::fs::metadata(&self.path).await {
            Ok(meta) => meta,
            Err(e) => {
                tracing::warn!(file = %path, error = %e, "recipients file unreadable; keeping the last version");
                return Arc::clone(&self.lock().table);
            }
        };
        let now = stamp(&meta);
        if now.is_some() && now == last_stamp {
            return Arc::clone(&self.lock().table);
        }
        let parsed = match tokio::fs::read_to_string(&self.path).await {
            Ok(text) => Table::parse(&text),
            Err(e) => Err(e.to_string()),
        };
        let mut state = self.lock();
        // Remember this version either way, so a broken edit is reported once.
        state.stamp = now;
        match parsed {
            Ok(table) => {
                tracing::info!(file = %path, addresses = table.known.len(), aliases = table.aliases.len(), "recipients file loaded");
                state.table = Arc::new(table);
            }
            Err(e) => {
                tracing::warn!(file = %path, error = %e, "recipients file does not parse; keeping the last version");
            }
        }
        Arc::clone(&state.table)
    }
}

/// The HTTP lookup.
#[derive(Debug)]
struct HttpSource {
    client: HttpClient,
    url: String,
    timeout: Duration,
    on_error: FailMode,
}

/// The lookup service's answer to a known address.
#[derive(Debug, Default, Deserialize)]
struct HttpAnswer {
    #[serde(default)]
    targets: Vec<String>,
}

/// `text` URL-encoded for a query value (RFC 3986 §2: everything but unreserved characters).
fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl HttpSource {
    async fn lookup(&self, address: &str) -> Result<Found, String> {
        let separator = if self.url.contains('?') { '&' } else { '?' };
        let url = format!("{}{separator}address={}", self.url, url_encode(address));
        let uri = url.parse::<Uri>().map_err(|e| format!("{url}: {e}"))?;
        let request = Request::get(uri)
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("request: {e}"))?;
        let (status, body) =
            tokio::time::timeout(self.timeout, exchange(&self.client, request, MAX_ANSWER))
                .await
                .map_err(|_| format!("no answer within {:?}", self.timeout))?
                .map_err(|e| format!("{}: {e}", self.url))?;
        match status {
            StatusCode::NOT_FOUND => Ok(Found::Unknown),
            StatusCode::OK if body.trim_ascii().is_empty() => Ok(Found::Known),
            StatusCode::OK => {
                let answer: HttpAnswer = serde_json::from_slice(&body)
                    .map_err(|e| format!("answer is not the expected JSON: {e}"))?;
                if answer.targets.is_empty() {
                    return Ok(Found::Known);
                }
                let targets = answer
                    .targets
                    .iter()
                    .map(|t| parse_address(t).map(|m| m.to_string()))
                    .collect::<Result<_, _>>()?;
                Ok(Found::Alias(targets))
            }
            _ => Err(format!("HTTP {status}: {}", excerpt(&body))),
        }
    }
}

/// Transaction note: the recipients to replace at the data hook, as `(address as received,
/// targets)`.
#[derive(Debug, Clone, Default)]
struct Rewrites(Vec<(String, Vec<String>)>);

/// The `recipients` plugin, built from [`RecipientsPluginSpec`].
#[derive(Debug)]
pub struct RecipientsPlugin {
    /// Covered domains, lower-case; empty: every domain (not for authenticated clients).
    domains: HashSet<String>,
    spec_table: Table,
    file: Option<FileSource>,
    http: Option<HttpSource>,
}

impl RecipientsPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors. Reads `file`
    /// when the context loads files.
    pub fn new(spec: &RecipientsPluginSpec, path: &str, env: &Env) -> Result<Self, PluginError> {
        let invalid = |field: String| {
            let path = format!("{path}.{field}");
            move |reason: String| PluginError::Invalid { path, reason }
        };
        let mut table = Table::default();
        for (i, address) in spec.addresses.iter().enumerate() {
            table
                .add_address(address)
                .map_err(invalid(format!("addresses[{i}]")))?;
        }
        for (i, alias) in spec.aliases.iter().enumerate() {
            let targets: Vec<&str> = alias.targets.iter().map(String::as_str).collect();
            table
                .add_alias(&alias.address, &targets)
                .map_err(invalid(format!("aliases[{i}]")))?;
        }
        for (i, c) in spec.catch_all.iter().enumerate() {
            table
                .add_catch_all(&c.domain, &c.target)
                .map_err(invalid(format!("catchAll[{i}]")))?;
        }
        let file = spec
            .file
            .as_deref()
            .map(|f| FileSource::new(f, env.ctx.load_files).map_err(invalid("file".into())))
            .transpose()?;
        let http = spec
            .http
            .as_ref()
            .map(|h| {
                Ok::<_, PluginError>(HttpSource {
                    client: http_client(h.timeout.as_duration())
                        .map_err(invalid("http.url".into()))?,
                    url: h.url.clone(),
                    timeout: h.timeout.as_duration(),
                    on_error: h.on_error,
                })
            })
            .transpose()?;
        Ok(Self {
            domains: spec
                .domains
                .iter()
                .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            spec_table: table,
            file,
            http,
        })
    }

    /// Whether this plugin decides about recipients of `m`'s domain for this session.
    fn covers(&self, s: &SessionInfo, m: &Mailbox) -> bool {
        if self.domains.is_empty() {
            return s.auth_user.is_none() && !m.is_address_literal();
        }
        self.domains
            .contains(m.domain_lowercase().trim_end_matches('.'))
    }

    /// Looks `m` up in the sources, in the documented order.
    async fn lookup(&self, m: &Mailbox) -> Result<Found, String> {
        let key = key(m);
        let file_table = match &self.file {
            Some(file) => Some(file.table().await),
            None => None,
        };
        let tables = std::iter::once(&self.spec_table).chain(file_table.as_deref());
        if let Some(found) = tables.clone().find_map(|t| t.exact(&key)) {
            return Ok(found);
        }
        if m.local.eq_ignore_ascii_case("postmaster") {
            return Ok(Found::Known);
        }
        if let Some(http) = &self.http {
            match http.lookup(&m.to_string()).await? {
                Found::Unknown => {}
                found => return Ok(found),
            }
        }
        let domain = m.domain_lowercase();
        Ok(tables
            .filter_map(|t| t.catch_all(domain.trim_end_matches('.')))
            .next()
            .unwrap_or(Found::Unknown))
    }

    fn on_error(&self) -> FailMode {
        self.http
            .as_ref()
            .map_or(FailMode::Tempfail, |h| h.on_error)
    }
}

#[async_trait]
impl Plugin for RecipientsPlugin {
    fn name(&self) -> &'static str {
        "recipients"
    }

    async fn rcpt(
        &self,
        s: &SessionInfo,
        tx: &Transaction,
        to: &ForwardPath,
        _params: &RcptParams,
    ) -> Verdict {
        let count = |outcome: &str| {
            LOOKUPS.with_label_values(&[&s.listener, outcome]).inc();
        };
        let ForwardPath::Mailbox(m) = to else {
            count("known"); // <Postmaster>, RFC 5321 §4.5.1
            return Verdict::Continue;
        };
        if !self.covers(s, m) {
            return Verdict::Continue;
        }
        let found = match self.lookup(m).await {
            Ok(found) => found,
            Err(error) => {
                count("error");
                tracing::warn!(listener = %s.listener, recipient = %m, %error, "recipient lookup failed");
                return match self.on_error() {
                    FailMode::Accept => Verdict::Continue,
                    FailMode::Tempfail => Verdict::tempfail(
                        451,
                        (4, 3, 0),
                        format!("<{m}>: Recipient address lookup failed, try again later"),
                    ),
                };
            }
        };
        count(found.label());
        match found {
            Found::Known => Verdict::Continue,
            Found::Alias(targets) => {
                tx.notes
                    .update(|r: &mut Rewrites| r.0.push((m.to_string(), targets)));
                Verdict::Continue
            }
            Found::CatchAll(target) => {
                tx.notes
                    .update(|r: &mut Rewrites| r.0.push((m.to_string(), vec![target])));
                Verdict::Continue
            }
            Found::Unknown => Verdict::reject(
                550,
                (5, 1, 1),
                format!("<{m}>: Recipient address rejected: user unknown"),
            ),
        }
    }

    async fn data(
        &self,
        _s: &SessionInfo,
        tx: &Transaction,
        _body: &[u8],
        edits: &mut MessageEdits,
    ) -> Verdict {
        let Some(Rewrites(rewrites)) = tx.notes.get::<Rewrites>() else {
            return Verdict::Continue;
        };
        for (to, _) in &tx.recipients {
            let ForwardPath::Mailbox(m) = to else {
                continue;
            };
            let address = m.to_string();
            let done = |a: &String| a.eq_ignore_ascii_case(&address);
            if edits.recipient_rewrites.iter().any(|(a, _)| done(a)) {
                continue;
            }
            if let Some((_, targets)) = rewrites.iter().rev().find(|(a, _)| done(a)) {
                edits.rewrite_recipient(address, targets.clone());
            }
        }
        Verdict::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(text: &str) -> Mailbox {
        Mailbox::parse(text).expect("address")
    }

    #[test]
    fn the_file_format_has_addresses_aliases_catch_alls_and_comments() {
        let table = Table::parse(
            "# users\n\
             Alice@Example.TEST\n\
             \n\
             sales@example.test: alice@example.test, bob@other.test\n\
             @example.test: catch@example.test\n",
        )
        .expect("parses");
        assert_eq!(
            table.exact(&key(&mailbox("ALICE@example.test"))),
            Some(Found::Known)
        );
        assert_eq!(
            table.exact(&key(&mailbox("Sales@EXAMPLE.test"))),
            Some(Found::Alias(vec![
                "alice@example.test".into(),
                "bob@other.test".into()
            ]))
        );
        assert_eq!(table.exact(&key(&mailbox("carol@example.test"))), None);
        assert_eq!(
            table.catch_all("example.test"),
            Some(Found::CatchAll("catch@example.test".into()))
        );
        for (bad, line) in [
            ("a@b.test\nnot an address\n", "line 2"),
            ("x@b.test:\n", "line 1"),
            ("@b.test: a@b.test, c@b.test\n", "line 1"),
            ("x@b.test: a@b.test, nope\n", "line 1"),
        ] {
            let error = Table::parse(bad).expect_err(bad);
            assert!(error.starts_with(line), "{bad:?}: {error}");
        }
    }

    #[test]
    fn query_values_are_url_encoded() {
        assert_eq!(
            url_encode("\"a b\"+x@example.test"),
            "%22a%20b%22%2Bx%40example.test"
        );
        assert_eq!(url_encode("jörg@x.test"), "j%C3%B6rg%40x.test");
    }
}
