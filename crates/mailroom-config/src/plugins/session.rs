//! Session behaviour and lookups: `earlyTalker`, `tarpit`, `recipients` and `webhook`.

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::FailMode;
use crate::validate::Problems;
use crate::{ByteSize, HumanDuration, schema, syntax};

/// Longest `earlyTalker.delay`: clients give up on a silent server after a few minutes
/// (RFC 5321 §4.5.3.2.1 asks for 5), but every delay holds a connection slot.
const MAX_GREETING_DELAY: HumanDuration = HumanDuration::from_secs(30);
/// Longest `tarpit.delay`: well below any client's command timeout (RFC 5321 §4.5.3.2).
const MAX_REPLY_DELAY: HumanDuration = HumanDuration::from_secs(60);

/// Holds the greeting back for `delay` and refuses clients that talk before it with
/// `554 5.5.1` (RFC 5321 §3.1: a client waits for the greeting; spam software often does not).
/// Clients noted as trusted (by `dnswl` earlier in the chain) and `allowClients` are greeted at
/// once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct EarlyTalkerPluginSpec {
    /// How long the greeting is held back (more than 0s, at most 30s). Default 1s.
    pub delay: HumanDuration,
    /// Client networks (CIDR; a bare address means one host) greeted without delay.
    #[serde(deserialize_with = "schema::deserialize_ip_nets")]
    #[schemars(with = "Vec<schema::IpNetString>")]
    pub allow_clients: Vec<IpNet>,
}

impl Default for EarlyTalkerPluginSpec {
    fn default() -> Self {
        Self {
            delay: HumanDuration::from_secs(1),
            allow_clients: Vec::new(),
        }
    }
}

impl EarlyTalkerPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, at: &str, p: &mut Problems) {
        check_delay(&self.delay, MAX_GREETING_DELAY, &format!("{at}.delay"), p);
    }
}

/// Slows down the replies to clients that look like spam software: every reply (the greeting
/// included) is sent `delay` late. Clients noted as trusted (by `dnswl`) are never slowed down.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TarpitPluginSpec {
    /// How long each reply is held back (more than 0s, at most 60s; keep it below the clients'
    /// command timeouts). Default 5s.
    pub delay: HumanDuration,
    /// Client networks (CIDR; a bare address means one host) that are always slowed down.
    #[serde(deserialize_with = "schema::deserialize_ip_nets")]
    #[schemars(with = "Vec<schema::IpNetString>")]
    pub clients: Vec<IpNet>,
    /// Also slow down clients that plugins in tagging mode found suspicious (`dnsbl`, `iprev`,
    /// `helo` with `action: tag`), from the reply after the finding on. Default true.
    pub suspicious: bool,
}

impl Default for TarpitPluginSpec {
    fn default() -> Self {
        Self {
            delay: HumanDuration::from_secs(5),
            clients: Vec::new(),
            suspicious: true,
        }
    }
}

impl TarpitPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, at: &str, p: &mut Problems) {
        check_delay(&self.delay, MAX_REPLY_DELAY, &format!("{at}.delay"), p);
    }
}

fn check_delay(delay: &HumanDuration, max: HumanDuration, at: &str, p: &mut Problems) {
    if delay.is_zero() {
        p.push(at, "must be longer than 0s");
    } else if *delay > max {
        p.push(
            at,
            format!("must be at most {}s", max.as_duration().as_secs()),
        );
    }
}

/// Accepts only the known recipients of the domains it covers and refuses the others at RCPT
/// with `550 5.1.1 <address>: Recipient address rejected: user unknown`. Known recipients come
/// from `addresses`, `aliases`, `catchAll`, a `file` and an `http` lookup, asked in the order
/// documented for each. Addresses are compared case-insensitively, the local part too.
/// `<Postmaster>` and `postmaster@<domain>` are always accepted (RFC 5321 §4.5.1). Aliases and
/// catch-alls are accepted at RCPT and the message is queued for their targets instead.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RecipientsPluginSpec {
    /// Recipient domains this plugin is authoritative for; recipients of other domains are left
    /// to the next plugin. Empty (the default): every recipient domain, except for
    /// authenticated clients (who relay to any domain) and address literals. Set it when the
    /// listener has `relayNetworks`.
    pub domains: Vec<String>,
    /// Known recipient addresses (`user@example.com`).
    pub addresses: Vec<String>,
    /// Aliases: a recipient accepted and replaced by its targets.
    pub aliases: Vec<RecipientAliasSpec>,
    /// Catch-alls: any otherwise unknown recipient of the domain is accepted and replaced by the
    /// target.
    pub catch_all: Vec<CatchAllSpec>,
    /// A file of known recipients, one per line: `user@example.com`, an alias
    /// `alias@example.com: one@example.com, two@example.net`, or a catch-all
    /// `@example.com: someone@example.com`; lines starting with `#` are comments. Re-read when
    /// it changes (checked at most every 2 seconds); while an edit does not parse, the last good
    /// version stays in use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// A lookup service asked for recipients the lists and the file do not know.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<RecipientsHttpSpec>,
}

/// One alias of the `recipients` plugin.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RecipientAliasSpec {
    /// The alias address (`sales@example.com`).
    pub address: String,
    /// The addresses the message is queued for instead (at least one). Targets are not looked
    /// up again.
    pub targets: Vec<String>,
}

/// The catch-all of one domain.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CatchAllSpec {
    /// The domain (`example.com`).
    pub domain: String,
    /// The address that receives the domain's otherwise unknown recipients.
    pub target: String,
}

/// An HTTP recipient lookup: `GET <url>?address=<address, URL-encoded>`. `200` means known
/// (a JSON body `{"targets": ["a@example.com"]}` makes it an alias), `404` unknown, anything
/// else (or no answer within `timeout`) is an error handled by `onError`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RecipientsHttpSpec {
    /// `http://` or `https://host:port/path` of the lookup service.
    pub url: String,
    /// Longest wait for an answer. Default 5s.
    pub timeout: HumanDuration,
    /// When the lookup fails: `tempfail` the recipient with 451 4.3.0 (the default, so no mail
    /// for unknown users gets in) or `accept` it.
    pub on_error: FailMode,
}

impl Default for RecipientsHttpSpec {
    fn default() -> Self {
        Self {
            url: String::new(),
            timeout: HumanDuration::from_secs(5),
            on_error: FailMode::Tempfail,
        }
    }
}

impl RecipientsPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, at: &str, p: &mut Problems) {
        if self.addresses.is_empty()
            && self.aliases.is_empty()
            && self.catch_all.is_empty()
            && self.file.is_none()
            && self.http.is_none()
        {
            p.push(
                at,
                "name the known recipients: set addresses, aliases, catchAll, file or http \
                 (without any, every recipient would be refused)",
            );
        }
        for (i, domain) in self.domains.iter().enumerate() {
            p.check(
                format!("{at}.domains[{i}]"),
                syntax::check_domain(domain, false),
            );
        }
        for (i, address) in self.addresses.iter().enumerate() {
            p.check(format!("{at}.addresses[{i}]"), check_address(address));
        }
        for (i, alias) in self.aliases.iter().enumerate() {
            let at = format!("{at}.aliases[{i}]");
            p.check(format!("{at}.address"), check_address(&alias.address));
            if alias.targets.is_empty() {
                p.push(format!("{at}.targets"), "list at least one target address");
            }
            for (j, target) in alias.targets.iter().enumerate() {
                p.check(format!("{at}.targets[{j}]"), check_address(target));
            }
        }
        for (i, catch_all) in self.catch_all.iter().enumerate() {
            let at = format!("{at}.catchAll[{i}]");
            p.check(
                format!("{at}.domain"),
                syntax::check_domain(&catch_all.domain, false),
            );
            p.check(format!("{at}.target"), check_address(&catch_all.target));
        }
        if let Some(file) = &self.file {
            p.non_empty(format!("{at}.file"), file);
        }
        if let Some(http) = &self.http {
            p.check(format!("{at}.http.url"), syntax::check_http_url(&http.url));
            if http.timeout.is_zero() {
                p.push(format!("{at}.http.timeout"), "must be longer than 0s");
            }
        }
    }
}

/// Checks a plain `local@domain` address as the `recipients` plugin lists it.
fn check_address(address: &str) -> Result<(), String> {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Err(format!(
            "{address:?} is not an address: expected local@domain, such as \"user@example.com\""
        ));
    };
    if local.is_empty() || local.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{address:?}: the local part must be non-empty, without spaces or control characters"
        ));
    }
    syntax::check_domain(domain, false).map_err(|e| format!("{address:?}: {e}"))
}

/// The hook points at which `webhook` asks its service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::plain_string_enum)]
pub enum WebhookHook {
    /// A client connected (before the greeting).
    Connect,
    /// EHLO / HELO.
    Helo,
    /// MAIL FROM.
    Mail,
    /// RCPT TO.
    Rcpt,
    /// The whole message was received (end of DATA / last BDAT chunk).
    Data,
}

impl WebhookHook {
    /// The hook's name as written in the config (`rcpt`).
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookHook::Connect => "connect",
            WebhookHook::Helo => "helo",
            WebhookHook::Mail => "mail",
            WebhookHook::Rcpt => "rcpt",
            WebhookHook::Data => "data",
        }
    }
}

/// Asks an HTTP policy service at the chosen hooks: `POST <url>` with a JSON description of the
/// session; the JSON answer continues, accepts, rejects, defers or disconnects, and may add
/// header fields at the data hook (the contract is in docs/plugins/webhook.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct WebhookPluginSpec {
    /// `http://` or `https://host:port/path` of the service (https verified against the
    /// system's trusted roots). Required.
    pub url: String,
    /// The hooks at which the service is asked. Default `[rcpt]`.
    pub hooks: Vec<WebhookHook>,
    /// Longest wait for an answer. Default 5s.
    pub timeout: HumanDuration,
    /// When the service fails (no connection, a timeout, an HTTP error, an answer that breaks
    /// the contract): `accept` (continue as if it had no opinion, the default) or `tempfail`
    /// (451 4.7.1).
    pub on_error: FailMode,
    /// At the data hook, send the message (base64, in `body`). Default false.
    pub include_body: bool,
    /// Longest part of the message sent with `includeBody`; a longer message is cut there and
    /// flagged `bodyTruncated`. Default 1MiB.
    pub max_body_size: ByteSize,
    /// Extra request header fields, such as an API key.
    pub headers: Vec<HttpHeaderSpec>,
    /// A file holding a bearer token, sent as `Authorization: Bearer <token>` (surrounding
    /// whitespace removed). Read when the server starts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
}

impl Default for WebhookPluginSpec {
    fn default() -> Self {
        Self {
            url: String::new(),
            hooks: vec![WebhookHook::Rcpt],
            timeout: HumanDuration::from_secs(5),
            on_error: FailMode::Accept,
            include_body: false,
            max_body_size: ByteSize::mib(1),
            headers: Vec::new(),
            token_file: None,
        }
    }
}

/// One HTTP request header field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHeaderSpec {
    /// Field name, such as `X-Api-Key`.
    pub name: String,
    /// Field value.
    pub value: String,
}

impl WebhookPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, at: &str, p: &mut Problems) {
        p.check(format!("{at}.url"), syntax::check_http_url(&self.url));
        if self.hooks.is_empty() {
            p.push(
                format!("{at}.hooks"),
                "list at least one hook (connect, helo, mail, rcpt, data)",
            );
        }
        if self.timeout.is_zero() {
            p.push(format!("{at}.timeout"), "must be longer than 0s");
        }
        for (i, header) in self.headers.iter().enumerate() {
            let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
            if header.name.is_empty() || !header.name.chars().all(token) {
                p.push(
                    format!("{at}.headers[{i}].name"),
                    format!("{:?} is not an HTTP header field name", header.name),
                );
            }
            if header.value.chars().any(|c| c.is_control() && c != '\t') {
                p.push(
                    format!("{at}.headers[{i}].value"),
                    "must not contain control characters",
                );
            }
        }
        if let Some(file) = &self.token_file {
            p.non_empty(format!("{at}.tokenFile"), file);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{PluginSpec, load_str};

    fn plugins(entries: &str) -> Result<Vec<PluginSpec>, Vec<(String, String)>> {
        let yaml = format!(
            "listeners:\n  - name: smtp\n    address: 127.0.0.1:2525\n    \
             acceptedDomains: [example.test]\n    plugins:\n{entries}"
        );
        match load_str(&yaml, "t.yaml") {
            Ok(mut config) => Ok(config.listeners.remove(0).plugins),
            Err(e) => Err(e
                .problems
                .into_iter()
                .map(|p| (p.path, p.message))
                .collect()),
        }
    }

    #[test]
    fn bare_entries_get_their_defaults_where_that_makes_sense() {
        let specs = plugins("      - earlyTalker:\n      - tarpit:\n").expect("valid");
        let early = specs[0].early_talker.clone().expect("earlyTalker");
        assert_eq!(early.delay.as_duration().as_secs(), 1);
        let tarpit = specs[1].tarpit.clone().expect("tarpit");
        assert_eq!(tarpit.delay.as_duration().as_secs(), 5);
        assert!(tarpit.suspicious && tarpit.clients.is_empty());

        let problems = plugins("      - recipients:\n      - webhook:\n").expect_err("invalid");
        let paths: Vec<&str> = problems.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "listeners[0].plugins[0].recipients",
                "listeners[0].plugins[1].webhook.url"
            ],
            "{problems:#?}"
        );
    }

    #[test]
    fn webhook_defaults_and_hooks() {
        let specs = plugins(
            "      - webhook:\n          url: http://127.0.0.1:9000/p\n          \
             hooks: [connect, data]\n",
        )
        .expect("valid");
        let hook = specs[0].webhook.clone().expect("webhook");
        let hooks: Vec<&str> = hook.hooks.iter().map(|h| h.as_str()).collect();
        assert_eq!(hooks, ["connect", "data"]);
        assert_eq!(hook.timeout.as_duration().as_secs(), 5);
        assert_eq!(hook.on_error, super::FailMode::Accept);
        assert_eq!(hook.max_body_size.bytes(), 1 << 20);
        let default = super::WebhookPluginSpec::default();
        assert_eq!(default.hooks.len(), 1);
        assert_eq!(default.hooks[0].as_str(), "rcpt");
    }

    #[test]
    fn problems_name_the_exact_field() {
        let problems = plugins(
            r#"      - earlyTalker: {delay: 31s}
      - tarpit: {delay: 0s}
      - recipients:
          domains: [example.test, "bad domain"]
          addresses: [alice@example.test, nobody]
          aliases: [{address: a@example.test, targets: []}, {address: b@example.test, targets: [x@-bad.test]}]
          catchAll: [{domain: example.test, target: "no at"}]
          http: {url: "lookup.test", timeout: 0s}
      - webhook:
          url: ftp://x
          hooks: []
          headers: [{name: "Bad Name", value: "ok"}]
"#,
        )
        .expect_err("invalid");
        let expected = [
            "listeners[0].plugins[0].earlyTalker.delay",
            "listeners[0].plugins[1].tarpit.delay",
            "listeners[0].plugins[2].recipients.domains[1]",
            "listeners[0].plugins[2].recipients.addresses[1]",
            "listeners[0].plugins[2].recipients.aliases[0].targets",
            "listeners[0].plugins[2].recipients.aliases[1].targets[0]",
            "listeners[0].plugins[2].recipients.catchAll[0].target",
            "listeners[0].plugins[2].recipients.http.url",
            "listeners[0].plugins[2].recipients.http.timeout",
            "listeners[0].plugins[3].webhook.url",
            "listeners[0].plugins[3].webhook.hooks",
            "listeners[0].plugins[3].webhook.headers[0].name",
        ];
        let paths: Vec<&str> = problems.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, expected, "{problems:#?}");
        assert!(problems[0].1.contains("at most 30s"), "{problems:#?}");
    }
}
