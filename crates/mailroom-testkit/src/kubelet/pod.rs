//! One pod on the fake node: its sandbox (network namespace, volumes), one supervisor task per
//! container (start, probes, restarts with back-off, stop), and the pod status written back
//! through `pods/status` whenever something changes.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, EnvVar, ObjectReference, Pod, PodCondition, PodIP,
    PodStatus, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use rustix::process::{Pid, Signal, kill_process_group};
use tokio::process::{Child, Command};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use super::launch::{self, BindMount, Identity, LaunchSpec};
use super::network::PodNetns;
use super::probe::{self, Target, Timing};
use super::volumes::{self, Materialised, PodFacts, VolumeError};
use super::{ResolvedImage, Shared};

/// How often a pod whose volumes cannot be set up yet retries (the kubelet's `FailedMount`).
const VOLUME_RETRY: Duration = Duration::from_secs(1);
/// A container that ran this long before exiting restarts without back-off.
const BACKOFF_RESET: Duration = Duration::from_secs(60);
/// Path of the default `PATH` (distroless and Debian images).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn now() -> Time {
    Time(Timestamp::now())
}

/// The end of one run of a container.
#[derive(Debug, Clone)]
struct Terminated {
    exit_code: i32,
    signal: Option<i32>,
    reason: String,
    message: Option<String>,
    started_at: Time,
    finished_at: Time,
    container_id: String,
}

impl Terminated {
    fn to_api(&self) -> ContainerStateTerminated {
        ContainerStateTerminated {
            exit_code: self.exit_code,
            signal: self.signal,
            reason: Some(self.reason.clone()),
            message: self.message.clone(),
            started_at: Some(self.started_at.clone()),
            finished_at: Some(self.finished_at.clone()),
            container_id: Some(self.container_id.clone()),
        }
    }
}

#[derive(Debug, Clone)]
enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Time,
    },
    Terminated(Terminated),
}

/// What the pod status says about one container.
#[derive(Debug, Clone)]
struct CState {
    name: String,
    image: String,
    image_id: String,
    state: State,
    last: Option<Terminated>,
    ready: bool,
    started: bool,
    restart_count: i32,
    container_id: Option<String>,
    /// Set while its process runs (for exec probes).
    pid: Option<u32>,
    /// Will not run again (restartPolicy).
    finished: bool,
}

impl CState {
    fn to_api(&self) -> ContainerStatus {
        let state = match &self.state {
            State::Waiting { reason, message } => ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: message.clone(),
                }),
                ..ContainerState::default()
            },
            State::Running { started_at } => ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(started_at.clone()),
                }),
                ..ContainerState::default()
            },
            State::Terminated(t) => ContainerState {
                terminated: Some(t.to_api()),
                ..ContainerState::default()
            },
        };
        ContainerStatus {
            name: self.name.clone(),
            image: self.image.clone(),
            image_id: self.image_id.clone(),
            container_id: self.container_id.clone(),
            ready: self.ready,
            started: Some(self.started),
            restart_count: self.restart_count,
            state: Some(state),
            last_state: Some(
                self.last
                    .as_ref()
                    .map_or_else(ContainerState::default, |t| ContainerState {
                        terminated: Some(t.to_api()),
                        ..ContainerState::default()
                    }),
            ),
            ..ContainerStatus::default()
        }
    }
}

/// The containers' states, shared by their supervisors and the pod task.
#[derive(Debug, Default)]
struct Board {
    containers: Mutex<Vec<CState>>,
    changed: Notify,
}

impl Board {
    fn update(&self, index: usize, f: impl FnOnce(&mut CState)) {
        {
            let mut all = self
                .containers
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(c) = all.get_mut(index) {
                f(c);
            }
        }
        self.changed.notify_one();
    }

    fn get(&self, index: usize) -> Option<CState> {
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(index)
            .cloned()
    }

    fn snapshot(&self) -> Vec<CState> {
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The pod's identity and where its files are.
#[derive(Debug, Clone)]
struct PodInfo {
    namespace: String,
    name: String,
    uid: String,
    dir: PathBuf,
}

impl PodInfo {
    fn describe(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The pod as an Event's `involvedObject`.
    fn reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Pod".to_owned()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.name.clone()),
            uid: Some(self.uid.clone()),
            ..ObjectReference::default()
        }
    }
}

/// Runs one pod until it is deleted (then finalises it) or the kubelet shuts down.
pub(crate) async fn run_pod(shared: Arc<Shared>, mut pod_rx: watch::Receiver<Option<Pod>>) {
    let Some(pod) = pod_rx.borrow_and_update().clone() else {
        return;
    };
    let info = PodInfo {
        namespace: pod.namespace().unwrap_or_else(|| "default".to_owned()),
        name: pod.name_any(),
        uid: pod.uid().unwrap_or_default(),
        dir: shared.pod_dir(&pod),
    };
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &info.namespace);
    if pod.metadata.deletion_timestamp.is_some() {
        finalize(&api, &info).await;
        return;
    }
    let mut worker = PodWorker::new(Arc::clone(&shared), info.clone(), &pod);
    let outcome = worker.run(&mut pod_rx, pod).await;
    worker.teardown().await;
    if outcome == Outcome::Deleted {
        finalize(&api, &info).await;
    }
    shared.log(&format!("pod {} done ({outcome:?})", info.describe()));
}

/// Deletes the pod with grace 0 (the kubelet's last word), if it is still the same pod.
async fn finalize(api: &Api<Pod>, info: &PodInfo) {
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(info.uid.clone()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    let _ = api.delete(&info.name, &dp).await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Deleted through the API (graceful): finalise.
    Deleted,
    /// Gone from the API, or the kubelet stops: just clean up.
    Gone,
}

struct PodWorker {
    shared: Arc<Shared>,
    info: PodInfo,
    api: Api<Pod>,
    board: Arc<Board>,
    netns: Option<PodNetns>,
    pod_ip: Option<IpAddr>,
    start_time: Time,
    /// Our conditions with their last transition time.
    conditions: BTreeMap<String, (String, Time)>,
    sandbox_ready: bool,
    last_sent: Option<serde_json::Value>,
    supervisors: JoinSet<()>,
    /// `Some(grace)`: stop the containers.
    stop_tx: watch::Sender<Option<Duration>>,
}

impl PodWorker {
    fn new(shared: Arc<Shared>, info: PodInfo, pod: &Pod) -> Self {
        let api = Api::namespaced(shared.client.clone(), &info.namespace);
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default();
        let board = Arc::new(Board::default());
        *board
            .containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = containers
            .iter()
            .map(|c| CState {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                image_id: String::new(),
                state: State::Waiting {
                    reason: "ContainerCreating".to_owned(),
                    message: None,
                },
                last: None,
                ready: false,
                started: false,
                restart_count: 0,
                container_id: None,
                pid: None,
                finished: false,
            })
            .collect();
        let (stop_tx, _) = watch::channel(None);
        Self {
            shared,
            info,
            api,
            board,
            netns: None,
            pod_ip: None,
            start_time: now(),
            conditions: BTreeMap::new(),
            sandbox_ready: false,
            last_sent: None,
            supervisors: JoinSet::new(),
            stop_tx,
        }
    }

    fn set_all_waiting(&self, reason: &str, message: &str) {
        let n = self.board.snapshot().len();
        for i in 0..n {
            self.board.update(i, |c| {
                c.state = State::Waiting {
                    reason: reason.to_owned(),
                    message: Some(message.to_owned()),
                };
            });
        }
    }

    async fn run(&mut self, pod_rx: &mut watch::Receiver<Option<Pod>>, mut pod: Pod) -> Outcome {
        let mut shutdown = self.shared.shutdown.clone();
        // Sandbox: dirs and network namespace.
        let setup = self.setup_sandbox(&pod).await;
        if let Err(message) = &setup {
            self.shared
                .log(&format!("pod {}: {message}", self.info.describe()));
            self.set_all_waiting("ContainerCreating", message);
        }
        self.push_status(&pod).await;
        // Volumes (retried until they work, as the kubelet does).
        let mut volumes = None;
        let mut last_mount_error: Option<String> = None;
        if setup.is_ok() {
            loop {
                let facts = self.facts(&pod);
                match volumes::materialise_all(
                    &self.shared.client,
                    &pod,
                    &facts,
                    &self.info.dir.join("volumes"),
                )
                .await
                {
                    Ok(v) => {
                        volumes = Some(v);
                        break;
                    }
                    Err(VolumeError::Retry(m)) => {
                        if last_mount_error.as_deref() != Some(m.as_str()) {
                            self.shared.event(
                                &self.info.reference(),
                                true,
                                "FailedMount",
                                format!("MountVolume.SetUp failed: {m}"),
                            );
                            last_mount_error = Some(m.clone());
                        }
                        self.set_all_waiting("ContainerCreating", &format!("FailedMount: {m}"));
                    }
                    Err(VolumeError::Fatal(m)) => {
                        self.set_all_waiting("CreateContainerConfigError", &m);
                        self.shared
                            .log(&format!("pod {}: volumes: {m}", self.info.describe()));
                        break;
                    }
                }
                self.push_status(&pod).await;
                tokio::select! {
                    () = tokio::time::sleep(VOLUME_RETRY) => {}
                    changed = pod_rx.changed() => {
                        match (changed, pod_rx.borrow_and_update().clone()) {
                            (Ok(()), Some(p)) if p.metadata.deletion_timestamp.is_none() => pod = p,
                            (Ok(()), Some(_)) => return Outcome::Deleted,
                            _ => return Outcome::Gone,
                        }
                    }
                    _ = shutdown.changed() => return Outcome::Gone,
                }
            }
        }
        if let Some(volumes) = volumes {
            self.start_containers(&pod, &volumes).await;
        }
        self.push_status(&pod).await;
        let board = Arc::clone(&self.board);
        loop {
            tokio::select! {
                () = board.changed.notified() => self.push_status(&pod).await,
                changed = pod_rx.changed() => {
                    let next = pod_rx.borrow_and_update().clone();
                    match (changed, next) {
                        (Ok(()), Some(p)) => {
                            if p.metadata.deletion_timestamp.is_some() {
                                let grace = p
                                    .metadata
                                    .deletion_grace_period_seconds
                                    .or_else(|| p.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
                                    .unwrap_or(30);
                                let grace = Duration::from_secs(u64::try_from(grace.max(0)).unwrap_or(0));
                                self.stop_containers(grace).await;
                                return Outcome::Deleted;
                            }
                            pod = p;
                        }
                        _ => {
                            self.stop_containers(Duration::from_secs(2)).await;
                            return Outcome::Gone;
                        }
                    }
                }
                _ = shutdown.changed() => {
                    let grace = pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.termination_grace_period_seconds)
                        .map_or(self.shared.shutdown_grace, |g| {
                            Duration::from_secs(u64::try_from(g.max(0)).unwrap_or(0))
                                .min(self.shared.shutdown_grace)
                        });
                    self.stop_containers(grace).await;
                    return Outcome::Gone;
                }
            }
        }
    }

    async fn setup_sandbox(&mut self, pod: &Pod) -> Result<(), String> {
        for sub in ["volumes", "logs", "run", "etc"] {
            let d = self.info.dir.join(sub);
            fs::create_dir_all(&d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        }
        let network = self.shared.network.clone();
        let netns = tokio::task::spawn_blocking(move || PodNetns::create(&network))
            .await
            .map_err(|e| format!("network setup panicked: {e}"))?
            .map_err(|e| format!("network setup failed: {e}"))?;
        self.pod_ip = Some(IpAddr::V4(netns.ip));
        self.write_etc_files(pod, &netns.ip.to_string())?;
        self.netns = Some(netns);
        self.sandbox_ready = true;
        self.shared.log(&format!(
            "pod {} sandbox ready, IP {}",
            self.info.describe(),
            self.pod_ip.map(|i| i.to_string()).unwrap_or_default()
        ));
        Ok(())
    }

    /// The kubelet-managed `/etc/hosts`, `/etc/hostname` and `/etc/resolv.conf` of the pod.
    /// DNS (`dnsPolicy: ClusterFirst`, the default) points at the bridge address, where no DNS
    /// server listens unless a test puts one there: lookups fail at once instead of timing out
    /// against the host's nameservers, which pods cannot reach. `Default` copies the host's
    /// file, `None` uses only `dnsConfig`.
    fn write_etc_files(&self, pod: &Pod, pod_ip: &str) -> Result<(), String> {
        let etc = self.info.dir.join("etc");
        let name = &self.info.name;
        let write = |file: &str, text: String| {
            let path = etc.join(file);
            fs::write(&path, text)
                .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o644)))
                .map_err(|e| format!("cannot write {}: {e}", path.display()))
        };
        write(
            "hosts",
            format!(
                "# Kubernetes-managed hosts file (mailroom-testkit FakeKubelet).\n\
                 127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
                 {pod_ip}\t{name}\n"
            ),
        )?;
        write("hostname", format!("{name}\n"))?;
        let spec = pod.spec.as_ref();
        let policy = spec
            .and_then(|s| s.dns_policy.as_deref())
            .unwrap_or("ClusterFirst");
        let mut resolv = match policy {
            "Default" => fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            "None" => String::new(),
            _ => format!(
                "search {ns}.svc.cluster.local svc.cluster.local cluster.local\n\
                 nameserver {}\noptions ndots:5\n",
                self.shared.network.gateway(),
                ns = self.info.namespace
            ),
        };
        if let Some(config) = spec.and_then(|s| s.dns_config.as_ref()) {
            for ns in config.nameservers.iter().flatten() {
                resolv.push_str(&format!("nameserver {ns}\n"));
            }
            if let Some(searches) = config.searches.as_ref().filter(|s| !s.is_empty()) {
                resolv.push_str(&format!("search {}\n", searches.join(" ")));
            }
            for option in config.options.iter().flatten() {
                let name = option.name.clone().unwrap_or_default();
                match &option.value {
                    Some(v) => resolv.push_str(&format!("options {name}:{v}\n")),
                    None => resolv.push_str(&format!("options {name}\n")),
                }
            }
        }
        write("resolv.conf", resolv)
    }

    fn facts(&self, pod: &Pod) -> PodFacts {
        PodFacts {
            pod_ip: self.pod_ip.map(|i| i.to_string()).unwrap_or_default(),
            host_ip: self.shared.network.gateway().to_string(),
            node_name: pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_else(|| self.shared.node_name.clone()),
        }
    }

    async fn start_containers(&mut self, pod: &Pod, volumes: &BTreeMap<String, Materialised>) {
        let Some(spec) = pod.spec.as_ref() else {
            return;
        };
        if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
            self.set_all_waiting(
                "CreateContainerConfigError",
                "init containers are not supported by FakeKubelet",
            );
            return;
        }
        let Some(netns) = &self.netns else {
            return;
        };
        let facts = self.facts(pod);
        for (index, container) in spec.containers.iter().enumerate() {
            let prepared = self
                .prepare_container(pod, container, volumes, &facts, netns)
                .await;
            match prepared {
                Ok((launch, image)) => {
                    self.board.update(index, |c| {
                        c.image_id = format!("testkit://{}", image.binary.display());
                    });
                    let supervisor = Supervisor {
                        shared: Arc::clone(&self.shared),
                        board: Arc::clone(&self.board),
                        index,
                        container: container.clone(),
                        launch,
                        pod_ip: self.pod_ip.unwrap_or(self.shared.network.gateway()),
                        log: self
                            .info
                            .dir
                            .join("logs")
                            .join(format!("{}.log", container.name)),
                        restart_policy: spec
                            .restart_policy
                            .clone()
                            .unwrap_or_else(|| "Always".to_owned()),
                        grace: Duration::from_secs(
                            u64::try_from(
                                spec.termination_grace_period_seconds.unwrap_or(30).max(0),
                            )
                            .unwrap_or(30),
                        ),
                        id_prefix: format!("{}-{}", self.info.uid, container.name),
                        stop_rx: self.stop_tx.subscribe(),
                        describe: format!("{}/{}", self.info.describe(), container.name),
                        pod_ref: self.info.reference(),
                    };
                    self.supervisors.spawn(supervisor.run());
                }
                Err((reason, message)) => {
                    self.shared.log(&format!(
                        "pod {} container {}: {reason}: {message}",
                        self.info.describe(),
                        container.name
                    ));
                    let mut reference = self.info.reference();
                    reference.field_path = Some(format!("spec.containers{{{}}}", container.name));
                    self.shared
                        .event(&reference, true, "Failed", format!("{reason}: {message}"));
                    self.board.update(index, |c| {
                        c.state = State::Waiting {
                            reason,
                            message: Some(message),
                        };
                    });
                }
            }
        }
    }

    /// The launch spec of one container, or (waiting reason, message).
    async fn prepare_container(
        &self,
        pod: &Pod,
        container: &Container,
        volumes: &BTreeMap<String, Materialised>,
        facts: &PodFacts,
        netns: &PodNetns,
    ) -> Result<(LaunchSpec, ResolvedImage), (String, String)> {
        let image_ref = container.image.clone().unwrap_or_default();
        let Some(image) = self.shared.resolve_image(&image_ref) else {
            return Err((
                "ErrImagePull".to_owned(),
                format!(
                    "FakeKubelet has no binary for image {image_ref:?} (map it with \
                     FakeKubeletBuilder::image)"
                ),
            ));
        };
        let spec = pod.spec.as_ref().ok_or((
            "CreateContainerConfigError".to_owned(),
            "no spec".to_owned(),
        ))?;
        let psc = spec.security_context.clone().unwrap_or_default();
        let csc = container.security_context.clone().unwrap_or_default();
        let config_err = |m: String| ("CreateContainerConfigError".to_owned(), m);
        let uid = csc
            .run_as_user
            .or(psc.run_as_user)
            .or(image.user.map(|(u, _)| i64::from(u)))
            .unwrap_or(0);
        let gid = csc
            .run_as_group
            .or(psc.run_as_group)
            .or(image.user.map(|(_, g)| i64::from(g)))
            .unwrap_or(0);
        let non_root = csc.run_as_non_root.or(psc.run_as_non_root).unwrap_or(false);
        if non_root && uid == 0 {
            return Err(config_err(
                "container has runAsNonRoot and image will run as root".to_owned(),
            ));
        }
        let to_u32 = |v: i64| u32::try_from(v).map_err(|_| config_err(format!("invalid id {v}")));
        let mut groups = Vec::new();
        if let Some(g) = psc.fs_group {
            groups.push(to_u32(g)?);
        }
        for g in psc.supplemental_groups.iter().flatten() {
            groups.push(to_u32(*g)?);
        }
        groups.sort_unstable();
        groups.dedup();
        let caps = csc.capabilities.clone().unwrap_or_default();
        let adds: Vec<String> = caps
            .add
            .iter()
            .flatten()
            .map(|c| c.trim_start_matches("CAP_").to_owned())
            .collect();
        let drop_all = caps.drop.iter().flatten().any(|c| c == "ALL");
        let identity = Identity {
            uid: to_u32(uid)?,
            gid: to_u32(gid)?,
            groups,
            no_new_privs: csc.allow_privilege_escalation == Some(false),
            drop_all_keep: drop_all.then(|| adds.iter().map(|c| format!("cap_{c}")).collect()),
        };
        let env = self
            .container_env(pod, container, facts, &image)
            .await
            .map_err(config_err)?;
        // command/args with $(VAR) expansion.
        let mut argv: Vec<String> = match &container.command {
            Some(cmd) if !cmd.is_empty() => cmd.iter().map(|a| launch::expand(a, &env)).collect(),
            _ => vec![image.binary.to_string_lossy().into_owned()],
        };
        match &container.args {
            Some(args) => argv.extend(args.iter().map(|a| launch::expand(a, &env))),
            None if container.command.as_ref().is_none_or(Vec::is_empty) => {
                argv.extend(image.args.iter().cloned());
            }
            None => {}
        }
        let mut mounts = Vec::new();
        for vm in container.volume_mounts.iter().flatten() {
            let Some(volume) = volumes.get(&vm.name) else {
                return Err(config_err(format!(
                    "volumeMount {}: no such volume",
                    vm.name
                )));
            };
            let mut source = volume.path.clone();
            if let Some(sub) = vm.sub_path.as_deref().filter(|s| !s.is_empty()) {
                if sub.split('/').any(|p| p == "..") || sub.starts_with('/') {
                    return Err(config_err(format!("invalid subPath {sub:?}")));
                }
                source = source.join(sub);
                if !source.exists() {
                    // The kubelet creates a missing subPath as a directory.
                    let _ = fs::create_dir_all(&source);
                }
            }
            mounts.push(BindMount {
                source,
                target: vm.mount_path.clone(),
                read_only: vm.read_only.unwrap_or(false),
            });
        }
        if let Some(snapshot) = &image.snapshot {
            mounts.push(BindMount {
                source: snapshot.clone(),
                target: image.binary.to_string_lossy().into_owned(),
                read_only: true,
            });
        }
        for file in ["hosts", "hostname", "resolv.conf"] {
            if !vm_targets(container).any(|t| t == format!("/etc/{file}")) {
                mounts.push(BindMount {
                    source: self.info.dir.join("etc").join(file),
                    target: format!("/etc/{file}"),
                    read_only: false,
                });
            }
        }
        let scratch = self.info.dir.join("run").join(&container.name);
        fs::create_dir_all(&scratch)
            .map_err(|e| config_err(format!("cannot create {}: {e}", scratch.display())))?;
        let launch = LaunchSpec {
            netns_path: netns.path(),
            hostname: self.info.name.chars().take(63).collect(),
            scratch,
            mounts,
            read_only_root: csc.read_only_root_filesystem.unwrap_or(false),
            unprivileged_ports: adds.iter().any(|c| c == "NET_BIND_SERVICE"),
            identity,
            working_dir: container
                .working_dir
                .clone()
                .filter(|w| !w.is_empty())
                .unwrap_or_else(|| "/".to_owned()),
            env,
            argv,
        };
        // Validate the mount plan now, so a bad mountPath is a config error, not a crash loop.
        launch::mount_script(&launch).map_err(config_err)?;
        Ok((launch, image))
    }

    /// The container's environment: PATH, HOSTNAME, the apiserver service, the image's env,
    /// `envFrom`, then `env` (later entries win, `$(VAR)` expanded).
    async fn container_env(
        &self,
        pod: &Pod,
        container: &Container,
        facts: &PodFacts,
        image: &ResolvedImage,
    ) -> Result<Vec<(String, String)>, String> {
        let mut env: Vec<(String, String)> = Vec::new();
        let set = |env: &mut Vec<(String, String)>, k: &str, v: String| {
            env.retain(|(name, _)| name != k);
            env.push((k.to_owned(), v));
        };
        set(&mut env, "PATH", DEFAULT_PATH.to_owned());
        set(&mut env, "HOSTNAME", self.info.name.clone());
        let (host, port) = (&self.shared.apiserver.0, self.shared.apiserver.1);
        set(&mut env, "KUBERNETES_SERVICE_HOST", host.clone());
        set(&mut env, "KUBERNETES_SERVICE_PORT", port.to_string());
        set(&mut env, "KUBERNETES_SERVICE_PORT_HTTPS", port.to_string());
        set(&mut env, "KUBERNETES_PORT", format!("tcp://{host}:{port}"));
        for (k, v) in &image.env {
            set(&mut env, k, v.clone());
        }
        let ns = &self.info.namespace;
        let client = &self.shared.client;
        for from in container.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            if let Some(cm_ref) = &from.config_map_ref {
                let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
                match api.get_opt(&cm_ref.name).await.map_err(|e| e.to_string())? {
                    Some(cm) => {
                        for (k, v) in cm.data.unwrap_or_default() {
                            set(&mut env, &format!("{prefix}{k}"), v);
                        }
                    }
                    None if cm_ref.optional == Some(true) => {}
                    None => return Err(format!("configmap \"{}\" not found", cm_ref.name)),
                }
            }
            if let Some(s_ref) = &from.secret_ref {
                let api: Api<Secret> = Api::namespaced(client.clone(), ns);
                match api.get_opt(&s_ref.name).await.map_err(|e| e.to_string())? {
                    Some(s) => {
                        for (k, v) in s.data.unwrap_or_default() {
                            set(
                                &mut env,
                                &format!("{prefix}{k}"),
                                String::from_utf8_lossy(&v.0).into_owned(),
                            );
                        }
                    }
                    None if s_ref.optional == Some(true) => {}
                    None => return Err(format!("secret \"{}\" not found", s_ref.name)),
                }
            }
        }
        for var in container.env.iter().flatten() {
            if let Some(value) = self.env_value(pod, var, facts, &env).await? {
                set(&mut env, &var.name, value);
            }
        }
        Ok(env)
    }

    async fn env_value(
        &self,
        pod: &Pod,
        var: &EnvVar,
        facts: &PodFacts,
        so_far: &[(String, String)],
    ) -> Result<Option<String>, String> {
        let Some(from) = &var.value_from else {
            return Ok(Some(launch::expand(
                var.value.as_deref().unwrap_or_default(),
                so_far,
            )));
        };
        let ns = &self.info.namespace;
        let client = &self.shared.client;
        if let Some(field) = &from.field_ref {
            return volumes::field_value(pod, facts, field)
                .map(Some)
                .map_err(|m| format!("env {}: {m}", var.name));
        }
        if let Some(res) = &from.resource_field_ref {
            let container = res.container_name.as_deref();
            return Ok(Some(volumes::resource_value(pod, container, &res.resource)));
        }
        if let Some(key) = &from.config_map_key_ref {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
            let cm = api.get_opt(&key.name).await.map_err(|e| e.to_string())?;
            return match cm
                .and_then(|c| c.data)
                .and_then(|d| d.get(&key.key).cloned())
            {
                Some(v) => Ok(Some(v)),
                None if key.optional == Some(true) => Ok(None),
                None => Err(format!(
                    "env {}: configmap {}/{} has no key {}",
                    var.name, ns, key.name, key.key
                )),
            };
        }
        if let Some(key) = &from.secret_key_ref {
            let api: Api<Secret> = Api::namespaced(client.clone(), ns);
            let s = api.get_opt(&key.name).await.map_err(|e| e.to_string())?;
            return match s
                .and_then(|c| c.data)
                .and_then(|d| d.get(&key.key).cloned())
            {
                Some(v) => Ok(Some(String::from_utf8_lossy(&v.0).into_owned())),
                None if key.optional == Some(true) => Ok(None),
                None => Err(format!(
                    "env {}: secret {}/{} has no key {}",
                    var.name, ns, key.name, key.key
                )),
            };
        }
        Ok(None)
    }

    async fn stop_containers(&mut self, grace: Duration) {
        self.shared.log(&format!(
            "pod {}: stopping containers (grace {grace:?})",
            self.info.describe()
        ));
        let _ = self.stop_tx.send(Some(grace));
        while self.supervisors.join_next().await.is_some() {}
    }

    /// Removes the network namespace and the volumes (the logs stay until the kubelet goes).
    async fn teardown(&mut self) {
        self.supervisors.abort_all();
        while self.supervisors.join_next().await.is_some() {}
        if let Some(mut netns) = self.netns.take() {
            let _ = tokio::task::spawn_blocking(move || netns.remove()).await;
        }
        let _ = fs::remove_dir_all(self.info.dir.join("volumes"));
        let _ = fs::remove_dir_all(self.info.dir.join("run"));
    }

    fn condition(&mut self, kind: &str, ok: bool) -> PodCondition {
        let status = if ok { "True" } else { "False" }.to_owned();
        let entry = self
            .conditions
            .entry(kind.to_owned())
            .or_insert_with(|| (status.clone(), now()));
        if entry.0 != status {
            *entry = (status.clone(), now());
        }
        PodCondition {
            type_: kind.to_owned(),
            status,
            last_transition_time: Some(entry.1.clone()),
            ..PodCondition::default()
        }
    }

    /// Writes the status if it changed since the last write.
    async fn push_status(&mut self, pod: &Pod) {
        let containers = self.board.snapshot();
        let spec = pod.spec.as_ref();
        let restart_policy = spec
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".to_owned());
        let phase = phase(&containers, &restart_policy);
        let all_ready = !containers.is_empty() && containers.iter().all(|c| c.ready);
        let gates_ok = spec
            .and_then(|s| s.readiness_gates.as_ref())
            .into_iter()
            .flatten()
            .all(|g| {
                pod.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .into_iter()
                    .flatten()
                    .any(|c| c.type_ == g.condition_type && c.status == "True")
            });
        let terminal = phase == "Succeeded" || phase == "Failed";
        let mut conditions = vec![
            self.condition("PodReadyToStartContainers", self.sandbox_ready && !terminal),
            self.condition("Initialized", true),
            self.condition("ContainersReady", all_ready),
            self.condition("Ready", all_ready && gates_ok),
        ];
        // Keep the conditions others own (PodScheduled from the binding, readiness gates).
        let ours = [
            "PodReadyToStartContainers",
            "Initialized",
            "ContainersReady",
            "Ready",
        ];
        for c in pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
        {
            if !ours.contains(&c.type_.as_str()) {
                conditions.push(c.clone());
            }
        }
        let host_ip = self.shared.network.gateway().to_string();
        let pod_ip = self.pod_ip.map(|i| i.to_string());
        let status = PodStatus {
            phase: Some(phase.to_owned()),
            conditions: Some(conditions),
            host_ip: Some(host_ip.clone()),
            host_ips: Some(vec![k8s_openapi::api::core::v1::HostIP { ip: host_ip }]),
            pod_ip: pod_ip.clone(),
            pod_ips: pod_ip.map(|ip| vec![PodIP { ip }]),
            start_time: Some(self.start_time.clone()),
            container_statuses: Some(containers.iter().map(CState::to_api).collect()),
            ..PodStatus::default()
        };
        let Ok(mut value) = serde_json::to_value(&status) else {
            return;
        };
        // Timestamps of conditions change only on transitions, so equality is meaningful.
        if self.last_sent.as_ref() == Some(&value) {
            return;
        }
        let patch = serde_json::json!({ "status": value.take() });
        match self
            .api
            .patch_status(
                &self.info.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => self.last_sent = patch.get("status").cloned(),
            Err(e) => {
                self.last_sent = None;
                self.shared.log(&format!(
                    "pod {}: status update failed: {e}",
                    self.info.describe()
                ));
            }
        }
    }
}

/// The `mountPath`s of a container.
fn vm_targets(container: &Container) -> impl Iterator<Item = &str> {
    container
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.trim_end_matches('/'))
}

/// The kubelet's `getPhase`.
fn phase(containers: &[CState], restart_policy: &str) -> &'static str {
    let (mut waiting, mut running, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for c in containers {
        match &c.state {
            State::Running { .. } => running += 1,
            State::Terminated(t) => {
                stopped += 1;
                if t.exit_code == 0 {
                    succeeded += 1;
                }
            }
            State::Waiting { .. } => {
                if c.last.is_some() {
                    stopped += 1;
                } else {
                    waiting += 1;
                }
            }
        }
    }
    if waiting > 0 {
        return "Pending";
    }
    if running > 0 {
        return "Running";
    }
    if stopped > 0 {
        if restart_policy == "Always" {
            return "Running";
        }
        if stopped == succeeded {
            return "Succeeded";
        }
        if restart_policy == "Never" || containers.iter().all(|c| c.finished) {
            return "Failed";
        }
        return "Running";
    }
    "Pending"
}

/// Why a running container is stopped.
enum Stop {
    /// The process exited by itself.
    Exited(ExitStatus),
    /// A liveness or startup probe failed: kill and (per restart policy) restart.
    Unhealthy(String, ExitStatus),
    /// The pod is being deleted or the kubelet stops.
    Requested(ExitStatus),
}

/// Runs one container: start, probes, restarts with back-off, stop.
struct Supervisor {
    shared: Arc<Shared>,
    board: Arc<Board>,
    index: usize,
    container: Container,
    launch: LaunchSpec,
    pod_ip: IpAddr,
    log: PathBuf,
    restart_policy: String,
    grace: Duration,
    id_prefix: String,
    stop_rx: watch::Receiver<Option<Duration>>,
    describe: String,
    pod_ref: ObjectReference,
}

impl Supervisor {
    fn event(&self, warning: bool, reason: &str, message: String) {
        let mut reference = self.pod_ref.clone();
        reference.field_path = Some(format!("spec.containers{{{}}}", self.container.name));
        self.shared.event(&reference, warning, reason, message);
    }

    fn stop_requested(&self) -> Option<Duration> {
        *self.stop_rx.borrow()
    }

    async fn run(mut self) {
        let mut backoff = self.shared.backoff.0;
        let mut restarts: i32 = 0;
        loop {
            if self.stop_requested().is_some() {
                return;
            }
            let container_id = format!("testkit://{}-{restarts}", self.id_prefix);
            let started_at = now();
            let began = Instant::now();
            let stop = match self.spawn() {
                Ok(child) => {
                    self.event(
                        false,
                        "Started",
                        format!("Started container {}", self.container.name),
                    );
                    let pid = child.id();
                    self.board.update(self.index, |c| {
                        c.state = State::Running {
                            started_at: started_at.clone(),
                        };
                        c.container_id = Some(container_id.clone());
                        c.pid = pid;
                        c.ready = false;
                        c.started = false;
                        c.restart_count = restarts;
                    });
                    self.supervise(child).await
                }
                Err(message) => {
                    self.event(true, "Failed", format!("Error: {message}"));
                    self.append_log(&format!("--- mailroom-testkit: cannot start: {message}"));
                    self.board.update(self.index, |c| {
                        c.state = State::Waiting {
                            reason: "RunContainerError".to_owned(),
                            message: Some(message.clone()),
                        };
                    });
                    // Behaves like an exit with an error for the restart decision.
                    Stop::Exited(std::os::unix::process::ExitStatusExt::from_raw(128 << 8))
                }
            };
            let (status, reason, message, requested) = match &stop {
                Stop::Exited(s) => (*s, None, None, false),
                Stop::Unhealthy(m, s) => (*s, Some("Error"), Some(m.clone()), false),
                Stop::Requested(s) => (*s, None, None, true),
            };
            let (exit_code, signal) = exit_code(status);
            let terminated = Terminated {
                exit_code,
                signal,
                reason: reason.map(str::to_owned).unwrap_or_else(|| {
                    if exit_code == 0 { "Completed" } else { "Error" }.to_owned()
                }),
                message,
                started_at,
                finished_at: now(),
                container_id: container_id.clone(),
            };
            self.append_log(&format!(
                "--- mailroom-testkit: container exited with code {exit_code}{}",
                signal.map(|s| format!(" (signal {s})")).unwrap_or_default()
            ));
            let restart = !requested
                && match self.restart_policy.as_str() {
                    "Never" => false,
                    "OnFailure" => exit_code != 0,
                    _ => true,
                };
            self.board.update(self.index, |c| {
                c.state = State::Terminated(terminated.clone());
                c.ready = false;
                c.pid = None;
                c.finished = !restart;
            });
            if !restart {
                return;
            }
            if began.elapsed() >= BACKOFF_RESET {
                backoff = self.shared.backoff.0;
            }
            let delay = backoff;
            backoff = (backoff * 2).min(self.shared.backoff.1);
            self.board.update(self.index, |c| {
                c.last = Some(terminated.clone());
                c.state = State::Waiting {
                    reason: "CrashLoopBackOff".to_owned(),
                    message: Some(format!(
                        "back-off {delay:?} restarting failed container {}",
                        self.describe
                    )),
                };
            });
            self.shared.log(&format!(
                "container {} exited ({exit_code}); restarting in {delay:?}",
                self.describe
            ));
            self.event(
                true,
                "BackOff",
                format!(
                    "Back-off {delay:?} restarting failed container {}",
                    self.container.name
                ),
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = self.stop_rx.changed() => return,
            }
            restarts += 1;
        }
    }

    fn append_log(&self, line: &str) {
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(&self.log) {
            let _ = writeln!(f, "{line}");
        }
    }

    fn spawn(&self) -> Result<Child, String> {
        let argv = launch::command_line(&self.launch)?;
        self.append_log(&format!(
            "--- mailroom-testkit: starting {}: {}",
            self.describe,
            self.launch.argv.join(" ")
        ));
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("cannot open {}: {e}", self.log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", self.log.display()))?;
        // The exact command, re-runnable by hand when debugging (MAILROOM_TESTKIT_KEEP=1).
        let quoted: Vec<String> = argv.iter().map(|a| launch::sh_quote(a)).collect();
        let _ = fs::write(
            self.log.with_extension("launch.sh"),
            format!("#!/bin/sh\n{}\n", quoted.join(" \\\n  ")),
        );
        let (program, args) = argv.split_first().ok_or("empty command")?;
        Command::new(program)
            .args(args)
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {program}: {e}"))
    }

    /// Waits for the process while probing it; stops it when asked or unhealthy.
    async fn supervise(&mut self, mut child: Child) -> Stop {
        let target = Target {
            pod_ip: self.pod_ip,
            pid: child.id(),
            identity: self.launch.identity.clone(),
            working_dir: self.launch.working_dir.clone(),
            env: self.launch.env.clone(),
        };
        let probes = run_probes(
            Arc::clone(&self.board),
            self.index,
            self.container.clone(),
            target,
            self.describe.clone(),
            Arc::clone(&self.shared),
            {
                let mut reference = self.pod_ref.clone();
                reference.field_path = Some(format!("spec.containers{{{}}}", self.container.name));
                reference
            },
        );
        tokio::pin!(probes);
        let mut stop_rx = self.stop_rx.clone();
        let why = tokio::select! {
            status = child.wait() => {
                return Stop::Exited(status.unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(1 << 8)));
            }
            message = &mut probes => Err(message),
            _ = stop_rx.wait_for(Option::is_some) => Ok(()),
        };
        let grace = match &why {
            Ok(()) => self.stop_requested().unwrap_or(self.grace),
            Err(_) => self.grace,
        };
        self.board.update(self.index, |c| c.ready = false);
        let killing = match &why {
            Ok(()) => format!("Stopping container {}", self.container.name),
            Err(m) => {
                self.event(true, "Unhealthy", m.clone());
                format!("Container {} {m}, will be restarted", self.container.name)
            }
        };
        self.event(false, "Killing", killing);
        let status = terminate(&mut child, grace).await;
        match why {
            Ok(()) => Stop::Requested(status),
            Err(message) => {
                self.shared
                    .log(&format!("container {}: {message}; killed", self.describe));
                Stop::Unhealthy(message, status)
            }
        }
    }
}

/// Exit code as the kubelet reports it (128 + signal for a signal).
fn exit_code(status: ExitStatus) -> (i32, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => (code, None),
        (None, Some(sig)) => (128 + sig, Some(sig)),
        (None, None) => (1, None),
    }
}

fn signal_group(child: &Child, signal: Signal) {
    // `id()` is None once the child has been reaped: then its PID may be reused, so no signal.
    if let Some(pid) = child
        .id()
        .and_then(|p| Pid::from_raw(i32::try_from(p).ok()?))
    {
        let _ = kill_process_group(pid, signal);
    }
}

/// SIGTERM to the container's process group, SIGKILL after `grace`; returns the exit status.
async fn terminate(child: &mut Child, grace: Duration) -> ExitStatus {
    signal_group(child, Signal::TERM);
    if let Ok(Ok(status)) = tokio::time::timeout(grace, child.wait()).await {
        return status;
    }
    signal_group(child, Signal::KILL);
    child
        .wait()
        .await
        .unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(9))
}

/// Startup, then readiness and liveness probes of one running container. Returns only when the
/// container must be killed (with the reason).
async fn run_probes(
    board: Arc<Board>,
    index: usize,
    container: Container,
    target: Target,
    describe: String,
    shared: Arc<Shared>,
    reference: ObjectReference,
) -> String {
    let started_at = Instant::now();
    let after_delay = |timing: &Timing| {
        let wait = timing.initial_delay.saturating_sub(started_at.elapsed());
        tokio::time::sleep(wait)
    };
    if let Some(startup) = &container.startup_probe {
        let timing = Timing::of(startup);
        after_delay(&timing).await;
        let mut failures = 0;
        loop {
            match probe::run(&container, startup, &target).await {
                Ok(()) => break,
                Err(m) => {
                    failures += 1;
                    if failures >= timing.failure_threshold {
                        return format!("Startup probe failed: {m}");
                    }
                }
            }
            tokio::time::sleep(timing.period).await;
        }
    }
    board.update(index, |c| c.started = true);
    let readiness = async {
        let Some(probe_spec) = &container.readiness_probe else {
            board.update(index, |c| c.ready = true);
            return std::future::pending::<()>().await;
        };
        let timing = Timing::of(probe_spec);
        after_delay(&timing).await;
        let (mut successes, mut failures) = (0u32, 0u32);
        loop {
            let result = probe::run(&container, probe_spec, &target).await;
            let ready = board.get(index).is_some_and(|c| c.ready);
            match result {
                Ok(()) => {
                    failures = 0;
                    successes += 1;
                    if !ready && successes >= timing.success_threshold {
                        board.update(index, |c| c.ready = true);
                        shared.log(&format!("container {describe} is ready"));
                    }
                }
                Err(m) => {
                    successes = 0;
                    failures += 1;
                    if ready && failures >= timing.failure_threshold {
                        board.update(index, |c| c.ready = false);
                        shared.log(&format!(
                            "container {describe}: Readiness probe failed: {m}"
                        ));
                        shared.event(
                            &reference,
                            true,
                            "Unhealthy",
                            format!("Readiness probe failed: {m}"),
                        );
                    }
                }
            }
            tokio::time::sleep(timing.period).await;
        }
    };
    let liveness = async {
        let Some(probe_spec) = &container.liveness_probe else {
            return std::future::pending::<String>().await;
        };
        let timing = Timing::of(probe_spec);
        after_delay(&timing).await;
        let mut failures = 0;
        loop {
            match probe::run(&container, probe_spec, &target).await {
                Ok(()) => failures = 0,
                Err(m) => {
                    failures += 1;
                    if failures >= timing.failure_threshold {
                        return format!("Liveness probe failed: {m}");
                    }
                }
            }
            tokio::time::sleep(timing.period).await;
        }
    };
    tokio::select! {
        () = readiness => String::new(),
        m = liveness => m,
    }
}

/// `<root>/pods/<namespace>_<name>_<uid>`.
pub(crate) fn pod_dir_name(pod: &Pod) -> String {
    format!(
        "{}_{}_{}",
        pod.namespace().unwrap_or_else(|| "default".to_owned()),
        pod.name_any(),
        pod.uid().unwrap_or_default()
    )
}

/// The newest pod dir of `namespace/name` under `pods`.
pub(crate) fn find_pod_dir(pods: &Path, namespace: &str, name: &str) -> Option<PathBuf> {
    let prefix = format!("{namespace}_{name}_");
    fs::read_dir(pods)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(state: State, last: bool) -> CState {
        CState {
            name: "c".to_owned(),
            image: String::new(),
            image_id: String::new(),
            state,
            last: last.then(|| Terminated {
                exit_code: 1,
                signal: None,
                reason: "Error".to_owned(),
                message: None,
                started_at: now(),
                finished_at: now(),
                container_id: String::new(),
            }),
            ready: false,
            started: false,
            restart_count: 0,
            container_id: None,
            pid: None,
            finished: false,
        }
    }

    #[test]
    fn phase_follows_the_kubelet() {
        let waiting = || State::Waiting {
            reason: "ErrImagePull".to_owned(),
            message: None,
        };
        let running = || State::Running { started_at: now() };
        assert_eq!(phase(&[c(waiting(), false)], "Always"), "Pending");
        assert_eq!(
            phase(&[c(running(), false), c(waiting(), false)], "Always"),
            "Pending"
        );
        assert_eq!(
            phase(&[c(running(), false), c(waiting(), true)], "Always"),
            "Running"
        );
        let done = |code| {
            State::Terminated(Terminated {
                exit_code: code,
                signal: None,
                reason: String::new(),
                message: None,
                started_at: now(),
                finished_at: now(),
                container_id: String::new(),
            })
        };
        assert_eq!(phase(&[c(done(0), false)], "Never"), "Succeeded");
        assert_eq!(phase(&[c(done(1), false)], "Never"), "Failed");
        assert_eq!(phase(&[c(done(1), false)], "Always"), "Running");
    }
}
