//! The reconcilers: `dereference -> validate -> build -> apply -> update_status` for every
//! `MailListener` and `DeliveryPolicy`.
//!
//! * dereference: read the referenced Secrets and check that every key the spec names
//!   exists (Secrets are watched too, so that creating or rotating one reconciles the
//!   resources that reference it at once);
//! * validate + build: [`crate::render`], pure;
//! * apply: server-side apply of every object under [`FIELD_MANAGER`], with owner references
//!   so that deleting the resource garbage-collects them;
//! * update_status: conditions, replicas, address or backlog through the status subresource,
//!   written only when they changed; an Event for each change the operator made and for each
//!   failure.
//!
//! A spec that cannot be applied is reported as `Degraded` and retried with backoff (2 s
//! doubling to 2 min), never a crash loop. Every resource is also reconciled every 30 s
//! ([`BACKLOG_REFRESH`]) for its policy backlog or listener traffic in status.
//! A `DeliveryPolicy` carries the finalizer
//! [`QUEUE_FINALIZER`]: its deletion waits until its queue is empty, unless it is annotated
//! [`FORCE_DELETE_ANNOTATION`]`: "true"`.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalize, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use mailroom_config::JetStreamQueueSpec;
use mailroom_inbound::report;
use mailroom_outbound::shaping::{KvStore, LastError, Override, ShapingStore};
use mailroom_queue::{Backlog as QueueBacklog, Queue};
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::autoscale;
use crate::crd::{
    Backlog, DeliveryPolicy, DeliveryPolicyStatus, MailListener, MailListenerStatus, ScaleDecision,
    SecretRef,
};
use crate::metrics;
use crate::render::{self, FIELD_MANAGER, RenderError, Settings, render_listener, render_policy};
use crate::status::{self, Outcome, Rollout, reason};

/// Finalizer on every `DeliveryPolicy`: removed once its queue holds no mail.
pub const QUEUE_FINALIZER: &str = "mailroom.dev/queue-drained";
/// `"true"` on a `DeliveryPolicy` lets it be deleted with mail still queued.
pub const FORCE_DELETE_ANNOTATION: &str = "mailroom.dev/force-delete";
/// How often a policy's backlog and a listener's traffic in status are refreshed, by default.
pub const BACKLOG_REFRESH: Duration = Duration::from_secs(30);

/// Why a reconcile failed. [`Error::category`] is the static label of the failure metric.
#[derive(Debug, Error)]
pub enum Error {
    /// The spec or a referenced Secret must be fixed by the user.
    #[error("{message}")]
    Spec {
        /// A [`reason`] constant.
        reason: &'static str,
        /// What to fix, naming the field.
        message: String,
    },
    /// The API server refused a request or could not be reached.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The queue's backlog could not be read.
    #[error("queue: {0}")]
    Queue(String),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// A deleted policy still has queued mail.
    #[error("{0}")]
    DeletionBlocked(String),
}

impl Error {
    /// The label of `mailroom_operator_reconcile_failures_total`.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Spec { reason, .. } => reason,
            Self::Kube(_) => "KubeApi",
            Self::Queue(_) => "Queue",
            Self::Finalizer(_) => "Finalizer",
            Self::DeletionBlocked(_) => reason::DELETION_BLOCKED,
        }
    }

    fn outcome(&self) -> Outcome {
        match self {
            Self::Spec { reason, message } => Outcome::Failed {
                reason,
                message: message.clone(),
            },
            Self::DeletionBlocked(message) => Outcome::DeletionBlocked {
                message: message.clone(),
            },
            other => Outcome::Failed {
                reason: reason::APPLY_FAILED,
                message: other.to_string(),
            },
        }
    }
}

impl From<RenderError> for Error {
    fn from(e: RenderError) -> Self {
        Self::Spec {
            reason: reason::INVALID_SPEC,
            message: e.to_string(),
        }
    }
}

/// Opens the queue of one namespace (its stream, [`Settings::queue_for`]): the queue, and the
/// JetStream context its traffic-shaping state lives in.
pub type QueueOpener = Arc<
    dyn Fn(JetStreamQueueSpec) -> BoxFuture<'static, Result<NamespaceQueue, String>> + Send + Sync,
>;

/// One namespace's queue, as [`QueueOpener`] returns it.
#[derive(Clone)]
pub struct NamespaceQueue {
    /// The queue (backlogs).
    pub queue: Arc<dyn Queue>,
    /// Where the workers keep traffic-shaping state (rules in force), if anywhere.
    pub jetstream: Option<async_nats::jetstream::Context>,
}

/// Shared by every reconcile.
pub struct Context {
    client: Client,
    settings: Settings,
    recorder: Recorder,
    open_queue: QueueOpener,
    queues: tokio::sync::Mutex<HashMap<String, NamespaceQueue>>,
    backlog_refresh: Duration,
    failures: Mutex<HashMap<String, u32>>,
    stabilizers: Mutex<HashMap<String, autoscale::Stabilizer>>,
    last_scale: Mutex<HashMap<String, ScaleDecision>>,
    traffic: Mutex<HashMap<String, crate::traffic::Tracker>>,
    shaping_stores: tokio::sync::Mutex<HashMap<String, Arc<KvStore>>>,
    stats_stores: tokio::sync::Mutex<HashMap<String, async_nats::jetstream::kv::Store>>,
}

impl Context {
    /// A context; `instance` names this operator replica in Events (its pod name).
    pub fn new(
        client: Client,
        settings: Settings,
        open_queue: QueueOpener,
        instance: Option<String>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.to_owned(),
                instance,
            },
        );
        Self {
            client,
            settings,
            recorder,
            open_queue,
            queues: tokio::sync::Mutex::new(HashMap::new()),
            backlog_refresh: BACKLOG_REFRESH,
            failures: Mutex::new(HashMap::new()),
            stabilizers: Mutex::new(HashMap::new()),
            last_scale: Mutex::new(HashMap::new()),
            traffic: Mutex::new(HashMap::new()),
            shaping_stores: tokio::sync::Mutex::new(HashMap::new()),
            stats_stores: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// How often each policy's backlog is read into its status (default [`BACKLOG_REFRESH`]).
    #[must_use]
    pub fn with_backlog_refresh(mut self, every: Duration) -> Self {
        self.backlog_refresh = every;
        self
    }

    /// The queue of `namespace`, opened on first use.
    async fn queue(&self, namespace: &str) -> Result<NamespaceQueue, Error> {
        let mut queues = self.queues.lock().await;
        if let Some(q) = queues.get(namespace) {
            return Ok(q.clone());
        }
        let spec = self.settings.queue_for(namespace);
        let opened = (self.open_queue)(spec.clone())
            .await
            .map_err(|e| Error::Queue(format!("stream {}: {e}", spec.stream)))?;
        queues.insert(namespace.to_owned(), opened.clone());
        Ok(opened)
    }

    /// The workers' shaping state of `policy` in `namespace` (opened once, then reused).
    async fn shaping_store(&self, namespace: &str, policy: &str) -> Result<Arc<KvStore>, String> {
        let key = format!("{namespace}/{policy}");
        let mut stores = self.shaping_stores.lock().await;
        if let Some(store) = stores.get(&key) {
            return Ok(Arc::clone(store));
        }
        let js = self
            .queue(namespace)
            .await
            .map_err(|e| e.to_string())?
            .jetstream
            .ok_or("the queue has no JetStream context")?;
        let queue = self.settings.queue_for(namespace);
        let store = KvStore::open(&js, &queue.stream, policy, usize::from(queue.replicas))
            .await
            .map_err(|e| e.to_string())?;
        let store = Arc::new(store);
        stores.insert(key, Arc::clone(&store));
        Ok(store)
    }

    /// The rules in force and the last errors for `policy` in `namespace`, from the workers'
    /// shaping state; empty when unknown (logged; the store is opened again next time).
    async fn shaping_state(
        &self,
        namespace: &str,
        policy: &str,
    ) -> (Vec<Override>, Vec<LastError>) {
        let read = async {
            let store = self.shaping_store(namespace, policy).await?;
            let rules = store.overrides().await.map_err(|e| e.to_string())?;
            let errors = store.last_errors().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((rules, errors))
        };
        match read.await {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!(policy, error = %e, "cannot read the shaping state");
                self.shaping_stores
                    .lock()
                    .await
                    .remove(&format!("{namespace}/{policy}"));
                (Vec::new(), Vec::new())
            }
        }
    }

    /// The listener counts bucket of `namespace` (opened once, then reused).
    async fn stats_store(
        &self,
        namespace: &str,
    ) -> Result<async_nats::jetstream::kv::Store, String> {
        let mut stores = self.stats_stores.lock().await;
        if let Some(store) = stores.get(namespace) {
            return Ok(store.clone());
        }
        let js = self
            .queue(namespace)
            .await
            .map_err(|e| e.to_string())?
            .jetstream
            .ok_or("the queue has no JetStream context")?;
        let spec = self.settings.queue_for(namespace);
        let store = report::open(&js, &spec.stream, usize::from(spec.replicas)).await?;
        stores.insert(namespace.to_owned(), store.clone());
        Ok(store)
    }

    /// The listener's recent traffic from its pods' reported totals; `None` when they cannot
    /// be read (logged; the bucket is opened again next time).
    async fn listener_traffic(&self, ml: &MailListener) -> Option<crate::crd::ListenerTraffic> {
        let namespace = ml.namespace().unwrap_or_default();
        let read = async {
            let store = self.stats_store(&namespace).await?;
            report::read(&store, &ml.name_any()).await
        };
        match read.await {
            Ok(readings) => Some(
                self.traffic
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .entry(key(ml))
                    .or_default()
                    .observe(Instant::now(), &readings),
            ),
            Err(e) => {
                tracing::warn!(listener = %ml.name_any(), error = %e, "cannot read listener counts");
                self.stats_stores.lock().await.remove(&namespace);
                None
            }
        }
    }

    /// Records a failure of `key` and returns how long to wait before the next try.
    fn backoff(&self, key: String) -> Duration {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = failures.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        let shift = (*n - 1).min(6);
        Duration::from_secs(2u64 << shift).min(Duration::from_secs(120))
    }

    fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }

    /// Publishes an Event. The recorder folds Events with the same reason and `action` into
    /// one series that keeps the first note, so `action` must tell distinct happenings apart
    /// (`Scale1To3`, `Rollout<checksum>`); repeated failures share `Reconcile`.
    async fn event<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        type_: EventType,
        (reason, action): (&str, String),
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(truncate(note, 1000)),
            action,
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "cannot publish an Event");
        }
    }
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

fn key<K: Resource<DynamicType = ()>>(object: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

/// A Secret the spec references, with the keys it names (`(field, key)`). `rolls` is true when
/// the pods read the files only at start, so a change of their contents must roll the pods.
struct SecretUse<'a> {
    field: &'static str,
    secret: &'a SecretRef,
    keys: Vec<(String, String)>,
    rolls: bool,
}

/// Reads every referenced Secret, checks the keys, and returns a digest of the contents of
/// those that roll the pods.
async fn dereference(
    client: &Client,
    namespace: &str,
    uses: &[SecretUse<'_>],
) -> Result<String, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    for u in uses {
        let Some(secret) = api.get_opt(&u.secret.name).await? else {
            return Err(Error::Spec {
                reason: reason::SECRET_NOT_FOUND,
                message: format!(
                    "{}: Secret {:?} not found in namespace {namespace:?}; create it or fix the name",
                    u.field, u.secret.name
                ),
            });
        };
        let data = secret.data.unwrap_or_default();
        let string_data = secret.string_data.unwrap_or_default();
        for (field, k) in &u.keys {
            let value = data
                .get(k)
                .map(|v| v.0.clone())
                .or_else(|| string_data.get(k).map(|v| v.clone().into_bytes()));
            let Some(value) = value else {
                let present: Vec<&str> = data.keys().map(String::as_str).collect();
                return Err(Error::Spec {
                    reason: reason::SECRET_KEY_MISSING,
                    message: format!(
                        "{field}: Secret {:?} has no key {k:?} (it has: {}); add the key or fix {field}",
                        u.secret.name,
                        if present.is_empty() {
                            "no keys".to_owned()
                        } else {
                            present.join(", ")
                        }
                    ),
                });
            };
            if u.rolls {
                digest.update(u.secret.name.as_bytes());
                digest.update(b"\0");
                digest.update(k.as_bytes());
                digest.update(b"\0");
                digest.update(ring::digest::digest(&ring::digest::SHA256, &value).as_ref());
            }
        }
    }
    Ok(digest
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Server-side apply of one object under the operator's field manager.
async fn apply<K>(client: &Client, object: &K) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let namespace = object.meta().namespace.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), &namespace);
    let name = object.name_any();
    Ok(api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await?)
}

/// Applies a Deployment and says, as an Event, what changed against `before`.
async fn apply_deployment<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    owner: &K,
    before: Option<&Deployment>,
    deployment: &Deployment,
    scale_reason: Option<&str>,
) -> Result<Deployment, Error> {
    let applied = apply(&ctx.client, deployment).await?;
    let name = deployment.name_any();
    let replicas = |d: &Deployment| d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    match before {
        None => {
            ctx.event(
                owner,
                EventType::Normal,
                ("Created", "Create".to_owned()),
                format!(
                    "created Deployment {name} with {} replicas",
                    replicas(&applied)
                ),
            )
            .await;
        }
        Some(before) => {
            if render::template_checksum(before) != render::template_checksum(&applied) {
                let sum = render::template_checksum(&applied).unwrap_or_default();
                ctx.event(
                    owner,
                    EventType::Normal,
                    (
                        "ConfigChanged",
                        format!("Rollout{}", sum.get(..12).unwrap_or(&sum)),
                    ),
                    format!(
                        "rolling Deployment {name} to config {}",
                        sum.get(..12).unwrap_or(&sum)
                    ),
                )
                .await;
            }
            if replicas(before) != replicas(&applied) {
                ctx.event(
                    owner,
                    EventType::Normal,
                    (
                        "Scaled",
                        format!("Scale{}To{}", replicas(before), replicas(&applied)),
                    ),
                    format!(
                        "Deployment {name} from {} to {} replicas{}",
                        replicas(before),
                        replicas(&applied),
                        scale_reason.map(|r| format!(": {r}")).unwrap_or_default()
                    ),
                )
                .await;
            }
        }
    }
    Ok(applied)
}

async fn existing_deployment(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<Deployment>, Error> {
    Ok(Api::<Deployment>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await?)
}

/// Writes `status` through the status subresource when it differs from `current`.
async fn write_status<K, S>(
    client: &Client,
    object: &K,
    current: Option<&S>,
    status: &S,
) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
    S: Serialize + PartialEq,
{
    if current == Some(status) {
        return Ok(());
    }
    let api: Api<K> = Api::namespaced(client.clone(), &object.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        &object.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Runs one reconcile with metrics, status on failure and a Warning Event.
async fn observed<K, F>(
    object: &K,
    ctx: &Context,
    kind: &'static str,
    work: F,
) -> Result<Action, Error>
where
    K: Resource<DynamicType = ()>,
    F: Future<Output = Result<Action, Error>>,
{
    let start = Instant::now();
    metrics::RECONCILES.with_label_values(&[kind]).inc();
    let result = work.await;
    metrics::RECONCILE_SECONDS
        .with_label_values(&[kind])
        .observe(start.elapsed().as_secs_f64());
    match &result {
        Ok(_) => ctx.succeeded(&key(object)),
        Err(e) => {
            metrics::RECONCILE_FAILURES
                .with_label_values(&[kind, e.category()])
                .inc();
            tracing::warn!(kind, name = %object.name_any(), namespace = ?object.namespace(), error = %e, "reconcile failed");
            ctx.event(
                object,
                EventType::Warning,
                (e.category(), "Reconcile".to_owned()),
                e.to_string(),
            )
            .await;
        }
    }
    result
}

// ---- MailListener ----

fn listener_secrets(ml: &MailListener) -> Vec<SecretUse<'_>> {
    let spec = &ml.spec;
    let mut uses = Vec::new();
    if let (Some(secret), Some(tls)) = (&spec.tls_secret_ref, &spec.listener.tls) {
        uses.push(SecretUse {
            field: "spec.tlsSecretRef",
            secret,
            keys: vec![
                ("spec.tls.certFile".to_owned(), tls.cert_file.clone()),
                ("spec.tls.keyFile".to_owned(), tls.key_file.clone()),
            ],
            // The server reloads its certificate files when they change.
            rolls: false,
        });
    }
    if let (Some(secret), Some(auth)) = (&spec.users_secret_ref, &spec.listener.auth) {
        uses.push(SecretUse {
            field: "spec.usersSecretRef",
            secret,
            keys: vec![("spec.auth.usersFile".to_owned(), auth.users_file.clone())],
            rolls: true,
        });
    }
    uses
}

async fn apply_listener(
    ml: &MailListener,
    ctx: &Context,
) -> Result<(Rollout, Option<String>), Error> {
    let namespace = ml.namespace().unwrap_or_default();
    let digest = dereference(&ctx.client, &namespace, &listener_secrets(ml)).await?;
    let objects = render_listener(ml, &ctx.settings, &digest)?;
    let before =
        existing_deployment(&ctx.client, &namespace, &objects.deployment.name_any()).await?;
    apply(&ctx.client, &objects.config_map).await?;
    let service = apply(&ctx.client, &objects.service).await?;
    apply(&ctx.client, &objects.pdb).await?;
    let deployment = apply_deployment(ctx, ml, before.as_ref(), &objects.deployment, None).await?;
    Ok((Rollout::of(&deployment), service_address(&service)))
}

/// The load balancer's address, else the cluster IP.
fn service_address(service: &Service) -> Option<String> {
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .and_then(|list| list.first());
    ingress
        .and_then(|i| i.ip.clone().or_else(|| i.hostname.clone()))
        .or_else(|| service.spec.as_ref().and_then(|s| s.cluster_ip.clone()))
        .filter(|a| !a.is_empty() && a != "None")
}

fn previous_conditions(conditions: Option<&Vec<Condition>>) -> &[Condition] {
    conditions.map_or(&[], Vec::as_slice)
}

/// Reconciles one `MailListener`.
pub async fn reconcile_listener(ml: Arc<MailListener>, ctx: Arc<Context>) -> Result<Action, Error> {
    observed(&*ml, &ctx, "MailListener", async {
        let result = apply_listener(&ml, &ctx).await;
        let current = ml.status.clone();
        let previous = current.as_ref().map(|s| &s.conditions);
        let mut status = current.clone().unwrap_or_default();
        let outcome = match &result {
            Ok((rollout, address)) => {
                status.replicas = Some(rollout.replicas);
                status.ready_replicas = Some(rollout.ready);
                status.address = address.clone();
                status.ports = Some(
                    ml.spec
                        .service
                        .ports
                        .iter()
                        .map(|p| p.port.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                );
                Outcome::Applied(*rollout)
            }
            Err(e) => e.outcome(),
        };
        if let Some(traffic) = ctx.listener_traffic(&ml).await {
            status.traffic = Some(traffic);
        }
        status.observed_generation = ml.metadata.generation;
        status.conditions = status::conditions(
            previous_conditions(previous),
            ml.metadata.generation,
            "inbound pods",
            &outcome,
            now(),
        );
        write_status::<MailListener, MailListenerStatus>(
            &ctx.client,
            &ml,
            current.as_ref(),
            &status,
        )
        .await?;
        // Back soon for the traffic counts.
        result.map(|_| Action::requeue(ctx.backlog_refresh))
    })
    .await
}

// ---- DeliveryPolicy ----

fn policy_secrets(dp: &DeliveryPolicy) -> Vec<SecretUse<'_>> {
    let spec = &dp.spec;
    let mut uses = Vec::new();
    if let Some(secret) = &spec.dkim_secret_ref {
        uses.push(SecretUse {
            field: "spec.dkimSecretRef",
            secret,
            keys: spec
                .policy
                .dkim
                .iter()
                .enumerate()
                .map(|(i, d)| (format!("spec.dkim[{i}].keyFile"), d.key_file.clone()))
                .collect(),
            rolls: true,
        });
    }
    if let (Some(secret), Some(relay)) = (&spec.relay_secret_ref, &spec.policy.routing.relay) {
        let mut keys = Vec::new();
        if let Some(file) = &relay.password_file {
            keys.push(("spec.routing.relay.passwordFile".to_owned(), file.clone()));
        }
        if let Some(file) = &relay.ca_file {
            keys.push(("spec.routing.relay.caFile".to_owned(), file.clone()));
        }
        uses.push(SecretUse {
            field: "spec.relaySecretRef",
            secret,
            keys,
            rolls: true,
        });
    }
    uses
}

/// The worker count applied to a policy's Deployment, and the scaling decision when it changed.
struct Scaling {
    replicas: i32,
    decision: Option<ScaleDecision>,
}

/// The autoscaler's choice for `dp`: the recommendation for `backlog`, stabilised, from
/// `current` workers; without a backlog (queue unreachable) the current count within bounds.
fn scale(
    ctx: &Context,
    dp: &DeliveryPolicy,
    current: Option<i32>,
    backlog: Option<&QueueBacklog>,
) -> Scaling {
    let Some(backlog) = backlog else {
        return Scaling {
            replicas: render::worker_replicas(dp, current),
            decision: None,
        };
    };
    let rec = autoscale::recommend(&dp.spec, backlog);
    let window = dp.spec.workers.scale_down_window.as_duration();
    let replicas = match current {
        None => rec.replicas,
        Some(current) => ctx
            .stabilizers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(key(dp))
            .or_default()
            .apply(Instant::now(), window, current, rec.replicas),
    };
    let mut reason = rec.reason;
    if replicas != rec.replicas {
        reason.push_str(&format!(
            "; keeping {replicas} for the scale-down window ({})",
            dp.spec.workers.scale_down_window
        ));
    }
    let mut last = ctx
        .last_scale
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let decision = if current == Some(replicas) {
        // The object this reconcile read may predate the status write of the one that
        // scaled; this replica's memory does not.
        last.get(&key(dp)).cloned()
    } else {
        let decision = ScaleDecision {
            time: now(),
            from: current.unwrap_or(0),
            to: replicas,
            reason,
        };
        last.insert(key(dp), decision.clone());
        Some(decision)
    };
    Scaling { replicas, decision }
}

async fn apply_policy(
    dp: &DeliveryPolicy,
    ctx: &Context,
    backlog: Option<&QueueBacklog>,
) -> Result<(Rollout, Scaling), Error> {
    let namespace = dp.namespace().unwrap_or_default();
    let digest = dereference(&ctx.client, &namespace, &policy_secrets(dp)).await?;
    let name = render::policy_child_name(&dp.name_any());
    let before = existing_deployment(&ctx.client, &namespace, &name).await?;
    let current = before
        .as_ref()
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.replicas);
    let scaling = scale(ctx, dp, current, backlog);
    let objects = render_policy(dp, &ctx.settings, scaling.replicas, &digest)?;
    apply(&ctx.client, &objects.config_map).await?;
    let reason = scaling
        .decision
        .as_ref()
        .filter(|d| Some(d.to) != current)
        .map(|d| d.reason.as_str());
    let deployment =
        apply_deployment(ctx, dp, before.as_ref(), &objects.deployment, reason).await?;
    Ok((Rollout::of(&deployment), scaling))
}

async fn policy_backlog(ctx: &Context, dp: &DeliveryPolicy) -> Result<QueueBacklog, Error> {
    let namespace = dp.namespace().unwrap_or_default();
    let mut backlogs = ctx
        .queue(&namespace)
        .await?
        .queue
        .backlogs()
        .await
        .map_err(|e| Error::Queue(e.to_string()))?;
    Ok(backlogs.remove(&dp.name_any()).unwrap_or_default())
}

/// When the oldest entry of each listed destination's domains was accepted; empty (the
/// status then shows no ages) when the queue cannot say.
async fn oldest_queued(
    ctx: &Context,
    dp: &DeliveryPolicy,
    groups: &[status::DestinationGroup],
) -> std::collections::BTreeMap<String, u64> {
    let domains: Vec<String> = groups.iter().flat_map(|g| g.domains.clone()).collect();
    if domains.is_empty() {
        return Default::default();
    }
    let namespace = dp.namespace().unwrap_or_default();
    let result = match ctx.queue(&namespace).await {
        Ok(q) => q
            .queue
            .oldest_queued(&dp.name_any(), &domains)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    result.unwrap_or_else(|error| {
        tracing::warn!(policy = %dp.name_any(), %error, "cannot read the oldest queued entries");
        Default::default()
    })
}

fn status_backlog(b: &QueueBacklog) -> Backlog {
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    Backlog {
        ready: count(b.ready),
        deferred: count(b.deferred),
        leased: count(b.leased),
    }
}

async fn policy_status(
    dp: &DeliveryPolicy,
    ctx: &Context,
    result: &Result<(Rollout, Scaling), Error>,
    backlog: Option<&QueueBacklog>,
) -> Result<(), Error> {
    let current = dp.status.clone();
    let mut status = current.clone().unwrap_or_default();
    let outcome = match result {
        Ok((rollout, scaling)) => {
            status.replicas = Some(rollout.replicas);
            status.ready_replicas = Some(rollout.ready);
            status.desired_replicas = Some(scaling.replicas);
            if let Some(decision) = &scaling.decision {
                status.last_scale = Some(decision.clone());
            }
            Outcome::Applied(*rollout)
        }
        Err(e) => e.outcome(),
    };
    if let Some(b) = backlog {
        status.backlog = Some(status_backlog(b));
        let (rules, errors) = ctx
            .shaping_state(&dp.namespace().unwrap_or_default(), &dp.name_any())
            .await;
        let groups = status::destination_groups(&dp.spec, b, &rules);
        let oldest = oldest_queued(ctx, dp, &groups).await;
        status.destinations =
            status::destinations(&groups, &rules, &errors, &oldest, mailroom_queue::now_ms());
    }
    status.observed_generation = dp.metadata.generation;
    status.conditions = status::conditions(
        previous_conditions(current.as_ref().map(|s| &s.conditions)),
        dp.metadata.generation,
        "workers",
        &outcome,
        now(),
    );
    write_status::<DeliveryPolicy, DeliveryPolicyStatus>(&ctx.client, dp, current.as_ref(), &status)
        .await
}

async fn policy_apply_event(dp: Arc<DeliveryPolicy>, ctx: &Context) -> Result<Action, Error> {
    // Without the backlog (queue unreachable) the workers keep their count and the rollout
    // goes on: a queue outage must not stop configuration changes.
    let backlog = match policy_backlog(ctx, &dp).await {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::warn!(policy = %dp.name_any(), error = %e, "cannot read the backlog");
            None
        }
    };
    let result = apply_policy(&dp, ctx, backlog.as_ref()).await;
    policy_status(&dp, ctx, &result, backlog.as_ref()).await?;
    result.map(|_| Action::requeue(ctx.backlog_refresh))
}

async fn policy_cleanup(dp: Arc<DeliveryPolicy>, ctx: &Context) -> Result<Action, Error> {
    let forced = dp
        .annotations()
        .get(FORCE_DELETE_ANNOTATION)
        .is_some_and(|v| v == "true");
    let backlog = match policy_backlog(ctx, &dp).await {
        Ok(b) => b,
        Err(e) if forced => {
            tracing::warn!(policy = %dp.name_any(), error = %e, "forced deletion without reading the backlog");
            QueueBacklog::default()
        }
        Err(e) => {
            let blocked = Error::DeletionBlocked(format!(
                "deletion waits: the queue backlog cannot be read ({e}); annotate \
                 {FORCE_DELETE_ANNOTATION}=true to delete anyway"
            ));
            policy_status(&dp, ctx, &Err(blocked), None).await?;
            return Err(Error::DeletionBlocked(e.to_string()));
        }
    };
    let left = backlog.ready + backlog.deferred + backlog.leased;
    if left > 0 && !forced {
        let message = format!(
            "deletion waits for {left} queued messages ({} ready, {} deferred, {} in delivery) \
             to leave; annotate {FORCE_DELETE_ANNOTATION}=true to delete anyway",
            backlog.ready, backlog.deferred, backlog.leased
        );
        policy_status(
            &dp,
            ctx,
            &Err(Error::DeletionBlocked(message.clone())),
            Some(&backlog),
        )
        .await?;
        return Err(Error::DeletionBlocked(message));
    }
    if left > 0 {
        ctx.event(
            &*dp,
            EventType::Warning,
            ("ForcedDeletion", "Delete".to_owned()),
            format!("deleted with {left} messages still queued ({FORCE_DELETE_ANNOTATION})"),
        )
        .await;
    }
    Ok(Action::await_change())
}

/// Reconciles one `DeliveryPolicy` (with its finalizer).
pub async fn reconcile_policy(dp: Arc<DeliveryPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    observed(&*dp, &ctx, "DeliveryPolicy", async {
        let api: Api<DeliveryPolicy> =
            Api::namespaced(ctx.client.clone(), &dp.namespace().unwrap_or_default());
        finalizer(&api, QUEUE_FINALIZER, dp.clone(), |event| async {
            match event {
                Finalize::Apply(dp) => policy_apply_event(dp, &ctx).await,
                Finalize::Cleanup(dp) => policy_cleanup(dp, &ctx).await,
            }
        })
        .await
        .map_err(|e| match e {
            kube::runtime::finalizer::Error::ApplyFailed(e)
            | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
            other => Error::Finalizer(other.to_string()),
        })
    })
    .await
}

/// How often a deletion held by [`QUEUE_FINALIZER`] looks at the backlog again.
pub const DRAIN_CHECK: Duration = Duration::from_secs(5);

/// Backoff after a failed reconcile: 2 s doubling to 2 min per object, reset on success. A
/// deletion waiting for the queue to drain is not a failure to back off from: it is checked
/// every [`DRAIN_CHECK`].
pub fn error_policy<K: Resource<DynamicType = ()>>(
    object: Arc<K>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    match error {
        Error::DeletionBlocked(_) => Action::requeue(DRAIN_CHECK),
        _ => Action::requeue(ctx.backoff(key(&*object))),
    }
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs both controllers until `stop` completes: over all namespaces when `namespaces` is
/// empty, else over each of them (one pair of controllers per namespace, so the operator needs
/// only namespaced permissions there).
pub async fn run(
    ctx: Arc<Context>,
    namespaces: Vec<String>,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let controllers = futures_util::future::join_all(
        scopes
            .into_iter()
            .map(|ns| run_scope(Arc::clone(&ctx), ns, stop_rx.clone())),
    );
    let stopper = async move {
        stop.await;
        let _ = stop_tx.send(true);
    };
    tokio::join!(controllers, stopper);
}

/// Both controllers over one namespace (`None`: all).
async fn run_scope(
    ctx: Arc<Context>,
    namespace: Option<String>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=mailroom-operator");
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let listeners = Controller::new(api::<MailListener>(&client, ns), watcher::Config::default());
    let listener_store = listeners.store();
    let listeners = listeners
        .watches(
            api::<Secret>(&client, ns),
            watcher::Config::default(),
            move |secret| referencing(&listener_store, &secret, listener_secret_names),
        )
        .owns(api::<Deployment>(&client, ns), owned.clone())
        .owns(api::<Service>(&client, ns), owned.clone())
        .owns(api::<ConfigMap>(&client, ns), owned.clone())
        .owns(api::<PodDisruptionBudget>(&client, ns), owned.clone())
        .graceful_shutdown_on(stopped(stop.clone()))
        .run(reconcile_listener, error_policy, ctx.clone())
        .for_each(|result| async move { log_result(result) });
    let policies = Controller::new(
        api::<DeliveryPolicy>(&client, ns),
        watcher::Config::default(),
    );
    let policy_store = policies.store();
    let policies = policies
        .watches(
            api::<Secret>(&client, ns),
            watcher::Config::default(),
            move |secret| referencing(&policy_store, &secret, policy_secret_names),
        )
        .owns(api::<Deployment>(&client, ns), owned.clone())
        .owns(api::<ConfigMap>(&client, ns), owned)
        .graceful_shutdown_on(stopped(stop))
        .run(reconcile_policy, error_policy, ctx)
        .for_each(|result| async move { log_result(result) });
    tokio::join!(listeners, policies);
}

/// The resources in `store` whose spec references `secret` (same namespace): a new, changed
/// or deleted Secret reconciles them at once, so a missing Secret recovers as soon as it is
/// created and rotated keys roll the pods.
fn referencing<K>(
    store: &kube::runtime::reflector::Store<K>,
    secret: &Secret,
    names: fn(&K) -> Vec<&str>,
) -> Vec<ObjectRef<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let namespace = secret.namespace();
    let name = secret.name_any();
    store
        .state()
        .iter()
        .filter(|object| object.namespace() == namespace && names(object).contains(&name.as_str()))
        .map(|object| ObjectRef::from_obj(&**object))
        .collect()
}

fn listener_secret_names(ml: &MailListener) -> Vec<&str> {
    secret_names(listener_secrets(ml))
}

fn policy_secret_names(dp: &DeliveryPolicy) -> Vec<&str> {
    secret_names(policy_secrets(dp))
}

fn secret_names(uses: Vec<SecretUse<'_>>) -> Vec<&str> {
    uses.into_iter().map(|u| u.secret.name.as_str()).collect()
}

fn log_result<K: Resource, E: std::fmt::Display, Q: std::fmt::Display>(
    result: Result<(ObjectRef<K>, Action), kube::runtime::controller::Error<E, Q>>,
) {
    match result {
        Ok((object, _)) => tracing::debug!(object = %object, "reconciled"),
        Err(kube::runtime::controller::Error::ReconcilerFailed(_, object)) => {
            tracing::debug!(object = %object, "reconcile failed; retrying with backoff")
        }
        Err(e) => tracing::warn!(error = %e, "controller"),
    }
}
