//! The fake node: its `Node` object (Ready, addresses, capacity), the heartbeat that keeps the
//! node lifecycle controller from tainting it (a `kube-node-lease` Lease and the Ready
//! condition's heartbeat time, every 10 s), and binding pods to it.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Binding, Node, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

/// Interval of the node heartbeat.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(10);
const KUBELET_VERSION: &str = "v1.36.3-mailroom-testkit";

/// The node conditions: healthy, heartbeat `now`, unchanged since `since`.
fn conditions(now: &str, since: &str) -> serde_json::Value {
    let c = |kind: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": kind, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": now, "lastTransitionTime": since,
        })
    };
    json!([
        c(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available"
        ),
        c(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure"
        ),
        c(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available"
        ),
        c(
            "Ready",
            "True",
            "KubeletReady",
            "mailroom-testkit FakeKubelet is posting ready status"
        ),
    ])
}

/// Creates (or re-creates) the Node and writes its status; returns the registration time for
/// [`heartbeat`].
pub(crate) async fn register(
    client: &Client,
    name: &str,
    address: &str,
    cidr: &str,
) -> kube::Result<String> {
    let nodes: Api<Node> = Api::all(client.clone());
    if nodes.get_opt(name).await?.is_some() {
        nodes.delete(name, &DeleteParams::default()).await?;
        for _ in 0..50 {
            if nodes.get_opt(name).await?.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut labels = BTreeMap::new();
    labels.insert("kubernetes.io/hostname".to_owned(), name.to_owned());
    labels.insert("kubernetes.io/os".to_owned(), "linux".to_owned());
    labels.insert(
        "kubernetes.io/arch".to_owned(),
        std::env::consts::ARCH
            .replace("x86_64", "amd64")
            .replace("aarch64", "arm64"),
    );
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: Some(k8s_openapi::api::core::v1::NodeSpec {
            pod_cidr: Some(cidr.to_owned()),
            pod_cidrs: Some(vec![cidr.to_owned()]),
            ..Default::default()
        }),
        status: None,
    };
    nodes.create(&PostParams::default(), &node).await?;
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let q = |s: String| Quantity(s);
    let capacity: BTreeMap<String, Quantity> = [
        ("cpu".to_owned(), q(cpus.to_string())),
        ("memory".to_owned(), q("8Gi".to_owned())),
        ("pods".to_owned(), q("110".to_owned())),
        ("ephemeral-storage".to_owned(), q("20Gi".to_owned())),
    ]
    .into_iter()
    .collect();
    let now = Timestamp::now().to_string();
    let status = json!({
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": conditions(&now, &now),
            "addresses": [
                {"type": "InternalIP", "address": address},
                {"type": "Hostname", "address": name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": "mailroom-testkit", "systemUUID": "mailroom-testkit",
                "bootID": "mailroom-testkit", "kernelVersion": "", "osImage": "mailroom-testkit",
                "containerRuntimeVersion": "mailroom-testkit://1", "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "", "operatingSystem": "linux",
                "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
            },
        }
    });
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(now)
}

/// One heartbeat: renew the node Lease (creating it if needed) and refresh the conditions.
pub(crate) async fn heartbeat(client: &Client, name: &str, since: &str) -> kube::Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let now = Timestamp::now();
    let renew = MicroTime(now);
    match leases.get_opt(name).await? {
        Some(_) => {
            let patch = json!({"spec": {"renewTime": renew, "holderIdentity": name}});
            leases
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some("kube-node-lease".to_owned()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(name.to_owned()),
                    lease_duration_seconds: Some(40),
                    renew_time: Some(renew),
                    ..LeaseSpec::default()
                }),
            };
            leases.create(&PostParams::default(), &lease).await?;
        }
    }
    let nodes: Api<Node> = Api::all(client.clone());
    let time = Time(now).0.to_string();
    let status = json!({"status": {"conditions": conditions(&time, since)}});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// Binds `pod` to the node (what the scheduler would do).
pub(crate) async fn bind(client: &Client, pod: &Pod, node: &str) -> kube::Result<()> {
    let ns = pod.namespace().unwrap_or_else(|| "default".to_owned());
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(pod.name_any()),
            namespace: Some(ns.clone()),
            uid: pod.uid(),
            ..ObjectMeta::default()
        },
        target: ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Node".to_owned()),
            name: Some(node.to_owned()),
            ..ObjectReference::default()
        },
    };
    let _: serde_json::Value = api
        .create_subresource("binding", &pod.name_any(), &PostParams::default(), &binding)
        .await?;
    Ok(())
}
