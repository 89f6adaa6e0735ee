//! [`FakeKubelet`]: plays the node of a [`KubeControlPlane`] (see its docs for what it runs
//! and how), and its [`PodNetwork`].

mod launch;
mod network;
mod node;
mod pod;
mod probe;
mod volumes;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use tempfile::TempDir;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use self::network::PodNetwork;
use crate::KubeControlPlane;
use crate::error::{Result, TestkitError};
use crate::nats::{new_tempdir, release_tempdir};

/// Default name of the node.
pub const DEFAULT_NODE_NAME: &str = "testkit-node";

/// A binary that stands in for a container image: its entrypoint (and default args, user and
/// env). See [`FakeKubeletBuilder::image`].
#[derive(Debug, Clone)]
pub struct Image {
    binary: PathBuf,
    path_in_image: Option<String>,
    args: Vec<String>,
    user: Option<(u32, u32)>,
    env: Vec<(String, String)>,
    in_place: bool,
}

impl Image {
    /// The image's entrypoint is `binary`. At start the kubelet "pulls" it: hard-links (or
    /// copies) it into its own dir (so a rebuild during the test does not change it), and
    /// bind-mounts it read-only into each container at `/usr/local/bin/<file name>` (see
    /// [`Self::path_in_image`]), whatever the container mounts over the host's paths.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            path_in_image: None,
            args: Vec::new(),
            user: None,
            env: Vec::new(),
            in_place: false,
        }
    }

    /// Where the entrypoint is inside the containers (default `/usr/local/bin/<file name>`).
    #[must_use]
    pub fn path_in_image(mut self, path: impl Into<String>) -> Self {
        self.path_in_image = Some(path.into());
        self
    }

    /// Run the binary from where it is on the host (the containers see the host's files
    /// under their own mounts) instead of a snapshot: for system binaries such as
    /// `/usr/bin/python3` that find their files relative to their own path.
    #[must_use]
    pub fn in_place(mut self) -> Self {
        self.in_place = true;
        self
    }

    /// The image's default arguments (`CMD`), used when the container has neither `command` nor
    /// `args`.
    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args = args.into_iter().map(Into::into).collect();
        self
    }

    /// The image's `USER` (uid, gid), used when the pod does not say `runAsUser`/`runAsGroup`
    /// (default root). Distroless `nonroot` images are 65532:65532.
    #[must_use]
    pub fn user(mut self, uid: u32, gid: u32) -> Self {
        self.user = Some((uid, gid));
        self
    }

    /// An `ENV` of the image.
    #[must_use]
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }
}

/// An [`Image`] after the pull.
#[derive(Debug, Clone)]
pub(crate) struct ResolvedImage {
    /// The entrypoint as the container sees it.
    pub(crate) binary: PathBuf,
    /// The snapshot to bind-mount at `binary` (none for in-place images).
    pub(crate) snapshot: Option<PathBuf>,
    pub(crate) args: Vec<String>,
    pub(crate) user: Option<(u32, u32)>,
    pub(crate) env: Vec<(String, String)>,
}

/// `registry/repo:tag@digest` -> `registry/repo`.
fn repository(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    match no_digest.rfind(':') {
        Some(colon) if !no_digest[colon..].contains('/') => &no_digest[..colon],
        _ => no_digest,
    }
}

/// Whether an image reference matches a pattern of [`FakeKubeletBuilder::image`].
fn image_matches(pattern: &str, image: &str) -> bool {
    let repo = repository(image);
    image == pattern || repo == pattern || repo.ends_with(&format!("/{pattern}"))
}

/// Builder of [`FakeKubelet`]; see [`FakeKubelet::builder`].
#[derive(Debug, Clone)]
pub struct FakeKubeletBuilder {
    node_name: String,
    images: Vec<(String, Image)>,
    network: Option<PodNetwork>,
    backoff: (Duration, Duration),
    shutdown_grace: Duration,
    startup_timeout: Duration,
}

impl Default for FakeKubeletBuilder {
    fn default() -> Self {
        Self {
            node_name: DEFAULT_NODE_NAME.to_owned(),
            images: Vec::new(),
            network: None,
            backoff: (Duration::from_secs(10), Duration::from_secs(300)),
            shutdown_grace: Duration::from_secs(5),
            startup_timeout: Duration::from_secs(30),
        }
    }
}

impl FakeKubeletBuilder {
    /// The Node's name (default [`DEFAULT_NODE_NAME`]). An existing Node of that name is
    /// deleted and registered anew.
    #[must_use]
    pub fn node_name(mut self, name: impl Into<String>) -> Self {
        self.node_name = name.into();
        self
    }

    /// Containers whose image matches `pattern` run `image`. A pattern matches the whole
    /// reference (`registry.example/mailroom:1.0`), the repository (`registry.example/mailroom`)
    /// or its last path segments (`mailroom` matches `registry.example/team/mailroom:1.0`).
    /// The first matching mapping wins; a container without one waits in `ErrImagePull`.
    #[must_use]
    pub fn image(mut self, pattern: impl Into<String>, image: Image) -> Self {
        self.images.push((pattern.into(), image));
        self
    }

    /// Put pods on this network (default: a new [`PodNetwork`], removed with the kubelet).
    /// Create it first when servers must listen on its gateway before the kubelet starts.
    #[must_use]
    pub fn network(mut self, network: PodNetwork) -> Self {
        self.network = Some(network);
        self
    }

    /// Restart back-off: first delay and cap (the kubelet's 10 s and 5 min by default).
    #[must_use]
    pub fn restart_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff = (initial, max.max(initial));
        self
    }

    /// Longest grace period for containers when the kubelet itself stops (default 5 s).
    #[must_use]
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Starts the kubelet against `cp`: registers the Node, starts watching pods and returns
    /// once both work. Blocking (the kubelet runs on a thread and runtime of its own, so it
    /// keeps working while a test blocks on `kubectl`); fine to call from async tests.
    ///
    /// Pods reach the apiserver at the network's gateway on the apiserver's port, so build the
    /// control plane with [`crate::KubeControlPlaneBuilder::apiserver_bind`] of that gateway
    /// for pods that talk to it.
    ///
    /// # Errors
    /// Not root, a tool missing, an image binary not found, the network or Node could not be
    /// made.
    pub fn start(self, cp: &KubeControlPlane) -> Result<FakeKubelet> {
        FakeKubelet::start_with(self, cp)
    }
}

/// State shared by the kubelet's tasks.
pub(crate) struct Shared {
    pub(crate) client: Client,
    pub(crate) node_name: String,
    pub(crate) network: PodNetwork,
    pub(crate) pods_dir: PathBuf,
    images: Vec<(String, ResolvedImage)>,
    /// Host and port of the apiserver as pods reach it.
    pub(crate) apiserver: (String, u16),
    pub(crate) backoff: (Duration, Duration),
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) shutdown_grace: Duration,
    log_file: Mutex<Option<fs::File>>,
    started: Instant,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("node_name", &self.node_name)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn resolve_image(&self, image: &str) -> Option<ResolvedImage> {
        self.images
            .iter()
            .find(|(pattern, _)| image_matches(pattern, image))
            .map(|(_, i)| i.clone())
    }

    pub(crate) fn pod_dir(&self, pod: &Pod) -> PathBuf {
        self.pods_dir.join(pod::pod_dir_name(pod))
    }

    /// A core/v1 Event about a pod from the kubelet (`kubectl describe pod` shows it), sent in
    /// the background; failures are only logged.
    pub(crate) fn event(
        self: &Arc<Self>,
        pod: &k8s_openapi::api::core::v1::ObjectReference,
        warning: bool,
        reason: &str,
        message: String,
    ) {
        use k8s_openapi::api::core::v1::{Event, EventSource};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
        let ns = pod
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", pod.name.as_deref().unwrap_or("pod"))),
                namespace: Some(ns.clone()),
                ..ObjectMeta::default()
            },
            involved_object: pod.clone(),
            reason: Some(reason.to_owned()),
            message: Some(message),
            type_: Some(if warning { "Warning" } else { "Normal" }.to_owned()),
            source: Some(EventSource {
                component: Some("kubelet".to_owned()),
                host: Some(self.node_name.clone()),
            }),
            reporting_component: Some("kubelet".to_owned()),
            reporting_instance: Some(self.node_name.clone()),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Event::default()
        };
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            let api: Api<Event> = Api::namespaced(shared.client.clone(), &ns);
            if let Err(e) = api.create(&kube::api::PostParams::default(), &event).await {
                shared.log(&format!("cannot record event: {e}"));
            }
        });
    }

    /// One line to `<dir>/kubelet.log` and stderr.
    pub(crate) fn log(&self, line: &str) {
        let line = format!(
            "fake-kubelet [{:7.2}s] {line}",
            self.started.elapsed().as_secs_f64()
        );
        eprintln!("{line}");
        let mut file = self.log_file.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = file.as_mut() {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// The test harness that plays the node of a [`KubeControlPlane`]. There is no real kubelet or
/// scheduler in the tests; this registers a Node (Ready, with a heartbeat), binds the pods
/// nobody scheduled to it, and runs each pod's containers as local processes exactly as the pod
/// spec says, so that Deployments, ReplicaSets, readiness and rollouts behave as in a cluster.
///
/// Per pod:
/// * **Network:** a network namespace with `eth0` on the [`PodNetwork`] bridge (pod IP
///   `10.244.<N>.<M>`, default route via the bridge address, where the host's services are).
/// * **Volumes:** `configMap`, `secret`, `emptyDir`, `downwardAPI`, `projected` (service-account
///   token from a TokenRequest bound to the pod, `kube-root-ca.crt`, namespace) and `hostPath`
///   written under the pod dir with `items`, `defaultMode` and `fsGroup` ownership, and
///   bind-mounted at each container's `mountPath` (honouring `readOnly` and `subPath`) in a
///   mount namespace of the container's own, whose `/` is a copy-on-write overlay of the host's
///   (mount points are created there and nothing the container writes reaches the host);
///   `readOnlyRootFilesystem` makes it read-only. A kubelet-style `/etc/hosts`, `/etc/hostname`
///   and `/etc/resolv.conf` (nameserver: the bridge address) are mounted too.
/// * **Process:** `command`/`args` (else the image's entrypoint, see [`Image`]) with `$(VAR)`
///   expansion, `env`/`envFrom` (values, `fieldRef`, `resourceFieldRef`, ConfigMap and Secret
///   keys), `KUBERNETES_SERVICE_HOST/PORT` pointing at the apiserver on the bridge address,
///   `workingDir`, `runAsUser`/`runAsGroup`/`fsGroup`/`supplementalGroups` through `setpriv`
///   (so file permissions matter as in a cluster), `allowPrivilegeEscalation: false` as
///   no-new-privs, the hostname set to the pod name. Stdout and stderr go to
///   `<pod dir>/logs/<container>.log` ([`FakeKubelet::logs`]).
/// * **Lifecycle:** `restartPolicy` with the kubelet's exponential back-off
///   (`CrashLoopBackOff`), startup/readiness/liveness probes (`httpGet` from the host to the pod
///   IP, `tcpSocket`, `exec`), status (phase, pod IP, container states, restart counts,
///   conditions `Ready`/`ContainersReady` earned from the readiness probe) written through
///   `pods/status`, and Events (`Started`, `Killing`, `Unhealthy`, `BackOff`, `Failed`,
///   `FailedMount`). A deleted pod's process group gets SIGTERM, SIGKILL after its grace
///   period, then the pod is finalised (deleted with grace 0).
///
/// Not supported (the pod stays waiting with a message saying so): init containers, images
/// without a mapping (`ErrImagePull`), volume types other than the above. Not modelled:
/// resource limits, seccomp, capabilities beyond dropping them (`NET_BIND_SERVICE` is honoured
/// by allowing low ports in the pod's network namespace), Services (there is no kube-proxy:
/// reach pods on their IP), `hostNetwork`/`hostPID` (every pod gets its own network namespace),
/// `nodeSelector`/affinity/taints (every pod is bound to this node), live updates of
/// ConfigMap/Secret volumes, `kubectl logs`/`exec`/`port-forward`.
///
/// Needs root (namespaces, bridge, mounts, `setpriv`) and `ip`, `nsenter`, `unshare`,
/// `setpriv`, `mount` (iproute2, util-linux). Only processes it started are signalled. On drop
/// every pod is stopped (SIGTERM, then SIGKILL after the shorter of its grace period and
/// [`FakeKubeletBuilder::shutdown_grace`]), the namespaces and veths are removed (the bridge
/// when the last handle of its [`PodNetwork`] goes), and its dir is deleted unless
/// `MAILROOM_TESTKIT_KEEP=1`. The Node and the pods stay in the API.
///
/// ```no_run
/// # fn demo() -> Result<(), mailroom_testkit::TestkitError> {
/// use mailroom_testkit::{FakeKubelet, Image, KubeControlPlane, PodNetwork};
///
/// let network = PodNetwork::create()?;
/// let cp = KubeControlPlane::builder()
///     .controller_manager(true)
///     .apiserver_bind(network.gateway())
///     .start()?;
/// let kubelet = FakeKubelet::builder()
///     .network(network)
///     .image("mailroom", Image::new("target/debug/mailroom").user(65532, 65532))
///     .start(&cp)?;
/// cp.kubectl_ok(&["create", "deployment", "x", "--image=registry.example/mailroom:1"])?;
/// // ... later: what the container wrote
/// let pod = "x-...";
/// let text = kubelet.logs("default", pod, "mailroom");
/// # let _ = text;
/// # Ok(())
/// # }
/// ```
pub struct FakeKubelet {
    node_name: String,
    network: PodNetwork,
    dir: PathBuf,
    tempdir: Option<TempDir>,
    shutdown: Option<watch::Sender<bool>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl fmt::Debug for FakeKubelet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeKubelet")
            .field("node_name", &self.node_name)
            .field("network", &self.network.cidr())
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl FakeKubelet {
    /// A builder: images, network, node name, back-off.
    pub fn builder() -> FakeKubeletBuilder {
        FakeKubeletBuilder::default()
    }

    fn start_with(opts: FakeKubeletBuilder, cp: &KubeControlPlane) -> Result<Self> {
        network::require_root("FakeKubelet")?;
        for tool in ["ip", "nsenter", "unshare", "setpriv", "mount"] {
            if !["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
                .iter()
                .any(|d| Path::new(d).join(tool).exists())
            {
                return Err(TestkitError::InvalidOption(format!(
                    "FakeKubelet needs `{tool}` (iproute2 / util-linux) in /usr/bin or /usr/sbin"
                )));
            }
        }
        let network = match opts.network {
            Some(n) => n,
            None => PodNetwork::create()?,
        };
        let tempdir = new_tempdir("mailroom-kubelet-")?;
        let dir = tempdir.path().to_path_buf();
        let io_err = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| TestkitError::Io { what, path, source }
        };
        // Traversable (not listable) by the pods' users, for the image snapshots.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o711))
            .map_err(io_err("cannot chmod", &dir))?;
        let pods_dir = dir.join("pods");
        fs::create_dir_all(&pods_dir).map_err(io_err("cannot create", &pods_dir))?;
        let images = pull_images(&dir, &opts.images)?;
        let apiserver = (network.gateway().to_string(), cp.apiserver_port());
        if cp
            .apiserver_bind_address()
            .is_none_or(|ip| ip != network.gateway())
        {
            eprintln!(
                "mailroom-testkit: FakeKubelet: the apiserver does not listen on {} (use \
                 KubeControlPlaneBuilder::apiserver_bind): pods cannot reach it",
                network.gateway()
            );
        }
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("kubelet.log"))
            .ok();
        let kubeconfig = cp.kubeconfig_path();
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let node_name = opts.node_name.clone();
        let thread_network = network.clone();
        let backoff = opts.backoff;
        let shutdown_grace = opts.shutdown_grace;
        let thread = thread::Builder::new()
            .name("fake-kubelet".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(source) => {
                        let _ = ready_tx.send(Err(TestkitError::Io {
                            what: "cannot start the FakeKubelet runtime for",
                            path: kubeconfig,
                            source,
                        }));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let client = match client_from(&kubeconfig).await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let shared = Arc::new(Shared {
                        client,
                        node_name,
                        network: thread_network,
                        pods_dir,
                        images,
                        apiserver,
                        backoff,
                        shutdown: shutdown_rx,
                        shutdown_grace,
                        log_file: Mutex::new(log_file),
                        started: Instant::now(),
                    });
                    main_loop(shared, ready_tx).await;
                });
                // Pod tasks still sleeping in back-off are dropped here; their children are
                // killed on drop (kill_on_drop).
                runtime.shutdown_timeout(Duration::from_secs(5));
            })
            .map_err(io_err("cannot spawn the FakeKubelet thread for", &dir))?;
        let mut kubelet = Self {
            node_name: opts.node_name,
            network,
            dir,
            tempdir: Some(tempdir),
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(opts.startup_timeout) {
            Ok(Ok(())) => {
                eprintln!(
                    "mailroom-testkit: FakeKubelet node {} ready on {} (dir {})",
                    kubelet.node_name,
                    kubelet.network.cidr(),
                    kubelet.dir.display()
                );
                Ok(kubelet)
            }
            Ok(Err(e)) => {
                kubelet.stop();
                Err(e)
            }
            Err(_) => {
                kubelet.stop();
                Err(TestkitError::InvalidOption(format!(
                    "FakeKubelet not ready after {:?} (see {})",
                    opts.startup_timeout,
                    kubelet.dir.join("kubelet.log").display()
                )))
            }
        }
    }

    /// The Node's name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The pod network (bridge, gateway address).
    pub fn network(&self) -> &PodNetwork {
        &self.network
    }

    /// The kubelet's dir: `kubelet.log`, `images/`, `pods/<namespace>_<name>_<uid>/`
    /// (`logs/<container>.log`, `volumes/`, `run/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The dir of the newest pod `namespace/name` (kept after the pod is gone, with its logs,
    /// until the kubelet is dropped).
    pub fn pod_dir(&self, namespace: &str, name: &str) -> Option<PathBuf> {
        pod::find_pod_dir(&self.dir.join("pods"), namespace, name)
    }

    /// The log file of a container of pod `namespace/name`: every run of it, each after a
    /// `--- mailroom-testkit: starting ...` line.
    pub fn log_path(&self, namespace: &str, pod: &str, container: &str) -> Option<PathBuf> {
        self.pod_dir(namespace, pod)
            .map(|d| d.join("logs").join(format!("{container}.log")))
    }

    /// What the container wrote to stdout and stderr so far (empty if nothing or no such pod).
    pub fn logs(&self, namespace: &str, pod: &str, container: &str) -> String {
        self.log_path(namespace, pod, container)
            .and_then(|p| fs::read(p).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Every container log of every pod the kubelet ran in `namespace` whose name starts with
    /// `prefix`, concatenated with headers (for failure messages).
    pub fn all_logs(&self, namespace: &str, prefix: &str) -> String {
        let mut out = String::new();
        let Ok(entries) = fs::read_dir(self.dir.join("pods")) else {
            return out;
        };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(std::result::Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{namespace}_{prefix}"))
            })
            .map(|e| e.path())
            .collect();
        dirs.sort();
        for dir in dirs {
            let Ok(logs) = fs::read_dir(dir.join("logs")) else {
                continue;
            };
            for log in logs
                .filter_map(std::result::Result::ok)
                .filter(|l| l.path().extension().is_some_and(|e| e == "log"))
            {
                let text = fs::read(log.path()).unwrap_or_default();
                out.push_str(&format!(
                    "===== {}/{}\n{}\n",
                    dir.file_name().unwrap_or_default().to_string_lossy(),
                    log.file_name().to_string_lossy(),
                    String::from_utf8_lossy(&text)
                ));
            }
        }
        out
    }

    /// Stops every pod and the kubelet (see the type docs). Idempotent; drop calls it.
    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = self.tempdir.take() {
            release_tempdir(dir);
        }
    }
}

async fn client_from(kubeconfig: &Path) -> Result<Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let err = |source| TestkitError::Kubeconfig {
        path: kubeconfig.to_path_buf(),
        source,
    };
    let config = kube::config::Kubeconfig::read_from(kubeconfig).map_err(err)?;
    let config =
        kube::Config::from_custom_kubeconfig(config, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(err)?;
    let server = config.cluster_url.to_string();
    Client::try_from(config).map_err(|source| TestkitError::KubeClient { server, source })
}

/// "Pulls" the images: hard-links (or copies) each binary into `<dir>/images/<n>/`.
fn pull_images(dir: &Path, images: &[(String, Image)]) -> Result<Vec<(String, ResolvedImage)>> {
    let mut out = Vec::new();
    for (n, (pattern, image)) in images.iter().enumerate() {
        let source = &image.binary;
        if !source.is_file() {
            return Err(TestkitError::InvalidOption(format!(
                "image {pattern:?}: binary {} does not exist",
                source.display()
            )));
        }
        let snapshot = if image.in_place {
            None
        } else {
            let image_dir = dir.join("images").join(n.to_string());
            fs::create_dir_all(&image_dir).map_err(|e| TestkitError::Io {
                what: "cannot create",
                path: image_dir.clone(),
                source: e,
            })?;
            for d in [dir.join("images"), image_dir.clone()] {
                let _ = fs::set_permissions(&d, fs::Permissions::from_mode(0o755));
            }
            let name = source.file_name().unwrap_or_default();
            let target = image_dir.join(name);
            if fs::hard_link(source, &target).is_err() {
                fs::copy(source, &target).map_err(|e| TestkitError::Io {
                    what: "cannot copy the image binary to",
                    path: target.clone(),
                    source: e,
                })?;
            }
            // The pods' users must be able to run it (a hard link shares the mode).
            let mode = fs::metadata(&target).map_or(0o755, |m| m.permissions().mode());
            if mode & 0o005 != 0o005 {
                let _ = fs::set_permissions(&target, fs::Permissions::from_mode(mode | 0o555));
            }
            Some(target)
        };
        let binary = match (&snapshot, &image.path_in_image) {
            (None, _) => source.clone(),
            (Some(_), Some(path)) => PathBuf::from(path),
            (Some(_), None) => {
                Path::new("/usr/local/bin").join(source.file_name().unwrap_or_default())
            }
        };
        out.push((
            pattern.clone(),
            ResolvedImage {
                binary,
                snapshot,
                args: image.args.clone(),
                user: image.user,
                env: image.env.clone(),
            },
        ));
    }
    Ok(out)
}

/// Watches pods: binds the unscheduled ones, runs ours, tells each pod task what changed.
async fn main_loop(shared: Arc<Shared>, ready: mpsc::Sender<Result<()>>) {
    let node = shared.node_name.clone();
    let gateway = shared.network.gateway().to_string();
    let since = match node::register(&shared.client, &node, &gateway, &shared.network.cidr()).await
    {
        Ok(since) => since,
        Err(source) => {
            let _ = ready.send(Err(TestkitError::KubeClient {
                server: "the apiserver (registering the Node)".to_owned(),
                source,
            }));
            return;
        }
    };
    if let Err(source) = node::heartbeat(&shared.client, &node, &since).await {
        let _ = ready.send(Err(TestkitError::KubeClient {
            server: "the apiserver (node Lease)".to_owned(),
            source,
        }));
        return;
    }
    shared.log(&format!("node {node} registered"));
    let mut shutdown = shared.shutdown.clone();
    let heartbeat = {
        let shared = Arc::clone(&shared);
        let mut shutdown = shared.shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(node::HEARTBEAT) => {}
                    _ = shutdown.changed() => return,
                }
                if let Err(e) = node::heartbeat(&shared.client, &shared.node_name, &since).await {
                    shared.log(&format!("heartbeat failed: {e}"));
                }
            }
        })
    };
    let api: Api<Pod> = Api::all(shared.client.clone());
    let stream = watcher(api, watcher::Config::default());
    futures_util::pin_mut!(stream);
    let mut ready = Some(ready);
    let mut pods: HashMap<String, watch::Sender<Option<Pod>>> = HashMap::new();
    let mut finished: HashSet<String> = HashSet::new();
    let mut binding: HashSet<String> = HashSet::new();
    let mut seen_in_init: HashSet<String> = HashSet::new();
    let mut tasks: JoinSet<String> = JoinSet::new();
    let (bound_tx, mut bound_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    loop {
        let event = tokio::select! {
            _ = shutdown.changed() => break,
            Some(Ok(uid)) = tasks.join_next(), if !tasks.is_empty() => {
                pods.remove(&uid);
                finished.insert(uid);
                continue;
            }
            Some(uid) = bound_rx.recv() => {
                binding.remove(&uid);
                continue;
            }
            event = stream.next() => event,
        };
        let event = match event {
            Some(Ok(event)) => event,
            Some(Err(e)) => {
                shared.log(&format!("pod watch error: {e}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            None => break,
        };
        let (pod, deleted) = match event {
            watcher::Event::Init => {
                seen_in_init.clear();
                continue;
            }
            watcher::Event::InitDone => {
                // Pods we run that were not listed are gone.
                let gone: Vec<String> = pods
                    .keys()
                    .filter(|uid| !seen_in_init.contains(*uid))
                    .cloned()
                    .collect();
                for uid in gone {
                    if let Some(tx) = pods.get(&uid) {
                        let _ = tx.send(None);
                    }
                }
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Ok(()));
                }
                continue;
            }
            watcher::Event::InitApply(pod) => {
                if let Some(uid) = pod.uid() {
                    seen_in_init.insert(uid);
                }
                (pod, false)
            }
            watcher::Event::Apply(pod) => (pod, false),
            watcher::Event::Delete(pod) => (pod, true),
        };
        let Some(uid) = pod.uid() else {
            continue;
        };
        if finished.contains(&uid) {
            continue;
        }
        if deleted {
            if let Some(tx) = pods.get(&uid) {
                let _ = tx.send(None);
            }
            continue;
        }
        let spec = pod.spec.as_ref();
        let node_name = spec.and_then(|s| s.node_name.clone()).unwrap_or_default();
        if node_name.is_empty() {
            let scheduler = spec
                .and_then(|s| s.scheduler_name.clone())
                .unwrap_or_default();
            let terminal = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|p| p == "Succeeded" || p == "Failed");
            if pod.metadata.deletion_timestamp.is_none()
                && (scheduler.is_empty() || scheduler == "default-scheduler")
                && !terminal
                && binding.insert(uid.clone())
            {
                let shared = Arc::clone(&shared);
                let bound_tx = bound_tx.clone();
                tokio::spawn(async move {
                    match node::bind(&shared.client, &pod, &shared.node_name).await {
                        Ok(()) => shared.log(&format!(
                            "bound pod {}/{}",
                            pod.namespace().unwrap_or_default(),
                            pod.name_any()
                        )),
                        Err(e) => shared.log(&format!(
                            "cannot bind pod {}/{}: {e}",
                            pod.namespace().unwrap_or_default(),
                            pod.name_any()
                        )),
                    }
                    let _ = bound_tx.send(uid);
                });
            }
            continue;
        }
        if node_name != shared.node_name {
            continue;
        }
        if let Some(tx) = pods.get(&uid) {
            let _ = tx.send(Some(pod));
            continue;
        }
        let terminal = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed");
        if terminal && pod.metadata.deletion_timestamp.is_none() {
            // Finished before (an earlier kubelet): nothing to run.
            continue;
        }
        let (tx, rx) = watch::channel(Some(pod));
        pods.insert(uid.clone(), tx);
        let shared = Arc::clone(&shared);
        tasks.spawn(async move {
            pod::run_pod(shared, rx).await;
            uid
        });
    }
    // Shutdown: every pod task sees the shutdown signal and stops its containers.
    heartbeat.abort();
    let deadline = shared.shutdown_grace + Duration::from_secs(10);
    if tokio::time::timeout(deadline, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        shared.log("pods still stopping after the shutdown grace; killing them");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    drop(pods);
    shared.log("stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_patterns() {
        assert_eq!(
            repository("registry.example/mailroom:0.1.0"),
            "registry.example/mailroom"
        );
        assert_eq!(
            repository("localhost:5000/mailroom"),
            "localhost:5000/mailroom"
        );
        assert_eq!(repository("mailroom@sha256:abc"), "mailroom");
        assert!(image_matches("mailroom", "registry.example/mailroom:0.1.0"));
        assert!(image_matches("mailroom", "mailroom"));
        assert!(!image_matches("mailroom", "registry.example/mailroom-x:1"));
        assert!(image_matches(
            "registry.example/mailroom:0.1.0",
            "registry.example/mailroom:0.1.0"
        ));
        assert!(!image_matches("rspamd", "registry.example/mailroom:0.1.0"));
    }
}
