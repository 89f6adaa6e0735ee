//! Issue 6, "How it is checked": helm install to delivered mail, with the outbound workers
//! scaling on the backlog.
//!
//! 1. A control plane (etcd, kube-apiserver, kube-controller-manager) whose only node is
//!    `FakeKubelet`: pods run as local processes in network and mount namespaces, exactly as
//!    their specs say, and are Ready only when their readiness probe (`/readyz`) answers. A
//!    nats-server, a DNS server and an SMTP sink listen on the pod network's gateway.
//! 2. `helm install` of `charts/mailroom`: the operator runs as a pod with the chart's
//!    ServiceAccount token and RBAC (a missing permission fails the test).
//! 3. `kubectl apply` of a MailListener and a DeliveryPolicy (`e2e/manifests/mail.yaml`); both
//!    become Ready.
//! 4. 60 messages sent with Python's smtplib to the inbound pod are delivered through an MX
//!    lookup to the sink.
//! 5. The sink is slow at first: the backlog grows and the operator scales the workers up
//!    (a `Scaled` Event); then it is fast, the queue drains and the workers are scaled down
//!    after the window. Every message arrives exactly once (counted by Message-ID).
//! 6. `helm uninstall` removes the operator and keeps the CRDs (and the resources).
//!
//! Needs root and the tools of `e2e/tools/build.sh`; uses the `mailroom` binary of this
//! target dir (built by `cargo test --workspace`, or `cargo build -p mailroom`).

use std::collections::BTreeSet;
use std::env;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use mailroom_testkit::{
    DnsServer, FakeKubelet, Image, KubeControlPlane, NatsServer, PodNetwork, SmtpSink, Zone,
};
use serde_json::Value;

/// Messages sent.
const MESSAGES: usize = 60;
/// The sink's delay before each `250` while it is slow.
const SLOW: Duration = Duration::from_millis(1500);
/// Namespace of the release (the operator) and of the listener and policy.
const RELEASE_NS: &str = "mailroom";
const NS: &str = "mail";
const IMAGE_REPOSITORY: &str = "registry.e2e.test/mailroom";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The `mailroom` binary of this target dir (`target/debug/deps/cluster-*` -> `target/debug`),
/// or `MAILROOM_BIN`.
fn mailroom_binary() -> PathBuf {
    if let Some(path) = env::var_os("MAILROOM_BIN") {
        return PathBuf::from(path);
    }
    let exe = env::current_exe().expect("test executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir of the test executable");
    let binary = dir.join("mailroom");
    assert!(
        binary.is_file(),
        "{} does not exist: build it with `cargo build -p mailroom` (cargo test --workspace \
         does), or set MAILROOM_BIN",
        binary.display()
    );
    // Warn when a source is newer than the binary: `cargo test -p mailroom-e2e` alone does not
    // rebuild it.
    let built = fs::metadata(&binary)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    if newest_source(&repo_root().join("crates")).is_some_and(|t| t > built) {
        eprintln!(
            "WARNING: {} is older than the sources; run `cargo build -p mailroom` first",
            binary.display()
        );
    }
    binary
}

fn newest_source(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in fs::read_dir(dir).ok()?.filter_map(Result::ok) {
        let path = entry.path();
        let time = if path.is_dir() {
            newest_source(&path)
        } else if path.extension().is_some_and(|e| e == "rs") {
            entry.metadata().and_then(|m| m.modified()).ok()
        } else {
            None
        };
        newest = newest.max(time);
    }
    newest
}

/// Progress lines with the time since the start.
struct Clock(Instant);

impl Clock {
    fn say(&self, what: &str) {
        eprintln!("[e2e {:6.1}s] {what}", self.0.elapsed().as_secs_f64());
    }
}

/// Polls `check` every 500 ms until it returns `Some`; panics after `within`.
fn wait_for<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(500));
    }
}

fn json(cp: &KubeControlPlane, args: &[&str]) -> Option<Value> {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = cp.kubectl(&all).ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn condition(object: &Value, kind: &str) -> Option<String> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .and_then(|c| c["status"].as_str().map(str::to_owned))
}

fn int(value: &Value) -> i64 {
    value.as_i64().unwrap_or(0)
}

/// Pod IPs of the ready pods with these labels.
fn ready_pod_ips(cp: &KubeControlPlane, selector: &str) -> Vec<String> {
    let Some(list) = json(cp, &["get", "pods", "-n", NS, "-l", selector]) else {
        return Vec::new();
    };
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter(|p| condition(p, "Ready").as_deref() == Some("True"))
        .filter_map(|p| p["status"]["podIP"].as_str().map(str::to_owned))
        .collect()
}

/// `Scaled` Events of the policy: (message) in order.
fn scaled_events(cp: &KubeControlPlane) -> Vec<String> {
    let Some(list) = json(cp, &["get", "events", "-n", NS]) else {
        return Vec::new();
    };
    let mut events: Vec<(String, String)> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["reason"] == "Scaled" && e["involvedObject"]["name"] == "e2e")
        .map(|e| {
            let time = e["eventTime"]
                .as_str()
                .or_else(|| e["lastTimestamp"].as_str())
                .or_else(|| e["metadata"]["creationTimestamp"].as_str())
                .unwrap_or_default()
                .to_owned();
            (time, e["message"].as_str().unwrap_or_default().to_owned())
        })
        .collect();
    events.sort();
    events.into_iter().map(|(_, m)| m).collect()
}

/// The outbound Deployment's (spec.replicas, status.readyReplicas).
fn workers(cp: &KubeControlPlane) -> (i64, i64) {
    json(cp, &["get", "deployment", "-n", NS, "e2e-outbound"]).map_or((0, 0), |d| {
        (
            int(&d["spec"]["replicas"]),
            int(&d["status"]["readyReplicas"]),
        )
    })
}

/// Sends `MESSAGES` messages over one SMTP session with Python's smtplib; each has the
/// Message-ID `<e2e-N@client.e2e.test>`.
fn send_mail(addr: SocketAddr) {
    let script = r#"
import smtplib, sys, email.utils
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with smtplib.SMTP(host, port, local_hostname="client.e2e.test", timeout=60) as s:
    for i in range(n):
        msg = (f"From: sender@client.e2e.test\r\nTo: user{i % 7}@example.net\r\n"
               f"Subject: e2e {i}\r\nDate: {email.utils.formatdate()}\r\n"
               f"Message-ID: <e2e-{i}@client.e2e.test>\r\n\r\nmessage {i}\r\n")
        refused = s.sendmail("sender@client.e2e.test", [f"user{i % 7}@example.net"], msg)
        assert not refused, refused
print(f"sent {n}")
"#;
    let out = Command::new("python3")
        .args([
            "-c",
            script,
            &addr.ip().to_string(),
            &addr.port().to_string(),
            &MESSAGES.to_string(),
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "smtplib failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Fails when the operator was refused anything: the chart's RBAC lacks a permission (its
/// ServiceAccount is all the operator has). Checked while waiting too, so that a missing
/// permission is named instead of showing up as a timeout.
fn assert_rbac_sufficed(kubelet: &FakeKubelet) {
    let logs = kubelet.all_logs(RELEASE_NS, "mailroom");
    let forbidden: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("forbidden") || l.contains("Forbidden"))
        .collect();
    assert!(
        forbidden.is_empty(),
        "the operator was refused something: the chart's RBAC lacks a permission:\n{}",
        forbidden.join("\n")
    );
}

/// On a failure, prints what a CI log needs to tell why.
struct Diagnostics<'a> {
    cp: &'a KubeControlPlane,
    kubelet: &'a FakeKubelet,
}

impl Drop for Diagnostics<'_> {
    fn drop(&mut self) {
        if !thread::panicking() {
            return;
        }
        for args in [
            &["get", "ml,dp,deploy,pods", "-A", "-o", "wide"][..],
            &["get", "events", "-A"][..],
        ] {
            if let Ok(out) = self.cp.kubectl(args) {
                eprintln!(
                    "----- kubectl {}\n{}{}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        for (ns, prefix) in [(RELEASE_NS, "mailroom"), (NS, "mx-"), (NS, "e2e-")] {
            let logs = self.kubelet.all_logs(ns, prefix);
            let lines: Vec<&str> = logs.lines().collect();
            eprintln!(
                "----- logs of {ns}/{prefix}* (last 150 lines)\n{}",
                lines[lines.len().saturating_sub(150)..].join("\n")
            );
        }
    }
}

#[test]
fn helm_install_to_delivered_mail_with_autoscaled_workers() {
    let clock = Clock(Instant::now());
    let binary = mailroom_binary();

    // 1. The machine: pod network, control plane, node, NATS, DNS, SMTP sink.
    let network = PodNetwork::create().expect("pod network (the e2e test needs root)");
    let gateway = network.gateway();
    let cp = KubeControlPlane::builder()
        .controller_manager(true)
        .apiserver_bind(gateway)
        .start()
        .expect("control plane");
    let nats = NatsServer::builder()
        .listen(gateway)
        .start()
        .expect("nats-server");
    let sink = SmtpSink::start_on(SocketAddr::new(gateway, 0)).expect("smtp sink");
    sink.set_delay(SLOW);
    let dns = DnsServer::start_on(
        gateway,
        Zone::new()
            .mx("example.net", 10, "mx.example.net")
            .ip("mx.example.net", gateway),
    )
    .expect("dns server");
    let kubelet = FakeKubelet::builder()
        .network(network)
        // As the Dockerfile builds it: /mailroom, distroless `nonroot` user.
        .image(
            IMAGE_REPOSITORY,
            Image::new(&binary)
                .path_in_image("/mailroom")
                .user(65532, 65532),
        )
        .restart_backoff(Duration::from_secs(2), Duration::from_secs(20))
        .start(&cp)
        .expect("fake kubelet");
    let _diagnostics = Diagnostics {
        cp: &cp,
        kubelet: &kubelet,
    };
    clock.say(&format!(
        "control plane, node ({}), nats {}, dns {}, sink {} up",
        kubelet.network().cidr(),
        nats.url(),
        dns.addr(),
        sink.addr()
    ));

    // 2. helm install: the operator as a pod, with the chart's ServiceAccount and RBAC.
    let chart = repo_root().join("charts/mailroom");
    let nats_url = format!("nats.url={}", nats.url());
    cp.helm_ok(&[
        "install",
        "mailroom",
        &chart.to_string_lossy(),
        "--namespace",
        RELEASE_NS,
        "--create-namespace",
        "--set",
        &format!("image.repository={IMAGE_REPOSITORY}"),
        "--set",
        "image.tag=e2e",
        "--set",
        &nats_url,
        "--set",
        "backlogInterval=2s",
    ])
    .expect("helm install");
    clock.say("helm install done; waiting for the operator pod");
    wait_for(
        "the operator Deployment available",
        Duration::from_secs(90),
        || {
            assert_rbac_sufficed(&kubelet);
            let d = json(&cp, &["get", "deployment", "-n", RELEASE_NS, "mailroom"])?;
            (int(&d["status"]["availableReplicas"]) == 1).then_some(())
        },
    );
    clock.say("operator running and ready (its /readyz through the kubelet's probe)");

    // 3. The listener and the policy.
    let manifests = fs::read_to_string(repo_root().join("e2e/manifests/mail.yaml"))
        .expect("e2e/manifests/mail.yaml")
        .replace("${NAMESPACE}", NS)
        .replace("${NAMESERVER}", &dns.addr().to_string())
        .replace("${MX_PORT}", &sink.addr().port().to_string());
    let manifest_file = kubelet.dir().join("mail.yaml");
    fs::write(&manifest_file, manifests).expect("write manifests");
    cp.kubectl_ok(&["create", "namespace", NS])
        .expect("namespace");
    cp.kubectl_ok(&["apply", "-f", &manifest_file.to_string_lossy()])
        .expect("kubectl apply");
    clock.say("MailListener mx and DeliveryPolicy e2e applied; waiting for Ready");
    wait_for("ml/mx and dp/e2e Ready", Duration::from_secs(90), || {
        assert_rbac_sufficed(&kubelet);
        let ml = json(&cp, &["get", "ml", "-n", NS, "mx"])?;
        let dp = json(&cp, &["get", "dp", "-n", NS, "e2e"])?;
        (condition(&ml, "Ready").as_deref() == Some("True")
            && condition(&dp, "Ready").as_deref() == Some("True"))
        .then_some(())
    });
    let table = cp.kubectl_ok(&["get", "ml,dp", "-n", NS]).expect("get");
    clock.say(&format!("Ready:\n{table}"));
    let inbound = ready_pod_ips(&cp, "app.kubernetes.io/component=inbound");
    assert_eq!(inbound.len(), 1, "inbound pods: {inbound:?}");
    let inbound: SocketAddr = format!("{}:2525", inbound[0]).parse().expect("addr");
    assert_eq!(workers(&cp), (1, 1), "one worker to start with");

    // 4. + 5. Mail in; with the sink slow, the backlog grows and the workers scale up.
    send_mail(inbound);
    clock.say(&format!(
        "{MESSAGES} messages accepted by {inbound} (smtplib)"
    ));
    let mut last = String::new();
    let mut most_backlog = 0;
    wait_for(
        "the workers scaled up and delivering from several pods",
        Duration::from_secs(120),
        || {
            assert_rbac_sufficed(&kubelet);
            let (desired, ready) = workers(&cp);
            let peers: BTreeSet<_> = sink.messages().iter().map(|m| m.peer.ip()).collect();
            let dp = json(&cp, &["get", "dp", "-n", NS, "e2e"]).unwrap_or_default();
            most_backlog = most_backlog.max(int(&dp["status"]["backlog"]["ready"]));
            let line = format!(
                "workers desired {desired} ready {ready}, backlog {}, delivered {} from {} pods",
                dp["status"]["backlog"]["ready"],
                sink.count(),
                peers.len()
            );
            if line != last {
                clock.say(&line);
                last = line;
            }
            (desired > 1 && ready > 1 && peers.len() > 1).then_some(())
        },
    );
    assert!(
        most_backlog >= 10,
        "the policy's status never showed a backlog (at most {most_backlog})"
    );
    let up = scaled_events(&cp);
    clock.say(&format!("Scaled Events: {up:?}"));
    assert!(
        up.iter().any(|m| m.contains("from 1 to")),
        "no scale-up Event: {up:?}"
    );

    // The sink speeds up: the queue drains, every message arrives once.
    sink.set_delay(Duration::ZERO);
    clock.say("sink fast now; waiting for every message");
    wait_for("every message delivered", Duration::from_secs(90), || {
        (sink.message_id_counts().len() >= MESSAGES).then_some(())
    });
    clock.say(&format!(
        "{} messages delivered, {} distinct Message-IDs",
        sink.count(),
        sink.message_id_counts().len()
    ));

    // ... and after the scale-down window the workers go back to one.
    wait_for(
        "the workers scaled down to 1",
        Duration::from_secs(90),
        || {
            assert_rbac_sufficed(&kubelet);
            let (desired, ready) = workers(&cp);
            let line = format!("workers desired {desired} ready {ready}");
            if line != last {
                clock.say(&line);
                last = line.clone();
            }
            (desired == 1 && ready == 1).then_some(())
        },
    );
    let events = scaled_events(&cp);
    clock.say(&format!("Scaled Events: {events:?}"));
    assert!(
        events.iter().any(|m| m.contains("to 1 replicas")),
        "no scale-down Event: {events:?}"
    );
    // Nothing lost, nothing twice (also not late, from a worker that was stopped).
    thread::sleep(Duration::from_secs(2));
    let counts = sink.message_id_counts();
    let expected: BTreeSet<String> = (0..MESSAGES)
        .map(|i| format!("<e2e-{i}@client.e2e.test>"))
        .collect();
    let got: BTreeSet<String> = counts.keys().cloned().collect();
    assert_eq!(got, expected, "delivered Message-IDs");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(sink.count(), MESSAGES);
    // `kubectl get ml,dp`: Ready, the listener's accepted count, no backlog.
    wait_for(
        "the listener's status counting 60 accepted",
        Duration::from_secs(60),
        || {
            let ml = json(&cp, &["get", "ml", "-n", NS, "mx"])?;
            (int(&ml["status"]["traffic"]["accepted"]) == MESSAGES as i64).then_some(())
        },
    );
    let table = cp.kubectl_ok(&["get", "ml,dp", "-n", NS]).expect("get");
    clock.say(&format!("after the run:\n{table}"));
    let dp = json(&cp, &["get", "dp", "-n", NS, "e2e"]).expect("dp");
    clock.say(&format!("dp/e2e status: {}", dp["status"]));
    assert_eq!(condition(&dp, "Ready").as_deref(), Some("True"), "{dp}");
    assert_eq!(int(&dp["status"]["backlog"]["ready"]), 0, "{dp}");
    let ml = json(&cp, &["get", "ml", "-n", NS, "mx"]).expect("ml");
    assert_eq!(condition(&ml, "Ready").as_deref(), Some("True"), "{ml}");

    // The operator never lacked a permission.
    assert_rbac_sufficed(&kubelet);

    // 6. helm uninstall: the operator goes, the CRDs and the resources stay.
    cp.helm_ok(&["uninstall", "mailroom", "--namespace", RELEASE_NS])
        .expect("helm uninstall");
    wait_for("the operator pods gone", Duration::from_secs(60), || {
        let pods = json(&cp, &["get", "pods", "-n", RELEASE_NS])?;
        let deploy = cp
            .kubectl(&["get", "deployment", "-n", RELEASE_NS, "mailroom"])
            .ok()?;
        (pods["items"].as_array().is_some_and(Vec::is_empty) && !deploy.status.success())
            .then_some(())
    });
    for crd in [
        "maillisteners.mailroom.dev",
        "deliverypolicies.mailroom.dev",
    ] {
        cp.kubectl_ok(&["get", "crd", crd])
            .unwrap_or_else(|e| panic!("CRD {crd} removed by helm uninstall: {e}"));
    }
    cp.kubectl_ok(&["get", "ml/mx", "dp/e2e", "-n", NS])
        .expect("the MailListener and DeliveryPolicy are kept");
    clock.say("helm uninstall removed the operator and kept the CRDs; done");
}
