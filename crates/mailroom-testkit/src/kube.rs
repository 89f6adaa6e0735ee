//! [`KubeControlPlane`]: etcd + kube-apiserver (+ kube-controller-manager) on loopback for tests,
//! "our envtest for Rust". The PKI is in the `pki` submodule.

mod pki;

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::binary::Tool;
use crate::error::{Result, TestkitError};
use crate::nats::{PORT_ATTEMPTS, new_tempdir, release_tempdir};
use crate::net::{free_ports, http_get, https_get};
use crate::process::{ChildProcess, START_MARKER, command_line};

use self::pki::Pki;

/// Default time each component may take to become ready (2-core CI under load).
const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// SIGTERM grace before SIGKILL, per process.
const STOP_GRACE: Duration = Duration::from_secs(10);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(100);
const LOG_TAIL_LINES: usize = 40;
const KUBECONFIG: &str = "admin.kubeconfig";

/// The processes of a control plane, in start order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Component {
    Etcd,
    KubeApiserver,
    KubeControllerManager,
}

impl Component {
    fn name(self) -> &'static str {
        self.tool().name()
    }

    fn tool(self) -> Tool {
        match self {
            Self::Etcd => Tool::Etcd,
            Self::KubeApiserver => Tool::KubeApiserver,
            Self::KubeControllerManager => Tool::KubeControllerManager,
        }
    }
}

/// Why a component did not start: retry with new ports, or give up.
enum LaunchError {
    PortInUse(TestkitError),
    Failed(TestkitError),
}

impl LaunchError {
    fn into_inner(self) -> TestkitError {
        match self {
            Self::PortInUse(e) | Self::Failed(e) => e,
        }
    }
}

/// Builder for [`KubeControlPlane`]; see [`KubeControlPlane::builder`].
#[derive(Debug, Clone)]
pub struct KubeControlPlaneBuilder {
    controller_manager: bool,
    startup_timeout: Duration,
    apiserver_args: Vec<String>,
    controller_manager_args: Vec<String>,
    crds: Vec<PathBuf>,
    apiserver_bind: Option<IpAddr>,
}

impl Default for KubeControlPlaneBuilder {
    fn default() -> Self {
        Self {
            controller_manager: false,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            apiserver_args: Vec::new(),
            controller_manager_args: Vec::new(),
            crds: Vec::new(),
            apiserver_bind: None,
        }
    }
}

impl KubeControlPlaneBuilder {
    /// Also run `kube-controller-manager` (all controllers): garbage collection, Deployment ->
    /// ReplicaSet, namespace deletion, `default` service accounts, `kube-root-ca.crt`. Start
    /// waits until it has created `default/default`. Off by default.
    #[must_use]
    pub fn controller_manager(mut self, enabled: bool) -> Self {
        self.controller_manager = enabled;
        self
    }

    /// How long each component may take to become ready (default 60 s).
    #[must_use]
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// CustomResourceDefinitions to install (a file or a directory of YAML files, applied with
    /// `kubectl apply`) as soon as the apiserver is ready, and to wait for until established:
    /// before the controller manager starts, so that its garbage collector knows the custom
    /// kinds from its first discovery (it rediscovers only every 30 s, and owners of a kind it
    /// does not know are retried with a growing backoff).
    #[must_use]
    pub fn crds(mut self, path: impl Into<PathBuf>) -> Self {
        self.crds.push(path.into());
        self
    }

    /// An extra `kube-apiserver` flag, e.g. `--feature-gates=...` (after the generated ones).
    #[must_use]
    pub fn apiserver_arg(mut self, arg: impl Into<String>) -> Self {
        self.apiserver_args.push(arg.into());
        self
    }

    /// Make the apiserver reachable on `ip` too (e.g. the gateway of a [`crate::PodNetwork`],
    /// so that pods of a [`crate::FakeKubelet`] reach it as `KUBERNETES_SERVICE_HOST`): it then
    /// listens on all addresses (`--bind-address=0.0.0.0`; loopback keeps working, the
    /// kubeconfig still says `https://127.0.0.1:<port>`), advertises `ip`, and its serving
    /// certificate names `ip` besides 127.0.0.1 and `localhost`. Off by default (loopback only).
    #[must_use]
    pub fn apiserver_bind(mut self, ip: IpAddr) -> Self {
        self.apiserver_bind = Some(ip);
        self
    }

    /// An extra `kube-controller-manager` flag (after the generated ones).
    #[must_use]
    pub fn controller_manager_arg(mut self, arg: impl Into<String>) -> Self {
        self.controller_manager_args.push(arg.into());
        self
    }

    /// Starts etcd, kube-apiserver and (if enabled) kube-controller-manager and waits until the
    /// apiserver is ready and namespace `default` exists (and, with the controller manager,
    /// service account `default/default`). Blocking; fine to call from async tests.
    ///
    /// # Errors
    /// A binary was not found ([`TestkitError::BinaryNotFound`] says which `e2e/tools/build.sh`
    /// command builds it), the PKI or a file could not be written, or a component exited or was
    /// not ready in time ([`TestkitError::ControlPlane`], with the end of its log).
    pub fn start(self) -> Result<KubeControlPlane> {
        KubeControlPlane::start_with(self)
    }
}

/// A real Kubernetes control plane for tests ("our envtest for Rust"): `etcd` +
/// `kube-apiserver` (+ optionally `kube-controller-manager`) on free loopback ports, with a
/// generated PKI, everything (PKI, etcd data, logs, kubeconfig) in one temp dir, stopped on drop.
///
/// It follows `e2e/tools/smoke-k8s.sh`: RBAC on; the admin user is a client cert
/// (`CN=admin, O=system:masters`); the ServiceAccount admission plugin is off unless the
/// controller manager runs (nothing would create the `default` service accounts it requires).
/// There is no scheduler and no kubelet: Pods never run, unless a [`crate::FakeKubelet`] plays
/// the node (build the control plane with [`KubeControlPlaneBuilder::apiserver_bind`] of its
/// network's gateway so its pods reach the apiserver). Without the controller manager there is
/// also no garbage collection, no Deployment -> ReplicaSet, and deleted namespaces stay
/// `Terminating`.
///
/// ```no_run
/// # async fn demo() -> Result<(), mailroom_testkit::TestkitError> {
/// use mailroom_testkit::KubeControlPlane;
///
/// let cp = KubeControlPlane::builder().controller_manager(true).start()?;
/// let client = cp.client().await?;
/// let out = cp.kubectl_ok(&["get", "namespaces", "-o", "name"])?;
/// # let _ = (client, out);
/// # Ok(())
/// # }
/// ```
///
/// Binaries come from [`Tool::find`] (`MAILROOM_ETCD`, `MAILROOM_KUBE_APISERVER`,
/// `MAILROOM_KUBE_CONTROLLER_MANAGER`, `MAILROOM_KUBECTL`, `MAILROOM_HELM`, else the tools cache,
/// else `PATH`); build them with
/// `e2e/tools/build.sh etcd kube-apiserver kube-controller-manager kubectl` (and `helm` for
/// [`Self::helm`]).
///
/// Lifetime: the processes are children of the test process and are stopped (SIGTERM, then
/// SIGKILL after 10 s, in reverse start order) when the handle is dropped, also when a test
/// panics. They are *not* stopped if the test process itself dies without unwinding (SIGKILL, a
/// libtest timeout that kills it, `panic = "abort"`), and never when the handle lives in a
/// `static` (statics are not dropped): such orphans keep running until killed. A parent-death
/// signal (`PR_SET_PDEATHSIG`) would need `pre_exec`, i.e. unsafe code, which the workspace
/// forbids; so keep one control plane per test (or per test function that needs it) rather than
/// a process-wide one. The processes share the test's process group, so Ctrl-C in a terminal
/// reaches them too.
///
/// Files in [`Self::dir`]: `pki/` (`ca.crt`, `admin.crt`, ...), `etcd-data/`,
/// `admin.kubeconfig`, and `<component>.log` for `etcd`, `kube-apiserver`,
/// `kube-controller-manager`. Removed on drop unless `MAILROOM_TESTKIT_KEEP=1`.
#[derive(Debug)]
pub struct KubeControlPlane {
    processes: Vec<(Component, ChildProcess)>,
    pki: Pki,
    dir: PathBuf,
    tempdir: Option<TempDir>,
    etcd_port: u16,
    apiserver_port: u16,
    controller_manager: bool,
    apiserver_bind: Option<IpAddr>,
}

impl KubeControlPlane {
    /// Starts etcd + kube-apiserver only (no controller manager) with default options.
    ///
    /// # Errors
    /// See [`KubeControlPlaneBuilder::start`].
    pub fn start() -> Result<Self> {
        Self::builder().start()
    }

    /// A builder: controller manager, timeouts, extra flags.
    pub fn builder() -> KubeControlPlaneBuilder {
        KubeControlPlaneBuilder::default()
    }

    fn start_with(opts: KubeControlPlaneBuilder) -> Result<Self> {
        let started = Instant::now();
        // Find every binary before creating or starting anything.
        let etcd = Tool::Etcd.find()?;
        let apiserver = Tool::KubeApiserver.find()?;
        let controller_manager = if opts.controller_manager {
            Some(Tool::KubeControllerManager.find()?)
        } else {
            None
        };
        let tempdir = new_tempdir("mailroom-kube-")?;
        let dir = tempdir.path().to_path_buf();
        let extra_sans: Vec<IpAddr> = opts.apiserver_bind.into_iter().collect();
        let pki = pki::generate(&dir, &extra_sans)?;
        // From here on, an early return drops `cp`: it stops what runs and removes the dir.
        let mut cp = Self {
            processes: Vec::new(),
            pki,
            dir,
            tempdir: Some(tempdir),
            etcd_port: 0,
            apiserver_port: 0,
            controller_manager: opts.controller_manager,
            apiserver_bind: opts.apiserver_bind,
        };
        cp.start_etcd(&etcd, opts.startup_timeout)?;
        cp.start_apiserver(&apiserver, &opts.apiserver_args, opts.startup_timeout)?;
        cp.write_kubeconfig()?;
        for path in &opts.crds {
            let path = path.to_string_lossy();
            cp.kubectl_ok(&["apply", "--server-side", "-f", &path])?;
        }
        if !opts.crds.is_empty() {
            let timeout = format!("--timeout={}s", opts.startup_timeout.as_secs().max(1));
            cp.kubectl_ok(&[
                "wait",
                "--for=condition=Established",
                "crd",
                "--all",
                &timeout,
            ])?;
        }
        if let Some(binary) = controller_manager {
            cp.start_controller_manager(
                &binary,
                &opts.controller_manager_args,
                opts.startup_timeout,
            )?;
        }
        eprintln!(
            "mailroom-testkit: kube control plane ready after {:.1}s: {} (kubeconfig {})",
            started.elapsed().as_secs_f64(),
            cp.server_url(),
            cp.kubeconfig_path().display()
        );
        Ok(cp)
    }

    fn start_etcd(&mut self, binary: &Path, timeout: Duration) -> Result<()> {
        let data_dir = self.dir.join("etcd-data");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let ports = free_ports(2)?;
            let (client, peer) = (ports[0], ports[1]);
            // A failed attempt may have initialised the data dir with the old peer URL.
            let _ = fs::remove_dir_all(&data_dir);
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let args = vec![
                "--name=mailroom-testkit".to_owned(),
                format!("--data-dir={}", data_dir.display()),
                format!("--listen-client-urls={client_url}"),
                format!("--advertise-client-urls={client_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=mailroom-testkit={peer_url}"),
                "--unsafe-no-fsync".to_owned(),
                "--log-level=warn".to_owned(),
            ];
            let probe = |_: &Self| {
                let resp = http_get(client, "/health", PROBE_TIMEOUT).map_err(|e| e.to_string())?;
                if resp.status == 200 && resp.body.contains("\"health\":\"true\"") {
                    Ok(())
                } else {
                    Err(format!(
                        "/health: HTTP {} {}",
                        resp.status,
                        resp.body.trim()
                    ))
                }
            };
            match self.launch(Component::Etcd, binary, &args, timeout, probe) {
                Ok(()) => {
                    self.etcd_port = client;
                    return Ok(());
                }
                Err(LaunchError::PortInUse(_)) if attempt < PORT_ATTEMPTS => {}
                Err(e) => return Err(e.into_inner()),
            }
        }
    }

    fn start_apiserver(
        &mut self,
        binary: &Path,
        extra: &[String],
        timeout: Duration,
    ) -> Result<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_ports(1)?[0];
            let mut args = self.apiserver_args(port);
            args.extend(extra.iter().cloned());
            let probe = |cp: &Self| {
                for path in ["/readyz", "/api/v1/namespaces/default"] {
                    let resp = https_get(port, path, &cp.pki.admin_tls, PROBE_TIMEOUT)
                        .map_err(|e| format!("GET {path}: {e}"))?;
                    if resp.status != 200 {
                        return Err(format!(
                            "GET {path}: HTTP {} {}",
                            resp.status,
                            last_line(&resp.body)
                        ));
                    }
                }
                Ok(())
            };
            match self.launch(Component::KubeApiserver, binary, &args, timeout, probe) {
                Ok(()) => {
                    self.apiserver_port = port;
                    return Ok(());
                }
                Err(LaunchError::PortInUse(_)) if attempt < PORT_ATTEMPTS => {}
                Err(e) => return Err(e.into_inner()),
            }
        }
    }

    /// The flags of `e2e/tools/smoke-k8s.sh` (minus its static token file).
    fn apiserver_args(&self, port: u16) -> Vec<String> {
        let p = &self.pki;
        let (bind, advertise) = match self.apiserver_bind {
            Some(ip) => ("0.0.0.0".to_owned(), ip.to_string()),
            None => ("127.0.0.1".to_owned(), "127.0.0.1".to_owned()),
        };
        let mut args = vec![
            format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
            format!("--bind-address={bind}"),
            format!("--advertise-address={advertise}"),
            format!("--secure-port={port}"),
            format!("--tls-cert-file={}", p.apiserver_cert.display()),
            format!("--tls-private-key-file={}", p.apiserver_key.display()),
            format!("--client-ca-file={}", p.ca_cert.display()),
            format!("--service-account-issuer=https://127.0.0.1:{port}/"),
            // The public key: the PKCS#8 EC private key is not accepted here (see pki.rs).
            format!("--service-account-key-file={}", p.sa_pub.display()),
            format!("--service-account-signing-key-file={}", p.sa_key.display()),
            "--service-cluster-ip-range=10.0.0.0/24".to_owned(),
            "--authorization-mode=RBAC".to_owned(),
            "--allow-privileged=true".to_owned(),
            format!("--cert-dir={}", self.dir.join("apiserver-certs").display()),
        ];
        if !self.controller_manager {
            // Nothing would create the `default` service accounts this plugin insists on.
            args.push("--disable-admission-plugins=ServiceAccount".to_owned());
        }
        args
    }

    fn start_controller_manager(
        &mut self,
        binary: &Path,
        extra: &[String],
        timeout: Duration,
    ) -> Result<()> {
        let kubeconfig = self.kubeconfig_path();
        let kubeconfig = kubeconfig.display();
        let mut args = vec![
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--bind-address=127.0.0.1".to_owned(),
            // 0: no HTTPS endpoint at all, so no port to collide on.
            "--secure-port=0".to_owned(),
            "--leader-elect=false".to_owned(),
            format!(
                "--service-account-private-key-file={}",
                self.pki.sa_key.display()
            ),
            format!("--root-ca-file={}", self.pki.ca_cert.display()),
            "--use-service-account-credentials=false".to_owned(),
            "--controllers=*".to_owned(),
        ];
        args.extend(extra.iter().cloned());
        let port = self.apiserver_port;
        let probe = |cp: &Self| {
            let path = "/api/v1/namespaces/default/serviceaccounts/default";
            let resp = https_get(port, path, &cp.pki.admin_tls, PROBE_TIMEOUT)
                .map_err(|e| format!("GET {path}: {e}"))?;
            if resp.status == 200 {
                Ok(())
            } else {
                Err(format!(
                    "serviceaccount default/default: HTTP {}",
                    resp.status
                ))
            }
        };
        self.launch(
            Component::KubeControllerManager,
            binary,
            &args,
            timeout,
            probe,
        )
        .map_err(LaunchError::into_inner)
    }

    /// Spawns one component and polls `probe` until it succeeds; on failure the process is
    /// killed and removed again.
    fn launch(
        &mut self,
        component: Component,
        binary: &Path,
        args: &[String],
        timeout: Duration,
        probe: impl Fn(&Self) -> std::result::Result<(), String>,
    ) -> std::result::Result<(), LaunchError> {
        let log = self.log_path(component.name());
        let started = Instant::now();
        let process = ChildProcess::spawn(binary, args, &log).map_err(LaunchError::Failed)?;
        self.processes.push((component, process));
        let fail = |cp: &mut Self, reason: String| {
            if let Some((_, mut p)) = cp.processes.pop() {
                let _ = p.kill();
            }
            let since_start = log_since_last_start(&log);
            let err = TestkitError::ControlPlane {
                component: component.name(),
                reason,
                log: log.clone(),
                log_tail: tail(&since_start, LOG_TAIL_LINES),
            };
            if since_start.contains("address already in use") {
                LaunchError::PortInUse(err)
            } else {
                LaunchError::Failed(err)
            }
        };
        loop {
            let exited = self.processes.last_mut().and_then(|(_, p)| p.exit_status());
            if let Some(status) = exited {
                let reason = format!(
                    "exited during startup with {status} (command: {})",
                    command_line(binary, args)
                );
                return Err(fail(self, reason));
            }
            let last = match probe(self) {
                Ok(()) => break,
                Err(why) => why,
            };
            if started.elapsed() >= timeout {
                let reason = format!("not ready after {timeout:?}: {last}");
                return Err(fail(self, reason));
            }
            thread::sleep(POLL);
        }
        eprintln!(
            "mailroom-testkit: {} ready after {:.1}s",
            component.name(),
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    fn write_kubeconfig(&self) -> Result<()> {
        // JSON strings are valid YAML scalars: safe quoting for any path.
        let q = |p: &Path| serde_json::Value::from(p.to_string_lossy()).to_string();
        let text = format!(
            "# generated by mailroom-testkit\n\
             apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: mailroom-testkit\n  \
               cluster:\n    \
                 server: {server}\n    \
                 certificate-authority: {ca}\n\
             users:\n\
             - name: admin\n  \
               user:\n    \
                 client-certificate: {cert}\n    \
                 client-key: {key}\n\
             contexts:\n\
             - name: mailroom-testkit\n  \
               context:\n    \
                 cluster: mailroom-testkit\n    \
                 user: admin\n    \
                 namespace: default\n\
             current-context: mailroom-testkit\n",
            server = serde_json::Value::from(self.server_url()),
            ca = q(&self.pki.ca_cert),
            cert = q(&self.pki.admin_cert),
            key = q(&self.pki.admin_key),
        );
        let path = self.kubeconfig_path();
        fs::write(&path, text).map_err(|source| TestkitError::Io {
            what: "cannot write",
            path,
            source,
        })
    }

    /// The apiserver URL, `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.apiserver_port)
    }

    /// The apiserver's port on 127.0.0.1.
    pub fn apiserver_port(&self) -> u16 {
        self.apiserver_port
    }

    /// The extra address the apiserver is reachable on ([`KubeControlPlaneBuilder::apiserver_bind`]).
    pub fn apiserver_bind_address(&self) -> Option<IpAddr> {
        self.apiserver_bind
    }

    /// etcd's client URL, `http://127.0.0.1:<port>` (no TLS, no auth).
    pub fn etcd_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.etcd_port)
    }

    /// Kubeconfig of the admin user (client cert in `system:masters`; context namespace
    /// `default`), for kube-rs, kubectl and helm (`--kubeconfig` or `KUBECONFIG`).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.join(KUBECONFIG)
    }

    /// The CA that signed the apiserver's serving cert and the client certs (PEM).
    pub fn ca_cert_path(&self) -> &Path {
        &self.pki.ca_cert
    }

    /// The PKI dir: `ca.crt`, `ca.key`, `apiserver.{crt,key}`, `admin.{crt,key}`, `sa.{key,pub}`.
    pub fn pki_dir(&self) -> &Path {
        &self.pki.dir
    }

    /// The control plane's temp dir (see the type docs for its contents).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether kube-controller-manager runs as part of this control plane.
    pub fn has_controller_manager(&self) -> bool {
        self.controller_manager
    }

    /// Log file of a component: `etcd`, `kube-apiserver` or `kube-controller-manager`.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// Current contents of [`Self::log_path`] (empty if unreadable).
    pub fn log(&self, name: &str) -> String {
        fs::read(self.log_path(name))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Whether every started process still runs (reaps those that exited).
    pub fn is_running(&mut self) -> bool {
        !self.processes.is_empty() && self.processes.iter_mut().all(|(_, p)| p.is_running())
    }

    /// A kube-rs config for the admin user, from [`Self::kubeconfig_path`]. Change it (e.g.
    /// `auth_info`, impersonation) for clients acting as other users.
    ///
    /// Installs rustls' ring provider as the process default if none is installed yet (kube's
    /// rustls client needs one; with several rustls backends compiled in there is no implicit
    /// default).
    ///
    /// # Errors
    /// The kubeconfig cannot be read or its files loaded.
    pub async fn config(&self) -> Result<::kube::Config> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let path = self.kubeconfig_path();
        let kubeconfig_err = |source| TestkitError::Kubeconfig {
            path: path.clone(),
            source,
        };
        let kubeconfig = ::kube::config::Kubeconfig::read_from(&path).map_err(kubeconfig_err)?;
        ::kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &::kube::config::KubeConfigOptions::default(),
        )
        .await
        .map_err(kubeconfig_err)
    }

    /// A kube-rs client for the admin user (see [`Self::config`]).
    ///
    /// # Errors
    /// The kubeconfig cannot be loaded or the client not built.
    pub async fn client(&self) -> Result<::kube::Client> {
        let config = self.config().await?;
        ::kube::Client::try_from(config).map_err(|source| TestkitError::KubeClient {
            server: self.server_url(),
            source,
        })
    }

    /// Runs `kubectl --kubeconfig <admin kubeconfig> --cache-dir <dir>/kubectl-cache <args...>`
    /// (blocking) and returns its output whatever the exit status. kubectl is looked up on first
    /// use ([`Tool::Kubectl`]).
    ///
    /// # Errors
    /// kubectl not found or not spawnable.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        let binary = Tool::Kubectl.find()?;
        let kubeconfig = self.kubeconfig_path();
        let cache_dir = self.dir.join("kubectl-cache");
        let mut all: Vec<&std::ffi::OsStr> = vec![
            "--kubeconfig".as_ref(),
            kubeconfig.as_os_str(),
            "--cache-dir".as_ref(),
            cache_dir.as_os_str(),
        ];
        all.extend(args.iter().map(std::ffi::OsStr::new));
        Command::new(&binary)
            .args(&all)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| TestkitError::Spawn {
                command: command_line(&binary, &all),
                binary,
                source,
            })
    }

    /// [`Self::kubectl`], and its stdout if it exited with 0.
    ///
    /// # Errors
    /// kubectl not found, or [`TestkitError::CommandFailed`] with its stderr.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        crate::helm::success("kubectl", args, self.kubectl(args)?)
    }

    /// Runs `helm --kubeconfig <admin kubeconfig> <args...>` (blocking) with helm's cache,
    /// config and data homes in `<dir>/helm/` (see [`crate::helm()`]) and returns its output
    /// whatever the exit status. helm is looked up on first use ([`Tool::Helm`]; build it with
    /// `e2e/tools/build.sh helm`). Without a [`crate::FakeKubelet`] no pod runs, so
    /// `helm install --wait` would never finish.
    ///
    /// # Errors
    /// helm not found or not spawnable.
    pub fn helm(&self, args: &[&str]) -> Result<Output> {
        crate::helm::run(&self.dir.join("helm"), Some(&self.kubeconfig_path()), args)
    }

    /// [`Self::helm`], and its stdout if it exited with 0.
    ///
    /// # Errors
    /// helm not found, or [`TestkitError::CommandFailed`] with its stderr.
    pub fn helm_ok(&self, args: &[&str]) -> Result<String> {
        crate::helm::success("helm", args, self.helm(args)?)
    }

    /// Stops every process in reverse start order (SIGTERM, SIGKILL after 10 s each). The dir
    /// stays until drop. Idempotent.
    ///
    /// # Errors
    /// The first failure to signal or reap a child (the others are still stopped).
    pub fn stop(&mut self) -> Result<()> {
        let mut first_err = None;
        while let Some((_, mut process)) = self.processes.pop() {
            if let Err(e) = process.terminate(STOP_GRACE) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for KubeControlPlane {
    fn drop(&mut self) {
        let _ = self.stop();
        if let Some(dir) = self.tempdir.take() {
            release_tempdir(dir);
        }
    }
}

/// The part of a log written since the last [`ChildProcess::spawn`] into it.
fn log_since_last_start(log: &Path) -> String {
    let text = fs::read(log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    match text.rfind(START_MARKER) {
        Some(at) => text[at..].to_owned(),
        None => text,
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The last non-empty line of a probe body (`/readyz` ends with "readyz check failed").
fn last_line(body: &str) -> &str {
    body.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_since_last_start_skips_earlier_attempts() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let log = tmp.path().join("x.log");
        fs::write(
            &log,
            format!(
                "{START_MARKER}etcd a\nbind: address already in use\n{START_MARKER}etcd b\nok\n"
            ),
        )
        .expect("write");
        let text = log_since_last_start(&log);
        assert!(text.ends_with("etcd b\nok\n"), "{text}");
        assert!(!text.contains("address already in use"), "{text}");
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(
            last_line("[-]etcd failed\nreadyz check failed\n\n"),
            "readyz check failed"
        );
    }

    #[test]
    fn early_exit_reports_component_and_log_tail() {
        // `false` exits at once: the error names the component, status and command line.
        let tmp = tempfile::tempdir().expect("tempdir");
        let pki = pki::generate(tmp.path(), &[]).expect("pki");
        let mut cp = KubeControlPlane {
            processes: Vec::new(),
            pki,
            dir: tmp.path().to_path_buf(),
            tempdir: None,
            etcd_port: 0,
            apiserver_port: 0,
            controller_manager: false,
            apiserver_bind: None,
        };
        let err = match cp.launch(
            Component::Etcd,
            Path::new("/bin/false"),
            &["--flag".to_owned()],
            Duration::from_secs(5),
            |_| Err("never".to_owned()),
        ) {
            Err(LaunchError::Failed(e)) => e,
            Err(LaunchError::PortInUse(e)) => panic!("not a port collision: {e}"),
            Ok(()) => panic!("`false` cannot get ready"),
        };
        let msg = err.to_string();
        assert!(msg.starts_with("etcd exited during startup"), "{msg}");
        assert!(msg.contains("/bin/false --flag"), "{msg}");
        assert!(cp.processes.is_empty());
    }

    #[test]
    fn apiserver_flags_depend_on_the_controller_manager() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut cp = KubeControlPlane {
            processes: Vec::new(),
            pki: pki::generate(tmp.path(), &[]).expect("pki"),
            dir: tmp.path().to_path_buf(),
            tempdir: None,
            etcd_port: 2379,
            apiserver_port: 0,
            controller_manager: false,
            apiserver_bind: None,
        };
        let args = cp.apiserver_args(6443);
        for want in [
            "--etcd-servers=http://127.0.0.1:2379",
            "--secure-port=6443",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://127.0.0.1:6443/",
            "--disable-admission-plugins=ServiceAccount",
        ] {
            assert!(args.iter().any(|a| a == want), "{want} missing in {args:?}");
        }
        cp.controller_manager = true;
        let args = cp.apiserver_args(6443);
        assert!(!args.iter().any(|a| a.contains("admission")), "{args:?}");
    }
}
