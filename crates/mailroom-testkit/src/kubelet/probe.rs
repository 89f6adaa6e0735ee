//! Container probes as the kubelet runs them: `httpGet` (from the host to the pod IP; 200-399
//! is success), `tcpSocket` (connect) and `exec` (the command in the container's namespaces,
//! as its user; exit 0 is success). `grpc` probes are not supported (they fail).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

use super::launch::{Identity, exec_argv};

/// Timing of a probe with the Kubernetes defaults.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) initial_delay: Duration,
    pub(crate) period: Duration,
    pub(crate) timeout: Duration,
    pub(crate) success_threshold: u32,
    pub(crate) failure_threshold: u32,
}

fn secs(v: Option<i32>, default: i32) -> Duration {
    Duration::from_secs(u64::try_from(v.unwrap_or(default).max(0)).unwrap_or(0))
}

fn count(v: Option<i32>, default: i32) -> u32 {
    u32::try_from(v.unwrap_or(default).max(1)).unwrap_or(1)
}

impl Timing {
    pub(crate) fn of(probe: &Probe) -> Self {
        Self {
            initial_delay: secs(probe.initial_delay_seconds, 0),
            period: secs(probe.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: secs(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
            success_threshold: count(probe.success_threshold, 1),
            failure_threshold: count(probe.failure_threshold, 3),
        }
    }
}

/// What a probe needs besides its spec.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) pod_ip: IpAddr,
    /// PID of the container process (for exec probes).
    pub(crate) pid: Option<u32>,
    pub(crate) identity: Identity,
    pub(crate) working_dir: String,
    pub(crate) env: Vec<(String, String)>,
}

/// A named or numbered port of the container.
fn resolve_port(container: &Container, port: &IntOrString) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("bad port {n}")),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| format!("container has no port named {name:?}")),
    }
}

/// Runs `probe` once; `Err` carries the failure message (as in the `Unhealthy` event).
pub(crate) async fn run(
    container: &Container,
    probe: &Probe,
    target: &Target,
) -> Result<(), String> {
    let timeout = Timing::of(probe).timeout;
    let attempt = async {
        if let Some(http) = &probe.http_get {
            let port = resolve_port(container, &http.port)?;
            let host = http
                .host
                .as_deref()
                .and_then(|h| h.parse().ok())
                .unwrap_or(target.pod_ip);
            let path = http.path.as_deref().unwrap_or("/");
            http_get(SocketAddr::new(host, port), path).await
        } else if let Some(tcp) = &probe.tcp_socket {
            let port = resolve_port(container, &tcp.port)?;
            TcpStream::connect(SocketAddr::new(target.pod_ip, port))
                .await
                .map(drop)
                .map_err(|e| format!("dial tcp {}:{port}: {e}", target.pod_ip))
        } else if let Some(exec) = &probe.exec {
            exec_probe(exec.command.as_deref().unwrap_or_default(), target).await
        } else {
            Err("probe type not supported by FakeKubelet".to_owned())
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("probe timed out after {timeout:?}")),
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> Result<(), String> {
    let url = format!("http://{addr}{path}");
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: kube-probe/mailroom-testkit\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    // The status line is enough.
    while !head.contains(&b'\n') && head.len() < 8192 {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("Get \"{url}\": {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("Get \"{url}\": malformed response"))?;
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(format!("HTTP probe failed with statuscode: {status}"))
    }
}

async fn exec_probe(command: &[String], target: &Target) -> Result<(), String> {
    let Some(pid) = target.pid else {
        return Err("container is not running".to_owned());
    };
    let mut args = vec![
        format!("--target={pid}"),
        "--mount".to_owned(),
        "--net".to_owned(),
        "--uts".to_owned(),
        "--root".to_owned(),
        "--".to_owned(),
    ];
    args.extend(exec_argv(
        &target.identity,
        &target.working_dir,
        &target.env,
        command,
    ));
    let out = Command::new("nsenter")
        .args(&args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("exec probe: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "command {command:?} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim_end()
        ))
    }
}
