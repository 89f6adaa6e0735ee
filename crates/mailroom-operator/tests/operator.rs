//! The operator against a real kube-apiserver (mailroom-testkit's `KubeControlPlane`) and a
//! real nats-server: the CRDs install, applying a resource creates its objects with the right
//! fields, status and Events tell what happened, a spec change rolls the Deployment, a missing
//! Secret is `Degraded` and recovers, deletion garbage-collects (with kube-controller-manager),
//! a policy with queued mail is held by its finalizer, and `kubectl get` / `describe` show it.
//!
//! Without a kubelet no pod runs, so readiness is played by writing the Deployment's status
//! (on the control plane without a controller manager, whose Deployment controller would
//! overwrite it).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use mailroom_config::JetStreamQueueSpec;
use mailroom_operator::controller::{
    self, Context, FORCE_DELETE_ANNOTATION, NamespaceQueue, QUEUE_FINALIZER, QueueOpener,
};
use mailroom_operator::render::{self, FIELD_MANAGER, Settings};
use mailroom_operator::status::{DEGRADED, READY, reason};
use mailroom_operator::{DeliveryPolicy, MailListener, generate, metrics};
use mailroom_queue::jetstream::{JetStreamOptions, JetStreamQueue};
use mailroom_queue::{LeaseRequest, Queue};
use mailroom_testkit::{KubeControlPlane, NatsServer, eventually};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(40);

/// A control plane with the CRDs installed, a nats-server, and the operator running in this
/// process; dropped at the end of the test.
struct Harness {
    plane: KubeControlPlane,
    client: Client,
    /// The queue of namespace `mail` (stream `MAILROOM-mail`).
    queue: Arc<dyn Queue>,
    /// Its JetStream context (traffic-shaping state).
    js: async_nats::jetstream::Context,
    stop: CancellationToken,
    _nats: NatsServer,
}

impl Harness {
    async fn start(controller_manager: bool) -> Self {
        // The operator's logs, for a failing test: MAILROOM_TEST_LOG=mailroom_operator=debug.
        if let Ok(filter) = std::env::var("MAILROOM_TEST_LOG") {
            let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
        }
        let plane = KubeControlPlane::builder()
            .controller_manager(controller_manager)
            .crds(generate::repo_crds_dir())
            .start()
            .expect("control plane starts");
        let client = plane.client().await.expect("client");
        let nats = NatsServer::start().expect("nats-server starts");
        let settings = Settings::new(
            "registry.example/mailroom:test",
            JetStreamQueueSpec {
                urls: vec![nats.url()],
                ..JetStreamQueueSpec::default()
            },
        );
        // Each namespace has its own stream; the tests put mail into namespace "mail".
        let open_queue: QueueOpener = Arc::new(|spec: JetStreamQueueSpec| {
            Box::pin(async move {
                let queue = JetStreamQueue::connect(JetStreamOptions {
                    urls: spec.urls.clone(),
                    stream: spec.stream.clone(),
                    ..JetStreamOptions::default()
                })
                .await
                .map_err(|e| e.to_string())?;
                Ok(NamespaceQueue {
                    jetstream: Some(queue.context().clone()),
                    queue: Arc::new(queue),
                })
            })
        });
        let mail = open_queue(settings.queue_for("mail"))
            .await
            .expect("the queue of namespace mail");
        let ctx = Arc::new(
            Context::new(
                client.clone(),
                settings,
                open_queue,
                Some("test-operator".to_owned()),
            )
            .with_backlog_refresh(Duration::from_secs(1)),
        );
        let stop = CancellationToken::new();
        tokio::spawn(controller::run(
            ctx,
            Vec::new(),
            stop.clone().cancelled_owned(),
        ));
        Self {
            plane,
            client,
            queue: mail.queue,
            js: mail.jetstream.expect("JetStream context"),
            stop,
            _nats: nats,
        }
    }

    async fn namespace(&self, name: &str) {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("namespace");
    }

    fn api<K>(&self, ns: &str) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), ns)
    }

    /// `kubectl apply` of a YAML document, as a user would.
    fn kubectl_apply(&self, yaml: &str) {
        let path = self.plane.dir().join(format!("apply-{}.yaml", unique()));
        std::fs::write(&path, yaml).expect("write manifest");
        let path = path.to_string_lossy().into_owned();
        self.plane
            .kubectl_ok(&["apply", "-f", &path])
            .expect("kubectl apply");
    }

    async fn secret(&self, ns: &str, name: &str, data: &[(&str, &str)]) {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        };
        self.api::<Secret>(ns)
            .patch(
                name,
                &PatchParams::apply("mailroom-tests").force(),
                &Patch::Apply(&secret),
            )
            .await
            .expect("secret");
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A number unique in this process, for file names.
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn condition<'a>(
    conditions: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

async fn listener_condition(
    api: &Api<MailListener>,
    name: &str,
    type_: &str,
) -> Option<(String, String, String)> {
    let ml = api.get(name).await.ok()?;
    let status = ml.status?;
    let c = condition(&status.conditions, type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Plays the delivery workers: leases every due entry of `policy` and acks it. Returns how
/// many there were.
async fn deliver_all(queue: &Arc<dyn Queue>, policy: &str) -> usize {
    let leases = queue
        .lease(&LeaseRequest {
            policy: policy.to_owned(),
            max: 100,
            wait: Duration::from_secs(2),
            max_age: None,
        })
        .await
        .expect("lease");
    let n = leases.len();
    for lease in leases {
        queue.ack(lease).await.expect("ack");
    }
    n
}

/// Plays the kubelet and the Deployment controller: every replica exists, runs the current
/// template and is ready.
async fn mark_ready(api: &Api<Deployment>, name: &str) {
    let d = api.get(name).await.expect("deployment");
    let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "status": {
            "observedGeneration": d.metadata.generation,
            "replicas": replicas, "readyReplicas": replicas,
            "updatedReplicas": replicas, "availableReplicas": replicas,
        }
    });
    api.patch_status(
        name,
        &PatchParams::apply("fake-kubelet").force(),
        &Patch::Apply(&status),
    )
    .await
    .expect("deployment status");
}

const LISTENER: &str = r#"
apiVersion: mailroom.dev/v1alpha1
kind: MailListener
metadata: { name: mx, namespace: mail }
spec:
  address: "0.0.0.0:2525"
  acceptedDomains: [example.test]
  tls: { certFile: tls.crt, keyFile: tls.key }
  tlsSecretRef: { name: mx-tls }
  replicas: 2
  service:
    type: LoadBalancer
    externalTrafficPolicy: Local
    ports: [{ name: smtp, port: 25 }, { name: submission, port: 587 }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_becomes_objects_status_and_events() {
    let h = Harness::start(false).await;
    h.namespace("mail").await;
    h.secret("mail", "mx-tls", &[("tls.crt", "cert"), ("tls.key", "key")])
        .await;
    h.kubectl_apply(LISTENER);

    let deployments = h.api::<Deployment>("mail");
    let d = eventually("Deployment mx-inbound", WAIT, || async {
        deployments.get_opt("mx-inbound").await.ok().flatten()
    })
    .await;
    let ml_api = h.api::<MailListener>("mail");
    let ml = ml_api.get("mx").await.expect("ml");
    // Owned by the listener, applied by our field manager, with the requested shape.
    let owner = &d.metadata.owner_references.as_ref().expect("owner refs")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("MailListener", "mx")
    );
    assert_eq!(owner.uid, ml.uid().expect("uid"));
    assert!(
        d.metadata
            .managed_fields
            .iter()
            .flatten()
            .any(|f| f.manager.as_deref() == Some(FIELD_MANAGER))
    );
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(2));
    let pod = d
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("pod spec");
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert!(
        pod.volumes.iter().flatten().any(|v| v
            .secret
            .as_ref()
            .and_then(|s| s.secret_name.as_deref())
            == Some("mx-tls"))
    );
    let config = h
        .api::<ConfigMap>("mail")
        .get("mx-inbound")
        .await
        .expect("ConfigMap");
    let yaml = &config.data.expect("data")["mailroom.yaml"];
    assert!(
        yaml.contains("certFile: /etc/mailroom/tls/tls.crt"),
        "{yaml}"
    );
    let service = h
        .api::<Service>("mail")
        .get("mx-inbound")
        .await
        .expect("Service");
    let spec = service.spec.clone().expect("service spec");
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
    assert_eq!(spec.ports.as_ref().map(Vec::len), Some(2));
    h.api::<PodDisruptionBudget>("mail")
        .get("mx-inbound")
        .await
        .expect("PDB");

    // No pod runs yet: not ready, not degraded, and status tells the Service address.
    let (status, why, message) = eventually("Ready=False", WAIT, || async {
        listener_condition(&ml_api, "mx", READY)
            .await
            .filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!(
        (status.as_str(), why.as_str()),
        ("False", reason::NOT_READY)
    );
    assert_eq!(message, "0 of 2 inbound pods ready");
    let ml = ml_api.get("mx").await.expect("ml");
    let st = ml.status.clone().expect("status");
    assert_eq!(st.observed_generation, ml.metadata.generation);
    assert_eq!(
        st.address,
        spec.cluster_ip.clone(),
        "no load balancer here: the cluster IP"
    );
    assert_eq!(
        condition(&st.conditions, DEGRADED).map(|c| c.status.as_str()),
        Some("False")
    );

    // The pods become ready: so does the listener.
    mark_ready(&deployments, "mx-inbound").await;
    eventually("Ready=True", WAIT, || async {
        listener_condition(&ml_api, "mx", READY)
            .await
            .filter(|c| c.0 == "True")
    })
    .await;
    let st = ml_api.get("mx").await.expect("ml").status.expect("status");
    assert_eq!((st.replicas, st.ready_replicas), (Some(2), Some(2)));

    // A spec change rolls the pods (new checksum), and says so in an Event.
    let before = render::template_checksum(&d).expect("checksum");
    h.kubectl_apply(&LISTENER.replace(
        "  replicas: 2\n",
        "  replicas: 2\n  limits: { maxRecipients: 500 }\n",
    ));
    let rolled = eventually("a new config checksum", WAIT, || async {
        let d = deployments.get("mx-inbound").await.ok()?;
        render::template_checksum(&d).filter(|c| *c != before)
    })
    .await;
    assert_ne!(rolled, before);
    eventually("Progressing while the pods roll", WAIT, || async {
        listener_condition(&ml_api, "mx", "Progressing")
            .await
            .filter(|c| c.0 == "True" && c.1 == reason::ROLLING_OUT)
    })
    .await;

    // kubectl shows the printer columns, the conditions and the Events.
    let table = h
        .plane
        .kubectl_ok(&["get", "ml", "-n", "mail"])
        .expect("kubectl get");
    let header = table.lines().next().unwrap_or_default();
    for column in ["NAME", "READY", "REPLICAS", "PORTS", "AGE"] {
        assert!(header.contains(column), "{table}");
    }
    assert!(table.contains("25,587"), "{table}");
    let wide = h
        .plane
        .kubectl_ok(&["get", "ml", "-n", "mail", "-o", "wide"])
        .expect("wide");
    assert!(
        wide.lines().next().unwrap_or_default().contains("MESSAGE"),
        "{wide}"
    );
    let describe = eventually("describe shows the ConfigChanged Event", WAIT, || async {
        let text = h
            .plane
            .kubectl_ok(&["describe", "ml", "mx", "-n", "mail"])
            .ok()?;
        text.contains("ConfigChanged").then_some(text)
    })
    .await;
    for needle in [
        "Conditions:",
        "Ready",
        "Degraded",
        "Created",
        "mailroom-operator",
    ] {
        assert!(describe.contains(needle), "{needle} not in:\n{describe}");
    }
    assert!(
        metrics::RECONCILES
            .with_label_values(&["MailListener"])
            .get()
            > 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_secret_is_degraded_until_it_appears() {
    let h = Harness::start(false).await;
    h.namespace("mail").await;
    h.kubectl_apply(
        r#"
apiVersion: mailroom.dev/v1alpha1
kind: MailListener
metadata: { name: submission, namespace: mail }
spec:
  address: "0.0.0.0:5870"
  mode: submission
  acceptedDomains: [example.test]
  tls: { certFile: tls.crt, keyFile: tls.key }
  tlsSecretRef: { name: sub-tls }
  auth: { usersFile: users }
  usersSecretRef: { name: sub-users }
"#,
    );
    let api = h.api::<MailListener>("mail");
    let (_, why, message) = eventually("Degraded=True", WAIT, || async {
        listener_condition(&api, "submission", DEGRADED)
            .await
            .filter(|c| c.0 == "True")
    })
    .await;
    assert_eq!(why, reason::SECRET_NOT_FOUND);
    assert!(
        message.contains("spec.tlsSecretRef") && message.contains("sub-tls"),
        "{message}"
    );
    assert!(
        h.api::<Deployment>("mail")
            .get_opt("submission-inbound")
            .await
            .expect("get")
            .is_none(),
        "nothing is deployed from an unresolvable spec"
    );
    // The Secret appears but lacks the key the spec names: still degraded, naming the key.
    h.secret(
        "mail",
        "sub-tls",
        &[("tls.crt", "cert"), ("tls.key", "key")],
    )
    .await;
    h.secret("mail", "sub-users", &[("passwd", "x")]).await;
    let (_, why, message) = eventually("SecretKeyMissing", WAIT, || async {
        listener_condition(&api, "submission", DEGRADED)
            .await
            .filter(|c| c.1 == reason::SECRET_KEY_MISSING)
    })
    .await;
    assert_eq!(why, reason::SECRET_KEY_MISSING);
    assert!(
        message.contains("spec.auth.usersFile") && message.contains("passwd"),
        "{message}"
    );
    // Fixed: it recovers by itself (retried with backoff) and deploys.
    h.secret("mail", "sub-users", &[("users", "alice:$2b$...")])
        .await;
    eventually("Degraded=False after the fix", WAIT, || async {
        listener_condition(&api, "submission", DEGRADED)
            .await
            .filter(|c| c.0 == "False")
    })
    .await;
    h.api::<Deployment>("mail")
        .get("submission-inbound")
        .await
        .expect("deployed after the fix");
    let events = h
        .plane
        .kubectl_ok(&[
            "get",
            "events",
            "-n",
            "mail",
            "--field-selector",
            "involvedObject.name=submission",
        ])
        .expect("events");
    assert!(events.contains("SecretNotFound"), "{events}");
    assert!(
        metrics::RECONCILE_FAILURES
            .with_label_values(&["MailListener", reason::SECRET_NOT_FOUND])
            .get()
            > 0
    );

    // An invalid spec is degraded with the field named, too.
    h.kubectl_apply(
        r#"
apiVersion: mailroom.dev/v1alpha1
kind: MailListener
metadata: { name: bad, namespace: mail }
spec:
  address: "0.0.0.0:2526"
  acceptedDomains: [example.test]
  limits: { maxRecipients: 1 }
  plugins:
    - access: { denySenders: [""] }
    - dnsbl: { zones: [{ name: "not a zone" }] }
    - greylist: { delay: 10m, retryWindow: 5m }
"#,
    );
    let (_, why, message) = eventually("InvalidSpec", WAIT, || async {
        listener_condition(&api, "bad", DEGRADED)
            .await
            .filter(|c| c.0 == "True")
    })
    .await;
    assert_eq!(why, reason::INVALID_SPEC);
    assert!(message.contains("spec.limits.maxRecipients"), "{message}");
    assert!(message.contains("spec.plugins[0].access"), "{message}");
    // The new plugin kinds' own checks name their fields too.
    assert!(
        message.contains("spec.plugins[1].dnsbl.zones[0].name"),
        "{message}"
    );
    assert!(
        message.contains("spec.plugins[2].greylist.retryWindow"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_collects_children_and_a_policy_waits_for_its_queue() {
    let h = Harness::start(true).await;
    h.namespace("mail").await;
    h.kubectl_apply(LISTENER.replace("  tls: { certFile: tls.crt, keyFile: tls.key }\n  tlsSecretRef: { name: mx-tls }\n", "").as_str());
    let deployments = h.api::<Deployment>("mail");
    eventually("Deployment mx-inbound", WAIT, || async {
        deployments.get_opt("mx-inbound").await.ok().flatten()
    })
    .await;
    h.api::<MailListener>("mail")
        .delete("mx", &DeleteParams::background())
        .await
        .expect("delete ml");
    eventually("children garbage-collected", WAIT, || async {
        let d = deployments.get_opt("mx-inbound").await.ok()?;
        let s = h.api::<Service>("mail").get_opt("mx-inbound").await.ok()?;
        let c = h
            .api::<ConfigMap>("mail")
            .get_opt("mx-inbound")
            .await
            .ok()?;
        (d.is_none() && s.is_none() && c.is_none()).then_some(())
    })
    .await;

    // A policy with one queued message.
    h.kubectl_apply(
        r#"
apiVersion: mailroom.dev/v1alpha1
kind: DeliveryPolicy
metadata: { name: bulk, namespace: mail }
spec:
  workers: { minReplicas: 2, maxReplicas: 4 }
"#,
    );
    let policies = h.api::<DeliveryPolicy>("mail");
    let dp = eventually("the finalizer", WAIT, || async {
        let dp = policies.get("bulk").await.ok()?;
        dp.finalizers()
            .iter()
            .any(|f| f == QUEUE_FINALIZER)
            .then_some(dp)
    })
    .await;
    let d = eventually("Deployment bulk-outbound", WAIT, || async {
        deployments.get_opt("bulk-outbound").await.ok().flatten()
    })
    .await;
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(2));
    let args = d
        .spec
        .and_then(|s| s.template.spec)
        .expect("pod")
        .containers[0]
        .args
        .clone()
        .expect("args");
    assert_eq!(args.last().map(String::as_str), Some("bulk"));
    assert_eq!(dp.spec.workers.max_replicas, 4);

    let mut message = mailroom_queue::contract::message("a@example.test", &["b@example.org"]);
    message.envelope.policy = "bulk".to_owned();
    h.queue.enqueue(message).await.expect("enqueue");
    eventually("backlog in status", WAIT, || async {
        let b = policies.get("bulk").await.ok()?.status?.backlog?;
        (b.ready == 1).then_some(())
    })
    .await;

    policies
        .delete("bulk", &DeleteParams::background())
        .await
        .expect("delete dp");
    let (why, text) = eventually("DeletionBlocked", WAIT, || async {
        let st = policies.get("bulk").await.ok()?.status?;
        let c = condition(&st.conditions, READY)?;
        (c.reason == reason::DELETION_BLOCKED).then(|| (c.reason.clone(), c.message.clone()))
    })
    .await;
    assert_eq!(why, reason::DELETION_BLOCKED);
    assert!(
        text.contains("1 queued message") && text.contains(FORCE_DELETE_ANNOTATION),
        "{text}"
    );
    assert!(
        deployments
            .get_opt("bulk-outbound")
            .await
            .expect("get")
            .is_some(),
        "workers keep running"
    );

    // The workers deliver it (lease + ack): the finalizer lets go and the children follow.
    assert_eq!(deliver_all(&h.queue, "bulk").await, 1);
    eventually("the policy is gone", WAIT, || async {
        policies.get_opt("bulk").await.ok()?.is_none().then_some(())
    })
    .await;
    eventually("its workers are collected", WAIT, || async {
        deployments
            .get_opt("bulk-outbound")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;

    // Forced deletion with mail queued.
    h.kubectl_apply(
        "apiVersion: mailroom.dev/v1alpha1\nkind: DeliveryPolicy\nmetadata: { name: urgent, namespace: mail }\nspec: {}\n",
    );
    eventually("the finalizer on urgent", WAIT, || async {
        let dp = policies.get("urgent").await.ok()?;
        dp.finalizers()
            .iter()
            .any(|f| f == QUEUE_FINALIZER)
            .then_some(())
    })
    .await;
    let mut message = mailroom_queue::contract::message("a@example.test", &["c@example.org"]);
    message.envelope.policy = "urgent".to_owned();
    h.queue.enqueue(message).await.expect("enqueue");
    policies
        .delete("urgent", &DeleteParams::background())
        .await
        .expect("delete");
    eventually("urgent blocked", WAIT, || async {
        let st = policies.get("urgent").await.ok()?.status?;
        let c = condition(&st.conditions, READY)?;
        (c.reason == reason::DELETION_BLOCKED).then_some(())
    })
    .await;
    h.plane
        .kubectl_ok(&[
            "annotate",
            "dp",
            "urgent",
            "-n",
            "mail",
            &format!("{FORCE_DELETE_ANNOTATION}=true"),
        ])
        .expect("annotate");
    eventually("urgent is gone", WAIT, || async {
        policies
            .get_opt("urgent")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
}

/// Every sample in `config/samples/` is accepted and becomes running objects (with the Secrets
/// the samples name), and `kubectl get ml,dp` lists them; every manifest in `tests/invalid/`
/// is refused by the schema or a CEL rule with the message its `# expect:` line names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_are_accepted_and_invalid_resources_refused() {
    let h = Harness::start(false).await;
    h.secret(
        "default",
        "submission-tls",
        &[("tls.crt", "c"), ("tls.key", "k")],
    )
    .await;
    h.secret(
        "default",
        "submission-users",
        &[("users", "alice:$2b$12$x")],
    )
    .await;
    h.secret("default", "smarthost", &[("password", "secret")])
        .await;
    h.secret(
        "default",
        "dkim-keys",
        &[("s2026.pem", "-----BEGIN PRIVATE KEY-----")],
    )
    .await;
    let samples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/samples");
    let out = h
        .plane
        .kubectl_ok(&["apply", "-f", &samples.to_string_lossy()])
        .expect("the samples apply");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&samples).expect("config/samples") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("sample");
        let value: serde_json::Value = serde_saphyr::from_str(&text).expect("sample YAML");
        let kind = value["kind"].as_str().expect("kind").to_owned();
        let name = value["metadata"]["name"].as_str().expect("name").to_owned();
        names.push((kind, name));
    }
    assert!(names.len() >= 4, "{names:?}");
    let deployments = h.api::<Deployment>("default");
    for (kind, name) in &names {
        assert!(out.contains(name.as_str()), "{out}");
        let child = match kind.as_str() {
            "MailListener" => format!("{name}-inbound"),
            "DeliveryPolicy" => format!("{name}-outbound"),
            other => panic!("unexpected sample kind {other}"),
        };
        eventually(&format!("Deployment {child}"), WAIT, || async {
            deployments.get_opt(&child).await.ok().flatten()
        })
        .await;
    }
    // The rspamd plugin of the mx sample runs as a sidecar in the listener's pods.
    let mx = deployments.get("mx-inbound").await.expect("mx-inbound");
    let containers: Vec<String> = mx
        .spec
        .and_then(|s| s.template.spec)
        .map(|p| p.containers.into_iter().map(|c| c.name).collect())
        .unwrap_or_default();
    assert_eq!(containers, ["mailroom", "rspamd"]);
    let listeners = h.api::<MailListener>("default");
    let policies = h.api::<DeliveryPolicy>("default");
    eventually("no sample is degraded", WAIT, || async {
        let mut all = Vec::new();
        for ml in listeners.list(&Default::default()).await.ok()? {
            all.push(ml.status.map(|s| s.conditions).unwrap_or_default());
        }
        for dp in policies.list(&Default::default()).await.ok()? {
            all.push(dp.status.map(|s| s.conditions).unwrap_or_default());
        }
        all.iter()
            .all(|c| condition(c, DEGRADED).is_some_and(|d| d.status == "False"))
            .then_some(())
    })
    .await;
    let table = h
        .plane
        .kubectl_ok(&["get", "ml,dp", "-A"])
        .expect("kubectl get ml,dp");
    for (_, name) in &names {
        assert!(table.contains(name.as_str()), "{table}");
    }
    for column in ["WORKERS", "RELAY", "BACKLOG", "PORTS"] {
        assert!(table.contains(column), "{column}: {table}");
    }
    assert!(table.contains("smarthost.example.net"), "{table}");

    let invalid = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid");
    let mut cases = 0;
    for entry in std::fs::read_dir(&invalid).expect("tests/invalid") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("manifest");
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: no `# expect:` line", path.display()));
        let out = h
            .plane
            .kubectl(&["apply", "-f", &path.to_string_lossy()])
            .expect("kubectl runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} was accepted", path.display());
        assert!(
            stderr.contains(expect),
            "{}: {expect:?} not in {stderr}",
            path.display()
        );
        cases += 1;
    }
    assert!(cases >= 5);
}

fn worker_count(d: &Deployment) -> Option<i32> {
    d.spec.as_ref().and_then(|s| s.replicas)
}

/// The autoscaler on a real queue: workers follow the ready backlog, never more than the
/// destination's connection limit can keep busy, scale down only after the window, and to zero
/// when allowed; status and Events say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_autoscaler_follows_the_ready_backlog_within_shaping_limits() {
    let h = Harness::start(false).await;
    h.namespace("mail").await;
    let policy = |max_connections: u32, min: u32| {
        format!(
            "apiVersion: mailroom.dev/v1alpha1\nkind: DeliveryPolicy\nmetadata: {{ name: bulk, namespace: mail }}\n\
             spec:\n  concurrency: 1\n  workers: {{ minReplicas: {min}, maxReplicas: 4, targetBacklogPerWorker: 2, scaleDownWindow: 3s }}\n  \
             destinations: [{{ name: org, domains: [example.org], maxConnections: {max_connections} }}]\n"
        )
    };
    h.kubectl_apply(&policy(2, 1));
    let deployments = h.api::<Deployment>("mail");
    let policies = h.api::<DeliveryPolicy>("mail");
    let d = eventually("Deployment bulk-outbound", WAIT, || async {
        deployments.get_opt("bulk-outbound").await.ok().flatten()
    })
    .await;
    assert_eq!(worker_count(&d), Some(1), "minReplicas with an empty queue");

    for n in 0..5 {
        let mut message =
            mailroom_queue::contract::message("a@example.test", &[&format!("r{n}@example.org")]);
        message.envelope.policy = "bulk".to_owned();
        h.queue.enqueue(message).await.expect("enqueue");
    }
    // 5 ready / 2 per worker = 3, but example.org takes 2 connections: 2 workers of 1.
    eventually("2 workers (the destination's limit)", WAIT, || async {
        let d = deployments.get("bulk-outbound").await.ok()?;
        (worker_count(&d) == Some(2)).then_some(())
    })
    .await;
    // The status write follows the Deployment's in the same reconcile.
    let st = eventually("status with the decision", WAIT, || async {
        let st = policies.get("bulk").await.ok()?.status?;
        (st.desired_replicas == Some(2)).then_some(st)
    })
    .await;
    let decision = st.last_scale.expect("a scaling decision");
    assert_eq!((decision.from, decision.to), (1, 2));
    assert!(decision.reason.contains("5 ready"), "{}", decision.reason);

    // The limit is raised: demand decides.
    h.kubectl_apply(&policy(10, 1));
    eventually("3 workers", WAIT, || async {
        let d = deployments.get("bulk-outbound").await.ok()?;
        (worker_count(&d) == Some(3)).then_some(())
    })
    .await;

    // The workers deliver everything: back to minReplicas, but only after the window.
    assert_eq!(deliver_all(&h.queue, "bulk").await, 5);
    let drained = std::time::Instant::now();
    eventually("1 worker after the window", WAIT, || async {
        let d = deployments.get("bulk-outbound").await.ok()?;
        (worker_count(&d) == Some(1)).then_some(())
    })
    .await;
    assert!(
        drained.elapsed() >= Duration::from_secs(2),
        "scaled down after {:?}, before the 3 s window",
        drained.elapsed()
    );
    // Scale to zero when allowed.
    h.kubectl_apply(&policy(10, 0));
    eventually("0 workers", WAIT, || async {
        let d = deployments.get("bulk-outbound").await.ok()?;
        (worker_count(&d) == Some(0)).then_some(())
    })
    .await;
    let events = eventually("Scaled events", WAIT, || async {
        let text = h
            .plane
            .kubectl_ok(&[
                "get",
                "events",
                "-n",
                "mail",
                "--field-selector",
                "involvedObject.name=bulk,reason=Scaled",
            ])
            .ok()?;
        text.contains("to 0 replicas").then_some(text)
    })
    .await;
    assert!(events.contains("ready / 2 per worker"), "{events}");
    let table = h
        .plane
        .kubectl_ok(&["get", "dp", "-n", "mail"])
        .expect("kubectl get dp");
    assert!(
        table.lines().next().unwrap_or_default().contains("DESIRED"),
        "{table}"
    );
}

/// Policy status says where mail waits: queued entries by destination (grouped like traffic
/// shaping) and the response-driven rules the workers put in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_status_shows_where_mail_waits_and_why() {
    use mailroom_outbound::shaping::{KvStore, LastError, Override, ShapingStore};
    let h = Harness::start(false).await;
    h.namespace("mail").await;
    h.kubectl_apply(
        "apiVersion: mailroom.dev/v1alpha1\nkind: DeliveryPolicy\nmetadata: { name: bulk, namespace: mail }\n\
         spec:\n  destinations: [{ name: org, domains: [example.org, \"*.example.org\"] }]\n",
    );
    let mut accepted_ms = Vec::new();
    for to in [
        "a@example.org",
        "b@sub.example.org",
        "c@example.org",
        "d@example.net",
    ] {
        let mut message = mailroom_queue::contract::message("s@example.test", &[to]);
        message.envelope.policy = "bulk".to_owned();
        accepted_ms.push(message.envelope.id.timestamp_ms());
        h.queue.enqueue(message).await.expect("enqueue");
    }
    // What a worker records when example.net answers 421 and a throttle rule matches.
    let store = KvStore::open(&h.js, "MAILROOM-mail", "bulk", 1)
        .await
        .expect("shaping state");
    let until_ms = mailroom_queue::now_ms() + 3_600_000;
    store
        .set_override(&Override {
            dest: "domain:example.net".to_owned(),
            rule: "slow-down".to_owned(),
            rate: Some("10/m".to_owned()),
            until_ms,
            response: "421 4.7.0 Try again later".to_owned(),
        })
        .await
        .expect("override");
    // And what a worker records for a temporary failure at example.org.
    store
        .record_error(&LastError::now(
            "dest:org",
            "451 4.2.0 mailbox full, try later",
        ))
        .await
        .expect("last error");
    let policies = h.api::<DeliveryPolicy>("mail");
    let list = eventually("destinations in status", WAIT, || async {
        let list = policies.get("bulk").await.ok()?.status?.destinations;
        (list.len() == 2 && list[0].due == 3).then_some(list)
    })
    .await;
    assert_eq!((list[0].name.as_str(), list[0].deferred), ("org", 0));
    assert_eq!(
        list[0].last_error.as_deref(),
        Some("451 4.2.0 mailbox full, try later")
    );
    assert!(list[0].last_error_time.is_some());
    // The oldest message of each destination: the first of the group's, read from the queue
    // (to the second, as the API server keeps times).
    let seconds = |t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
        t.as_ref().map(|t| t.0.as_second() as u64)
    };
    assert_eq!(seconds(&list[0].oldest), Some(accepted_ms[0] / 1000));
    assert_eq!(seconds(&list[1].oldest), Some(accepted_ms[3] / 1000));
    let age = list[0].oldest_age.as_deref().unwrap_or_default();
    assert!(age.ends_with('s'), "an age in seconds: {age:?}");
    assert_eq!((list[1].name.as_str(), list[1].due), ("example.net", 1));
    let rule = list[1].rule.as_ref().expect("the throttle");
    assert_eq!(
        (
            rule.name.as_str(),
            rule.action.as_str(),
            rule.rate.as_deref()
        ),
        ("slow-down", "throttle", Some("10/m"))
    );
    assert!(rule.response.starts_with("421"), "{}", rule.response);
    let yaml = h
        .plane
        .kubectl_ok(&["get", "dp", "bulk", "-n", "mail", "-o", "yaml"])
        .expect("kubectl get -o yaml");
    assert!(
        yaml.contains("slow-down") && yaml.contains("example.net"),
        "{yaml}"
    );

    // A policy of the same name in another namespace has its own queue: none of this mail.
    h.namespace("other").await;
    h.kubectl_apply(
        "apiVersion: mailroom.dev/v1alpha1\nkind: DeliveryPolicy\nmetadata: { name: bulk, namespace: other }\nspec: {}\n",
    );
    let others = h.api::<DeliveryPolicy>("other");
    let backlog = eventually("the other namespace's backlog", WAIT, || async {
        others.get("bulk").await.ok()?.status?.backlog
    })
    .await;
    assert_eq!((backlog.ready, backlog.deferred), (0, 0));
    let config = h
        .api::<ConfigMap>("other")
        .get("bulk-outbound")
        .await
        .expect("ConfigMap");
    assert!(
        config.data.expect("data")["mailroom.yaml"].contains("stream: MAILROOM-other"),
        "each namespace's pods use its own stream"
    );
}

/// MailListener status counts the messages its pods took and refused recently, from the
/// totals each inbound process reports to JetStream KV (mailroom_inbound::report).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_status_counts_recent_traffic_over_its_pods() {
    use mailroom_inbound::report::{self, ListenerCounts};
    let h = Harness::start(false).await;
    h.namespace("mail").await;
    let store = report::open(&h.js, "MAILROOM-mail", 1)
        .await
        .expect("counts bucket");
    let put = |process: &'static str, accepted: u64, rejected: u64| {
        let store = store.clone();
        async move {
            report::publish(&store, "mx", process, ListenerCounts { accepted, rejected })
                .await
                .expect("publish");
        }
    };
    // A pod that has been running for a while: its totals are only a baseline.
    put("mx-inbound-a", 100, 5).await;
    h.kubectl_apply(&LISTENER.replace(
        "  tls: { certFile: tls.crt, keyFile: tls.key }\n  tlsSecretRef: { name: mx-tls }\n",
        "",
    ));
    let listeners = h.api::<MailListener>("mail");
    eventually("traffic in status", WAIT, || async {
        listeners.get("mx").await.ok()?.status?.traffic
    })
    .await;
    put("mx-inbound-a", 110, 7).await;
    put("mx-inbound-b", 4, 0).await;
    let traffic = eventually("the growth of both pods", WAIT, || async {
        let t = listeners.get("mx").await.ok()?.status?.traffic?;
        (t.accepted == 14).then_some(t)
    })
    .await;
    assert_eq!(traffic.rejected, 2);
    assert!(traffic.window_seconds <= 300);
    let table = h
        .plane
        .kubectl_ok(&["get", "ml", "-n", "mail"])
        .expect("kubectl get ml");
    let header = table.lines().next().unwrap_or_default();
    assert!(
        header.contains("ACCEPTED") && header.contains("REJECTED"),
        "{table}"
    );
    assert!(
        table.lines().nth(1).unwrap_or_default().contains("14"),
        "{table}"
    );
}
