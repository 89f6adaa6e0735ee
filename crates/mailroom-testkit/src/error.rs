//! The one error type of the testkit. Every variant names the binary, port or directory
//! involved, so a failing CI log says which server did what.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Result with [`TestkitError`] as the default error.
pub type Result<T, E = TestkitError> = std::result::Result<T, E>;

/// What went wrong while finding, starting, probing or stopping a test server.
///
/// `Debug` prints the same text as `Display`, so `.expect("start nats-server")` in a test shows
/// the full explanation (what to run, which port, the end of the server log).
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum TestkitError {
    /// No binary was found in the env override, the tools cache or `PATH`.
    #[error(
        "{binary} not found (looked at: {searched}); run `{build}` to build it into {cache}, \
         or set {env}=/path/to/{binary}"
    )]
    BinaryNotFound {
        /// Binary name, e.g. `nats-server`.
        binary: &'static str,
        /// Environment variable that overrides the lookup.
        env: &'static str,
        /// The command that builds it, e.g. `e2e/tools/build.sh`.
        build: &'static str,
        /// The tools cache that `e2e/tools/build.sh` fills.
        cache: PathBuf,
        /// Human-readable list of the places looked at.
        searched: String,
    },

    /// The environment override points at something that is not an executable file.
    #[error("{env}={path} is not an executable file; fix it or unset it and run `{build}`")]
    BadBinaryOverride {
        /// The environment variable.
        env: &'static str,
        /// Its value.
        path: PathBuf,
        /// The command that builds the binary into the tools cache.
        build: &'static str,
    },

    /// A file or directory operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done, e.g. "cannot write config".
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },

    /// No free loopback port could be reserved.
    #[error("cannot reserve a free port on 127.0.0.1: {source}")]
    FreePort {
        /// The underlying error.
        source: io::Error,
    },

    /// The process could not be spawned at all.
    #[error("cannot spawn `{command}`: {source}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The whole command line (binary and arguments).
        command: String,
        /// The underlying error.
        source: io::Error,
    },

    /// The process exited before it became ready.
    #[error(
        "{binary} (client port {port}) exited during startup with {status}; \
         last lines of {log}:\n{log_tail}"
    )]
    ExitedEarly {
        /// The binary.
        binary: PathBuf,
        /// Client port it was given.
        port: u16,
        /// Exit status as text.
        status: String,
        /// Its log file (in its working dir, next to config and store).
        log: PathBuf,
        /// The last lines of its log.
        log_tail: String,
    },

    /// The process kept running but did not become ready in time (it was killed).
    #[error(
        "{binary} (client port {port}, monitor port {monitor_port}) not ready after \
         {timeout:?}: {last}; last lines of {log}:\n{log_tail}"
    )]
    NotReady {
        /// The binary.
        binary: PathBuf,
        /// Client port.
        port: u16,
        /// Monitoring (HTTP) port.
        monitor_port: u16,
        /// How long we waited.
        timeout: Duration,
        /// The last probe result.
        last: String,
        /// Its log file (in its working dir, next to config and store).
        log: PathBuf,
        /// The last lines of its log.
        log_tail: String,
    },

    /// A cluster did not reach a healthy state (all running nodes healthy, one agreed
    /// JetStream meta leader) in time.
    #[error("nats cluster in {dir} not healthy after {timeout:?}: {last}")]
    ClusterNotHealthy {
        /// Cluster root directory.
        dir: PathBuf,
        /// How long we waited.
        timeout: Duration,
        /// The last probe result, per node.
        last: String,
    },

    /// Sending a signal to, or waiting for, our own child process failed.
    #[error("cannot {action} {binary} (pid {pid}): {source}")]
    Signal {
        /// "terminate", "kill" or "wait for".
        action: &'static str,
        /// The binary.
        binary: PathBuf,
        /// Its pid.
        pid: u32,
        /// The underlying error.
        source: io::Error,
    },

    /// A monitoring request failed.
    #[error("GET http://127.0.0.1:{port}{path}: {reason}")]
    Http {
        /// Monitoring port.
        port: u16,
        /// Request path.
        path: String,
        /// What failed.
        reason: String,
    },

    /// A cluster node index out of range.
    #[error("nats cluster has no node {index} (it has {size})")]
    NoSuchNode {
        /// Requested index.
        index: usize,
        /// Number of nodes.
        size: usize,
    },

    /// A process of a [`crate::KubeControlPlane`] exited or did not get ready during startup
    /// (it was killed).
    #[error("{component} {reason}; last lines of {log}:\n{log_tail}")]
    ControlPlane {
        /// `etcd`, `kube-apiserver` or `kube-controller-manager`.
        component: &'static str,
        /// What happened, with the last probe result.
        reason: String,
        /// Its log file (in the control plane's dir).
        log: PathBuf,
        /// The last lines of its log.
        log_tail: String,
    },

    /// Generating the test PKI (CA, serving and client certs, service-account key) failed.
    #[error("cannot generate {what}: {reason}")]
    Pki {
        /// Which certificate or key.
        what: &'static str,
        /// The rcgen error as text.
        reason: String,
    },

    /// The generated kubeconfig could not be loaded by kube-rs.
    #[error("cannot load kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The kubeconfig file.
        path: PathBuf,
        /// The underlying error.
        source: ::kube::config::KubeconfigError,
    },

    /// A kube-rs client could not be built.
    #[error("cannot build a kube client for {server}: {source}")]
    KubeClient {
        /// The apiserver URL.
        server: String,
        /// The underlying error.
        source: ::kube::Error,
    },

    /// A command (e.g. kubectl) exited unsuccessfully.
    #[error("`{command}` failed with {status}:\n{stderr}")]
    CommandFailed {
        /// The whole command line.
        command: String,
        /// Exit status as text.
        status: String,
        /// Its stderr (and stdout, if stderr is empty).
        stderr: String,
    },

    /// Something that needs root (network namespaces, bridges, mounts) runs without it.
    #[error(
        "{what} needs root (network namespaces, a bridge, mounts, setpriv); run the test as \
         root (CI does), e.g. `sudo -E cargo test ...`"
    )]
    NotRoot {
        /// What needed it.
        what: String,
    },

    /// A builder option that cannot work.
    #[error("invalid option: {0}")]
    InvalidOption(String),
}

impl fmt::Debug for TestkitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
