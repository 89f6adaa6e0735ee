//! Semantic validation of a parsed [`Config`]: everything serde cannot express (uniqueness,
//! fields that require each other, value ranges, name and pattern syntax). It collects every
//! problem rather than stopping at the first, and names each one by its YAML path in camelCase
//! (`listeners[1].auth`), so a user fixes a file in one round.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::RangeInclusive;

use crate::Problem;
use crate::config::{Config, HttpSpec, JetStreamQueueSpec, LogSpec, QueueSpec};
use crate::human::HumanDuration;
use crate::limits::{Limits, Timeouts};
use crate::listener::{AuthSpec, ListenerMode, ListenerSpec, TlsSpec};
use crate::plugins::{AccessPluginSpec, PluginSpec};
use crate::policy::{DeliveryPolicySpec, RelayTls};
use crate::syntax;

/// Collects problems under a path prefix.
#[derive(Default)]
pub(crate) struct Problems(Vec<Problem>);

impl Problems {
    pub(crate) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    pub(crate) fn check(&mut self, path: impl Into<String>, result: Result<(), String>) {
        if let Err(message) = result {
            self.push(path, message);
        }
    }

    pub(crate) fn range(&mut self, path: String, value: u64, range: RangeInclusive<u64>) {
        if !range.contains(&value) {
            self.push(
                path,
                format!(
                    "{value} is out of range: expected {} to {}",
                    range.start(),
                    range.end()
                ),
            );
        }
    }

    pub(crate) fn non_empty(&mut self, path: String, value: &str) {
        if value.trim().is_empty() {
            self.push(path, "must not be empty");
        }
    }
}

impl Config {
    /// Checks the semantic rules of the model and returns every violation, each with the
    /// camelCase YAML path of the offending field (`listeners[1].auth`). Does not touch the
    /// filesystem; see [`TlsSpec::check_files`] for that.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut p = Problems::default();
        if let Some(hostname) = &self.hostname {
            p.check("hostname", syntax::check_domain(hostname, false));
        }
        if self.listeners.is_empty() && self.policies.is_empty() {
            p.push(
                "listeners",
                "at least one listener is required (a file for `mailroom outbound` may have \
                 policies instead)",
            );
        }
        check_listeners(&self.listeners, &mut p);
        check_policies(self, &mut p);
        check_queue(&self.queue, &mut p);
        check_http(&self.http, &self.listeners, &mut p);
        check_log(&self.log, &mut p);
        if p.0.is_empty() { Ok(()) } else { Err(p.0) }
    }
}

fn check_listeners(listeners: &[ListenerSpec], p: &mut Problems) {
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut addresses: HashMap<SocketAddr, usize> = HashMap::new();
    for (i, listener) in listeners.iter().enumerate() {
        let at = format!("listeners[{i}]");
        if let Some(first) = names.insert(&listener.name, i) {
            names.insert(&listener.name, first);
            p.push(
                format!("{at}.name"),
                format!(
                    "duplicate name {:?}: already used by listeners[{first}]",
                    listener.name
                ),
            );
        }
        if let Ok(addr) = listener.try_socket_addr()
            && let Some(first) = addresses.insert(addr, i)
        {
            addresses.insert(addr, first);
            p.push(
                format!("{at}.address"),
                format!("duplicate address {addr}: already used by listeners[{first}]"),
            );
        }
        check_listener(listener, &at, p);
    }
}

fn check_policies(config: &Config, p: &mut Problems) {
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, policy) in config.policies.iter().enumerate() {
        let at = format!("policies[{i}]");
        if let Some(first) = names.insert(&policy.name, i) {
            names.insert(&policy.name, first);
            p.push(
                format!("{at}.name"),
                format!(
                    "duplicate name {:?}: already used by policies[{first}]",
                    policy.name
                ),
            );
        }
        check_policy(policy, &at, p);
    }
    // With the embedded queue this process is the only one that delivers, so every listener's
    // policy must be here. With JetStream the policy's workers may run elsewhere (an inbound
    // pod's config carries no policies at all).
    if config.queue.jetstream.is_some() {
        return;
    }
    let known: Vec<String> = config
        .effective_policies()
        .into_iter()
        .map(|policy| policy.name)
        .collect();
    for (i, l) in config.listeners.iter().enumerate() {
        if !known.contains(&l.delivery_policy) {
            p.push(
                format!("listeners[{i}].deliveryPolicy"),
                format!(
                    "{:?} is not a policy here (policies: {})",
                    l.delivery_policy,
                    known.join(", ")
                ),
            );
        }
    }
}

fn check_policy(d: &DeliveryPolicySpec, at: &str, p: &mut Problems) {
    p.check(format!("{at}.name"), syntax::check_listener_name(&d.name));
    if let Some(helo) = &d.helo_name {
        p.check(format!("{at}.heloName"), syntax::check_domain(helo, false));
    }
    p.range(
        format!("{at}.concurrency"),
        d.concurrency.into(),
        1..=10_000,
    );
    if d.mx_port == 0 {
        p.push(format!("{at}.mxPort"), "must not be 0");
    }
    p.range(
        format!("{at}.maxMessagesPerConnection"),
        d.max_messages_per_connection.into(),
        1..=100_000,
    );
    if let Some(relay) = &d.routing.relay {
        p.non_empty(format!("{at}.routing.relay.host"), &relay.host);
        if relay.port == 0 {
            p.push(format!("{at}.routing.relay.port"), "must not be 0");
        }
        if relay.user.is_some() != relay.password_file.is_some() {
            p.push(
                format!("{at}.routing.relay"),
                "AUTH needs both user and passwordFile",
            );
        }
        if relay.user.is_some() && relay.tls == RelayTls::None {
            p.push(
                format!("{at}.routing.relay.tls"),
                "AUTH over plaintext would expose the password: use starttls or implicit",
            );
        }
    }
    for (j, ns) in d.resolver.nameservers.iter().enumerate() {
        p.check(
            format!("{at}.resolver.nameservers[{j}]"),
            check_socket_addr(ns),
        );
    }
    if d.retry.schedule.is_empty() {
        p.push(format!("{at}.retry.schedule"), "give at least one wait");
    }
    for (j, wait) in d.retry.schedule.iter().enumerate() {
        if wait.is_zero() {
            p.push(format!("{at}.retry.schedule[{j}]"), "must be above 0s");
        }
    }
    if d.retry.max_age.is_zero() {
        p.push(format!("{at}.retry.maxAge"), "must be above 0s");
    }
    let t = &d.timeouts;
    for (field, value) in [
        ("connect", &t.connect),
        ("greeting", &t.greeting),
        ("command", &t.command),
        ("dataStart", &t.data_start),
        ("dataBlock", &t.data_block),
        ("dataEnd", &t.data_end),
        ("idle", &t.idle),
    ] {
        if value.is_zero() {
            p.push(format!("{at}.timeouts.{field}"), "must be above 0s");
        }
    }
    let mut dest_names: HashMap<&str, usize> = HashMap::new();
    for (j, dest) in d.destinations.iter().enumerate() {
        let at_d = format!("{at}.destinations[{j}]");
        p.check(
            format!("{at_d}.name"),
            syntax::check_listener_name(&dest.name),
        );
        if let Some(first) = dest_names.insert(&dest.name, j) {
            dest_names.insert(&dest.name, first);
            p.push(
                format!("{at_d}.name"),
                format!(
                    "duplicate name {:?}: already used by destinations[{first}]",
                    dest.name
                ),
            );
        }
        if dest.domains.is_empty() && dest.mx_suffixes.is_empty() {
            p.push(at_d.clone(), "give domains, mxSuffixes or both");
        }
        for (k, domain) in dest.domains.iter().enumerate() {
            p.check(
                format!("{at_d}.domains[{k}]"),
                syntax::check_domain(domain, true),
            );
        }
        for (k, suffix) in dest.mx_suffixes.iter().enumerate() {
            p.check(
                format!("{at_d}.mxSuffixes[{k}]"),
                syntax::check_domain(suffix, false),
            );
        }
        check_shaping(&dest.limits, &at_d, p);
    }
    check_shaping(&d.default_limits, &format!("{at}.defaultLimits"), p);
    for (j, rule) in d.rules.iter().enumerate() {
        let at_r = format!("{at}.rules[{j}]");
        p.check(
            format!("{at_r}.name"),
            syntax::check_listener_name(&rule.name),
        );
        if let Err(e) = regex::Regex::new(&rule.pattern) {
            p.push(
                format!("{at_r}.pattern"),
                format!("not a valid regular expression: {e}"),
            );
        }
        if rule.duration.is_zero() {
            p.push(format!("{at_r}.duration"), "must be above 0s");
        }
        match (rule.action, &rule.rate) {
            (crate::policy::RuleAction::Throttle, None) => {
                p.push(format!("{at_r}.rate"), "a throttle rule needs a rate")
            }
            (crate::policy::RuleAction::Suspend, Some(_)) => p.push(
                format!("{at_r}.rate"),
                "a suspend rule stops delivery; remove rate or use action: throttle",
            ),
            _ => {}
        }
    }
    for (j, key) in d.dkim.iter().enumerate() {
        p.check(
            format!("{at}.dkim[{j}].domain"),
            syntax::check_domain(&key.domain, false),
        );
        if key.selector.is_empty()
            || !key
                .selector
                .split('.')
                .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        {
            p.push(
                format!("{at}.dkim[{j}].selector"),
                format!("{:?}: use letters, digits, '-' and dots", key.selector),
            );
        }
        p.non_empty(format!("{at}.dkim[{j}].keyFile"), &key.key_file);
    }
    if d.bounces
        .delay_warning_after
        .is_some_and(|after| after.is_zero())
    {
        p.push(
            format!("{at}.bounces.delayWarningAfter"),
            "must be above 0s (leave it out for no warnings)",
        );
    }
    if let Some(from) = &d.bounces.from
        && !from.contains('@')
    {
        p.push(
            format!("{at}.bounces.from"),
            format!("{from:?} is not an address (local@domain)"),
        );
    }
}

fn check_shaping(l: &crate::policy::ShapingLimits, at: &str, p: &mut Problems) {
    if let Some(n) = l.max_connections {
        p.range(format!("{at}.maxConnections"), n.into(), 1..=100_000);
    }
    if let Some(n) = l.max_messages_per_connection {
        p.range(
            format!("{at}.maxMessagesPerConnection"),
            n.into(),
            1..=100_000,
        );
    }
    for (field, rate) in [("rate", &l.rate), ("connectionRate", &l.connection_rate)] {
        if let Some(rate) = rate
            && (rate.count() == 0 || rate.per().is_zero())
        {
            p.push(
                format!("{at}.{field}"),
                format!("{rate}: use a count above 0"),
            );
        }
    }
}

fn check_listener(l: &ListenerSpec, at: &str, p: &mut Problems) {
    p.check(format!("{at}.name"), syntax::check_listener_name(&l.name));
    p.check(format!("{at}.address"), check_socket_addr(&l.address));
    if let Some(hostname) = &l.hostname {
        p.check(
            format!("{at}.hostname"),
            syntax::check_domain(hostname, false),
        );
    }
    for (j, domain) in l.accepted_domains.iter().enumerate() {
        p.check(
            format!("{at}.acceptedDomains[{j}]"),
            syntax::check_domain(domain, true),
        );
    }
    match l.mode {
        ListenerMode::Mx if l.accepted_domains.is_empty() && l.relay_networks.is_empty() => p.push(
            format!("{at}.acceptedDomains"),
            "an mx listener with no acceptedDomains and no relayNetworks would accept nothing: \
             list the domains to receive mail for",
        ),
        ListenerMode::Submission => {
            if l.auth.is_none() {
                p.push(
                    format!("{at}.auth"),
                    "a submission listener requires auth: submission is for authenticated \
                     users (RFC 6409)",
                );
            }
            if l.tls.is_none() {
                p.push(
                    format!("{at}.tls"),
                    "a submission listener requires tls: AUTH is only offered over TLS",
                );
            }
        }
        ListenerMode::Mx => {}
    }
    if l.mode == ListenerMode::Mx && l.auth.is_some() && l.tls.is_none() {
        p.push(
            format!("{at}.auth"),
            format!("AUTH is only offered over TLS: set {at}.tls"),
        );
    }
    if let Some(tls) = &l.tls {
        check_tls(tls, &format!("{at}.tls"), p);
    }
    if let Some(auth) = &l.auth {
        check_auth(auth, &format!("{at}.auth"), p);
    }
    check_limits(&l.limits, l.mode, &format!("{at}.limits"), p);
    check_timeouts(&l.timeouts, &format!("{at}.timeouts"), p);
    for (j, plugin) in l.plugins.iter().enumerate() {
        check_plugin(plugin, &format!("{at}.plugins[{j}]"), p);
    }
    for (j, ns) in l.dns.nameservers.iter().enumerate() {
        p.check(format!("{at}.dns.nameservers[{j}]"), check_socket_addr(ns));
    }
    if l.dns.timeout.is_zero() {
        p.push(format!("{at}.dns.timeout"), "must be above 0s");
    }
}

pub(crate) fn check_socket_addr(address: &str) -> Result<(), String> {
    address.trim().parse::<SocketAddr>().map(drop).map_err(|_| {
        format!(
            "invalid address {address:?}: expected an IP address and a port, \
             e.g. \"127.0.0.1:2525\" or \"[::]:25\""
        )
    })
}

fn check_tls(tls: &TlsSpec, at: &str, p: &mut Problems) {
    p.non_empty(format!("{at}.certFile"), &tls.cert_file);
    p.non_empty(format!("{at}.keyFile"), &tls.key_file);
    if tls.reload_interval.as_duration().as_secs() < 1 {
        p.push(format!("{at}.reloadInterval"), "must be at least 1s");
    }
}

fn check_auth(auth: &AuthSpec, at: &str, p: &mut Problems) {
    p.non_empty(format!("{at}.usersFile"), &auth.users_file);
    if auth.mechanisms.is_empty() {
        p.push(
            format!("{at}.mechanisms"),
            "at least one mechanism is required (PLAIN, LOGIN)",
        );
    }
    for (j, mechanism) in auth.mechanisms.iter().enumerate() {
        if auth.mechanisms[..j].contains(mechanism) {
            p.push(
                format!("{at}.mechanisms[{j}]"),
                format!("duplicate mechanism {}", mechanism.as_str()),
            );
        }
    }
}

fn check_limits(limits: &Limits, mode: ListenerMode, at: &str, p: &mut Problems) {
    let min_recipients = match mode {
        ListenerMode::Mx => 100, // RFC 5321 section 4.5.3.1.8
        ListenerMode::Submission => 1,
    };
    let Limits {
        max_message_size,
        max_recipients,
        max_line_length,
        max_command_length,
        max_connections,
        max_connections_per_ip,
        max_errors,
        max_messages_per_connection,
    } = limits;
    let size = max_message_size.bytes();
    if !(1 << 10..=1 << 30).contains(&size) {
        p.push(
            format!("{at}.maxMessageSize"),
            format!("{max_message_size} is out of range: expected 1KiB to 1GiB"),
        );
    }
    p.range(
        format!("{at}.maxRecipients"),
        (*max_recipients).into(),
        min_recipients..=100_000,
    );
    p.range(
        format!("{at}.maxLineLength"),
        (*max_line_length).into(),
        78..=1 << 20,
    );
    p.range(
        format!("{at}.maxCommandLength"),
        (*max_command_length).into(),
        512..=1 << 16,
    );
    p.range(
        format!("{at}.maxConnections"),
        (*max_connections).into(),
        1..=1_000_000,
    );
    p.range(
        format!("{at}.maxConnectionsPerIp"),
        (*max_connections_per_ip).into(),
        1..=(*max_connections).max(1).into(),
    );
    p.range(format!("{at}.maxErrors"), (*max_errors).into(), 1..=1000);
    p.range(
        format!("{at}.maxMessagesPerConnection"),
        (*max_messages_per_connection).into(),
        1..=1_000_000,
    );
}

fn check_timeouts(t: &Timeouts, at: &str, p: &mut Problems) {
    let Timeouts {
        command,
        data_init,
        data_block,
        data_termination,
        tls_handshake,
        session,
        shutdown_grace: _, // 0s is meaningful: close at once
    } = t;
    let positive: [(&str, &HumanDuration); 6] = [
        ("command", command),
        ("dataInit", data_init),
        ("dataBlock", data_block),
        ("dataTermination", data_termination),
        ("tlsHandshake", tls_handshake),
        ("session", session),
    ];
    for (field, value) in positive {
        if value.is_zero() {
            p.push(format!("{at}.{field}"), "must be longer than 0s");
        }
    }
}

fn check_plugin(plugin: &PluginSpec, at: &str, p: &mut Problems) {
    let kinds = plugin.kinds_set();
    if kinds.len() != 1 {
        p.push(
            at.to_owned(),
            format!(
                "set exactly one plugin kind (one of: {}), found {}",
                PluginSpec::KINDS.join(", "),
                if kinds.is_empty() {
                    "none".to_owned()
                } else {
                    kinds.join(" and ")
                }
            ),
        );
    }
    if let Some(access) = &plugin.access {
        check_access(access, &format!("{at}.access"), p);
    }
    if let Some(spec) = &plugin.dnsbl {
        spec.check(&format!("{at}.dnsbl"), p);
    }
    if let Some(spec) = &plugin.dnswl {
        spec.check(&format!("{at}.dnswl"), p);
    }
    if let Some(spec) = &plugin.iprev {
        spec.check(&format!("{at}.iprev"), p);
    }
    if let Some(spec) = &plugin.helo {
        spec.check(&format!("{at}.helo"), p);
    }
    if let Some(spec) = &plugin.spf {
        spec.check(&format!("{at}.spf"), p);
    }
    if let Some(spec) = &plugin.dkim_verify {
        spec.check(&format!("{at}.dkimVerify"), p);
    }
    if let Some(spec) = &plugin.dmarc {
        spec.check(&format!("{at}.dmarc"), p);
    }
    if let Some(spec) = &plugin.arc_verify {
        spec.check(&format!("{at}.arcVerify"), p);
    }
    if let Some(spec) = &plugin.rate_limit {
        spec.check(&format!("{at}.rateLimit"), p);
    }
    if let Some(spec) = &plugin.greylist {
        spec.check(&format!("{at}.greylist"), p);
    }
    if let Some(spec) = &plugin.early_talker {
        spec.check(&format!("{at}.earlyTalker"), p);
    }
    if let Some(spec) = &plugin.tarpit {
        spec.check(&format!("{at}.tarpit"), p);
    }
    if let Some(spec) = &plugin.recipients {
        spec.check(&format!("{at}.recipients"), p);
    }
    if let Some(spec) = &plugin.webhook {
        spec.check(&format!("{at}.webhook"), p);
    }
    if let Some(rspamd) = &plugin.rspamd {
        let at = format!("{at}.rspamd");
        p.check(format!("{at}.url"), syntax::check_http_url(&rspamd.url));
        if rspamd.timeout.is_zero() {
            p.push(format!("{at}.timeout"), "must be longer than 0s");
        }
        if let Some(sidecar) = &rspamd.sidecar {
            p.non_empty(format!("{at}.sidecar.image"), &sidecar.image);
        }
    }
}

fn check_access(a: &AccessPluginSpec, at: &str, p: &mut Problems) {
    for (j, pattern) in a.deny_helo.iter().enumerate() {
        p.check(
            format!("{at}.denyHelo[{j}]"),
            syntax::check_helo_pattern(pattern),
        );
    }
    let lists = [
        ("denySenders", &a.deny_senders),
        ("denyRecipients", &a.deny_recipients),
        ("allowSenders", &a.allow_senders),
    ];
    for (field, patterns) in lists {
        for (j, pattern) in patterns.iter().enumerate() {
            p.check(
                format!("{at}.{field}[{j}]"),
                syntax::check_address_pattern(pattern),
            );
        }
    }
}

fn check_queue(queue: &QueueSpec, p: &mut Problems) {
    let backends = queue.backends_set();
    if backends.len() != 1 {
        p.push(
            "queue",
            format!(
                "set exactly one queue backend (one of: {})",
                QueueSpec::BACKENDS.join(", ")
            ),
        );
    }
    if let Some(local) = &queue.local {
        p.non_empty("queue.local.path".to_owned(), &local.path);
        p.range(
            "queue.local.maxBatch".to_owned(),
            local.max_batch.into(),
            1..=65_536,
        );
        check_lease_time("queue.local.leaseTime", &local.lease_time, p);
    }
    if let Some(js) = &queue.jetstream {
        check_jetstream(js, p);
    }
}

fn check_jetstream(js: &JetStreamQueueSpec, p: &mut Problems) {
    if js.urls.is_empty() {
        p.push(
            "queue.jetstream.urls",
            "at least one NATS URL is required, e.g. nats://127.0.0.1:4222",
        );
    }
    for (i, url) in js.urls.iter().enumerate() {
        let scheme_ok = ["nats://", "tls://", "ws://", "wss://"]
            .iter()
            .any(|s| url.starts_with(s));
        if !scheme_ok
            || url
                .split_once("://")
                .is_none_or(|(_, rest)| rest.is_empty())
        {
            p.push(
                format!("queue.jetstream.urls[{i}]"),
                format!("{url:?} is not a NATS URL: expected nats://host:port (or tls://, ws://, wss://)"),
            );
        }
    }
    let methods = [
        js.credentials_file.is_some(),
        js.nkey_seed_file.is_some(),
        js.token_file.is_some(),
        js.user.is_some() || js.password_file.is_some(),
    ];
    if methods.iter().filter(|m| **m).count() > 1 {
        p.push(
            "queue.jetstream",
            "set at most one authentication method: credentialsFile, nkeySeedFile, tokenFile, or user + passwordFile",
        );
    }
    if js.user.is_some() != js.password_file.is_some() {
        p.push(
            "queue.jetstream.passwordFile",
            "user and passwordFile go together",
        );
    }
    if let Some(tls) = &js.tls
        && tls.cert_file.is_some() != tls.key_file.is_some()
    {
        p.push("queue.jetstream.tls", "certFile and keyFile go together");
    }
    if !js
        .stream
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        || js.stream.is_empty()
    {
        p.push(
            "queue.jetstream.stream",
            format!(
                "{:?}: a stream name uses letters, digits, '-' and '_' only",
                js.stream
            ),
        );
    }
    if !matches!(js.replicas, 1 | 3) {
        p.push(
            "queue.jetstream.replicas",
            format!("{}: use 1, or 3 on a NATS cluster", js.replicas),
        );
    }
    if js.publish_timeout.is_zero() {
        p.push("queue.jetstream.publishTimeout", "must be above 0s");
    }
    if js.max_age.is_zero() {
        p.push("queue.jetstream.maxAge", "must be above 0s");
    }
    check_lease_time("queue.jetstream.leaseTime", &js.lease_time, p);
    p.range(
        "queue.jetstream.maxLeased".to_owned(),
        js.max_leased.into(),
        1..=1_000_000,
    );
}

fn check_lease_time(field: &str, lease_time: &crate::HumanDuration, p: &mut Problems) {
    let d = lease_time.as_duration();
    if d < std::time::Duration::from_secs(1) || d > std::time::Duration::from_secs(12 * 3600) {
        p.push(
            field,
            format!("{lease_time}: use between 1s and 12h (a delivery extends it while it runs)"),
        );
    }
}

fn check_http(http: &HttpSpec, listeners: &[ListenerSpec], p: &mut Problems) {
    p.check("http.address", check_socket_addr(&http.address));
    if let Ok(addr) = http.try_socket_addr()
        && let Some(i) = listeners
            .iter()
            .position(|l| l.try_socket_addr() == Ok(addr))
    {
        p.push(
            "http.address",
            format!("address {addr} is already used by listeners[{i}]"),
        );
    }
}

fn check_log(log: &LogSpec, p: &mut Problems) {
    p.non_empty("log.level".to_owned(), &log.level);
    if let Some(path) = &log.delivery_log {
        p.non_empty("log.deliveryLog".to_owned(), path);
    }
}
