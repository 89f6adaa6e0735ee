//! Tests of the generated CRDs: structural schemas (what the apiserver insists on), the copy in
//! `crds/`, and the CEL rules, evaluated client-side with kube-cel.

use kube::CustomResourceExt;
use kube::core::cel::Validator;
use serde_json::{Value, json};

use crate::crd::{DeliveryPolicy, MailListener};
use crate::generate;

/// The `openAPIV3Schema` of a CRD as JSON.
fn schema_of(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Value {
    let version = &crd.spec.versions[0];
    let schema = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref());
    serde_json::to_value(schema.unwrap()).unwrap()
}

/// Keywords a structural schema must not contain anywhere (apiextensions validation).
const FORBIDDEN: &[&str] = &[
    "$ref",
    "$schema",
    "$defs",
    "definitions",
    "id",
    "dependencies",
    "patternProperties",
    "additionalItems",
    "const",
];

/// Walks a schema node and collects every violation of the structural-schema rules of
/// `k8s.io/apiextensions-apiserver/pkg/apiserver/schema` that apply to what we generate:
/// a single `type` on every node (unless int-or-string or preserve-unknown-fields), no
/// junctors (`allOf`, `anyOf`, `oneOf`, `not`; the apiserver allows value-only ones, we
/// allow none), `properties` xor `additionalProperties`, a single `items` schema, no
/// `uniqueItems: true`, list-map keys that are required scalar properties, enum values of the
/// node's type, and no forbidden keywords.
fn structural_problems(node: &Value, at: &str, out: &mut Vec<String>) {
    let Some(map) = node.as_object() else {
        out.push(format!("{at}: schema is not an object"));
        return;
    };
    for key in FORBIDDEN {
        if map.contains_key(*key) {
            out.push(format!("{at}: forbidden keyword {key}"));
        }
    }
    for key in ["allOf", "anyOf", "oneOf", "not"] {
        if map.contains_key(key) {
            out.push(format!(
                "{at}: {key} (junctors are not generated structurally)"
            ));
        }
    }
    let int_or_string = map.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    let preserve = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    let ty = map.get("type");
    match ty {
        Some(Value::String(t)) => {
            if int_or_string {
                out.push(format!("{at}: x-kubernetes-int-or-string with type {t}"));
            }
            let known = ["object", "array", "string", "integer", "number", "boolean"];
            if !known.contains(&t.as_str()) {
                out.push(format!("{at}: unknown type {t}"));
            }
        }
        Some(other) => out.push(format!("{at}: type must be one string, got {other}")),
        None if !(int_or_string || preserve) => out.push(format!("{at}: missing type")),
        None => {}
    }
    if map.contains_key("properties") && map.contains_key("additionalProperties") {
        out.push(format!(
            "{at}: properties and additionalProperties together"
        ));
    }
    if map.get("uniqueItems") == Some(&Value::Bool(true)) {
        out.push(format!("{at}: uniqueItems: true"));
    }
    // A `null` among the enum values is fine on a nullable node: the apiserver handles literal
    // nulls in enums since 1.23 (kubernetes#104969), and schemars renders `Option<Enum>` so.
    let nullable = map.get("nullable") == Some(&Value::Bool(true));
    if let (Some(Value::Array(values)), Some(Value::String(t))) = (map.get("enum"), ty) {
        for v in values {
            let ok = match t.as_str() {
                _ if v.is_null() => nullable,
                "string" => v.is_string(),
                "integer" => v.is_i64() || v.is_u64(),
                "number" => v.is_number(),
                "boolean" => v.is_boolean(),
                _ => true,
            };
            if !ok {
                out.push(format!("{at}: enum value {v} is not a {t}"));
            }
        }
    }
    if let Some(props) = map.get("properties").and_then(Value::as_object) {
        if ty.and_then(Value::as_str) != Some("object") {
            out.push(format!("{at}: properties on a non-object"));
        }
        for (name, child) in props {
            structural_problems(child, &format!("{at}.{name}"), out);
        }
    }
    match map.get("additionalProperties") {
        Some(Value::Bool(true)) | None => {}
        Some(Value::Bool(false)) => out.push(format!("{at}: additionalProperties: false")),
        Some(child) => structural_problems(child, &format!("{at}.*"), out),
    }
    match map.get("items") {
        Some(Value::Array(_)) => out.push(format!("{at}: items must be one schema")),
        Some(child) => {
            structural_problems(child, &format!("{at}[]"), out);
            list_map_problems(map, child, at, out);
        }
        None if ty.and_then(Value::as_str) == Some("array") => {
            out.push(format!("{at}: array without items"));
        }
        None => {}
    }
}

/// `x-kubernetes-list-type: map` needs object items whose keys are required (or defaulted)
/// scalar properties.
fn list_map_problems(
    list: &serde_json::Map<String, Value>,
    items: &Value,
    at: &str,
    out: &mut Vec<String>,
) {
    if list.get("x-kubernetes-list-type").and_then(Value::as_str) != Some("map") {
        return;
    }
    let Some(Value::Array(keys)) = list.get("x-kubernetes-list-map-keys") else {
        out.push(format!("{at}: list-type map without list-map-keys"));
        return;
    };
    let required: Vec<&str> = items["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for key in keys.iter().filter_map(Value::as_str) {
        let prop = &items["properties"][key];
        if prop.is_null() {
            out.push(format!("{at}: list-map key {key} is not a property"));
        } else if !required.contains(&key) && prop.get("default").is_none() {
            out.push(format!(
                "{at}: list-map key {key} is neither required nor defaulted"
            ));
        } else if matches!(prop["type"].as_str(), Some("object" | "array") | None) {
            out.push(format!("{at}: list-map key {key} is not a scalar"));
        }
    }
}

#[test]
fn crd_schemas_are_structural() {
    for crd in generate::crds() {
        let schema = schema_of(&crd);
        let mut problems = Vec::new();
        structural_problems(&schema, &crd.spec.names.kind, &mut problems);
        assert!(
            problems.is_empty(),
            "{}:\n{}",
            crd.spec.names.kind,
            problems.join("\n")
        );
        // The root may only describe apiVersion, kind, metadata, spec and status.
        let root: Vec<&String> = schema["properties"].as_object().unwrap().keys().collect();
        for key in &root {
            assert!(
                ["apiVersion", "kind", "metadata", "spec", "status"].contains(&key.as_str()),
                "root property {key}"
            );
        }
    }
}

/// The checker itself: each rule it claims to enforce fires on a minimal bad schema.
#[test]
fn structural_checker_catches_what_the_apiserver_rejects() {
    let cases = [
        (
            json!({"type": "object", "properties": {"a": {}}}),
            "missing type",
        ),
        (json!({"type": ["string", "null"]}), "one string"),
        (
            json!({"anyOf": [{"type": "string"}, {"type": "null"}]}),
            "anyOf",
        ),
        (
            json!({"type": "object", "properties": {"a": {"$ref": "#/x", "type": "string"}}}),
            "$ref",
        ),
        (
            json!({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "string"}}),
            "together",
        ),
        (
            json!({"type": "array", "items": {"type": "string"}, "uniqueItems": true}),
            "uniqueItems",
        ),
        (json!({"type": "string", "enum": ["a", 1]}), "enum value"),
        (
            json!({"type": "string", "enum": ["a", null]}),
            "enum value null",
        ),
        (
            json!({"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["k"],
                   "items": {"type": "object", "properties": {"k": {"type": "string"}}}}),
            "neither required",
        ),
    ];
    for (schema, expected) in cases {
        let mut problems = Vec::new();
        structural_problems(&schema, "x", &mut problems);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{schema}: expected {expected:?}, got {problems:?}"
        );
    }
}

#[test]
fn crd_names_and_columns() {
    let ml = MailListener::crd();
    assert_eq!(
        ml.metadata.name.as_deref(),
        Some("maillisteners.mailroom.dev")
    );
    assert_eq!(ml.spec.scope, "Namespaced");
    assert_eq!(ml.spec.names.short_names, Some(vec!["ml".to_owned()]));
    assert_eq!(ml.spec.names.categories, Some(vec!["mailroom".to_owned()]));
    let dp = DeliveryPolicy::crd();
    assert_eq!(
        dp.metadata.name.as_deref(),
        Some("deliverypolicies.mailroom.dev")
    );
    assert_eq!(dp.spec.names.short_names, Some(vec!["dp".to_owned()]));
    for crd in [&ml, &dp] {
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, crate::crd::VERSION);
        assert_eq!(crd.spec.group, crate::crd::GROUP);
        assert!(
            version
                .subresources
                .as_ref()
                .is_some_and(|s| s.status.is_some())
        );
        let columns = version.additional_printer_columns.as_ref().unwrap();
        let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names.first(), Some(&"Ready"));
        assert!(names.contains(&"Age"));
        let message = columns.iter().find(|c| c.name == "Message").unwrap();
        assert_eq!(message.priority, Some(1));
        let conditions = &schema_of(crd)["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map");
        assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
    }
}

#[test]
fn crds_dir_is_up_to_date() {
    let dir = generate::repo_crds_dir();
    let mut stale = Vec::new();
    for (name, text) in generate::files().unwrap() {
        let on_disk = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
        if on_disk != text {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "crds/ is stale ({}): run `cargo run -p mailroom -- crd --write`",
        stale.join(", ")
    );
}

#[test]
fn all_yaml_parses_back_into_the_crds() {
    let yaml = generate::all_yaml().unwrap();
    assert_eq!(yaml.matches("---\n").count(), 2);
    for (doc, crd) in yaml.split("---\n").skip(1).zip(generate::crds()) {
        let parsed: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
            serde_saphyr::from_str(doc).unwrap();
        assert_eq!(parsed, crd);
    }
}

// ---------------------------------------------------------------------------------------------
// CEL rules

/// Runs the CRD's CEL rules on `object` and returns the failure messages.
fn cel_failures(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    object: &Value,
) -> Vec<String> {
    match Validator::new().validate(&schema_of(crd), object, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors
            .iter()
            .map(|e| format!("{:?}: {}", e.kind, e.message))
            .collect(),
    }
}

fn listener(spec: Value) -> Value {
    json!({"apiVersion": "mailroom.dev/v1alpha1", "kind": "MailListener",
           "metadata": {"name": "mx"}, "spec": spec})
}

fn policy(spec: Value) -> Value {
    json!({"apiVersion": "mailroom.dev/v1alpha1", "kind": "DeliveryPolicy",
           "metadata": {"name": "default"}, "spec": spec})
}

#[test]
fn listener_cel_rules_accept_a_full_listener() {
    let ok = listener(json!({
        "address": "0.0.0.0:2525", "acceptedDomains": ["example.test"],
        "tls": {"certFile": "tls.crt", "keyFile": "tls.key"}, "tlsSecretRef": {"name": "mx-tls"},
        "auth": {"usersFile": "users"}, "usersSecretRef": {"name": "mx-users"},
        "service": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                    "ports": [{"name": "smtp", "port": 25}, {"name": "submission", "port": 587, "nodePort": 30587}]},
    }));
    assert_eq!(
        cel_failures(&MailListener::crd(), &ok),
        Vec::<String>::new()
    );
    let ipv6 = listener(json!({"address": "[::]:25"}));
    assert_eq!(
        cel_failures(&MailListener::crd(), &ipv6),
        Vec::<String>::new()
    );
    // The object deserializes into the Rust type too.
    let typed: MailListener = serde_json::from_value(ok).unwrap();
    assert_eq!(typed.spec.service.ports.len(), 2);
    assert_eq!(typed.spec.listener.address, "0.0.0.0:2525");
    assert_eq!(
        typed.spec.listener.name, "",
        "the name comes from metadata.name"
    );
}

#[test]
fn listener_cel_rules_reject_bad_ports_and_missing_secrets() {
    let cases = [
        (json!({"address": "0.0.0.0:0"}), "address must be"),
        (json!({"address": "0.0.0.0:70000"}), "address must be"),
        (json!({"address": "localhost:25"}), "address must be"),
        (
            json!({"address": "0.0.0.0:25", "service": {"ports": [{"name": "smtp", "port": 70000}]}}),
            "port must be from 1 to 65535",
        ),
        (
            json!({"address": "0.0.0.0:25",
                   "service": {"ports": [{"name": "smtp", "port": 25}, {"name": "smtp", "port": 2525}]}}),
            "port names must be unique",
        ),
        (
            json!({"address": "0.0.0.0:25",
                   "service": {"ports": [{"name": "a", "port": 25}, {"name": "b", "port": 25}]}}),
            "ports must be unique",
        ),
        (
            json!({"address": "0.0.0.0:25", "service": {"type": "ClusterIP", "externalTrafficPolicy": "Local"}}),
            "externalTrafficPolicy applies",
        ),
        (
            json!({"address": "0.0.0.0:25", "tls": {"certFile": "a", "keyFile": "b"}}),
            "tls needs tlsSecretRef",
        ),
        (
            json!({"address": "0.0.0.0:25", "auth": {"usersFile": "users"}}),
            "auth needs usersSecretRef",
        ),
    ];
    for (spec, expected) in cases {
        let failures = cel_failures(&MailListener::crd(), &listener(spec.clone()));
        assert!(
            failures.iter().any(|f| f.contains(expected)),
            "{spec}: expected {expected:?}, got {failures:?}"
        );
    }
}

#[test]
fn policy_cel_rules() {
    let crd = DeliveryPolicy::crd();
    let ok = policy(json!({
        "workers": {"minReplicas": 1, "maxReplicas": 4},
        "routing": {"relay": {"host": "smtp.example.test", "user": "u", "passwordFile": "password"}},
        "relaySecretRef": {"name": "relay"},
        "dkim": [{"domain": "example.test", "selector": "s1", "keyFile": "s1.pem"}],
        "dkimSecretRef": {"name": "dkim"},
        "rules": [{"name": "slow", "pattern": "^421", "action": "throttle", "duration": "10m", "rate": "10/min"}],
    }));
    assert_eq!(cel_failures(&crd, &ok), Vec::<String>::new());
    let typed: DeliveryPolicy = serde_json::from_value(ok).unwrap();
    assert_eq!(typed.spec.workers.max_replicas, 4);
    assert_eq!(typed.spec.policy.dkim.len(), 1);
    let cases = [
        (
            json!({"workers": {"minReplicas": 5, "maxReplicas": 2}}),
            "workers.minReplicas must not exceed workers.maxReplicas",
        ),
        (
            json!({"dkim": [{"domain": "example.test", "selector": "s1", "keyFile": "k"}]}),
            "dkim needs dkimSecretRef",
        ),
        (
            json!({"routing": {"relay": {"host": "relay", "passwordFile": "p"}}}),
            "passwordFile and caFile need relaySecretRef",
        ),
        (
            json!({"routing": {"relay": {"host": "relay", "caFile": "ca.crt"}}}),
            "passwordFile and caFile need relaySecretRef",
        ),
        (
            json!({"rules": [{"name": "r", "pattern": "x", "action": "throttle", "duration": "1m"}]}),
            "a throttle rule needs a rate",
        ),
        (
            json!({"rules": [{"name": "r", "pattern": "x", "action": "suspend", "duration": "1m", "rate": "1/s"}]}),
            "a suspend rule stops delivery",
        ),
    ];
    for (spec, expected) in cases {
        let failures = cel_failures(&crd, &policy(spec.clone()));
        assert!(
            failures.iter().any(|f| f.contains(expected)),
            "{spec}: expected {expected:?}, got {failures:?}"
        );
    }
}

#[test]
fn rate_strings_are_checked_by_pattern() {
    let schema = schema_of(&DeliveryPolicy::crd());
    let rate = &schema["properties"]["spec"]["properties"]["defaultLimits"]["properties"]["rate"];
    let pattern = regex::Regex::new(rate["pattern"].as_str().unwrap()).unwrap();
    for good in ["600/min", "10/s", "20/30s", "10000/h"] {
        assert!(pattern.is_match(good), "{good}");
    }
    for bad in ["10", "fast", "10/x"] {
        assert!(!pattern.is_match(bad), "{bad}");
    }
}

#[test]
fn crd_formats_are_ones_the_apiserver_knows() {
    // kube-apiserver warns on every apply about formats it does not know (uint32, ...).
    let known = [
        "int32",
        "int64",
        "float",
        "double",
        "byte",
        "date",
        "date-time",
        "password",
        "ipv4",
    ];
    let yaml = crate::generate::all_yaml().expect("yaml");
    for line in yaml.lines() {
        if let Some(format) = line.trim().strip_prefix("format: ") {
            assert!(
                known.contains(&format),
                "unknown format {format:?} in the CRDs"
            );
        }
    }
}
