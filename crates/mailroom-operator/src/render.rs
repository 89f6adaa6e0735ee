//! The pure part of reconciling: a custom resource, the operator's [`Settings`] and what the
//! reconciler looked up (a digest of the referenced Secrets) in, the Kubernetes objects out.
//! Nothing here talks to the API server, so every object the operator writes is unit-tested
//! from YAML fixtures (`tests/render/`, golden files).
//!
//! A `MailListener` `mx` becomes the ConfigMap, Deployment, Service and PodDisruptionBudget
//! `mx-inbound`; a `DeliveryPolicy` `bulk` becomes the ConfigMap and Deployment `bulk-outbound`.
//! The ConfigMap holds the same config file `mailroom inbound|outbound --config` reads; file
//! paths in the spec name keys of the referenced Secrets and are rewritten to where those
//! Secrets are mounted.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    HTTPGetAction, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    SeccompProfile, SecretVolumeSource, SecurityContext, Service, ServicePort as KubeServicePort,
    ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use mailroom_config::{
    Config, DeliveryPolicySpec, HttpSpec, JetStreamQueueSpec, ListenerSpec, LogFormat, LogSpec,
    PluginSpec, Problem, QueueSpec, Sidecar,
};
use serde::Serialize;
use thiserror::Error;

use crate::crd::{DeliveryPolicy, MailListener, SecretRef, ServiceType, TrafficPolicy};

/// The one field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "mailroom-operator";
/// Key of the config file in the rendered ConfigMap.
pub const CONFIG_KEY: &str = "mailroom.yaml";
/// Pod-template annotation whose change rolls the pods: a digest of the rendered config and
/// of the Secrets whose contents the process reads only at start.
pub const CHECKSUM_ANNOTATION: &str = "mailroom.dev/config-checksum";
/// Where the ConfigMap is mounted.
pub const CONFIG_DIR: &str = "/etc/mailroom/config";
/// Where `tlsSecretRef` is mounted.
pub const TLS_DIR: &str = "/etc/mailroom/tls";
/// Where `usersSecretRef` is mounted.
pub const USERS_DIR: &str = "/etc/mailroom/users";
/// Where `dkimSecretRef` is mounted.
pub const DKIM_DIR: &str = "/etc/mailroom/dkim";
/// Where `relaySecretRef` is mounted.
pub const RELAY_DIR: &str = "/etc/mailroom/relay";
/// Where the queue credentials Secret of the operator's settings is mounted.
pub const QUEUE_DIR: &str = "/etc/mailroom/queue";
/// Port of `/metrics`, `/healthz` and `/readyz` in every pod.
pub const HTTP_PORT: u16 = 9325;
/// User and group the pods run as (the `nonroot` user of distroless images).
pub const RUN_AS: i64 = 65532;

/// What the operator knows beyond the custom resource: its own command-line settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Image of the inbound and outbound pods (the one `mailroom` image).
    pub image: String,
    /// `imagePullPolicy` of those pods; Kubernetes' default when `None`.
    pub image_pull_policy: Option<String>,
    /// How pods reach the JetStream queue. File paths in it (credentials, TLS) are paths
    /// inside the pods, under [`QUEUE_DIR`] when `queue_secret` is set.
    pub queue: JetStreamQueueSpec,
    /// A Secret of that name in the resource's namespace is mounted at [`QUEUE_DIR`].
    pub queue_secret: Option<String>,
    /// Log level of the pods.
    pub log_level: String,
}

impl Settings {
    /// The queue of one namespace: the configured stream name with `-<namespace>` appended.
    /// Each namespace has its own stream (its own subjects and traffic-shaping buckets), so
    /// policies of the same name in two namespaces never share mail.
    pub fn queue_for(&self, namespace: &str) -> JetStreamQueueSpec {
        JetStreamQueueSpec {
            stream: format!("{}-{namespace}", self.queue.stream),
            ..self.queue.clone()
        }
    }

    /// Settings with the given image and queue, and defaults for the rest.
    pub fn new(image: impl Into<String>, queue: JetStreamQueueSpec) -> Self {
        Self {
            image: image.into(),
            image_pull_policy: None,
            queue,
            queue_secret: None,
            log_level: "info".to_owned(),
        }
    }
}

/// Why a resource cannot be rendered. Each names the field of the custom resource to fix.
#[derive(Debug, Error, PartialEq)]
pub enum RenderError {
    /// The object lacks metadata the API server always sets (name, namespace, uid).
    #[error("metadata.{0} is missing")]
    Metadata(&'static str),
    /// The spec does not make a valid config file.
    #[error("{}", join_problems(.0))]
    Invalid(Vec<Problem>),
    /// The rendered config could not be written as YAML.
    #[error("cannot write the config as YAML: {0}")]
    Yaml(String),
}

impl RenderError {
    /// The problems, or one problem naming `metadata` for the other variants.
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            Self::Invalid(problems) => problems.clone(),
            other => vec![Problem::new("metadata", other.to_string())],
        }
    }
}

fn join_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{}: {}", p.path, p.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The objects of one `MailListener`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ListenerObjects {
    /// The rendered inbound config.
    pub config_map: ConfigMap,
    /// The inbound pods.
    pub deployment: Deployment,
    /// The listener's Service.
    pub service: Service,
    /// Keeps all but one pod up during voluntary disruptions.
    pub pdb: PodDisruptionBudget,
}

/// The objects of one `DeliveryPolicy`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyObjects {
    /// The rendered outbound config.
    pub config_map: ConfigMap,
    /// The delivery workers.
    pub deployment: Deployment,
}

/// Name of a listener's objects.
pub fn listener_child_name(name: &str) -> String {
    format!("{name}-inbound")
}

/// Name of a policy's objects.
pub fn policy_child_name(name: &str) -> String {
    format!("{name}-outbound")
}

/// Longest resource name whose child names (`<name>-inbound`, `<name>-outbound`) still fit a
/// Service name (a DNS label, 63 characters).
pub const MAX_NAME: usize = 63 - "-outbound".len();

/// The name, namespace and owner reference of a custom resource.
struct Owner {
    name: String,
    namespace: String,
    reference: OwnerReference,
}

fn owner<K: Resource<DynamicType = ()>>(object: &K) -> Result<Owner, RenderError> {
    let meta = object.meta();
    let name = meta.name.clone().ok_or(RenderError::Metadata("name"))?;
    let namespace = meta
        .namespace
        .clone()
        .ok_or(RenderError::Metadata("namespace"))?;
    let reference = object
        .controller_owner_ref(&())
        .ok_or(RenderError::Metadata("uid"))?;
    Ok(Owner {
        name,
        namespace,
        reference,
    })
}

/// A resource name must be a valid listener/policy name, start with a letter (child Services
/// are DNS-1035 labels) and leave room for the child suffix.
fn check_resource_name(name: &str) -> Result<(), Problem> {
    let problem = |message: String| Problem::new("metadata.name", message);
    mailroom_config::syntax::check_listener_name(name).map_err(problem)?;
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(problem(format!("{name:?} must start with a letter")));
    }
    if name.len() > MAX_NAME {
        return Err(problem(format!(
            "{name:?} is {} characters long; at most {MAX_NAME} leave room for the \
             -inbound/-outbound suffix of its objects",
            name.len()
        )));
    }
    Ok(())
}

/// Maps a config path of the rendered file (`listeners[0].tls.certFile`, `policies[0].dkim`)
/// to the custom resource's field (`spec.tls.certFile`, `spec.dkim`).
fn spec_path(path: &str) -> String {
    for prefix in ["listeners[0]", "policies[0]"] {
        if let Some(rest) = path.strip_prefix(prefix) {
            return format!("spec{rest}");
        }
    }
    path.to_owned()
}

/// Rewrites a file name that names a key of a referenced Secret into the path where that
/// Secret is mounted. A key may hold letters, digits, `-`, `_` and `.` (Kubernetes' rule).
fn secret_file(field: &str, key: &str, dir: &str, problems: &mut Vec<Problem>) -> String {
    let valid = !key.is_empty()
        && key.len() <= 253
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && key != "."
        && key != "..";
    if !valid {
        problems.push(Problem::new(
            field,
            format!(
                "{key:?} must name a key of the referenced Secret (letters, digits, '-', '_', '.'), \
                 not a path"
            ),
        ));
    }
    format!("{dir}/{key}")
}

fn base_config(settings: &Settings, namespace: &str) -> Config {
    Config {
        hostname: None,
        listeners: Vec::new(),
        queue: QueueSpec {
            local: None,
            jetstream: Some(settings.queue_for(namespace)),
        },
        policies: Vec::new(),
        http: HttpSpec {
            address: format!("0.0.0.0:{HTTP_PORT}"),
        },
        log: LogSpec {
            level: settings.log_level.clone(),
            format: LogFormat::Json,
            delivery_log: None,
        },
    }
}

fn validated(config: Config, mut problems: Vec<Problem>) -> Result<Config, RenderError> {
    if let Err(found) = config.validate() {
        problems.extend(found.into_iter().map(|p| Problem {
            path: spec_path(&p.path),
            message: p.message,
        }));
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(RenderError::Invalid(problems))
    }
}

/// The inbound config of a listener: its spec with `name` from `metadata.name` and Secret keys
/// rewritten into mounted paths, on the cluster queue. Validated like a config file, with each
/// problem named by its field in the custom resource.
pub fn listener_config(ml: &MailListener, settings: &Settings) -> Result<Config, RenderError> {
    let name = ml
        .metadata
        .name
        .clone()
        .ok_or(RenderError::Metadata("name"))?;
    let mut problems: Vec<Problem> = check_resource_name(&name).err().into_iter().collect();
    let mut listener: ListenerSpec = ml.spec.listener.clone();
    listener.name = name;
    if let Some(tls) = &mut listener.tls {
        tls.cert_file = secret_file("spec.tls.certFile", &tls.cert_file, TLS_DIR, &mut problems);
        tls.key_file = secret_file("spec.tls.keyFile", &tls.key_file, TLS_DIR, &mut problems);
    }
    if let Some(auth) = &mut listener.auth {
        auth.users_file = secret_file(
            "spec.auth.usersFile",
            &auth.users_file,
            USERS_DIR,
            &mut problems,
        );
    }
    if let Err(e) = mailroom_plugins::build_chain(
        &listener.plugins,
        "spec.plugins",
        &mailroom_plugins::BuildContext {
            dns: listener.dns.clone(),
            load_files: false,
            ..mailroom_plugins::BuildContext::new(
                &listener.name,
                listener.hostname.as_deref().unwrap_or("localhost"),
            )
        },
    ) {
        problems.push(plugin_problem(&e));
    }
    let namespace = ml.metadata.namespace.as_deref().unwrap_or("default");
    let mut config = base_config(settings, namespace);
    config.listeners.push(listener);
    validated(config, problems)
}

fn plugin_problem(e: &mailroom_plugins::PluginError) -> Problem {
    Problem::new(e.path().to_owned(), e.reason())
}

/// The outbound config of a policy: its spec with `name` from `metadata.name` and Secret keys
/// rewritten into mounted paths, on the cluster queue.
pub fn policy_config(dp: &DeliveryPolicy, settings: &Settings) -> Result<Config, RenderError> {
    let name = dp
        .metadata
        .name
        .clone()
        .ok_or(RenderError::Metadata("name"))?;
    let mut problems: Vec<Problem> = check_resource_name(&name).err().into_iter().collect();
    let mut policy: DeliveryPolicySpec = dp.spec.policy.clone();
    policy.name = name;
    for (i, dkim) in policy.dkim.iter_mut().enumerate() {
        dkim.key_file = secret_file(
            &format!("spec.dkim[{i}].keyFile"),
            &dkim.key_file,
            DKIM_DIR,
            &mut problems,
        );
    }
    if let Some(relay) = policy.routing.relay.as_mut() {
        if let Some(file) = relay.password_file.as_mut() {
            *file = secret_file(
                "spec.routing.relay.passwordFile",
                file,
                RELAY_DIR,
                &mut problems,
            );
        }
        if let Some(file) = relay.ca_file.as_mut() {
            *file = secret_file("spec.routing.relay.caFile", file, RELAY_DIR, &mut problems);
        }
    }
    let namespace = dp.metadata.namespace.as_deref().unwrap_or("default");
    let mut config = base_config(settings, namespace);
    config.policies.push(policy);
    validated(config, problems)
}

fn config_yaml(config: &Config) -> Result<String, RenderError> {
    serde_saphyr::to_string(config).map_err(|e| RenderError::Yaml(e.to_string()))
}

/// Hex SHA-256 of the rendered config and the digest of the referenced Secrets.
fn checksum(config: &str, secrets_digest: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(config.as_bytes());
    ctx.update(b"\0");
    ctx.update(secrets_digest.as_bytes());
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Labels of every object of a resource; the first three also select its pods.
fn labels(component: &str, instance: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(component, instance);
    labels.insert(
        "app.kubernetes.io/managed-by".to_owned(),
        FIELD_MANAGER.to_owned(),
    );
    labels
}

fn selector_labels(component: &str, instance: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "mailroom".to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            component.to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), instance.to_owned()),
    ])
}

fn child_meta(owner: &Owner, name: &str, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(owner.namespace.clone()),
        labels: Some(labels(component, &owner.name)),
        owner_references: Some(vec![owner.reference.clone()]),
        ..ObjectMeta::default()
    }
}

fn config_map(owner: &Owner, name: &str, component: &str, yaml: String) -> ConfigMap {
    ConfigMap {
        metadata: child_meta(owner, name, component),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_owned(), yaml)])),
        ..ConfigMap::default()
    }
}

/// A Secret mounted read-only at `dir`.
struct SecretMount<'a> {
    volume: &'static str,
    secret: &'a SecretRef,
    dir: &'static str,
}

/// What differs between the inbound and the outbound pod.
struct PodParts<'a> {
    component: &'static str,
    args: Vec<String>,
    ports: Vec<ContainerPort>,
    secrets: Vec<SecretMount<'a>>,
    resources: Option<ResourceRequirements>,
    capabilities: Vec<String>,
    grace_seconds: i64,
    sidecars: Vec<Sidecar>,
}

fn restricted(add: Vec<String>) -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: (!add.is_empty()).then_some(add),
        }),
        ..SecurityContext::default()
    }
}

fn quantities(map: &BTreeMap<String, String>) -> Option<BTreeMap<String, Quantity>> {
    (!map.is_empty()).then(|| {
        map.iter()
            .map(|(k, v)| (k.clone(), Quantity(v.clone())))
            .collect()
    })
}

/// A plugin's helper container, with an empty volume for each directory it writes to.
fn sidecar_container(sidecar: &Sidecar, volumes: &mut Vec<Volume>) -> Container {
    let mut mounts = Vec::new();
    for (i, dir) in sidecar.writable_dirs.iter().enumerate() {
        let name = format!("{}-{i}", sidecar.name);
        volumes.push(Volume {
            name: name.clone(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name,
            mount_path: (*dir).to_owned(),
            ..VolumeMount::default()
        });
    }
    let resources = (!sidecar.requests.is_empty() || !sidecar.limits.is_empty()).then(|| {
        ResourceRequirements {
            requests: quantities(&sidecar.requests),
            limits: quantities(&sidecar.limits),
            ..ResourceRequirements::default()
        }
    });
    Container {
        name: sidecar.name.to_owned(),
        image: Some(sidecar.image.clone()),
        args: (!sidecar.args.is_empty()).then(|| sidecar.args.clone()),
        resources,
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        security_context: Some(restricted(Vec::new())),
        ..Container::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("http".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn deployment(
    owner: &Owner,
    name: &str,
    settings: &Settings,
    replicas: i32,
    checksum: String,
    parts: PodParts<'_>,
) -> Deployment {
    let mut volumes = vec![
        Volume {
            name: "config".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: name.to_owned(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity("64Mi".to_owned())),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![
        VolumeMount {
            name: "config".to_owned(),
            mount_path: CONFIG_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "tmp".to_owned(),
            mount_path: "/tmp".to_owned(),
            ..VolumeMount::default()
        },
    ];
    let queue_secret = settings
        .queue_secret
        .as_ref()
        .map(|name| SecretRef { name: name.clone() });
    let mut secrets = parts.secrets;
    if let Some(secret) = &queue_secret {
        secrets.push(SecretMount {
            volume: "queue",
            secret,
            dir: QUEUE_DIR,
        });
    }
    for mount in &secrets {
        volumes.push(Volume {
            name: mount.volume.to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(mount.secret.name.clone()),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: mount.volume.to_owned(),
            mount_path: mount.dir.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    let mut ports = parts.ports;
    ports.push(ContainerPort {
        name: Some("http".to_owned()),
        container_port: i32::from(HTTP_PORT),
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    });
    let container = Container {
        name: "mailroom".to_owned(),
        image: Some(settings.image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        args: Some(parts.args),
        ports: Some(ports),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        resources: parts.resources,
        volume_mounts: Some(mounts),
        security_context: Some(restricted(parts.capabilities)),
        ..Container::default()
    };
    let mut containers = vec![container];
    for sidecar in &parts.sidecars {
        containers.push(sidecar_container(sidecar, &mut volumes));
    }
    let selector = selector_labels(parts.component, &owner.name);
    Deployment {
        metadata: child_meta(owner, name, parts.component),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(parts.component, &owner.name)),
                    annotations: Some(BTreeMap::from([(CHECKSUM_ANNOTATION.to_owned(), checksum)])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers,
                    volumes: Some(volumes),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(parts.grace_seconds),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RUN_AS),
                        run_as_group: Some(RUN_AS),
                        fs_group: Some(RUN_AS),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_owned(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// Renders a listener. `secrets_digest` changes when a referenced Secret that is read only at
/// start (the users file) changes, so that the pods roll; TLS files are reloaded in place.
pub fn render_listener(
    ml: &MailListener,
    settings: &Settings,
    secrets_digest: &str,
) -> Result<ListenerObjects, RenderError> {
    let owner = owner(ml)?;
    let config = listener_config(ml, settings)?;
    let yaml = config_yaml(&config)?;
    let name = listener_child_name(&owner.name);
    let component = "inbound";
    let port = config
        .listeners
        .first()
        .and_then(|l| l.try_socket_addr().ok())
        .map_or(25, |addr| addr.port());
    let spec = &ml.spec;
    let mut secrets = Vec::new();
    if let Some(secret) = &spec.tls_secret_ref {
        secrets.push(SecretMount {
            volume: "tls",
            secret,
            dir: TLS_DIR,
        });
    }
    if let Some(secret) = &spec.users_secret_ref {
        secrets.push(SecretMount {
            volume: "users",
            secret,
            dir: USERS_DIR,
        });
    }
    let parts = PodParts {
        component,
        args: vec![
            "inbound".to_owned(),
            "--config".to_owned(),
            format!("{CONFIG_DIR}/{CONFIG_KEY}"),
        ],
        ports: vec![ContainerPort {
            name: Some("smtp".to_owned()),
            container_port: i32::from(port),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }],
        secrets,
        resources: spec.resources.clone(),
        // A listener on a port below 1024 binds it as a non-root user.
        capabilities: if port < 1024 {
            vec!["NET_BIND_SERVICE".to_owned()]
        } else {
            Vec::new()
        },
        // The server's own drain deadline plus room for the last replies.
        grace_seconds: 60,
        // Plugins that declare a helper container (rspamd) get it in the same pod.
        sidecars: config
            .listeners
            .iter()
            .flat_map(|l| &l.plugins)
            .filter_map(PluginSpec::sidecar)
            .collect(),
    };
    let deployment = deployment(
        &owner,
        &name,
        settings,
        spec.replicas,
        checksum(&yaml, secrets_digest),
        parts,
    );
    let service = Service {
        metadata: ObjectMeta {
            annotations: (!spec.service.annotations.is_empty())
                .then(|| spec.service.annotations.clone()),
            ..child_meta(&owner, &name, component)
        },
        spec: Some(ServiceSpec {
            type_: Some(
                match spec.service.type_ {
                    ServiceType::ClusterIP => "ClusterIP",
                    ServiceType::NodePort => "NodePort",
                    ServiceType::LoadBalancer => "LoadBalancer",
                }
                .to_owned(),
            ),
            external_traffic_policy: spec.service.external_traffic_policy.map(|p| {
                match p {
                    TrafficPolicy::Cluster => "Cluster",
                    TrafficPolicy::Local => "Local",
                }
                .to_owned()
            }),
            selector: Some(selector_labels(component, &owner.name)),
            ports: Some(
                spec.service
                    .ports
                    .iter()
                    .map(|p| KubeServicePort {
                        name: Some(p.name.clone()),
                        port: p.port,
                        node_port: p.node_port,
                        protocol: Some("TCP".to_owned()),
                        target_port: Some(IntOrString::String("smtp".to_owned())),
                        ..KubeServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let pdb = PodDisruptionBudget {
        metadata: child_meta(&owner, &name, component),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(component, &owner.name)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    };
    Ok(ListenerObjects {
        config_map: config_map(&owner, &name, component, yaml),
        deployment,
        service,
        pdb,
    })
}

/// Renders a policy with `replicas` workers (the autoscaler's choice within the bounds).
/// `secrets_digest` changes when the DKIM keys or the relay credentials change.
pub fn render_policy(
    dp: &DeliveryPolicy,
    settings: &Settings,
    replicas: i32,
    secrets_digest: &str,
) -> Result<PolicyObjects, RenderError> {
    let owner = owner(dp)?;
    let config = policy_config(dp, settings)?;
    let yaml = config_yaml(&config)?;
    let name = policy_child_name(&owner.name);
    let component = "outbound";
    let spec = &dp.spec;
    let mut secrets = Vec::new();
    if let Some(secret) = &spec.dkim_secret_ref {
        secrets.push(SecretMount {
            volume: "dkim",
            secret,
            dir: DKIM_DIR,
        });
    }
    if let Some(secret) = &spec.relay_secret_ref {
        secrets.push(SecretMount {
            volume: "relay",
            secret,
            dir: RELAY_DIR,
        });
    }
    let parts = PodParts {
        component,
        args: vec![
            "outbound".to_owned(),
            "--config".to_owned(),
            format!("{CONFIG_DIR}/{CONFIG_KEY}"),
            "--policy".to_owned(),
            owner.name.clone(),
        ],
        ports: Vec::new(),
        secrets,
        resources: spec.resources.clone(),
        capabilities: Vec::new(),
        // A delivery in flight finishes or is handed back to the queue within the data-end
        // timeout; leases of killed workers expire anyway.
        grace_seconds: 120,
        sidecars: Vec::new(),
    };
    let deployment = deployment(
        &owner,
        &name,
        settings,
        replicas,
        checksum(&yaml, secrets_digest),
        parts,
    );
    Ok(PolicyObjects {
        config_map: config_map(&owner, &name, component, yaml),
        deployment,
    })
}

/// The config checksum on a Deployment's pod template ([`CHECKSUM_ANNOTATION`]).
pub fn template_checksum(deployment: &Deployment) -> Option<String> {
    deployment
        .spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(CHECKSUM_ANNOTATION)
        .cloned()
}

/// Worker count for a policy: the current count kept within the bounds, `minReplicas` when
/// there is no Deployment yet.
pub fn worker_replicas(dp: &DeliveryPolicy, current: Option<i32>) -> i32 {
    let bounds = &dp.spec.workers;
    let min = bounds.min_replicas.min(bounds.max_replicas);
    current
        .unwrap_or(bounds.min_replicas)
        .clamp(min, bounds.max_replicas)
}
