//! The custom resources `MailListener` and `DeliveryPolicy` (group `mailroom.dev`, version
//! `v1alpha1`). Each spec is the shared `mailroom-config` model, flattened, plus what only
//! Kubernetes needs (replicas, resources, Service, Secret references); the operator renders the
//! shared part, with references resolved, into the pods' config file. Status types are written
//! only by the operator through the status subresource. [`crate::generate`] turns these types
//! into the CRD YAML of `crds/`.
//!
//! File paths inside the shared model (`tls.certFile`, `auth.usersFile`, `dkim[].keyFile`,
//! `routing.relay.passwordFile`) name keys of the referenced Secrets in a custom resource: the
//! operator mounts each Secret in the pod and makes the paths absolute.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use mailroom_config::{DeliveryPolicySpec, HumanDuration, ListenerSpec};
use serde::{Deserialize, Serialize};

/// API group of both resources.
pub const GROUP: &str = "mailroom.dev";
/// API version of both resources.
pub const VERSION: &str = "v1alpha1";

/// The desired state of a `MailListener`: one SMTP listener (the shared listener model) run by
/// `replicas` inbound pods behind one Service.
// clippy reads the repeated `printcolumn(type_ = ...)` keys as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "mailroom.dev",
    version = "v1alpha1",
    kind = "MailListener",
    namespaced,
    shortname = "ml",
    category = "mailroom",
    status = "MailListenerStatus",
    derive = "PartialEq",
    doc = "An SMTP listener run by inbound pods: accepts mail, runs its plugin chain and queues \
           the mail for its delivery policy.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Ready inbound pods"
    ),
    printcolumn(
        name = "Ports",
        type_ = "string",
        json_path = ".status.ports",
        description = "Service ports"
    ),
    printcolumn(
        name = "Accepted",
        type_ = "integer",
        json_path = ".status.traffic.accepted",
        description = "Messages accepted in the last minutes (status.traffic.windowSeconds)"
    ),
    printcolumn(
        name = "Rejected",
        type_ = "integer",
        json_path = ".status.traffic.rejected",
        description = "Messages refused in the last minutes"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].message"#,
        priority = 1
    )
)]
#[x_kube(
    validation = Rule::new("!has(self.tls) || has(self.tlsSecretRef)")
        .message("tls needs tlsSecretRef: certFile and keyFile name keys of that Secret")
        .field_path(".tlsSecretRef"),
    validation = Rule::new("!has(self.auth) || has(self.usersSecretRef)")
        .message("auth needs usersSecretRef: usersFile names a key of that Secret")
        .field_path(".usersSecretRef"),
    validation = Rule::new(
        "self.address.matches('^([0-9.]+|\\\\[[0-9a-fA-F:.]+\\\\]):[0-9]{1,5}$') && \
         int(self.address.substring(self.address.lastIndexOf(':') + 1)) >= 1 && \
         int(self.address.substring(self.address.lastIndexOf(':') + 1)) <= 65535"
    )
    .message("address must be an IP address and a port from 1 to 65535, e.g. 0.0.0.0:2525 or [::]:2525")
    .field_path(".address")
)]
#[serde(rename_all = "camelCase")]
pub struct MailListenerSpec {
    /// The listener: the same fields as a listener of `mailroom serve`.
    #[serde(flatten)]
    pub listener: ListenerSpec,
    /// Number of inbound pods. Default 1.
    #[serde(default = "one")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// CPU and memory of each inbound pod's container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The Service in front of the inbound pods.
    #[serde(default)]
    pub service: ListenerService,
    /// Secret holding the certificate and key; `tls.certFile` and `tls.keyFile` name its keys
    /// (`tls.crt` and `tls.key` for a cert-manager Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_ref: Option<SecretRef>,
    /// Secret holding the AUTH users file; `auth.usersFile` names its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users_secret_ref: Option<SecretRef>,
}

fn one() -> i32 {
    1
}

/// The Service that exposes a listener.
#[derive(KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[x_kube(
    validation = Rule::new("self.type != 'ClusterIP' || !has(self.externalTrafficPolicy)")
        .message("externalTrafficPolicy applies to NodePort and LoadBalancer Services only")
        .field_path(".externalTrafficPolicy")
)]
#[serde(rename_all = "camelCase")]
pub struct ListenerService {
    /// `ClusterIP`, `NodePort` or `LoadBalancer` (default; mail comes from the internet).
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Annotations of the Service, e.g. for a cloud load balancer.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// `Local` keeps the client's source address (needed by IP-based checks unless the
    /// listener uses `proxyProtocol`); `Cluster` spreads load over all nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<TrafficPolicy>,
    /// Ports of the Service; each forwards to the listener's port. Default one port `smtp`, 25.
    #[serde(default = "ServicePort::defaults")]
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(
        validation = Rule::new("self.all(p, self.exists_one(q, q.name == p.name))")
            .message("port names must be unique"),
        validation = Rule::new("self.all(p, self.exists_one(q, q.port == p.port))")
            .message("ports must be unique")
    )]
    pub ports: Vec<ServicePort>,
}

impl Default for ListenerService {
    fn default() -> Self {
        Self {
            type_: ServiceType::default(),
            annotations: BTreeMap::new(),
            external_traffic_policy: None,
            ports: ServicePort::defaults(),
        }
    }
}

/// Type of a listener's Service.
#[derive(
    schemars::JsonSchema, Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize,
)]
pub enum ServiceType {
    /// Reachable inside the cluster only.
    ClusterIP,
    /// A port on every node.
    NodePort,
    /// An external load balancer.
    #[default]
    LoadBalancer,
}

/// `externalTrafficPolicy` of a Service.
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrafficPolicy {
    /// Any node forwards to any pod; the client address is lost.
    Cluster,
    /// Only nodes with a pod accept; the client address is kept.
    Local,
}

/// One port of a listener's Service.
#[derive(KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[x_kube(
    validation = Rule::new("self.port >= 1 && self.port <= 65535")
        .message("port must be from 1 to 65535")
        .field_path(".port"),
    validation = Rule::new("!has(self.nodePort) || (self.nodePort >= 1 && self.nodePort <= 65535)")
        .message("nodePort must be from 1 to 65535")
        .field_path(".nodePort")
)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Port name (a DNS label: lowercase letters, digits, `-`), e.g. `smtp`, `submission`.
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Port of the Service.
    pub port: i32,
    /// Node port (NodePort and LoadBalancer Services); default: chosen by Kubernetes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<i32>,
}

impl ServicePort {
    fn defaults() -> Vec<Self> {
        vec![Self {
            name: "smtp".to_owned(),
            port: 25,
            node_port: None,
        }]
    }
}

/// A Secret in the resource's namespace.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// What the operator last observed of a `MailListener`.
#[derive(KubeSchema, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MailListenerStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Inbound pods that exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Inbound pods that are ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Where clients connect: the load balancer's address, or the Service's cluster address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The Service's ports, comma-separated (`25,587`), for `kubectl get` (a printer column
    /// shows only the first element of a list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<String>,
    /// Messages of the last minutes, over all the listener's pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<ListenerTraffic>,
}

/// Messages a listener took or refused recently.
#[derive(schemars::JsonSchema, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerTraffic {
    /// The window the counts cover, in seconds (shorter right after the operator started).
    pub window_seconds: i64,
    /// Messages queued and answered with 250.
    pub accepted: i64,
    /// Messages refused at or after DATA (size, malformed data, plugins, queue errors).
    pub rejected: i64,
}

/// The desired state of a `DeliveryPolicy`: how its queued mail leaves (the shared policy
/// model), and the delivery workers that do it, autoscaled on the backlog.
// clippy reads the repeated `printcolumn(type_ = ...)` keys as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "mailroom.dev",
    version = "v1alpha1",
    kind = "DeliveryPolicy",
    plural = "deliverypolicies",
    namespaced,
    shortname = "dp",
    category = "mailroom",
    status = "DeliveryPolicyStatus",
    derive = "PartialEq",
    doc = "How queued mail leaves: routing, TLS, retries, traffic shaping, DKIM, and the \
           delivery workers that run it.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "Workers",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Ready delivery workers"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.desiredReplicas",
        description = "Workers the autoscaler wants"
    ),
    printcolumn(
        name = "Relay",
        type_ = "string",
        json_path = ".spec.routing.relay.host",
        description = "Relay host; empty means MX delivery"
    ),
    printcolumn(
        name = "Backlog",
        type_ = "integer",
        json_path = ".status.backlog.ready",
        description = "Messages ready for delivery"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].message"#,
        priority = 1
    )
)]
#[x_kube(
    validation = Rule::new("!has(self.dkim) || size(self.dkim) == 0 || has(self.dkimSecretRef)")
        .message("dkim needs dkimSecretRef: each keyFile names a key of that Secret")
        .field_path(".dkimSecretRef"),
    validation = Rule::new(
        "!has(self.routing) || !has(self.routing.relay) || has(self.relaySecretRef) || \
         (!has(self.routing.relay.passwordFile) && !has(self.routing.relay.caFile))"
    )
    .message("routing.relay.passwordFile and caFile need relaySecretRef: they name keys of that Secret")
    .field_path(".relaySecretRef")
)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryPolicyResourceSpec {
    /// The policy: the same fields as a policy of `mailroom serve`.
    #[serde(flatten)]
    pub policy: DeliveryPolicySpec,
    /// How many delivery workers run; the autoscaler moves between the bounds by backlog.
    #[serde(default)]
    pub workers: WorkerBounds,
    /// CPU and memory of each worker pod's container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Secret holding the DKIM private keys; each `dkim[].keyFile` names one of its keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dkim_secret_ref: Option<SecretRef>,
    /// Secret holding the relay's AUTH password and CA certificate;
    /// `routing.relay.passwordFile` and `routing.relay.caFile` name its keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_secret_ref: Option<SecretRef>,
}

/// Autoscaling bounds of a policy's delivery workers.
#[derive(KubeSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas")
    .message("workers.minReplicas must not exceed workers.maxReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct WorkerBounds {
    /// Fewest workers, also with an empty queue. 0 stops delivery when idle. Default 1.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,
    /// Most workers. Default 1.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1000))]
    pub max_replicas: i32,
    /// Ready messages one worker is expected to work through; the autoscaler wants
    /// `ready / targetBacklogPerWorker` workers (never more than the destinations' connection
    /// limits can keep busy). Default 500.
    #[serde(default = "default_target_backlog")]
    #[schemars(range(min = 1))]
    pub target_backlog_per_worker: i32,
    /// Workers are removed only when every recommendation of this window allows it, so a
    /// short lull does not stop workers the next batch needs. Default `5m`.
    #[serde(default = "default_scale_down_window")]
    pub scale_down_window: HumanDuration,
}

fn default_target_backlog() -> i32 {
    500
}

fn default_scale_down_window() -> HumanDuration {
    HumanDuration::from_secs(300)
}

impl Default for WorkerBounds {
    fn default() -> Self {
        Self {
            min_replicas: 1,
            max_replicas: 1,
            target_backlog_per_worker: default_target_backlog(),
            scale_down_window: default_scale_down_window(),
        }
    }
}

/// The autoscaler's last change of the worker count.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScaleDecision {
    /// When.
    pub time: Time,
    /// Workers before.
    pub from: i32,
    /// Workers after.
    pub to: i32,
    /// Why: the backlog, the destinations' capacity and the bounds that decided it.
    pub reason: String,
}

/// What the operator last observed of a `DeliveryPolicy`.
#[derive(KubeSchema, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Worker pods that exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Worker pods that are ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// The policy's queued messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<Backlog>,
    /// Workers the autoscaler wants now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// The autoscaler's last change of the worker count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale: Option<ScaleDecision>,
    /// The destinations with the most queued mail (at most 10), and every destination a
    /// response-driven rule holds back: where mail waits, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<DestinationStatus>,
}

/// Queued mail of one destination (a `destinations` entry, or a recipient domain).
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationStatus {
    /// The `destinations` entry's name, or the domain.
    pub name: String,
    /// Entries due now (waiting for a worker or being delivered).
    pub due: i64,
    /// Entries waiting for a retry after a temporary failure.
    pub deferred: i64,
    /// When the oldest message queued here was accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest: Option<Time>,
    /// How long that message has waited (`45s`, `12m`, `3h12m`, `2d4h`), as of the last
    /// backlog refresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_age: Option<String>,
    /// A response-driven rule in force for this destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleInForce>,
    /// The last temporary failure a worker saw here (a reply or a connection error, at most
    /// 200 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When that was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_time: Option<Time>,
}

/// A suspension or throttle a receiving server's reply triggered.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleInForce {
    /// The rule's name (`rules[].name`).
    pub name: String,
    /// `suspend` or `throttle`.
    pub action: String,
    /// The throttled rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    /// Until when.
    pub until: Time,
    /// The remote reply that triggered it (at most 200 characters).
    pub response: String,
}

/// Queued messages of a policy, as last read from the queue.
#[derive(schemars::JsonSchema, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Backlog {
    /// Messages due for delivery now.
    pub ready: i64,
    /// Messages waiting for a retry.
    pub deferred: i64,
    /// Messages a worker is delivering right now.
    #[serde(default)]
    pub leased: i64,
}
