//! `render` from YAML fixtures: every `tests/render/<case>.input.yaml` (a MailListener or a
//! DeliveryPolicy) renders to exactly `tests/render/<case>.golden.yaml`. After an intended
//! change, `MAILROOM_UPDATE_GOLDEN=1 cargo test -p mailroom-operator --test render` rewrites
//! the golden files; review their diff like code. The other tests check single properties
//! (errors name the field, the checksum rolls pods when it should).

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use mailroom_config::JetStreamQueueSpec;
use mailroom_operator::render::{
    self, CONFIG_KEY, RenderError, Settings, render_listener, render_policy,
};
use mailroom_operator::{DeliveryPolicy, MailListener};

fn settings() -> Settings {
    let mut settings = Settings::new(
        "registry.example/mailroom:0.1.0",
        JetStreamQueueSpec {
            urls: vec!["nats://nats.mail.svc:4222".to_owned()],
            credentials_file: Some(format!("{}/nats.creds", render::QUEUE_DIR)),
            ..JetStreamQueueSpec::default()
        },
    );
    settings.queue_secret = Some("mailroom-nats".to_owned());
    settings
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/render")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Renders one fixture into the multi-document YAML of its objects.
fn render_fixture(input: &str) -> String {
    let value: serde_json::Value = serde_saphyr::from_str(input).expect("fixture is YAML");
    let docs: Vec<serde_json::Value> = match value["kind"].as_str() {
        Some("MailListener") => {
            let ml: MailListener = serde_json::from_value(value).expect("a MailListener");
            let objects = render_listener(&ml, &settings(), "secrets-v1").expect("renders");
            vec![
                serde_json::to_value(&objects.config_map),
                serde_json::to_value(&objects.deployment),
                serde_json::to_value(&objects.service),
                serde_json::to_value(&objects.pdb),
            ]
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("serializes")
        }
        Some("DeliveryPolicy") => {
            let dp: DeliveryPolicy = serde_json::from_value(value).expect("a DeliveryPolicy");
            let replicas = render::worker_replicas(&dp, None);
            let objects = render_policy(&dp, &settings(), replicas, "secrets-v1").expect("renders");
            vec![
                serde_json::to_value(&objects.config_map),
                serde_json::to_value(&objects.deployment),
            ]
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("serializes")
        }
        other => panic!("fixture kind {other:?}"),
    };
    let mut out = String::new();
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&doc).expect("YAML"));
    }
    out
}

#[test]
fn fixtures_render_to_their_golden_files() {
    let update = std::env::var_os("MAILROOM_UPDATE_GOLDEN").is_some();
    let mut cases = 0;
    let mut stale = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir())
        .expect("tests/render exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".input.yaml"))
        .collect();
    entries.sort();
    for input in entries {
        cases += 1;
        let golden = PathBuf::from(
            input
                .to_string_lossy()
                .replace(".input.yaml", ".golden.yaml"),
        );
        let rendered = render_fixture(&read(&input));
        if update {
            std::fs::write(&golden, &rendered).expect("write golden");
        } else if std::fs::read_to_string(&golden).ok().as_deref() != Some(rendered.as_str()) {
            stale.push(golden.display().to_string());
        }
    }
    assert!(cases >= 4, "expected the fixtures in {}", dir().display());
    assert!(
        stale.is_empty(),
        "rendered objects differ from {stale:?}; if intended, run \
         MAILROOM_UPDATE_GOLDEN=1 cargo test -p mailroom-operator --test render and review the diff"
    );
}

fn listener(extra: &str) -> MailListener {
    let yaml = format!(
        "apiVersion: mailroom.dev/v1alpha1\nkind: MailListener\nmetadata: {{ name: mx, namespace: ns, uid: u1 }}\n\
         spec:\n  address: \"0.0.0.0:2525\"\n  acceptedDomains: [example.test]\n{extra}"
    );
    serde_saphyr::from_str(&yaml).expect("listener YAML")
}

fn policy(extra: &str) -> DeliveryPolicy {
    let yaml = format!(
        "apiVersion: mailroom.dev/v1alpha1\nkind: DeliveryPolicy\nmetadata: {{ name: bulk, namespace: ns, uid: u2 }}\n\
         spec:\n{extra}"
    );
    serde_saphyr::from_str(&yaml).expect("policy YAML")
}

fn problems(err: RenderError) -> Vec<(String, String)> {
    err.problems()
        .into_iter()
        .map(|p| (p.path, p.message))
        .collect()
}

fn checksum(deployment: &Deployment) -> String {
    render::template_checksum(deployment).expect("checksum annotation")
}

#[test]
fn listener_problems_name_the_custom_resource_field() {
    let ml = listener(
        "  tls: { certFile: ../etc/passwd, keyFile: tls.key }\n  tlsSecretRef: { name: t }\n  \
         limits: { maxRecipients: 0 }\n  plugins:\n    - {}\n",
    );
    let found = problems(render_listener(&ml, &settings(), "").expect_err("invalid"));
    let paths: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
    assert!(paths.contains(&"spec.tls.certFile"), "{found:?}");
    assert!(paths.contains(&"spec.plugins[0]"), "{found:?}");
    assert!(paths.contains(&"spec.limits.maxRecipients"), "{found:?}");
    assert!(
        found.iter().all(|(p, _)| p.starts_with("spec.")),
        "every path names a spec field: {found:?}"
    );
}

#[test]
fn resource_names_that_cannot_name_a_service_are_refused() {
    for (name, why) in [
        ("9mx", "must start with a letter"),
        ("mx.example", "lowercase letters"),
        (&"m".repeat(60)[..], "at most 54"),
    ] {
        let mut ml = listener("");
        ml.metadata.name = Some(name.to_owned());
        let found = problems(render_listener(&ml, &settings(), "").expect_err(name));
        assert_eq!(found[0].0, "metadata.name", "{name}: {found:?}");
        assert!(found[0].1.contains(why), "{name}: {found:?}");
    }
}

#[test]
fn metadata_the_api_server_sets_is_required() {
    let mut ml = listener("");
    ml.metadata.uid = None;
    assert_eq!(
        render_listener(&ml, &settings(), ""),
        Err(RenderError::Metadata("uid"))
    );
}

#[test]
fn a_config_or_secret_change_rolls_the_pods_and_nothing_else_does() {
    let base = render_listener(&listener("  replicas: 2\n"), &settings(), "s1").expect("ok");
    let scaled = render_listener(&listener("  replicas: 5\n"), &settings(), "s1").expect("ok");
    let changed = render_listener(
        &listener("  replicas: 2\n  limits: { maxRecipients: 500 }\n"),
        &settings(),
        "s1",
    )
    .expect("ok");
    let rotated = render_listener(&listener("  replicas: 2\n"), &settings(), "s2").expect("ok");
    assert_eq!(checksum(&base.deployment), checksum(&scaled.deployment));
    assert_ne!(checksum(&base.deployment), checksum(&changed.deployment));
    assert_ne!(checksum(&base.deployment), checksum(&rotated.deployment));
    let yaml = &changed.config_map.data.as_ref().expect("data")[CONFIG_KEY];
    assert!(yaml.contains("maxRecipients: 500"), "{yaml}");
}

#[test]
fn the_rendered_config_is_a_valid_pod_config_file() {
    let objects = render_listener(
        &listener("  tls: { certFile: tls.crt, keyFile: tls.key }\n  tlsSecretRef: { name: t }\n"),
        &settings(),
        "",
    )
    .expect("ok");
    let yaml = &objects.config_map.data.as_ref().expect("data")[CONFIG_KEY];
    let config = mailroom_config::load_str(yaml, "rendered").expect("loads and validates");
    assert_eq!(config.listeners[0].name, "mx");
    let tls = config.listeners[0].tls.as_ref().expect("tls");
    assert_eq!(tls.cert_file, format!("{}/tls.crt", render::TLS_DIR));
    assert!(config.queue.jetstream.is_some() && config.queue.local.is_none());

    let dp = policy(
        "  dkim: [{ domain: example.test, selector: s1, keyFile: k.pem }]\n  dkimSecretRef: { name: d }\n",
    );
    let objects = render_policy(&dp, &settings(), 1, "").expect("ok");
    let yaml = &objects.config_map.data.as_ref().expect("data")[CONFIG_KEY];
    let config = mailroom_config::load_str(yaml, "rendered").expect("loads and validates");
    assert_eq!(config.policies[0].name, "bulk");
    assert_eq!(
        config.policies[0].dkim[0].key_file,
        format!("{}/k.pem", render::DKIM_DIR)
    );
    let args = objects
        .deployment
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod")
        .containers[0]
        .args
        .clone()
        .expect("args");
    assert_eq!(
        args[args.len() - 2..],
        ["--policy".to_owned(), "bulk".to_owned()]
    );
}

#[test]
fn worker_replicas_stay_within_the_bounds() {
    let dp = policy("  workers: { minReplicas: 2, maxReplicas: 4 }\n");
    assert_eq!(render::worker_replicas(&dp, None), 2);
    assert_eq!(render::worker_replicas(&dp, Some(3)), 3);
    assert_eq!(render::worker_replicas(&dp, Some(9)), 4);
    assert_eq!(render::worker_replicas(&dp, Some(0)), 2);
}

#[test]
fn only_a_privileged_port_adds_net_bind_service() {
    let caps = |address: &str| {
        let mut ml = listener("");
        ml.spec.listener.address = address.to_owned();
        let d = render_listener(&ml, &settings(), "")
            .expect("ok")
            .deployment;
        let container = &d.spec.expect("spec").template.spec.expect("pod").containers[0];
        let sc = container
            .security_context
            .clone()
            .expect("security context");
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        let caps = sc.capabilities.expect("capabilities");
        assert_eq!(caps.drop, Some(vec!["ALL".to_owned()]));
        caps.add.unwrap_or_default()
    };
    assert_eq!(caps("0.0.0.0:25"), vec!["NET_BIND_SERVICE".to_owned()]);
    assert!(caps("0.0.0.0:2525").is_empty());
}
