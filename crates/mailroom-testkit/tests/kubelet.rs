//! `FakeKubelet` against a real control plane (with kube-controller-manager): a Deployment's
//! pod is bound, runs as a local process as its spec says (user, groups, env, volumes,
//! read-only root, service-account token, hostname), becomes Ready only when its readiness
//! probe passes, is restarted when its liveness probe fails or it exits, and is stopped and
//! finalised when deleted. An image without a mapping waits in `ErrImagePull`.
//!
//! Needs root (CI runs as root); python3 in /usr/bin plays the container image.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use mailroom_testkit::{FakeKubelet, Image, KubeControlPlane, PodNetwork, eventually};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
const NS: &str = "kl";

/// The "application": serves /readyz (200 once /tmp/ready exists) and /healthz (500 while
/// /tmp/unhealthy exists) on :8080, deletes /tmp/unhealthy at start, prints what it sees.
const SERVER: &str = r#"
import http.server, json, os, socket, ssl, sys, threading, urllib.request
def say(k, v): print(f"{k}={v}", flush=True)
try: os.remove("/tmp/unhealthy")
except FileNotFoundError: pass
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/readyz": code = 200 if os.path.exists("/tmp/ready") else 503
        elif self.path == "/healthz": code = 500 if os.path.exists("/tmp/unhealthy") else 200
        else: code = 404
        self.send_response(code); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
server = http.server.HTTPServer(("0.0.0.0", 8080), H)
threading.Thread(target=server.serve_forever, daemon=True).start()
say("uid", os.getuid()); say("gid", os.getgid()); say("groups", sorted(os.getgroups()))
say("hostname", socket.gethostname()); say("cwd", os.getcwd())
for k in ["POD_NAME", "POD_IP", "GREETING", "FROM_CM", "KUBERNETES_SERVICE_HOST"]: say("env." + k, os.environ.get(k))
say("secret", open("/etc/testkit/secret/password").read())
say("secret.mode", oct(os.stat("/etc/testkit/secret/password").st_mode & 0o7777))
try:
    open("/rootfs-write-test", "w"); say("rootfs", "writable")
except OSError as e: say("rootfs", e.strerror)
try:
    open("/etc/testkit/secret/x", "w"); say("secretdir", "writable")
except OSError as e: say("secretdir", e.strerror)
open("/tmp/written", "w").write("ok"); say("tmp", "writable")
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
say("namespace", open(sa + "/namespace").read())
ctx = ssl.create_default_context(cafile=sa + "/ca.crt")
host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
req = urllib.request.Request(f"https://{host}:{port}/api/v1/namespaces/kube-system/secrets",
    headers={"Authorization": "Bearer " + open(sa + "/token").read()})
try:
    urllib.request.urlopen(req, context=ctx, timeout=10); say("api", "200")
except urllib.error.HTTPError as e: say("api", f"{e.code} {json.load(e).get('message')}")
except Exception as e: say("api", f"error {e}")
say("serving", 8080)
threading.Event().wait()
"#;

fn manifests() -> String {
    let script = serde_json::to_string(SERVER).expect("json");
    format!(
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {{ name: app, namespace: {NS} }}
data:
  server.py: {script}
  greeting: hello from a configmap
---
apiVersion: v1
kind: Secret
metadata: {{ name: app, namespace: {NS} }}
stringData: {{ password: s3cret }}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{ name: app, namespace: {NS} }}
spec:
  replicas: 1
  selector: {{ matchLabels: {{ app: app }} }}
  template:
    metadata: {{ labels: {{ app: app }} }}
    spec:
      terminationGracePeriodSeconds: 5
      securityContext: {{ runAsUser: 65532, runAsGroup: 65532, fsGroup: 65532, runAsNonRoot: true }}
      containers:
        - name: app
          image: registry.example/python:3
          args: [/scripts/server.py]
          env:
            - {{ name: POD_NAME, valueFrom: {{ fieldRef: {{ fieldPath: metadata.name }} }} }}
            - {{ name: POD_IP, valueFrom: {{ fieldRef: {{ fieldPath: status.podIP }} }} }}
            - {{ name: GREETING, value: "hi $(POD_NAME)" }}
            - {{ name: FROM_CM, valueFrom: {{ configMapKeyRef: {{ name: app, key: greeting }} }} }}
          ports: [{{ name: http, containerPort: 8080 }}]
          readinessProbe: {{ httpGet: {{ path: /readyz, port: http }}, periodSeconds: 1, failureThreshold: 1 }}
          livenessProbe: {{ httpGet: {{ path: /healthz, port: http }}, periodSeconds: 1, failureThreshold: 2 }}
          securityContext: {{ readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: {{ drop: [ALL] }} }}
          volumeMounts:
            - {{ name: scripts, mountPath: /scripts, readOnly: true }}
            - {{ name: secret, mountPath: /etc/testkit/secret, readOnly: true }}
            - {{ name: tmp, mountPath: /tmp }}
      volumes:
        - {{ name: scripts, configMap: {{ name: app, items: [{{ key: server.py, path: server.py }}], defaultMode: 0400 }} }}
        - {{ name: secret, secret: {{ secretName: app, defaultMode: 288 }} }}
        - {{ name: tmp, emptyDir: {{}} }}
---
apiVersion: v1
kind: Pod
metadata: {{ name: crasher, namespace: {NS} }}
spec:
  containers:
    - name: c
      image: registry.example/python:3
      command: [/usr/bin/python3, -c, "import sys; print('bye', flush=True); sys.exit(3)"]
---
apiVersion: v1
kind: Pod
metadata: {{ name: unmapped, namespace: {NS} }}
spec:
  containers:
    - {{ name: c, image: registry.example/nothing:1 }}
"#
    )
}

fn pod_json(cp: &KubeControlPlane, name: &str) -> Option<Value> {
    let out = cp
        .kubectl(&["get", "pod", "-n", NS, name, "-o", "json"])
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

fn condition(pod: &Value, kind: &str) -> Option<String> {
    pod["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .and_then(|c| c["status"].as_str().map(str::to_owned))
}

fn netns_of_this_process() -> Vec<String> {
    let prefix = format!("mrpod-{}-", std::process::id());
    fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_a_deployment_as_its_spec_says() {
    let started = Instant::now();
    let network = PodNetwork::create().expect("pod network (needs root)");
    let bridge = network.bridge().to_owned();
    let cp = KubeControlPlane::builder()
        .controller_manager(true)
        .apiserver_bind(network.gateway())
        .start()
        .expect("control plane");
    let kubelet = FakeKubelet::builder()
        .network(network)
        .image("python", Image::new("/usr/bin/python3").in_place())
        .restart_backoff(Duration::from_secs(1), Duration::from_secs(2))
        .start(&cp)
        .expect("kubelet");
    eprintln!("setup done after {:.1}s", started.elapsed().as_secs_f64());
    cp.kubectl_ok(&["create", "namespace", NS])
        .expect("namespace");
    let dir = kubelet.dir().to_owned();
    let file = dir.join("manifests.yaml");
    fs::write(&file, manifests()).expect("write manifests");
    // The ServiceAccount admission plugin needs `default` in the new namespace.
    let client = cp.client().await.expect("client");
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    eventually("serviceaccount kl/default", WAIT, || async {
        cp.kubectl(&["get", "serviceaccount", "-n", NS, "default"])
            .ok()
            .filter(|o| o.status.success())
    })
    .await;
    cp.kubectl_ok(&["apply", "-f", &file.to_string_lossy()])
        .expect("apply");

    // The Deployment's pod is bound and runs, but is not Ready until /tmp/ready exists.
    let pod_name = eventually("the app pod running", WAIT, || async {
        let list = pods
            .list(&ListParams::default().labels("app=app"))
            .await
            .ok()?;
        let pod = list.items.into_iter().next()?;
        let running = pod.status.as_ref()?.phase.as_deref() == Some("Running");
        running.then(|| pod.metadata.name.clone()).flatten()
    })
    .await;
    let pod = pod_json(&cp, &pod_name).expect("pod");
    assert_eq!(pod["spec"]["nodeName"], kubelet.node_name());
    let pod_ip = pod["status"]["podIP"].as_str().expect("podIP").to_owned();
    assert!(pod_ip.starts_with("10.244."), "{pod_ip}");
    let log = || kubelet.logs(NS, &pod_name, "app");
    eventually("the app serving", WAIT, || async {
        log().contains("serving=8080").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pod = pod_json(&cp, &pod_name).expect("pod");
    assert_eq!(condition(&pod, "Ready").as_deref(), Some("False"), "{pod}");

    // What the process saw.
    let text = log();
    for want in [
        "uid=65532\n".to_owned(),
        "gid=65532\n".to_owned(),
        "groups=[65532]\n".to_owned(),
        format!("hostname={pod_name}\n"),
        "cwd=/\n".to_owned(),
        format!("env.POD_NAME={pod_name}\n"),
        format!("env.POD_IP={pod_ip}\n"),
        format!("env.GREETING=hi {pod_name}\n"),
        "env.FROM_CM=hello from a configmap\n".to_owned(),
        "secret=s3cret\n".to_owned(),
        "secret.mode=0o440\n".to_owned(),
        "rootfs=Read-only file system\n".to_owned(),
        "secretdir=Read-only file system\n".to_owned(),
        "tmp=writable\n".to_owned(),
        format!("namespace={NS}\n"),
        // The token authenticates (403, not 401) as the pod's service account.
        "api=403".to_owned(),
        format!("system:serviceaccount:{NS}:default"),
    ] {
        assert!(text.contains(&want), "{want:?} missing in the log:\n{text}");
    }
    assert!(
        !Path::new("/etc/testkit").exists(),
        "the mount point was created on the host"
    );

    // Readiness is earned: create /tmp/ready in the pod's emptyDir.
    let pod_dir = kubelet.pod_dir(NS, &pod_name).expect("pod dir");
    let tmp = pod_dir.join("volumes/tmp");
    assert_eq!(fs::read_to_string(tmp.join("written")).expect("tmp"), "ok");
    fs::write(tmp.join("ready"), "").expect("ready file");
    eventually(
        "the pod Ready and the Deployment available",
        WAIT,
        || async {
            let pod = pod_json(&cp, &pod_name)?;
            let dep: Value = serde_json::from_str(
                &cp.kubectl_ok(&["get", "deployment", "-n", NS, "app", "-o", "json"])
                    .ok()?,
            )
            .ok()?;
            (condition(&pod, "Ready").as_deref() == Some("True")
                && dep["status"]["availableReplicas"] == 1)
                .then_some(())
        },
    )
    .await;

    // Liveness: an unhealthy container is killed and restarted (the restart deletes the file).
    fs::write(tmp.join("unhealthy"), "").expect("unhealthy file");
    eventually("the app restarted by its liveness probe", WAIT, || async {
        let pod = pod_json(&cp, &pod_name)?;
        let status = &pod["status"]["containerStatuses"][0];
        (status["restartCount"] == 1 && status["ready"] == true).then_some(())
    })
    .await;
    assert_eq!(log().matches("serving=8080").count(), 2, "{}", log());

    // A container that exits is restarted with back-off.
    eventually("crasher restarted twice", WAIT, || async {
        let pod = pod_json(&cp, "crasher")?;
        let status = &pod["status"]["containerStatuses"][0];
        let restarts = status["restartCount"].as_i64()?;
        (restarts >= 2 && status["lastState"]["terminated"]["exitCode"] == 3).then_some(())
    })
    .await;
    assert!(kubelet.logs(NS, "crasher", "c").matches("bye").count() >= 2);

    // An image without a mapping waits.
    eventually("unmapped waiting in ErrImagePull", WAIT, || async {
        let pod = pod_json(&cp, "unmapped")?;
        (pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ErrImagePull"
            && pod["status"]["phase"] == "Pending")
            .then_some(())
    })
    .await;

    // The kubelet's Events, as `kubectl describe pod` shows them.
    let events = cp
        .kubectl_ok(&["get", "events", "-n", NS, "-o", "json"])
        .expect("events");
    let events: Value = serde_json::from_str(&events).expect("json");
    let reasons: Vec<(String, String)> = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["source"]["component"] == "kubelet")
        .map(|e| {
            (
                e["involvedObject"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                e["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for (pod, reason) in [
        (pod_name.as_str(), "Started"),
        (pod_name.as_str(), "Unhealthy"),
        (pod_name.as_str(), "Killing"),
        ("crasher", "BackOff"),
        ("unmapped", "Failed"),
    ] {
        assert!(
            reasons.iter().any(|(p, r)| p == pod && r == reason),
            "no {reason} event for {pod}: {reasons:?}"
        );
    }

    // Deleting the Deployment stops the process and finalises the pod.
    cp.kubectl_ok(&["delete", "deployment", "-n", NS, "app", "--wait=false"])
        .expect("delete");
    eventually("the app pod gone", WAIT, || async {
        let list = pods
            .list(&ListParams::default().labels("app=app"))
            .await
            .ok()?;
        list.items.is_empty().then_some(())
    })
    .await;
    assert!(log().contains("container exited"), "{}", log());
    let ip_reachable = std::net::TcpStream::connect_timeout(
        &format!("{pod_ip}:8080").parse().expect("addr"),
        Duration::from_millis(500),
    )
    .is_ok();
    assert!(!ip_reachable, "the pod's address still answers");

    drop(kubelet);
    assert!(
        netns_of_this_process().is_empty(),
        "{:?}",
        netns_of_this_process()
    );
    assert!(
        mailroom_testkit_ip_link_absent(&bridge),
        "bridge {bridge} still exists"
    );
    eprintln!("done after {:.1}s", started.elapsed().as_secs_f64());
}

fn mailroom_testkit_ip_link_absent(name: &str) -> bool {
    !Path::new("/sys/class/net").join(name).exists()
}
