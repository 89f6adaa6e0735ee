//! A real `nats-server` for tests: JetStream on, free loopback ports, everything (config, log,
//! JetStream store) in one temp dir, stopped on drop.
//!
//! The server is always started from a generated config file (`nats.conf` in its dir), so a
//! restart reuses exactly the same ports, options and store dir.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::binary::nats_server_binary;
use crate::error::{Result, TestkitError};
use crate::net::{free_ports, http_get};
use crate::process::ChildProcess;

/// Default time a single server may take to become ready (2-core CI under load).
pub(crate) const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// SIGTERM grace before SIGKILL.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often a start is retried with new ports after "address already in use".
pub(crate) const PORT_ATTEMPTS: usize = 5;
const LOG_TAIL_LINES: usize = 25;
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(25);
/// nats-server's default `max_pending`; `max_payload` may not exceed it.
const DEFAULT_MAX_PENDING: u64 = 64 * 1024 * 1024;

/// Set to `1` to keep the temp dirs (config, log, store) after the test; paths go to stderr.
pub(crate) const KEEP_ENV: &str = "MAILROOM_TESTKIT_KEEP";

/// A process-unique name, e.g. `mailroom-1234-7`, used as `server_name` / cluster name, so a
/// monitoring port answering for another server is never taken for ours.
pub(crate) fn unique_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "mailroom-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub(crate) fn new_tempdir(prefix: &str) -> Result<TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|source| TestkitError::Io {
            what: "cannot create a temp dir in",
            path: env::temp_dir(),
            source,
        })
}

/// Drops a temp dir, or keeps it (and says where) when `MAILROOM_TESTKIT_KEEP=1`.
pub(crate) fn release_tempdir(dir: TempDir) {
    if env::var_os(KEEP_ENV).is_some_and(|v| v == "1") {
        let path = dir.keep();
        eprintln!("mailroom-testkit: kept {}", path.display());
    }
}

/// Client authentication of the test server.
#[derive(Debug, Clone, Default)]
pub(crate) enum Auth {
    #[default]
    None,
    Token(String),
    UserPassword(String, String),
}

/// Options shared by [`NatsServerBuilder`] and the cluster builder.
#[derive(Debug, Clone)]
pub(crate) struct NatsOptions {
    pub(crate) binary: Option<PathBuf>,
    pub(crate) jetstream: bool,
    pub(crate) max_payload: Option<u32>,
    pub(crate) auth: Auth,
    pub(crate) tls: Option<(PathBuf, PathBuf)>,
    pub(crate) extra_config: Vec<String>,
    pub(crate) startup_timeout: Duration,
    /// Client listen address (default 127.0.0.1).
    pub(crate) listen: IpAddr,
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self {
            binary: None,
            jetstream: true,
            max_payload: None,
            auth: Auth::None,
            tls: None,
            extra_config: Vec::new(),
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }
}

impl NatsOptions {
    pub(crate) fn validate(&self) -> Result<()> {
        if let Some(max) = self.max_payload
            && (max == 0 || i32::try_from(max).is_err())
        {
            return Err(TestkitError::InvalidOption(format!(
                "max_payload {max} must be between 1 and {}",
                i32::MAX
            )));
        }
        match &self.auth {
            Auth::Token(t) if t.is_empty() => {
                return Err(TestkitError::InvalidOption("empty token".to_owned()));
            }
            Auth::UserPassword(u, _) if u.is_empty() => {
                return Err(TestkitError::InvalidOption("empty user name".to_owned()));
            }
            _ => {}
        }
        if let Some((cert, key)) = &self.tls {
            for file in [cert, key] {
                if !file.is_file() {
                    return Err(TestkitError::InvalidOption(format!(
                        "tls file {} does not exist",
                        file.display()
                    )));
                }
            }
        }
        Ok(())
    }

    pub(crate) fn binary(&self) -> Result<PathBuf> {
        match &self.binary {
            Some(path) => Ok(path.clone()),
            None => nats_server_binary(),
        }
    }
}

/// The `cluster {}` block of one node.
#[derive(Debug, Clone)]
pub(crate) struct ClusterConfig {
    pub(crate) name: String,
    pub(crate) port: u16,
    pub(crate) routes: Vec<u16>,
}

/// A nats config string literal.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn quote_path(p: &Path) -> String {
    quote(&p.to_string_lossy())
}

/// Renders `nats.conf` for one server.
pub(crate) fn render_config(
    opts: &NatsOptions,
    server_name: &str,
    port: u16,
    monitor_port: u16,
    store_dir: &Path,
    cluster: Option<&ClusterConfig>,
) -> String {
    // `write!` into a String cannot fail; the results are ignored on purpose.
    let mut c = String::new();
    c.push_str("# generated by mailroom-testkit\n");
    let _ = writeln!(c, "server_name: {}", quote(server_name));
    let _ = writeln!(c, "listen: \"{}\"", SocketAddr::new(opts.listen, port));
    let _ = writeln!(c, "http: \"127.0.0.1:{monitor_port}\"");
    if let Some(max) = opts.max_payload {
        let _ = writeln!(c, "max_payload: {max}");
        if u64::from(max) > DEFAULT_MAX_PENDING {
            let _ = writeln!(c, "max_pending: {}", u64::from(max) * 2);
        }
    }
    if opts.jetstream {
        let _ = writeln!(
            c,
            "jetstream {{\n  store_dir: {}\n}}",
            quote_path(store_dir)
        );
    }
    match &opts.auth {
        Auth::None => {}
        Auth::Token(token) => {
            let _ = writeln!(c, "authorization {{\n  token: {}\n}}", quote(token));
        }
        Auth::UserPassword(user, password) => {
            let _ = writeln!(
                c,
                "authorization {{\n  user: {}\n  password: {}\n}}",
                quote(user),
                quote(password)
            );
        }
    }
    if let Some((cert, key)) = &opts.tls {
        let _ = writeln!(
            c,
            "tls {{\n  cert_file: {}\n  key_file: {}\n}}",
            quote_path(cert),
            quote_path(key)
        );
    }
    if let Some(cluster) = cluster {
        let _ = writeln!(c, "cluster {{");
        let _ = writeln!(c, "  name: {}", quote(&cluster.name));
        let _ = writeln!(c, "  listen: \"127.0.0.1:{}\"", cluster.port);
        let _ = writeln!(c, "  routes: [");
        for route in &cluster.routes {
            let _ = writeln!(c, "    \"nats-route://127.0.0.1:{route}\"");
        }
        let _ = writeln!(c, "  ]\n}}");
    }
    for line in &opts.extra_config {
        let _ = writeln!(c, "{line}");
    }
    c
}

/// Whether a start failed because a port was taken by someone else (then: new ports, retry).
pub(crate) fn is_port_collision(err: &TestkitError) -> bool {
    matches!(err, TestkitError::ExitedEarly { log_tail, .. } if log_tail.contains("address already in use"))
}

/// Builder for [`NatsServer`]; see [`NatsServer::builder`].
#[derive(Debug, Clone, Default)]
pub struct NatsServerBuilder {
    opts: NatsOptions,
}

impl NatsServerBuilder {
    /// Use this binary instead of [`crate::nats_server_binary`].
    #[must_use]
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.opts.binary = Some(path.into());
        self
    }

    /// JetStream on (default) or off.
    #[must_use]
    pub fn jetstream(mut self, enabled: bool) -> Self {
        self.opts.jetstream = enabled;
        self
    }

    /// `max_payload` in bytes (nats default 1 MiB; up to `i32::MAX`; nats warns above 8 MiB).
    /// `max_pending` is raised with it when needed.
    #[must_use]
    pub fn max_payload(mut self, bytes: u32) -> Self {
        self.opts.max_payload = Some(bytes);
        self
    }

    /// Require this token from clients (`CONNECT {"auth_token": ...}`). Replaces
    /// [`Self::user_password`].
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.opts.auth = Auth::Token(token.into());
        self
    }

    /// Require this user and password from clients. Replaces [`Self::token`].
    #[must_use]
    pub fn user_password(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.opts.auth = Auth::UserPassword(user.into(), password.into());
        self
    }

    /// Serve client connections with TLS, from these PEM files (e.g. made with `rcgen`).
    #[must_use]
    pub fn tls(mut self, cert_file: impl Into<PathBuf>, key_file: impl Into<PathBuf>) -> Self {
        self.opts.tls = Some((cert_file.into(), key_file.into()));
        self
    }

    /// Append a raw line to the generated nats config (escape hatch for rarely used options).
    #[must_use]
    pub fn extra_config(mut self, line: impl Into<String>) -> Self {
        self.opts.extra_config.push(line.into());
        self
    }

    /// Listen for clients on `ip` instead of 127.0.0.1, e.g. the gateway of a
    /// [`crate::PodNetwork`] so that pods reach it, or `0.0.0.0` (then [`NatsServer::url`]
    /// still says 127.0.0.1). The monitoring port stays on 127.0.0.1.
    #[must_use]
    pub fn listen(mut self, ip: IpAddr) -> Self {
        self.opts.listen = ip;
        self
    }

    /// How long start and restart wait for readiness (default 30 s).
    #[must_use]
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.opts.startup_timeout = timeout;
        self
    }

    /// Starts the server and waits until it is ready.
    ///
    /// # Errors
    /// Binary not found, invalid options, or the server did not become ready (the error carries
    /// the end of its log).
    pub fn start(self) -> Result<NatsServer> {
        NatsServer::start_standalone(self.opts)
    }
}

/// One running `nats-server` (standalone, or a node of a [`crate::NatsCluster`]).
///
/// Stops the process on drop (SIGTERM, then SIGKILL after 10 s) and removes its temp dir.
#[derive(Debug)]
pub struct NatsServer {
    process: Option<ChildProcess>,
    binary: PathBuf,
    opts: NatsOptions,
    server_name: String,
    port: u16,
    monitor_port: u16,
    cluster: Option<ClusterConfig>,
    dir: PathBuf,
    tempdir: Option<TempDir>,
}

impl NatsServer {
    /// Starts a standalone server with JetStream on free loopback ports, in a new temp dir, and
    /// waits until `/healthz?js-enabled-only=true` answers ok.
    ///
    /// # Errors
    /// See [`NatsServerBuilder::start`].
    pub fn start() -> Result<Self> {
        Self::builder().start()
    }

    /// A builder for non-default options (max payload, auth, TLS, ...).
    pub fn builder() -> NatsServerBuilder {
        NatsServerBuilder::default()
    }

    fn start_standalone(opts: NatsOptions) -> Result<Self> {
        opts.validate()?;
        let binary = opts.binary()?;
        let tempdir = new_tempdir("mailroom-nats-")?;
        let dir = tempdir.path().to_path_buf();
        let ports = free_ports(2)?;
        let mut server = Self::new(
            binary,
            opts,
            unique_name(),
            dir,
            Some(tempdir),
            (ports[0], ports[1]),
            None,
        );
        let mut attempt = 1;
        loop {
            server.write_config()?;
            match server.launch() {
                Ok(()) => return Ok(server),
                Err(e) if is_port_collision(&e) && attempt < PORT_ATTEMPTS => {
                    attempt += 1;
                    let ports = free_ports(2)?;
                    server.port = ports[0];
                    server.monitor_port = ports[1];
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn new(
        binary: PathBuf,
        opts: NatsOptions,
        server_name: String,
        dir: PathBuf,
        tempdir: Option<TempDir>,
        (port, monitor_port): (u16, u16),
        cluster: Option<ClusterConfig>,
    ) -> Self {
        Self {
            process: None,
            binary,
            opts,
            server_name,
            port,
            monitor_port,
            cluster,
            dir,
            tempdir,
        }
    }

    /// Client URL, `nats://127.0.0.1:<port>` (or the [`NatsServerBuilder::listen`] address; no
    /// credentials in it).
    pub fn url(&self) -> String {
        let ip = if self.opts.listen.is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            self.opts.listen
        };
        format!("nats://{}", SocketAddr::new(ip, self.port))
    }

    /// Client port on 127.0.0.1 (kept across [`Self::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Monitoring (HTTP) port on 127.0.0.1.
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// Monitoring base URL, `http://127.0.0.1:<monitor port>`.
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// Cluster (route) port, for cluster nodes.
    pub fn cluster_port(&self) -> Option<u16> {
        self.cluster.as_ref().map(|c| c.port)
    }

    /// The configured `server_name` (unique per test process).
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// The binary this server runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Working dir: `nats.conf`, `nats.log`, `jetstream/`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// JetStream `store_dir` (kept across [`Self::restart`]).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.join("jetstream")
    }

    /// The generated config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("nats.conf")
    }

    /// The server's stdout + stderr, appended across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("nats.log")
    }

    /// Current contents of [`Self::log_path`] (empty if unreadable).
    pub fn log(&self) -> String {
        fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// PID of the last started process, unless it was stopped or seen exiting.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ChildProcess::pid)
    }

    /// Whether the process is still running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(ChildProcess::is_running)
    }

    /// Whether the full `/healthz` answers 200 (for a cluster node: JetStream meta leader known
    /// and current).
    pub fn is_healthy(&self) -> bool {
        http_get(self.monitor_port, "/healthz", PROBE_TIMEOUT).is_ok_and(|r| r.status == 200)
    }

    /// GET a monitoring endpoint (e.g. `/varz`, `/jsz`, `/routez`) and parse its JSON.
    ///
    /// # Errors
    /// The request failed, was not 200, or the body is not JSON.
    pub fn monitor_json(&self, path: &str) -> Result<serde_json::Value> {
        let resp = http_get(self.monitor_port, path, PROBE_TIMEOUT)?;
        let http_err = |reason: String| TestkitError::Http {
            port: self.monitor_port,
            path: path.to_owned(),
            reason,
        };
        if resp.status != 200 {
            return Err(http_err(format!(
                "HTTP {}: {}",
                resp.status,
                resp.body.trim()
            )));
        }
        serde_json::from_str(&resp.body).map_err(|e| http_err(format!("bad JSON: {e}")))
    }

    /// Graceful stop: SIGTERM, then SIGKILL after 10 s. No-op when not running.
    ///
    /// # Errors
    /// Signalling or reaping our child failed.
    pub fn stop(&mut self) -> Result<()> {
        match self.process.take() {
            Some(mut p) => p.terminate(STOP_GRACE),
            None => Ok(()),
        }
    }

    /// Crash: SIGKILL, no chance to flush (for fault tests). No-op when not running.
    ///
    /// # Errors
    /// Signalling or reaping our child failed.
    pub fn kill(&mut self) -> Result<()> {
        match self.process.take() {
            Some(mut p) => p.kill(),
            None => Ok(()),
        }
    }

    /// Stops the server if it runs, then starts it again on the same ports, config and
    /// JetStream store dir, and waits until it is ready. Works after [`Self::kill`] too.
    ///
    /// # Errors
    /// Stop failed, or the new process did not become ready (also when another process took
    /// one of our ports meanwhile and kept it for several seconds).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.launch() {
                Ok(()) => return Ok(()),
                // Someone grabbed our port while we were down: wait for it to go away.
                Err(e) if is_port_collision(&e) && attempt < 25 => {
                    thread::sleep(Duration::from_millis(200))
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn write_config(&self) -> Result<()> {
        let text = render_config(
            &self.opts,
            &self.server_name,
            self.port,
            self.monitor_port,
            &self.store_dir(),
            self.cluster.as_ref(),
        );
        fs::create_dir_all(&self.dir).map_err(|source| TestkitError::Io {
            what: "cannot create",
            path: self.dir.clone(),
            source,
        })?;
        let path = self.config_path();
        fs::write(&path, text).map_err(|source| TestkitError::Io {
            what: "cannot write",
            path,
            source,
        })
    }

    /// Spawns the process without waiting for readiness.
    pub(crate) fn spawn(&mut self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let config = self.config_path();
        let process = ChildProcess::spawn(
            &self.binary,
            &[Path::new("-c"), config.as_path()],
            &self.log_path(),
        )?;
        self.process = Some(process);
        Ok(())
    }

    /// Spawn and wait for readiness; kills the process if it does not get ready.
    pub(crate) fn launch(&mut self) -> Result<()> {
        self.spawn()?;
        self.wait_ready(self.opts.startup_timeout)
    }

    /// Waits until the process answers its readiness probe, the monitoring port belongs to it
    /// (`/varz` shows our `server_name`) and it is still alive.
    pub(crate) fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let path = if self.opts.jetstream {
            "/healthz?js-enabled-only=true"
        } else {
            "/healthz"
        };
        loop {
            let status = match self.process.as_mut() {
                Some(p) => p.exit_status(),
                None => return Err(self.exited_early("not started".to_owned())),
            };
            if let Some(status) = status {
                self.process = None;
                return Err(self.exited_early(status.to_string()));
            }
            let last = match self.probe_ready(path) {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                let _ = self.kill();
                return Err(TestkitError::NotReady {
                    binary: self.binary.clone(),
                    port: self.port,
                    monitor_port: self.monitor_port,
                    timeout,
                    last,
                    log: self.log_path(),
                    log_tail: self.log_tail(),
                });
            }
            thread::sleep(POLL);
        }
    }

    fn probe_ready(&self, path: &str) -> std::result::Result<(), String> {
        let resp = http_get(self.monitor_port, path, PROBE_TIMEOUT).map_err(|e| e.to_string())?;
        if resp.status != 200 {
            return Err(format!("{path}: HTTP {} {}", resp.status, resp.body.trim()));
        }
        let varz = self.monitor_json("/varz").map_err(|e| e.to_string())?;
        let name = varz.get("server_name").and_then(serde_json::Value::as_str);
        if name != Some(self.server_name.as_str()) {
            return Err(format!(
                "monitor port {} answers for server {name:?}, not {}",
                self.monitor_port, self.server_name
            ));
        }
        Ok(())
    }

    fn exited_early(&self, status: String) -> TestkitError {
        TestkitError::ExitedEarly {
            binary: self.binary.clone(),
            port: self.port,
            status,
            log: self.log_path(),
            log_tail: self.log_tail(),
        }
    }

    /// Last lines of the log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let start = lines.len().saturating_sub(LOG_TAIL_LINES);
        lines[start..].join("\n")
    }

    /// First half of a parallel stop: SIGTERM without waiting.
    pub(crate) fn begin_stop(&mut self) {
        if let Some(p) = self.process.as_mut() {
            let _ = p.send_term();
        }
    }

    /// Second half of a parallel stop: wait until `deadline`, then SIGKILL.
    pub(crate) fn finish_stop(&mut self, deadline: Instant) {
        if let Some(mut p) = self.process.take()
            && !p.wait_until(deadline)
        {
            let _ = p.kill();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.stop();
        if let Some(dir) = self.tempdir.take() {
            release_tempdir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_ports_store_auth_and_cluster() {
        let opts = NatsOptions {
            max_payload: Some(2048),
            auth: Auth::Token("s3\"cret".to_owned()),
            ..NatsOptions::default()
        };
        let cluster = ClusterConfig {
            name: "c1".to_owned(),
            port: 6001,
            routes: vec![6002, 6003],
        };
        let conf = render_config(
            &opts,
            "n0",
            4001,
            8001,
            Path::new("/tmp/x/js"),
            Some(&cluster),
        );
        for want in [
            "server_name: \"n0\"",
            "listen: \"127.0.0.1:4001\"",
            "http: \"127.0.0.1:8001\"",
            "max_payload: 2048",
            "store_dir: \"/tmp/x/js\"",
            "token: \"s3\\\"cret\"",
            "name: \"c1\"",
            "listen: \"127.0.0.1:6001\"",
            "\"nats-route://127.0.0.1:6002\"",
            "\"nats-route://127.0.0.1:6003\"",
        ] {
            assert!(conf.contains(want), "missing {want:?} in\n{conf}");
        }
        assert!(!conf.contains("max_pending"));
    }

    #[test]
    fn config_without_jetstream_or_auth_is_minimal() {
        let opts = NatsOptions {
            jetstream: false,
            auth: Auth::UserPassword("u".to_owned(), "p".to_owned()),
            max_payload: Some(100 * 1024 * 1024),
            ..NatsOptions::default()
        };
        let conf = render_config(&opts, "s", 1, 2, Path::new("/x"), None);
        assert!(!conf.contains("jetstream"), "{conf}");
        assert!(!conf.contains("cluster"), "{conf}");
        assert!(conf.contains("user: \"u\"\n  password: \"p\""), "{conf}");
        assert!(conf.contains("max_pending: 209715200"), "{conf}");
    }

    #[test]
    fn invalid_options_are_rejected_before_anything_starts() {
        let err = NatsServer::builder()
            .max_payload(0)
            .binary("/nonexistent")
            .start()
            .expect_err("invalid");
        assert!(matches!(err, TestkitError::InvalidOption(_)), "{err}");
        let err = NatsServer::builder()
            .token("")
            .binary("/nonexistent")
            .start()
            .expect_err("invalid");
        assert!(matches!(err, TestkitError::InvalidOption(_)), "{err}");
        let err = NatsServer::builder()
            .tls("/nonexistent/cert.pem", "/nonexistent/key.pem")
            .binary("/nonexistent")
            .start()
            .expect_err("invalid");
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
    }

    #[test]
    fn spawn_failure_names_binary_and_config() {
        let err = NatsServer::builder()
            .binary("/nonexistent/nats-server")
            .start()
            .expect_err("no such binary");
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/nats-server"), "{msg}");
        assert!(msg.contains("nats.conf"), "{msg}");
    }

    #[test]
    fn early_exit_reports_log_tail() {
        // `false` exits at once with status 1: the error must say so and name the port.
        let err = NatsServer::builder()
            .binary("/bin/false")
            .startup_timeout(Duration::from_secs(5))
            .start()
            .expect_err("exits");
        assert!(matches!(err, TestkitError::ExitedEarly { .. }), "{err}");
        assert!(err.to_string().contains("client port"), "{err}");
        assert!(!is_port_collision(&err));
    }
}
