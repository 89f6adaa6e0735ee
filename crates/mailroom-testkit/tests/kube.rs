//! `KubeControlPlane` against the real binaries: etcd + kube-apiserver (RBAC, PKI, kubeconfig,
//! kube-rs client, kubectl), and with kube-controller-manager (Deployment controller, garbage
//! collector). Needs `e2e/tools/build.sh etcd kube-apiserver kube-controller-manager kubectl`;
//! missing binaries fail the tests (CI builds them).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::config::AuthInfo;
use mailroom_testkit::{KubeControlPlane, Tool, eventually};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

async fn create_namespace(client: &kube::Client, name: &str) {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
}

fn config_map(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ),
        ..ConfigMap::default()
    }
}

/// The HTTP status of a refused request.
fn api_status(err: &kube::Error) -> u16 {
    match err {
        kube::Error::Api(status) => status.code,
        other => panic!("expected an API error status, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_with_rbac_pki_kubeconfig_client_and_kubectl() {
    let started = Instant::now();
    let cp = KubeControlPlane::start().expect("start etcd + kube-apiserver");
    let startup = started.elapsed();
    assert!(!cp.has_controller_manager());
    assert!(cp.server_url().starts_with("https://127.0.0.1:"));
    assert!(cp.kubeconfig_path().is_file());
    assert!(
        cp.log("kube-apiserver")
            .contains("mailroom-testkit: starting")
    );
    let client = cp.client().await.expect("kube client");

    // The apiserver is the pinned, version-stamped build.
    let version = client.apiserver_version().await.expect("/version");
    let pinned = Tool::KubeApiserver
        .pinned_version()
        .expect("k8s/go.mod pin");
    assert_eq!(version.git_version, pinned);

    // Admin can list namespaces; the apiserver's bootstrap made these.
    let namespaces: Vec<String> = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list namespaces")
        .items
        .into_iter()
        .filter_map(|ns| ns.metadata.name)
        .collect();
    for want in ["default", "kube-system", "kube-public"] {
        assert!(namespaces.iter().any(|n| n == want), "{namespaces:?}");
    }

    // A ConfigMap in a new namespace round-trips.
    create_namespace(&client, "testkit-a").await;
    let cms = Api::<ConfigMap>::namespaced(client.clone(), "testkit-a");
    cms.create(
        &PostParams::default(),
        &config_map("settings", &[("greeting", "hello")]),
    )
    .await
    .expect("create configmap");
    let got = cms.get("settings").await.expect("get configmap");
    let want: BTreeMap<String, String> = [("greeting".to_owned(), "hello".to_owned())].into();
    assert_eq!(got.data, Some(want));

    // No credentials: refused (anonymous is authenticated as system:anonymous, then RBAC says
    // no; 401 if anonymous auth were off).
    let mut anonymous = cp.config().await.expect("config");
    anonymous.auth_info = AuthInfo::default();
    let anonymous = kube::Client::try_from(anonymous).expect("anonymous client");
    let err = Api::<Namespace>::all(anonymous)
        .list(&ListParams::default())
        .await
        .expect_err("anonymous list must be refused");
    assert!(matches!(api_status(&err), 401 | 403), "{err:?}");

    // The service-account key (EC P-256) signs and verifies tokens: a TokenRequest works, and
    // the token authenticates as the service account, which RBAC then refuses (403, not 401).
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), "testkit-a");
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "robot"}})).expect("serviceaccount");
    sas.create(&PostParams::default(), &sa)
        .await
        .expect("create serviceaccount");
    let token = sas
        .create_token_request(
            "robot",
            &PostParams::default(),
            &TokenRequest {
                spec: Some(TokenRequestSpec {
                    expiration_seconds: Some(600),
                    ..TokenRequestSpec::default()
                }),
                ..TokenRequest::default()
            },
        )
        .await
        .expect("token request")
        .status
        .expect("token status")
        .token
        .expect("token");
    let mut robot = cp.config().await.expect("config");
    robot.auth_info = AuthInfo {
        token: Some(token.into()),
        ..AuthInfo::default()
    };
    let robot = kube::Client::try_from(robot).expect("robot client");
    let err = Api::<Namespace>::all(robot)
        .list(&ListParams::default())
        .await
        .expect_err("robot has no RBAC binding");
    assert_eq!(api_status(&err), 403, "{err:?}");
    assert!(
        err.to_string()
            .contains("system:serviceaccount:testkit-a:robot"),
        "{err}"
    );

    // kubectl uses the same kubeconfig.
    let out = cp
        .kubectl_ok(&[
            "get",
            "configmap",
            "settings",
            "-n",
            "testkit-a",
            "-o",
            "name",
        ])
        .expect("kubectl get");
    assert_eq!(out.trim(), "configmap/settings");
    let err = cp
        .kubectl_ok(&["get", "configmap", "nope", "-n", "testkit-a"])
        .expect_err("not found");
    assert!(err.to_string().contains("NotFound"), "{err}");

    let dir = cp.dir().to_path_buf();
    let stopped = Instant::now();
    drop(cp);
    eprintln!(
        "control plane: start {:.1}s, stop {:.1}s",
        startup.as_secs_f64(),
        stopped.elapsed().as_secs_f64()
    );
    if std::env::var_os("MAILROOM_TESTKIT_KEEP").is_none() {
        assert!(!dir.exists(), "{} not removed", dir.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_manager_runs_deployments_and_garbage_collection() {
    let started = Instant::now();
    let cp = KubeControlPlane::builder()
        .controller_manager(true)
        .start()
        .expect("start etcd + kube-apiserver + kube-controller-manager");
    eprintln!(
        "control plane: start {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(cp.has_controller_manager());
    let client = cp.client().await.expect("kube client");
    create_namespace(&client, "testkit-b").await;

    // Deployment controller: a Deployment gets a ReplicaSet it owns (its Pods never run: there
    // is no scheduler or kubelet).
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "registry.invalid/web:1"}]}
            }
        }
    }))
    .expect("deployment");
    let created = Api::<Deployment>::namespaced(client.clone(), "testkit-b")
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create deployment");
    let deployment_uid = created.metadata.uid.expect("uid");
    let replicasets = Api::<ReplicaSet>::namespaced(client.clone(), "testkit-b");
    let rs = eventually("replicaset of deployment web", WAIT, || {
        let replicasets = replicasets.clone();
        async move {
            replicasets
                .list(&ListParams::default().labels("app=web"))
                .await
                .expect("list replicasets")
                .items
                .into_iter()
                .next()
        }
    })
    .await;
    let owner = rs
        .metadata
        .owner_references
        .unwrap_or_default()
        .into_iter()
        .next()
        .expect("replicaset has an owner");
    assert_eq!(
        (owner.kind.as_str(), owner.uid),
        ("Deployment", deployment_uid)
    );

    // Garbage collector: deleting the owner (background propagation) deletes the dependent.
    let cms = Api::<ConfigMap>::namespaced(client.clone(), "testkit-b");
    let owner_cm = cms
        .create(&PostParams::default(), &config_map("owner", &[]))
        .await
        .expect("create owner");
    let mut owned = config_map("owned", &[("k", "v")]);
    owned.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".to_owned(),
        kind: "ConfigMap".to_owned(),
        name: "owner".to_owned(),
        uid: owner_cm.metadata.uid.expect("owner uid"),
        ..OwnerReference::default()
    }]);
    cms.create(&PostParams::default(), &owned)
        .await
        .expect("create owned");
    cms.delete("owner", &DeleteParams::background())
        .await
        .expect("delete owner");
    eventually("owned configmap garbage-collected", WAIT, || {
        let cms = cms.clone();
        async move {
            cms.get_opt("owned")
                .await
                .expect("get owned")
                .is_none()
                .then_some(())
        }
    })
    .await;

    // The serviceaccount controller made the new namespace's default SA too.
    Api::<ServiceAccount>::namespaced(client, "testkit-b")
        .get("default")
        .await
        .expect("default serviceaccount in testkit-b");
}
