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

mod context;
mod listener;
mod policy;

pub use context::{Context, NamespaceQueue, QueueOpener};
use listener::listener_secret_names;
pub use listener::reconcile_listener;
use policy::policy_secret_names;
pub use policy::reconcile_policy;

fn previous_conditions(conditions: Option<&Vec<Condition>>) -> &[Condition] {
    conditions.map_or(&[], Vec::as_slice)
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
