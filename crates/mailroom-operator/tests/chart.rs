//! The Helm chart `charts/mailroom`: `helm lint --strict`; `helm template` with every values file
//! of `charts/mailroom/ci/` and assertions on what it renders (RBAC per watch mode, leader
//! election, CRDs identical to `crds/`, security context, ServiceMonitor); the values schema
//! rejects unknown keys and every value is documented; the rendered manifests pass a
//! server-side dry-run on a real kube-apiserver (with Pod Security `restricted` warnings on);
//! and `helm install` / `helm uninstall` against a control plane with kube-controller-manager,
//! where the chart's ServiceAccount is impersonated to check that its RBAC is least privilege
//! and the operator's pods pass Pod Security `restricted` admission.
//!
//! helm is `Tool::Helm` (`e2e/tools/build.sh helm`); the control plane is mailroom-testkit's.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use mailroom_config::JetStreamQueueSpec;
use mailroom_operator::generate;
use mailroom_testkit::{KubeControlPlane, helm, helm_ok};
use serde_json::{Value, json};

/// The namespace `helm template` renders into (the release namespace).
const NS: &str = "mail-system";
/// The release name: the chart's full name is then `mailroom`.
const RELEASE: &str = "mailroom";
/// The values files of `ci/`, each with its own assertions in [`check_rendered`].
const CI_FILES: [&str; 5] = [
    "default-values.yaml",
    "ha-values.yaml",
    "namespaced-values.yaml",
    "no-crds-values.yaml",
    "servicemonitor-values.yaml",
];
/// Values that are Kubernetes (or queue config) objects passed through as they are: documented
/// as a whole, not key by key.
const PASS_THROUGH: [&str; 10] = [
    "imagePullSecrets",
    "nats.queueConfig",
    "podAnnotations",
    "podLabels",
    "resources",
    "podSecurityContext",
    "securityContext",
    "nodeSelector",
    "tolerations",
    "affinity",
];

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../charts/mailroom")
}

/// helm's cache, config and data homes for the tests without a control plane: in Cargo's
/// temp dir for integration tests, shared (helm only creates empty dirs there).
fn helm_home() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("chart-helm-home")
}

fn chart() -> String {
    chart_dir().to_string_lossy().into_owned()
}

fn ci_file(name: &str) -> String {
    chart_dir()
        .join("ci")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// `helm template mailroom <chart> -n mail-system <args...>`, parsed into its documents.
fn render(home: &Path, args: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut all = vec!["template", RELEASE, chart.as_str(), "--namespace", NS];
    all.extend_from_slice(args);
    let out = helm_ok(home, &all).expect("helm template");
    documents(&out)
}

fn documents(yaml: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).expect("rendered YAML parses");
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(docs, kind);
    assert_eq!(found.len(), 1, "exactly one {kind}: {found:#?}");
    found[0]
}

fn named<'a>(docs: &'a [Value], kind: &str, namespace: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| {
            d["kind"] == kind
                && d["metadata"]["name"] == name
                && d["metadata"]["namespace"] == namespace
        })
        .unwrap_or_else(|| panic!("no {kind} {namespace}/{name}"))
}

/// The operator container's environment as name -> value (`valueFrom` as its JSON).
fn env_of(deployment: &Value) -> BTreeMap<String, Value> {
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            let name = e["name"].as_str().expect("env name").to_owned();
            let value = match e.get("value") {
                Some(v) => v.clone(),
                None => e["valueFrom"].clone(),
            };
            (name, value)
        })
        .collect()
}

/// The RBAC rules as a set of (group, resource, verb) triples.
fn grants(rules: &Value) -> Grants {
    let mut out = BTreeSet::new();
    for rule in rules.as_array().expect("rules") {
        let strings = |key: &str| -> Vec<String> {
            rule[key]
                .as_array()
                .unwrap_or_else(|| panic!("rule without {key}: {rule}"))
                .iter()
                .map(|v| v.as_str().expect("string").to_owned())
                .collect()
        };
        assert!(rule.get("resourceNames").is_none(), "{rule}");
        for group in strings("apiGroups") {
            for resource in strings("resources") {
                for verb in strings("verbs") {
                    out.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    out
}

fn grant_set(list: &[(&str, &[&str], &[&str])]) -> Grants {
    let mut out = BTreeSet::new();
    for (group, resources, verbs) in list {
        for resource in *resources {
            for verb in *verbs {
                out.insert((
                    (*group).to_owned(),
                    (*resource).to_owned(),
                    (*verb).to_owned(),
                ));
            }
        }
    }
    out
}

type Grants = BTreeSet<(String, String, String)>;

/// `actual == expected`, else a message with what is missing and what is extra.
fn assert_grants(actual: &Grants, expected: &Grants, what: &str) {
    let missing: Vec<_> = expected.difference(actual).collect();
    let extra: Vec<_> = actual.difference(expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: missing {missing:?}, not needed {extra:?}"
    );
}

/// Exactly what the operator uses in the namespaces it watches.
fn operator_grants() -> Grants {
    const WATCH: &[&str] = &["get", "list", "watch"];
    grant_set(&[
        (
            "mailroom.dev",
            &["maillisteners", "deliverypolicies"],
            &["get", "list", "watch", "patch", "update"],
        ),
        (
            "mailroom.dev",
            &["maillisteners/status", "deliverypolicies/status"],
            &["get", "patch", "update"],
        ),
        (
            "apps",
            &["deployments"],
            &["get", "list", "watch", "create", "patch"],
        ),
        (
            "",
            &["services", "configmaps"],
            &["get", "list", "watch", "create", "patch"],
        ),
        (
            "policy",
            &["poddisruptionbudgets"],
            &["get", "list", "watch", "create", "patch"],
        ),
        ("", &["secrets"], WATCH),
        ("events.k8s.io", &["events"], &["create", "patch"]),
    ])
}

fn lease_grants() -> Grants {
    grant_set(&[(
        "coordination.k8s.io",
        &["leases"],
        &["get", "create", "update"],
    )])
}

/// The CRD files of the repository's `crds/`, by name.
fn repo_crds() -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(generate::repo_crds_dir()).expect("crds/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = fs::read_to_string(&path).expect("read crd");
            let crd: Value = serde_saphyr::from_str(&text).expect("crd parses");
            let name = crd["metadata"]["name"].as_str().expect("name").to_owned();
            out.insert(name, crd);
        }
    }
    assert_eq!(out.len(), 2, "{:?}", out.keys());
    out
}

/// A copy with every number as an f64, so that `0` and `0.0` compare equal.
fn numbers_as_f64(value: &Value) -> Value {
    match value {
        Value::Number(n) => json!(n.as_f64().expect("finite")),
        Value::Array(items) => Value::Array(items.iter().map(numbers_as_f64).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), numbers_as_f64(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Assertions that hold for every values file.
fn check_common(file: &str, docs: &[Value]) {
    let deployment = one(docs, "Deployment");
    assert_eq!(deployment["metadata"]["name"], RELEASE, "{file}");
    assert_eq!(deployment["metadata"]["namespace"], NS, "{file}");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], RELEASE, "{file}");
    let sa = one(docs, "ServiceAccount");
    assert_eq!(sa["metadata"]["name"], RELEASE, "{file}");

    // Non-root 65532, read-only root filesystem, nothing to escalate with, RuntimeDefault.
    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true, "{file}");
    assert_eq!(psc["runAsUser"], 65532, "{file}");
    assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault", "{file}");
    let container = &pod["containers"][0];
    let sc = &container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{file}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{file}");
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{file}");
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{file}");

    assert_eq!(container["args"], json!(["operator"]), "{file}");
    assert_eq!(container["ports"][0]["containerPort"], 9326, "{file}");
    assert_eq!(container["ports"][0]["name"], "http", "{file}");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], "http");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "http");
    assert!(
        container["resources"]["requests"]["memory"].is_string(),
        "{file}"
    );

    let env = env_of(deployment);
    assert_eq!(
        env["POD_NAME"],
        json!({"fieldRef": {"fieldPath": "metadata.name"}}),
        "{file}"
    );
    assert_eq!(env["MAILROOM_OPERATOR_HTTP"], "0.0.0.0:9326", "{file}");
    assert_eq!(env["MAILROOM_LOG_JSON"], "true", "{file}");
    for value in env.values() {
        assert!(value.is_string() || value.is_object(), "{file}: {value}");
    }

    // Every object carries the release's labels; the pods are selected by stable ones.
    for doc in docs {
        let labels = &doc["metadata"]["labels"];
        assert_eq!(
            labels["app.kubernetes.io/instance"], RELEASE,
            "{file}: {doc}"
        );
        assert_eq!(labels["app.kubernetes.io/managed-by"], "Helm", "{file}");
    }
    assert_eq!(
        deployment["spec"]["selector"]["matchLabels"],
        json!({
            "app.kubernetes.io/name": "mailroom",
            "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": "operator",
        })
    );

    // The metrics Service points at the container's port.
    let service = named(docs, "Service", NS, "mailroom-metrics");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http", "{file}");
    assert_eq!(
        service["spec"]["ports"][0]["name"], "http-metrics",
        "{file}"
    );

    // Only these kinds, ever.
    let allowed = [
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Service",
        "Deployment",
        "ServiceMonitor",
    ];
    for doc in docs {
        let kind = doc["kind"].as_str().expect("kind");
        assert!(allowed.contains(&kind), "{file}: unexpected {kind}");
    }
}

fn check_cluster_rbac(file: &str, docs: &[Value]) {
    let role = one(docs, "ClusterRole");
    assert_grants(&grants(&role["rules"]), &operator_grants(), file);
    let binding = one(docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": RELEASE, "namespace": NS}])
    );
}

fn check_leader_election(file: &str, docs: &[Value], on: bool) {
    let env = env_of(one(docs, "Deployment"));
    let lease_role = docs
        .iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["name"] == "mailroom-leader-election");
    if !on {
        assert!(!env.contains_key("MAILROOM_LEADER_ELECT"), "{file}");
        assert!(
            lease_role.is_none(),
            "{file}: a Lease Role without election"
        );
        return;
    }
    assert_eq!(env["MAILROOM_LEADER_ELECT"], "true", "{file}");
    assert_eq!(env["MAILROOM_LEADER_ELECT_NAMESPACE"], NS, "{file}");
    let role = lease_role.expect("Lease Role");
    assert_eq!(role["metadata"]["namespace"], NS);
    assert_grants(&grants(&role["rules"]), &lease_grants(), file);
    let binding = named(docs, "RoleBinding", NS, "mailroom-leader-election");
    assert_eq!(binding["roleRef"]["name"], "mailroom-leader-election");
    assert_eq!(binding["subjects"][0]["name"], RELEASE);
}

/// The CRDs are `crds/` itself, plus labels and (with keep) the resource-policy annotation.
fn check_crds(file: &str, docs: &[Value], keep: bool) {
    let rendered = of_kind(docs, "CustomResourceDefinition");
    let repo = repo_crds();
    assert_eq!(rendered.len(), repo.len(), "{file}");
    for crd in rendered {
        let name = crd["metadata"]["name"].as_str().expect("name");
        let source = &repo[name];
        // helm's fromYaml/toYaml turn `minimum: 0.0` into `0`: the same number in JSON.
        let mut without_meta = numbers_as_f64(crd);
        let mut source_without_meta = numbers_as_f64(source);
        without_meta["metadata"] = json!({});
        source_without_meta["metadata"] = json!({});
        assert!(
            without_meta == source_without_meta,
            "{file}: CRD {name} differs from crds/"
        );
        assert_eq!(
            crd["metadata"]["labels"]["app.kubernetes.io/component"], "crds",
            "{file}"
        );
        let policy = &crd["metadata"]["annotations"]["helm.sh/resource-policy"];
        if keep {
            assert_eq!(policy, "keep", "{file}: {name}");
        } else {
            assert!(policy.is_null(), "{file}: {name}");
        }
    }
}

/// Per-file assertions; `file` is one of [`CI_FILES`].
fn check_rendered(file: &str, docs: &[Value]) {
    check_common(file, docs);
    let deployment = one(docs, "Deployment");
    let env = env_of(deployment);
    let version = env!("CARGO_PKG_VERSION");
    match file {
        "default-values.yaml" => {
            check_cluster_rbac(file, docs);
            assert!(of_kind(docs, "Role").is_empty(), "{file}");
            check_leader_election(file, docs, false);
            check_crds(file, docs, true);
            assert_eq!(deployment["spec"]["replicas"], 1);
            assert!(of_kind(docs, "ServiceMonitor").is_empty());
            assert!(of_kind(docs, "ConfigMap").is_empty());
            let image = format!("mailroom:{version}");
            let container = &deployment["spec"]["template"]["spec"]["containers"][0];
            assert_eq!(container["image"], image.as_str());
            assert_eq!(env["MAILROOM_IMAGE"], image.as_str());
            assert_eq!(env["MAILROOM_IMAGE_PULL_POLICY"], "IfNotPresent");
            assert_eq!(env["MAILROOM_NATS_URL"], "nats://nats:4222");
            for unset in [
                "MAILROOM_WATCH_NAMESPACES",
                "MAILROOM_QUEUE_SECRET",
                "MAILROOM_QUEUE_CONFIG",
            ] {
                assert!(!env.contains_key(unset), "{unset}");
            }
        }
        "namespaced-values.yaml" => {
            assert!(of_kind(docs, "ClusterRole").is_empty(), "{file}");
            assert!(of_kind(docs, "ClusterRoleBinding").is_empty(), "{file}");
            for ns in ["mail-a", "mail-b"] {
                let role = named(docs, "Role", ns, RELEASE);
                assert_grants(
                    &grants(&role["rules"]),
                    &operator_grants(),
                    &format!("{file} {ns}"),
                );
                let binding = named(docs, "RoleBinding", ns, RELEASE);
                assert_eq!(binding["roleRef"]["kind"], "Role");
                assert_eq!(
                    binding["subjects"],
                    json!([{"kind": "ServiceAccount", "name": RELEASE, "namespace": NS}])
                );
            }
            assert_eq!(of_kind(docs, "Role").len(), 2, "{file}");
            assert_eq!(env["MAILROOM_WATCH_NAMESPACES"], "mail-a,mail-b");
            check_leader_election(file, docs, false);
            // The queue settings: a ConfigMap the operator reads, with the URL of nats.url,
            // file paths inside the mounted Secret, and a checksum that rolls the pods.
            assert_eq!(env["MAILROOM_QUEUE_SECRET"], "mailroom-nats");
            assert_eq!(
                env["MAILROOM_QUEUE_CONFIG"],
                "/etc/mailroom/operator/queue.yaml"
            );
            let config = named(docs, "ConfigMap", NS, "mailroom-queue");
            let text = config["data"]["queue.yaml"].as_str().expect("queue.yaml");
            let queue: JetStreamQueueSpec =
                serde_saphyr::from_str(text).expect("queue.yaml is a queue.jetstream section");
            assert_eq!(queue.urls, ["nats://nats.nats.svc:4222"]);
            assert_eq!(queue.replicas, 3);
            assert_eq!(
                queue.credentials_file.as_deref(),
                Some("/etc/mailroom/queue/nats.creds")
            );
            let pod = &deployment["spec"]["template"]["spec"];
            let mounts = &pod["containers"][0]["volumeMounts"];
            let mount = |name: &str| {
                mounts
                    .as_array()
                    .expect("mounts")
                    .iter()
                    .find(|m| m["name"] == name)
                    .unwrap_or_else(|| panic!("mount {name}"))
                    .clone()
            };
            assert_eq!(mount("queue")["mountPath"], "/etc/mailroom/queue");
            assert_eq!(mount("queue-config")["mountPath"], "/etc/mailroom/operator");
            let volumes = pod["volumes"].as_array().expect("volumes");
            assert!(volumes.contains(&json!({
                "name": "queue",
                "secret": {"secretName": "mailroom-nats", "defaultMode": 0o440},
            })));
            let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
            assert!(annotations["checksum/queue-config"].is_string(), "{file}");
        }
        "ha-values.yaml" => {
            assert_eq!(deployment["spec"]["replicas"], 2);
            check_cluster_rbac(file, docs);
            check_leader_election(file, docs, true);
            assert_eq!(env["MAILROOM_LEADER_ELECT_LEASE"], "mailroom-operator-ha");
            let affinity = &deployment["spec"]["template"]["spec"]["affinity"];
            assert!(affinity["podAntiAffinity"].is_object(), "{file}");
        }
        "servicemonitor-values.yaml" => {
            let monitor = one(docs, "ServiceMonitor");
            assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
            assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
            let endpoint = &monitor["spec"]["endpoints"][0];
            assert_eq!(endpoint["port"], "http-metrics");
            assert_eq!(endpoint["path"], "/metrics");
            assert_eq!(endpoint["interval"], "30s");
            let service = named(docs, "Service", NS, "mailroom-metrics");
            assert_eq!(
                monitor["spec"]["selector"]["matchLabels"],
                service["spec"]["selector"]
            );
            assert_eq!(
                monitor["spec"]["namespaceSelector"]["matchNames"],
                json!([NS])
            );
        }
        "no-crds-values.yaml" => {
            assert!(of_kind(docs, "CustomResourceDefinition").is_empty());
            check_cluster_rbac(file, docs);
            assert_eq!(
                env["MAILROOM_IMAGE"],
                "registry.example.com/mailroom-mail:0.1.0-debug"
            );
            assert_eq!(env["MAILROOM_IMAGE_PULL_POLICY"], "Always");
            let container = &deployment["spec"]["template"]["spec"]["containers"][0];
            assert_eq!(container["image"], format!("mailroom:{version}").as_str());
            assert_eq!(container["imagePullPolicy"], "IfNotPresent");
        }
        other => panic!("no assertions for ci/{other}: add them to check_rendered"),
    }
}

#[test]
fn lint_is_clean_with_every_values_file() {
    let home = helm_home();
    let chart = chart();
    let mut runs = vec![vec!["lint", "--strict", chart.as_str()]];
    let files: Vec<String> = CI_FILES.iter().map(|f| ci_file(f)).collect();
    for file in &files {
        runs.push(vec!["lint", "--strict", chart.as_str(), "--values", file]);
    }
    for args in runs {
        let out = helm_ok(&home, &args).expect("helm lint --strict");
        assert!(out.contains("0 chart(s) failed"), "{out}");
        assert!(
            !out.contains("[WARNING]") && !out.contains("[ERROR]"),
            "{out}"
        );
    }
}

/// `helm package` follows the `files/crds` link: the archive holds the CRD files themselves, so
/// a packaged chart installs the same CRDs without the repository.
#[test]
fn packaged_chart_carries_the_crds() {
    let home = helm_home();
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chart-package");
    let _ = fs::remove_dir_all(&out_dir);
    let out = out_dir.to_string_lossy().into_owned();
    helm_ok(&home, &["package", &chart(), "--destination", &out]).expect("helm package");
    let archive = format!("{out}/mailroom-{}.tgz", chart_version());
    let rendered = helm_ok(&home, &["template", RELEASE, &archive, "--namespace", NS])
        .expect("helm template of the package");
    check_crds("packaged chart", &documents(&rendered), true);
}

/// Chart.yaml.
fn chart_yaml() -> Value {
    let text = fs::read_to_string(chart_dir().join("Chart.yaml")).expect("Chart.yaml");
    serde_saphyr::from_str(&text).expect("Chart.yaml parses")
}

fn chart_version() -> String {
    chart_yaml()["version"]
        .as_str()
        .expect("version")
        .to_owned()
}

#[test]
fn ci_values_files_render_what_they_promise() {
    let home = helm_home();
    let mut found: Vec<String> = fs::read_dir(chart_dir().join("ci"))
        .expect("ci/")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    assert_eq!(found, CI_FILES, "every ci/ file has assertions here");
    for file in CI_FILES {
        let docs = render(&home, &["--values", &ci_file(file)]);
        check_rendered(file, &docs);
    }

    // crds.keep=false: the CRDs go with the release.
    let docs = render(&home, &["--set", "crds.keep=false"]);
    check_crds("crds.keep=false", &docs, false);
    // Leader election forced on with one replica.
    let docs = render(&home, &["--set", "leaderElection.enabled=true"]);
    check_leader_election("leaderElection.enabled", &docs, true);
    assert_eq!(one(&docs, "Deployment")["spec"]["replicas"], 1);
    // A queue config with its own URLs keeps them; nats.url is trimmed into the env var.
    let docs = render(
        &home,
        &[
            "--set",
            "nats.queueConfig.urls={nats://q1:4222}",
            "--set",
            "nats.url=nats://a:4222\\, nats://b:4222",
        ],
    );
    let text = named(&docs, "ConfigMap", NS, "mailroom-queue")["data"]["queue.yaml"]
        .as_str()
        .expect("queue.yaml")
        .to_owned();
    let queue: JetStreamQueueSpec = serde_saphyr::from_str(&text).expect("queue.yaml");
    assert_eq!(queue.urls, ["nats://q1:4222"]);
    let env = env_of(one(&docs, "Deployment"));
    assert_eq!(env["MAILROOM_NATS_URL"], "nats://a:4222,nats://b:4222");
    // A ServiceMonitor without the Service it scrapes is refused.
    let chart = chart();
    let out = helm(
        &home,
        &[
            "template",
            RELEASE,
            &chart,
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "metrics.service.enabled=false",
        ],
    )
    .expect("helm runs");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs metrics.service.enabled"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn chart_version_follows_the_workspace() {
    assert_eq!(
        chart_yaml()["appVersion"],
        env!("CARGO_PKG_VERSION"),
        "Chart.yaml appVersion (the default image tag) is the workspace version"
    );
}

#[test]
fn schema_rejects_unknown_and_mistyped_values() {
    let home = helm_home();
    let chart = chart();
    for (set, expect) in [
        ("bogus=1", "additional properties 'bogus' not allowed"),
        ("crds.kep=true", "additional properties 'kep' not allowed"),
        ("nats.queueConfig.stream2=X", "'stream2' not allowed"),
        ("nats.queueConfig.tls.ca=x", "'ca' not allowed"),
        ("securityContext.runAsUsr=1", "'runAsUsr' not allowed"),
        (
            "metrics.serviceMonitor.intervall=1m",
            "'intervall' not allowed",
        ),
        ("replicaCount=two", "/replicaCount"),
        ("watchNamespaces={Mail_A}", "/watchNamespaces/0"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("backlogInterval=soon", "/backlogInterval"),
    ] {
        let out = helm(&home, &["template", RELEASE, &chart, "--set", set]).expect("helm");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--set {set} was accepted");
        assert!(stderr.contains(expect), "--set {set}: {stderr}");
    }
}

/// The paths (`a.b.c`) of the values the chart defines, from values.schema.json, and whether
/// each is a leaf: every object with properties, except [`PASS_THROUGH`] objects, is walked
/// into.
fn schema_paths(schema: &Value, prefix: &str, out: &mut Vec<(String, bool)>) {
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (key, child) in properties {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        let walk = !PASS_THROUGH.contains(&path.as_str()) && child.get("properties").is_some();
        out.push((path.clone(), !walk));
        if walk {
            schema_paths(child, &path, out);
        }
    }
}

/// Every object schema that lists properties refuses others.
fn assert_closed(schema: &Value, at: &str) {
    match schema {
        Value::Object(map) => {
            if map.contains_key("properties") {
                assert_eq!(
                    map.get("additionalProperties"),
                    Some(&Value::Bool(false)),
                    "values.schema.json {at}: additionalProperties must be false"
                );
            }
            for (key, child) in map {
                assert_closed(child, &format!("{at}/{key}"));
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                assert_closed(child, &format!("{at}/{i}"));
            }
        }
        _ => {}
    }
}

#[test]
fn every_value_is_in_the_schema_and_documented() {
    let dir = chart_dir();
    let schema: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("values.schema.json")).expect("read"))
            .expect("values.schema.json parses");
    assert_closed(&schema, "");
    let mut paths = Vec::new();
    schema_paths(&schema, "", &mut paths);

    let values_text = fs::read_to_string(dir.join("values.yaml")).expect("values.yaml");
    let values: Value = serde_saphyr::from_str(&values_text).expect("values.yaml parses");
    let readme = fs::read_to_string(dir.join("README.md")).expect("charts/mailroom/README.md");

    // values.yaml: every path has a default, and the line of each key has a comment above it.
    let lines: Vec<&str> = values_text.lines().collect();
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut commented = BTreeSet::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let Some((key, _)) = trimmed.split_once(':') else {
            continue;
        };
        if trimmed.starts_with('#')
            || trimmed.starts_with('-')
            || !key.chars().all(|c| c.is_ascii_alphanumeric())
        {
            continue;
        }
        stack.retain(|(level, _)| *level < indent);
        stack.push((indent, key.to_owned()));
        let path: Vec<&str> = stack.iter().map(|(_, k)| k.as_str()).collect();
        if i > 0 && lines[i - 1].trim_start().starts_with('#') {
            commented.insert(path.join("."));
        }
    }
    for (path, leaf) in &paths {
        let pointer = format!("/{}", path.replace('.', "/"));
        assert!(
            values.pointer(&pointer).is_some(),
            "values.yaml has no default for {path}"
        );
        assert!(
            commented.contains(path),
            "values.yaml: no comment above {path}"
        );
        assert!(
            !leaf || readme.contains(&format!("`{path}`")),
            "charts/mailroom/README.md does not document `{path}`"
        );
    }

    // nats.queueConfig lists exactly the keys of the queue.jetstream section.
    let model = serde_json::to_value(schemars::schema_for!(JetStreamQueueSpec)).expect("schema");
    let keys = |v: &Value| -> BTreeSet<String> {
        v["properties"]
            .as_object()
            .expect("properties")
            .keys()
            .cloned()
            .collect()
    };
    let chart_queue = &schema["properties"]["nats"]["properties"]["queueConfig"];
    assert_eq!(
        keys(chart_queue),
        keys(&model),
        "nats.queueConfig vs JetStreamQueueSpec"
    );
}

// ---- against a real kube-apiserver ----

/// A minimal ServiceMonitor CRD (the Prometheus Operator's is not installed in tests).
const SERVICE_MONITOR_CRD: &str = "\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: servicemonitors.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: ServiceMonitor, listKind: ServiceMonitorList, plural: servicemonitors, singular: servicemonitor}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {type: object, x-kubernetes-preserve-unknown-fields: true}
";

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    fs::write(&path, text).expect("write");
    path.to_string_lossy().into_owned()
}

/// Creates a namespace whose Pod Security level is `restricted` (enforced and warned).
fn restricted_namespace(plane: &KubeControlPlane, name: &str) {
    plane
        .kubectl_ok(&["create", "namespace", name])
        .expect("create namespace");
    plane
        .kubectl_ok(&[
            "label",
            "namespace",
            name,
            "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/warn=restricted",
        ])
        .expect("label namespace");
}

#[test]
fn rendered_manifests_pass_server_side_dry_run() {
    let started = Instant::now();
    let plane = KubeControlPlane::builder()
        .start()
        .expect("control plane starts");
    let dir = plane.dir().to_path_buf();
    let crd = write(&dir, "servicemonitor-crd.yaml", SERVICE_MONITOR_CRD);
    plane
        .kubectl_ok(&["apply", "--server-side", "-f", &crd])
        .expect("ServiceMonitor CRD");
    for ns in [NS, "mail-a", "mail-b"] {
        restricted_namespace(&plane, ns);
    }
    plane
        .kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "crd/servicemonitors.monitoring.coreos.com",
            "--timeout=30s",
        ])
        .expect("ServiceMonitor CRD established");

    let chart = chart();
    for file in CI_FILES {
        let values = ci_file(file);
        let rendered = plane
            .helm_ok(&["template", RELEASE, &chart, "-n", NS, "--values", &values])
            .expect("helm template");
        let manifest = write(&dir, &format!("rendered-{file}"), &rendered);
        let out = plane
            .kubectl(&[
                "apply",
                "--server-side",
                "--dry-run=server",
                "--field-manager=chart-test",
                "-f",
                &manifest,
            ])
            .expect("kubectl runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{file}: dry-run failed:\n{stderr}");
        // No warnings: no unknown fields, nothing Pod Security `restricted` objects to.
        assert!(!stderr.contains("Warning"), "{file}:\n{stderr}");
        let objects = documents(&rendered).len();
        assert_eq!(
            stdout
                .lines()
                .filter(|l| l.contains("(server dry run)"))
                .count(),
            objects,
            "{file}: every object applied:\n{stdout}"
        );
    }
    eprintln!(
        "dry-run of {} values files in {:.1}s",
        CI_FILES.len(),
        started.elapsed().as_secs_f64()
    );
}

/// Polls `check` until it is true (every 200 ms, panics after `within`).
fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// `kubectl auth can-i <verb> <resource> [--subresource=..] <scope> --as=<sa>`: "yes" or "no".
fn can_i(plane: &KubeControlPlane, sa: &str, verb: &str, resource: &str, scope: &str) -> bool {
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(format!("--subresource={s}"))),
        None => (resource, None),
    };
    let scope_args: Vec<String> = if scope == "*" {
        vec!["--all-namespaces".to_owned()]
    } else {
        vec![format!("--namespace={scope}")]
    };
    let mut args = vec!["auth", "can-i", verb, resource];
    if let Some(sub) = &subresource {
        args.push(sub);
    }
    args.extend(scope_args.iter().map(String::as_str));
    let as_user = format!("--as={sa}");
    args.push(&as_user);
    let out = plane.kubectl(&args).expect("kubectl auth can-i");
    match String::from_utf8_lossy(&out.stdout).trim() {
        "yes" => true,
        "no" => false,
        other => panic!(
            "kubectl {}: {other} {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn assert_can(plane: &KubeControlPlane, sa: &str, checks: &[(&str, &str, &str, bool)]) {
    let mut wrong = Vec::new();
    for &(verb, resource, scope, want) in checks {
        if can_i(plane, sa, verb, resource, scope) != want {
            wrong.push(format!(
                "{sa} {} {verb} {resource} in {scope}",
                if want { "cannot" } else { "can" }
            ));
        }
    }
    assert!(wrong.is_empty(), "RBAC:\n{}", wrong.join("\n"));
}

fn exists(plane: &KubeControlPlane, args: &[&str]) -> bool {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend(["-o", "name"]);
    plane
        .kubectl(&all)
        .is_ok_and(|out| out.status.success() && !out.stdout.is_empty())
}

#[test]
fn helm_install_grants_least_privilege_and_uninstall_keeps_the_crds() {
    let started = Instant::now();
    let plane = KubeControlPlane::builder()
        .controller_manager(true)
        .start()
        .expect("control plane starts");
    let chart = chart();
    for ns in [NS, "mail-scoped", "mail-a", "mail-b"] {
        restricted_namespace(&plane, ns);
    }

    // 1. All namespaces, defaults (CRDs installed and kept).
    let out = plane
        .helm_ok(&[
            "install",
            RELEASE,
            &chart,
            "--namespace",
            NS,
            "--set",
            "image.repository=registry.example/mailroom",
            "--timeout=60s",
        ])
        .expect("helm install");
    assert!(out.contains("STATUS: deployed"), "{out}");
    for (kind, name, namespaced) in [
        ("deployment", RELEASE, true),
        ("serviceaccount", RELEASE, true),
        ("service", "mailroom-metrics", true),
        ("clusterrole", RELEASE, false),
        ("clusterrolebinding", RELEASE, false),
        ("crd", "maillisteners.mailroom.dev", false),
        ("crd", "deliverypolicies.mailroom.dev", false),
    ] {
        let object = format!("{kind}/{name}");
        let mut args = vec![object.as_str()];
        if namespaced {
            args.extend(["-n", NS]);
        }
        assert!(exists(&plane, &args), "helm install made no {object}");
    }
    plane
        .kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "crd/maillisteners.mailroom.dev",
            "crd/deliverypolicies.mailroom.dev",
            "--timeout=30s",
        ])
        .expect("CRDs established");

    // The Deployment controller makes the operator's Pod, which Pod Security `restricted`
    // admits (no kubelet runs it).
    let selector = format!("app.kubernetes.io/instance={RELEASE}");
    wait_until("the operator's Pod", Duration::from_secs(30), || {
        exists(&plane, &["pods", "-n", NS, "-l", &selector])
    });

    let sa = format!("system:serviceaccount:{NS}:{RELEASE}");
    assert_can(
        &plane,
        &sa,
        &[
            ("watch", "maillisteners.mailroom.dev", "*", true),
            ("update", "deliverypolicies.mailroom.dev", "default", true),
            (
                "patch",
                "maillisteners.mailroom.dev/status",
                "default",
                true,
            ),
            ("patch", "deployments.apps", "default", true),
            ("create", "deployments.apps", "mail-a", true),
            ("create", "poddisruptionbudgets.policy", "mail-a", true),
            ("patch", "configmaps", "default", true),
            ("get", "secrets", "default", true),
            ("create", "events.events.k8s.io", "default", true),
            // Not more.
            ("delete", "deployments.apps", "default", false),
            ("update", "deployments.apps", "default", false),
            ("delete", "maillisteners.mailroom.dev", "default", false),
            ("create", "maillisteners.mailroom.dev", "default", false),
            ("create", "secrets", "default", false),
            ("update", "secrets", "default", false),
            ("list", "pods", "default", false),
            ("create", "events", "default", false),
            ("create", "leases.coordination.k8s.io", NS, false),
            (
                "create",
                "customresourcedefinitions.apiextensions.k8s.io",
                "*",
                false,
            ),
            (
                "create",
                "clusterrolebindings.rbac.authorization.k8s.io",
                "*",
                false,
            ),
        ],
    );

    // 2. A second release that watches two namespaces, with leader election, without the
    // CRDs (the first release owns them).
    plane
        .helm_ok(&[
            "install",
            "scoped",
            &chart,
            "--namespace",
            "mail-scoped",
            "--set",
            "crds.enabled=false",
            "--set",
            "watchNamespaces={mail-a,mail-b}",
            "--set",
            "replicaCount=2",
            "--timeout=60s",
        ])
        .expect("helm install (namespaced)");
    let scoped = "system:serviceaccount:mail-scoped:scoped-mailroom";
    assert_can(
        &plane,
        scoped,
        &[
            ("patch", "deployments.apps", "mail-a", true),
            ("list", "maillisteners.mailroom.dev", "mail-b", true),
            ("get", "secrets", "mail-b", true),
            ("create", "leases.coordination.k8s.io", "mail-scoped", true),
            ("update", "leases.coordination.k8s.io", "mail-scoped", true),
            // Nothing outside the watched namespaces or the Lease's.
            ("patch", "deployments.apps", "default", false),
            ("list", "maillisteners.mailroom.dev", "*", false),
            ("get", "secrets", "default", false),
            ("create", "leases.coordination.k8s.io", "mail-a", false),
            ("delete", "leases.coordination.k8s.io", "mail-scoped", false),
            ("list", "leases.coordination.k8s.io", "mail-scoped", false),
        ],
    );

    // 3. Uninstall: the operator goes, the CRDs (keep) stay.
    let out = plane
        .helm_ok(&["uninstall", RELEASE, "--namespace", NS, "--timeout=60s"])
        .expect("helm uninstall");
    assert!(
        out.contains("CustomResourceDefinition"),
        "kept resources: {out}"
    );
    wait_until(
        "the operator Deployment to go",
        Duration::from_secs(30),
        || !exists(&plane, &["deployment", RELEASE, "-n", NS]),
    );
    for object in ["clusterrole/mailroom", "clusterrolebinding/mailroom"] {
        assert!(!exists(&plane, &[object]), "{object} left behind");
    }
    assert!(!exists(&plane, &["serviceaccount", RELEASE, "-n", NS]));
    for crd in [
        "maillisteners.mailroom.dev",
        "deliverypolicies.mailroom.dev",
    ] {
        assert!(
            exists(&plane, &["crd", crd]),
            "{crd} deleted despite crds.keep"
        );
    }
    plane
        .helm_ok(&["uninstall", "scoped", "--namespace", "mail-scoped"])
        .expect("helm uninstall (namespaced)");
    assert!(!exists(
        &plane,
        &["role", "scoped-mailroom", "-n", "mail-a"]
    ));
    eprintln!(
        "helm install/uninstall test in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
