//! Loading and validation tests: the default file, minimal files, and the messages a user
//! sees for each kind of mistake (with their paths).

use super::*;

/// A valid listener to build test files around.
const LISTENER: &str =
    "  - name: smtp\n    address: 127.0.0.1:2525\n    acceptedDomains: [example.test]\n";

/// Loads `yaml`, expecting failure; returns the rendered error lines.
fn error_lines(yaml: &str) -> Vec<String> {
    match load_str(yaml, "t.yaml") {
        Ok(config) => panic!("unexpectedly loaded: {config:#?}"),
        Err(e) => e.to_string().lines().map(str::to_owned).collect(),
    }
}

/// Loads `yaml`, expecting failure; returns the problems as `(path, message)`.
fn problems(yaml: &str) -> Vec<(String, String)> {
    match load_str(yaml, "t.yaml") {
        Ok(config) => panic!("unexpectedly loaded: {config:#?}"),
        Err(e) => e
            .problems
            .into_iter()
            .map(|p| (p.path, p.message))
            .collect(),
    }
}

/// Asserts that some problem has `path` and a message containing `needle`.
fn assert_problem(found: &[(String, String)], path: &str, needle: &str) {
    assert!(
        found.iter().any(|(p, m)| p == path && m.contains(needle)),
        "no problem at {path:?} containing {needle:?} in {found:#?}"
    );
}

fn with_listener(extra: &str) -> String {
    format!("listeners:\n{LISTENER}{extra}")
}

#[test]
fn default_config_loads_and_validates() {
    let config = load_str(DEFAULT_CONFIG, "config/mailroom.yaml").unwrap();
    assert_eq!(config.hostname.as_deref(), Some("mail.example.test"));
    assert_eq!(config.listeners.len(), 1);
    let smtp = &config.listeners[0];
    assert_eq!(smtp.name, "smtp");
    assert_eq!(smtp.socket_addr(), "127.0.0.1:2525".parse().unwrap());
    assert_eq!(smtp.mode, ListenerMode::Mx);
    assert_eq!(smtp.accepted_domains, ["example.test"]);
    assert!(smtp.relay_networks.is_empty() && smtp.tls.is_none() && smtp.auth.is_none());
    // The file spells out the defaults; keep it truthful.
    assert_eq!(smtp.limits, Limits::default());
    assert_eq!(smtp.timeouts, Timeouts::default());
    let kinds: Vec<_> = smtp.plugins.iter().map(PluginSpec::kind).collect();
    assert_eq!(kinds, [Some("access"), Some("headers")]);
    assert_eq!(smtp.plugins[0].access, Some(AccessPluginSpec::default()));
    assert_eq!(smtp.plugins[1].headers, Some(HeadersPluginSpec::default()));
    assert_eq!(config.queue, QueueSpec::default());
    assert_eq!(config.policies, vec![DeliveryPolicySpec::default()]);
    assert_eq!(config.http, HttpSpec::default());
    assert_eq!(config.http.socket_addr(), "127.0.0.1:9325".parse().unwrap());
    assert_eq!(config.log, LogSpec::default());
    assert_eq!(config.listener_hostname(smtp), "mail.example.test");
}

#[test]
fn minimal_file_gets_every_default() {
    let config = load_str(&with_listener(""), "t.yaml").unwrap();
    let mut expected_listener = ListenerSpec::new("smtp", "127.0.0.1:2525");
    expected_listener.accepted_domains = vec!["example.test".into()];
    let expected = Config {
        listeners: vec![expected_listener],
        ..Config::default()
    };
    assert_eq!(config, expected);
    assert_eq!(
        config.queue.local.as_ref().map(|l| l.path.as_str()),
        Some("./spool")
    );
    assert_eq!(
        config.listeners[0].limits.max_message_size.bytes(),
        25 << 20
    );
}

#[test]
fn serialised_config_loads_back_unchanged() {
    let mut config = load_str(DEFAULT_CONFIG, "default").unwrap();
    let mut submission = ListenerSpec::new("submission", "[::1]:587");
    submission.mode = ListenerMode::Submission;
    submission.tls = Some(TlsSpec {
        cert_file: "tls.crt".into(),
        key_file: "tls.key".into(),
        implicit: true,
        reload_interval: HumanDuration::from_secs(90),
    });
    submission.auth = Some(AuthSpec::new("users"));
    submission.relay_networks = vec!["10.0.0.0/8".parse().unwrap()];
    config.listeners.push(submission);
    config.log.delivery_log = Some("delivery.jsonl".into());
    let yaml = serde_saphyr::to_string(&config).unwrap();
    assert_eq!(load_str(&yaml, "round-trip").unwrap(), config, "{yaml}");
}

#[test]
fn empty_file_asks_for_a_listener() {
    for yaml in ["", "# nothing yet\n", "---\n"] {
        assert_eq!(
            error_lines(yaml),
            [
                "t.yaml: listeners: at least one listener is required (a file for `mailroom \
                 outbound` may have policies instead)"
            ]
        );
    }
}

#[test]
fn unknown_field_names_its_path_and_the_expected_keys() {
    let lines = error_lines(&with_listener("    maxSize: 10MB\n"));
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert!(
        line.starts_with("t.yaml: listeners[0].maxSize: unknown field `maxSize`, expected one of"),
        "{line}"
    );
    assert!(
        line.contains("limits") && line.contains("acceptedDomains"),
        "{line}"
    );
    assert!(line.ends_with("at line 5, column 5"), "{line}");
}

#[test]
fn bad_size_names_its_path_value_and_forms() {
    let lines = error_lines(&with_listener("    limits:\n      maxMessageSize: 25XB\n"));
    let line = &lines[0];
    assert!(
        line.starts_with(
            "t.yaml: listeners[0].limits.maxMessageSize: invalid size \"25XB\": expected"
        ),
        "{line}"
    );
    assert!(line.contains("25MiB") && line.contains("line 6"), "{line}");
}

#[test]
fn wrong_types_name_path_and_position() {
    let cases = [
        (
            "    limits:\n      maxRecipients: lots\n",
            "listeners[0].limits.maxRecipients",
            "expected a whole number",
        ),
        (
            "    limits:\n      maxRecipients: -1\n",
            "listeners[0].limits.maxRecipients",
            "expected a whole number",
        ),
        (
            "    timeouts:\n      command: 30\n",
            "listeners[0].timeouts.command",
            "expected a duration string",
        ),
        (
            "    timeouts:\n      command: 5 min\n",
            "listeners[0].timeouts.command",
            "invalid duration \"5 min\"",
        ),
        (
            "    mode: relay\n",
            "listeners[0].mode",
            "unknown variant `relay`, expected one of mx, submission",
        ),
        (
            "    relayNetworks: [10.0.0.0/8, nope]\n",
            "listeners[0].relayNetworks[1]",
            "invalid network \"nope\"",
        ),
        (
            "    plugins:\n      - dkim: {}\n",
            "listeners[0].plugins[0].dkim",
            "expected one of access, headers",
        ),
        (
            "    auth:\n      usersFile: u\n      mechanisms: [CRAM-MD5]\n",
            "listeners[0].auth.mechanisms[0]",
            "expected one of PLAIN, LOGIN",
        ),
    ];
    for (extra, path, needle) in cases {
        let found = problems(&with_listener(extra));
        assert_problem(&found, path, needle);
        assert!(found[0].1.contains(" at line "), "{found:?}");
    }
}

#[test]
fn missing_required_field_and_yaml_syntax_errors() {
    assert_problem(
        &problems("listeners:\n  - name: smtp\n"),
        "listeners[0]",
        "missing field `address`",
    );
    // `name` has a default (a MailListener takes it from metadata.name); a file still needs it.
    assert_problem(
        &problems("listeners:\n  - address: 127.0.0.1:25\n"),
        "listeners[0].name",
        "missing: set a name",
    );
    assert_problem(&problems("listeners: [\n"), "listeners", "line 1");
    assert_problem(
        &problems("hostname: a\nhostname: b\n"),
        "",
        "duplicate mapping key `hostname`",
    );
    assert_problem(&problems("- a\n- b\n"), "", "line 1, column 1");
}

#[test]
fn submission_requires_auth_and_tls() {
    let found = problems(&with_listener(
        "  - name: submission\n    address: 0.0.0.0:587\n    mode: submission\n",
    ));
    assert_problem(
        &found,
        "listeners[1].auth",
        "a submission listener requires auth",
    );
    assert_problem(
        &found,
        "listeners[1].tls",
        "a submission listener requires tls",
    );
    assert_eq!(found.len(), 2, "{found:#?}");

    let ok = with_listener(
        "  - name: submission\n    address: 0.0.0.0:587\n    mode: submission\n    \
         tls: {certFile: c.pem, keyFile: k.pem}\n    auth: {usersFile: users}\n",
    );
    let config = load_str(&ok, "t.yaml").unwrap();
    let auth = config.listeners[1].auth.as_ref().unwrap();
    assert_eq!(
        auth.mechanisms,
        [AuthMechanism::Plain, AuthMechanism::Login]
    );
    assert_eq!(
        config.listeners[1].tls.as_ref().unwrap().reload_interval,
        HumanDuration::from_secs(10)
    );
}

#[test]
fn auth_without_tls_is_refused() {
    let lines = error_lines(&with_listener(
        "    auth:\n      usersFile: /etc/mailroom/users\n",
    ));
    assert_eq!(
        lines,
        ["t.yaml: listeners[0].auth: AUTH is only offered over TLS: set listeners[0].tls"]
    );
}

#[test]
fn mx_listener_must_accept_something() {
    let found = problems("listeners:\n  - name: smtp\n    address: 127.0.0.1:25\n");
    assert_problem(
        &found,
        "listeners[0].acceptedDomains",
        "would accept nothing",
    );
    // Relaying alone is enough (a smarthost for local clients).
    let relay =
        "listeners:\n  - name: smtp\n    address: 127.0.0.1:25\n    relayNetworks: [10.0.0.1]\n";
    let config = load_str(relay, "t.yaml").unwrap();
    assert_eq!(
        config.listeners[0].relay_networks,
        ["10.0.0.1/32".parse::<ipnet::IpNet>().unwrap()]
    );
}

#[test]
fn listener_names_and_addresses_are_unique() {
    let yaml = format!(
        "listeners:\n{LISTENER}{LISTENER}  - name: other\n    address: \"127.0.0.1:2525\"\n    acceptedDomains: [b.test]\nhttp:\n  address: 127.0.0.1:2525\n"
    );
    let found = problems(&yaml);
    assert_problem(
        &found,
        "listeners[1].name",
        "duplicate name \"smtp\": already used by listeners[0]",
    );
    assert_problem(
        &found,
        "listeners[1].address",
        "already used by listeners[0]",
    );
    assert_problem(
        &found,
        "listeners[2].address",
        "already used by listeners[0]",
    );
    assert_problem(&found, "http.address", "already used by listeners[0]");
    assert_eq!(found.len(), 4, "{found:#?}");
}

#[test]
fn plugin_entries_set_exactly_one_kind() {
    let found = problems(&with_listener(
        "    plugins:\n      - {}\n      - access: {}\n        headers: {}\n      - headers:\n",
    ));
    assert_problem(
        &found,
        "listeners[0].plugins[0]",
        "set exactly one plugin kind (one of: access, headers, rspamd, dnsbl, dnswl, iprev, helo, spf, dkimVerify, dmarc, arcVerify, rateLimit, greylist, earlyTalker, tarpit, recipients, webhook), found none",
    );
    assert_problem(
        &found,
        "listeners[0].plugins[1]",
        "found access and headers",
    );
    assert_eq!(
        found.len(),
        2,
        "a bare `headers:` is the headers plugin with defaults: {found:#?}"
    );
}

#[test]
fn every_semantic_problem_is_reported_with_its_path() {
    let yaml = r#"
hostname: mail_example
listeners:
  - name: Smtp
    address: localhost:25
    hostname: -bad.example
    acceptedDomains: ["*", ok.test, "a..b"]
    limits:
      maxMessageSize: 100
      maxRecipients: 10
      maxLineLength: 10
      maxCommandLength: 100000
      maxConnections: 10
      maxConnectionsPerIp: 20
      maxErrors: 0
    timeouts:
      command: 0s
      shutdownGrace: 0s
    tls: {certFile: "", keyFile: k, reloadInterval: 100ms}
    auth: {usersFile: u, mechanisms: [PLAIN, PLAIN]}
    plugins:
      - access:
          denyHelo: [""]
          denySenders: ["user@", "@example.com"]
          denyRecipients: ["a b@c"]
          allowSenders: ["*@*.example.com", "x@y@z"]
queue: {}
http:
  address: "9325"
log:
  level: ""
  deliveryLog: ""
"#;
    let found = problems(yaml);
    let expected_paths = [
        "hostname",
        "listeners[0].name",
        "listeners[0].address",
        "listeners[0].hostname",
        "listeners[0].acceptedDomains[0]",
        "listeners[0].acceptedDomains[2]",
        "listeners[0].tls.certFile",
        "listeners[0].tls.reloadInterval",
        "listeners[0].auth.mechanisms[1]",
        "listeners[0].limits.maxMessageSize",
        "listeners[0].limits.maxRecipients",
        "listeners[0].limits.maxLineLength",
        "listeners[0].limits.maxCommandLength",
        "listeners[0].limits.maxConnectionsPerIp",
        "listeners[0].limits.maxErrors",
        "listeners[0].timeouts.command",
        "listeners[0].plugins[0].access.denyHelo[0]",
        "listeners[0].plugins[0].access.denySenders[0]",
        "listeners[0].plugins[0].access.denyRecipients[0]",
        "listeners[0].plugins[0].access.allowSenders[1]",
        "queue",
        "http.address",
        "log.level",
        "log.deliveryLog",
    ];
    let paths: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths, expected_paths, "{found:#?}");
    assert_problem(
        &found,
        "listeners[0].limits.maxMessageSize",
        "100 is out of range: expected 1KiB to 1GiB",
    );
    assert_problem(
        &found,
        "listeners[0].limits.maxRecipients",
        "10 is out of range: expected 100 to 100000",
    );
    assert_problem(
        &found,
        "listeners[0].acceptedDomains[0]",
        "expected a name like \"example.com\" or \"*.example.com\"",
    );
    assert_problem(
        &found,
        "queue",
        "set exactly one queue backend (one of: local, jetstream)",
    );

    let err = load_str(yaml, "bad.yaml").unwrap_err();
    let text = err.to_string();
    assert_eq!(text.lines().count(), expected_paths.len());
    assert!(text.lines().all(|l| l.starts_with("bad.yaml: ")), "{text}");
}

#[test]
fn submission_may_limit_recipients_below_the_mx_minimum() {
    let yaml = with_listener(
        "  - name: submission\n    address: 0.0.0.0:587\n    mode: submission\n    \
         tls: {certFile: c, keyFile: k}\n    auth: {usersFile: u}\n    limits: {maxRecipients: 10}\n",
    );
    assert!(load_str(&yaml, "t.yaml").is_ok());
}

#[test]
fn accepted_domains_are_normalised() {
    let yaml = "listeners:\n  - name: smtp\n    address: 127.0.0.1:25\n    acceptedDomains: [Example.TEST., \"*.Corp.Test\"]\n";
    let config = load_str(yaml, "t.yaml").unwrap();
    assert_eq!(
        config.listeners[0].accepted_domains,
        ["example.test", "*.corp.test"]
    );
    assert!(config.listeners[0].accepts_domain("x.CORP.test"));
}

#[test]
fn load_file_reads_and_names_the_file() {
    let dir = std::env::temp_dir().join(format!("mailroom-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mailroom.yaml");
    std::fs::write(&path, DEFAULT_CONFIG).unwrap();
    assert!(load_file(&path).is_ok());

    std::fs::write(&path, "listeners: 3\n").unwrap();
    let err = load_file(&path).unwrap_err();
    assert_eq!(err.origin, path.display().to_string());
    assert!(
        err.to_string()
            .starts_with(&format!("{}: listeners: ", path.display())),
        "{err}"
    );

    let missing = dir.join("missing.yaml");
    let err = load_file(&missing).unwrap_err();
    assert!(
        err.to_string().contains("missing.yaml: cannot read: "),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tls_check_files_reports_each_missing_file() {
    let dir = std::env::temp_dir().join(format!("mailroom-config-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = dir.join("tls.crt");
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\n").unwrap();
    let tls = TlsSpec {
        cert_file: cert.display().to_string(),
        key_file: dir.join("tls.key").display().to_string(),
        implicit: false,
        reload_interval: HumanDuration::from_secs(10),
    };
    let problems = tls.check_files().unwrap_err();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].path, "keyFile");
    assert!(
        problems[0].message.contains("cannot open"),
        "{}",
        problems[0].message
    );
    let dir_as_key = TlsSpec {
        key_file: dir.display().to_string(),
        ..tls
    };
    assert!(
        dir_as_key.check_files().unwrap_err()[0]
            .message
            .contains("not a regular file")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hostname_falls_back_to_the_system() {
    let config = Config::default();
    let name = config.effective_hostname();
    assert!(syntax::check_domain(&name, false).is_ok(), "{name}");
    let mut listener = ListenerSpec::new("smtp", "127.0.0.1:25");
    listener.hostname = Some("mx.example.test".into());
    assert_eq!(config.listener_hostname(&listener), "mx.example.test");
}

#[test]
fn lease_times_are_bounded() {
    let found = problems(&with_listener(
        "queue:\n  local:\n    path: ./spool\n    leaseTime: 0s\n",
    ));
    assert_problem(&found, "queue.local.leaseTime", "between 1s and 12h");
    let found = problems(&with_listener(
        "queue:\n  jetstream:\n    leaseTime: 13h\n    maxLeased: 0\n",
    ));
    assert_problem(&found, "queue.jetstream.leaseTime", "between 1s and 12h");
    assert_problem(&found, "queue.jetstream.maxLeased", "");
}

#[test]
fn delivery_policies_load_with_defaults_and_listeners_name_them() {
    let yaml = "listeners:\n  - name: smtp\n    address: 127.0.0.1:2525\n    acceptedDomains: [example.test]\n    deliveryPolicy: bulk\npolicies:\n  - name: bulk\n    routing:\n      relay: { host: smarthost.example.net, user: u, passwordFile: /run/pw }\n    resolver: { nameservers: [\"127.0.0.1:5353\"], ipVersion: ipv6ThenIpv4 }\n    tls: required\n    retry: { schedule: [1m, 5m], maxAge: 2d }\n";
    let config = load_str(yaml, "t.yaml").unwrap();
    let bulk = &config.policies[0];
    assert_eq!(bulk.name, "bulk");
    let relay = bulk.routing.relay.as_ref().unwrap();
    assert_eq!((relay.port, relay.tls), (587, RelayTls::Starttls));
    assert_eq!(bulk.resolver.ip_version, IpVersion::Ipv6ThenIpv4);
    assert_eq!(bulk.tls, OutboundTlsMode::Required);
    assert_eq!(bulk.mx_port, 25);
    assert_eq!(bulk.retry.delay_after(1).as_secs(), 60);
    assert_eq!(bulk.retry.delay_after(2).as_secs(), 300);
    assert_eq!(
        bulk.retry.delay_after(9).as_secs(),
        300,
        "the last wait repeats"
    );
    assert_eq!(config.listeners[0].delivery_policy, "bulk");
    // No policies: one `default` policy, which listeners name by default.
    let config = load_str(&with_listener(""), "t.yaml").unwrap();
    assert_eq!(
        config.effective_policies(),
        vec![DeliveryPolicySpec::default()]
    );
    assert_eq!(config.listeners[0].delivery_policy, "default");
}

#[test]
fn delivery_policy_problems_name_their_fields() {
    let yaml = "listeners:\n  - name: smtp\n    address: 127.0.0.1:2525\n    acceptedDomains: [example.test]\n    deliveryPolicy: nowhere\npolicies:\n  - name: a\n    concurrency: 0\n    mxPort: 0\n    routing:\n      relay: { host: \"\", tls: none, user: u }\n    resolver: { nameservers: [\"not-an-address\"] }\n    retry: { schedule: [] }\n    timeouts: { connect: 0s }\n  - name: a\n    bounces: { from: nobody, delayWarningAfter: 0s }\n";
    let found = problems(yaml);
    assert_problem(
        &found,
        "listeners[0].deliveryPolicy",
        "\"nowhere\" is not a policy",
    );
    assert_problem(&found, "policies[1].name", "duplicate name");
    assert_problem(&found, "policies[0].concurrency", "out of range");
    assert_problem(&found, "policies[0].mxPort", "must not be 0");
    assert_problem(
        &found,
        "policies[0].routing.relay.host",
        "must not be empty",
    );
    assert_problem(&found, "policies[0].routing.relay", "passwordFile");
    assert_problem(&found, "policies[0].routing.relay.tls", "plaintext");
    assert_problem(&found, "policies[0].resolver.nameservers[0]", "");
    assert_problem(&found, "policies[0].retry.schedule", "at least one");
    assert_problem(&found, "policies[0].timeouts.connect", "above 0s");
    assert_problem(&found, "policies[1].bounces.from", "not an address");
    assert_problem(&found, "policies[1].bounces.delayWarningAfter", "above 0s");
}

#[test]
fn a_worker_file_needs_policies_not_listeners() {
    let config = load_str("policies:\n  - name: default\n", "t.yaml").unwrap();
    assert!(config.listeners.is_empty());
    assert_eq!(config.policies[0].name, "default");
}

#[test]
fn dkim_keys_load_and_are_checked() {
    let yaml = "policies:\n  - name: default\n    dkim:\n      - { domain: example.com, selector: s2026, keyFile: /k.pem, algorithm: ed25519-sha256 }\n      - { domain: \"bad domain\", selector: \"\", keyFile: \"\" }\n";
    let found = problems(yaml);
    assert_problem(&found, "policies[0].dkim[1].domain", "");
    assert_problem(&found, "policies[0].dkim[1].selector", "letters");
    assert_problem(&found, "policies[0].dkim[1].keyFile", "must not be empty");
    assert!(
        !found
            .iter()
            .any(|(p, _)| p.starts_with("policies[0].dkim[0]")),
        "{found:?}"
    );
    let ok = load_str(
        "policies:\n  - name: default\n    dkim:\n      - { domain: example.com, selector: s1, keyFile: /k.pem }\n",
        "t.yaml",
    )
    .unwrap();
    assert_eq!(ok.policies[0].dkim[0].algorithm, None);
    assert_eq!(ok.policies[0].dkim[0].selector, "s1");
}

#[test]
fn destinations_shape_traffic_with_named_limits() {
    let yaml = "policies:\n  - name: default\n    destinations:\n      - name: google\n        domains: [gmail.com, \"*.googlemail.com\"]\n        mxSuffixes: [google.com]\n        maxConnections: 2\n        rate: 120/min\n        connectionRate: 10/m\n    defaultLimits: { maxConnections: 5, maxMessagesPerConnection: 50 }\n";
    let config = load_str(yaml, "t.yaml").unwrap();
    let policy = &config.policies[0];
    let google = &policy.destinations[0];
    assert_eq!(google.name, "google");
    assert_eq!(google.limits.max_connections, Some(2));
    let rate = google.limits.rate.unwrap();
    assert_eq!((rate.count(), rate.per().as_secs()), (120, 60));
    assert_eq!(policy.default_limits.max_connections, Some(5));
    assert_eq!(policy.default_limits.max_messages_per_connection, Some(50));
    // Without defaultLimits: 20 connections per domain.
    let plain = load_str("policies:\n  - name: default\n", "t.yaml").unwrap();
    assert_eq!(plain.policies[0].default_limits.max_connections, Some(20));

    let bad = "policies:\n  - name: default\n    destinations:\n      - name: x\n        maxConnections: 0\n        rate: 0/min\n      - name: x\n        domains: [\"not a domain\"]\n        bogus: 1\n";
    let lines = error_lines(bad);
    assert!(
        lines.iter().any(|l| l.contains("bogus")),
        "unknown fields are refused: {lines:?}"
    );
}

#[test]
fn destination_problems_name_their_fields() {
    let bad = "policies:\n  - name: default\n    destinations:\n      - name: x\n        maxConnections: 0\n        rate: 0/min\n      - name: x\n        domains: [\"not a domain\"]\n";
    let found = problems(bad);
    assert_problem(&found, "policies[0].destinations[0]", "give domains");
    assert_problem(
        &found,
        "policies[0].destinations[0].maxConnections",
        "out of range",
    );
    assert_problem(&found, "policies[0].destinations[0].rate", "above 0");
    assert_problem(&found, "policies[0].destinations[1].name", "duplicate");
    assert_problem(&found, "policies[0].destinations[1].domains[0]", "");
}

#[test]
fn rules_load_and_are_checked() {
    let yaml = "policies:\n  - name: default\n    rules:\n      - { name: slow-down, pattern: \"^421 .*try again later\", action: throttle, duration: 10m, rate: 10/min }\n      - { name: blocked, pattern: \"^554 .*blocked\", action: suspend, duration: 1h }\n";
    let config = load_str(yaml, "t.yaml").unwrap();
    assert_eq!(config.policies[0].rules[0].action, RuleAction::Throttle);
    assert_eq!(
        config.policies[0].rules[1].duration.as_duration().as_secs(),
        3600
    );
    let bad = "policies:\n  - name: default\n    rules:\n      - { name: x, pattern: \"(unclosed\", action: throttle, duration: 0s }\n      - { name: y, pattern: ok, action: suspend, duration: 1m, rate: 1/s }\n";
    let found = problems(bad);
    assert_problem(&found, "policies[0].rules[0].pattern", "regular expression");
    assert_problem(&found, "policies[0].rules[0].duration", "above 0s");
    assert_problem(&found, "policies[0].rules[0].rate", "needs a rate");
    assert_problem(&found, "policies[0].rules[1].rate", "remove rate");
}

#[test]
fn with_jetstream_a_listener_may_name_a_policy_defined_elsewhere() {
    // An inbound pod's file has no policies: the policy's workers run in other pods.
    let yaml = "listeners:\n  - name: smtp\n    address: 0.0.0.0:2525\n    acceptedDomains: [example.test]\n    deliveryPolicy: bulk\nqueue:\n  jetstream: { urls: [\"nats://127.0.0.1:4222\"] }\n";
    let config = load_str(yaml, "t.yaml").unwrap();
    assert_eq!(config.listeners[0].delivery_policy, "bulk");
    // With the embedded queue this process delivers everything, so the policy must be here.
    let local = yaml.replace(
        "  jetstream: { urls: [\"nats://127.0.0.1:4222\"] }\n",
        "  local: {}\n",
    );
    assert_problem(
        &problems(&local),
        "listeners[0].deliveryPolicy",
        "\"bulk\" is not a policy here",
    );
}
