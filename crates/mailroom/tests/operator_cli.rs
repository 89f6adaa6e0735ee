//! `mailroom operator` as a process, as the chart runs it: KUBECONFIG, the NATS URL and flags
//! from the command line, /metrics and /readyz on its HTTP port, and leader election between
//! two replicas (only the Lease holder reconciles; a stopped leader hands over).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use mailroom_testkit::{KubeControlPlane, NatsServer, eventually};

const WAIT: Duration = Duration::from_secs(60);

struct Operator {
    child: Child,
    http: u16,
    name: String,
}

impl Operator {
    fn start(plane: &KubeControlPlane, nats: &NatsServer, name: &str, extra: &[&str]) -> Self {
        let http = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_mailroom"))
            .arg("operator")
            .args(["--nats-url", &nats.url()])
            .args(["--http", &format!("127.0.0.1:{http}")])
            .args(["--identity", name])
            .args(["--image", "registry.example/mailroom:test"])
            .args(extra)
            .env("KUBECONFIG", plane.kubeconfig_path())
            .env_remove("MAILROOM_WATCH_NAMESPACES")
            .stdin(Stdio::null())
            .spawn()
            .expect("mailroom operator starts");
        Self {
            child,
            http,
            name: name.to_owned(),
        }
    }

    fn get(&self, path: &str) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.http)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        stream.read_to_string(&mut out).ok()?;
        Some(out)
    }

    /// SIGTERM, as Kubernetes stops a pod; returns the exit status.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"))
            .expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        self.child.wait().expect("wait")
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn listener(plane: &KubeControlPlane, name: &str) {
    listener_in(plane, "default", name);
}

fn listener_in(plane: &KubeControlPlane, namespace: &str, name: &str) {
    let path = plane.dir().join(format!("{namespace}-{name}.yaml"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{ name: {namespace} }}\n---\napiVersion: mailroom.dev/v1alpha1\nkind: MailListener\nmetadata: {{ name: {name}, namespace: {namespace} }}\nspec:\n  address: \"0.0.0.0:2525\"\n  acceptedDomains: [example.test]\n"
        ),
    )
    .expect("manifest");
    plane
        .kubectl_ok(&["apply", "-f", &path.to_string_lossy()])
        .expect("kubectl apply");
}

/// The holder of the operator's leader Lease.
async fn lease_holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt("mailroom-operator")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

fn crds() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../crds"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_process_reconciles_and_serves_metrics() {
    let plane = KubeControlPlane::builder()
        .crds(crds())
        .start()
        .expect("control plane");
    let nats = NatsServer::start().expect("nats");
    let operator = Operator::start(&plane, &nats, "solo", &[]);
    let ready = eventually("/readyz", WAIT, || async { operator.get("/readyz") }).await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    listener(&plane, "mx");
    let client = plane.client().await.expect("client");
    let deployments: Api<Deployment> = Api::namespaced(client, "default");
    let d = eventually("Deployment mx-inbound", WAIT, || async {
        deployments.get_opt("mx-inbound").await.ok().flatten()
    })
    .await;
    let image = d
        .spec
        .and_then(|s| s.template.spec)
        .expect("pod")
        .containers[0]
        .image
        .clone();
    assert_eq!(image.as_deref(), Some("registry.example/mailroom:test"));
    // The duration is recorded when the reconcile ends, after its status write: the
    // Deployment can exist before that.
    let metrics = eventually("a finished reconcile in /metrics", WAIT, || async {
        operator.get("/metrics").filter(|m| {
            m.contains("mailroom_operator_reconciles_total{kind=\"MailListener\"}")
                && m.contains("mailroom_operator_reconcile_duration_seconds")
        })
    })
    .await;
    assert!(
        metrics
            .contains("mailroom_operator_reconcile_duration_seconds_count{kind=\"MailListener\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_elect_one_leader_that_hands_over_on_stop() {
    let plane = KubeControlPlane::builder()
        .crds(crds())
        .start()
        .expect("control plane");
    let nats = NatsServer::start().expect("nats");
    let elect = ["--leader-elect", "--leader-elect-namespace", "default"];
    let mut a = Operator::start(&plane, &nats, "replica-a", &elect);
    let mut b = Operator::start(&plane, &nats, "replica-b", &elect);
    let client = plane.client().await.expect("client");
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let holder = eventually("a leader", WAIT, || lease_holder(&leases)).await;
    let deployments: Api<Deployment> = Api::namespaced(client, "default");
    listener(&plane, "first");
    eventually("Deployment first-inbound", WAIT, || async {
        deployments.get_opt("first-inbound").await.ok().flatten()
    })
    .await;

    // Stop the leader like Kubernetes stops a pod: it releases the Lease and exits cleanly,
    // and the standby takes over without waiting for the Lease to expire.
    let (leader, standby) = if holder == a.name {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    assert_eq!(holder, leader.name);
    let stopped = Instant::now();
    let status = leader.terminate();
    assert!(
        status.success(),
        "the leader exits cleanly on SIGTERM: {status}"
    );
    let next = eventually("the standby leads", WAIT, || async {
        lease_holder(&leases).await.filter(|h| *h == standby.name)
    })
    .await;
    assert_eq!(next, standby.name);
    assert!(
        stopped.elapsed() < Duration::from_secs(15),
        "handed over before the 15 s expiry"
    );
    listener(&plane, "second");
    eventually("the new leader reconciles", WAIT, || async {
        deployments.get_opt("second-inbound").await.ok().flatten()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_reconciles_only_the_namespaces_it_watches() {
    let plane = KubeControlPlane::builder()
        .crds(crds())
        .start()
        .expect("control plane");
    let nats = NatsServer::start().expect("nats");
    let _operator = Operator::start(
        &plane,
        &nats,
        "scoped",
        &["--watch-namespaces", "team-a,team-b"],
    );
    for ns in ["team-a", "team-b", "team-c"] {
        listener_in(&plane, ns, "mx");
    }
    let client = plane.client().await.expect("client");
    for ns in ["team-a", "team-b"] {
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
        eventually(&format!("mx-inbound in {ns}"), WAIT, || async {
            deployments.get_opt("mx-inbound").await.ok().flatten()
        })
        .await;
    }
    // Both watched namespaces are done; the third was applied at the same time.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let other: Api<Deployment> = Api::namespaced(client, "team-c");
    assert!(
        other.get_opt("mx-inbound").await.expect("get").is_none(),
        "team-c is not watched"
    );
}
