//! Dev-only test harness for Mailroom: starts real third-party servers on loopback for
//! integration and fault tests, and stops them again when the handle is dropped.
//!
//! * [`NatsServer`]: one `nats-server` with JetStream in its own temp dir, on free loopback
//!   ports, with `stop`, `kill` (SIGKILL) and `restart` on the same ports and store dir.
//! * [`NatsCluster`]: N routed `nats-server` nodes with clustered JetStream; kill and restart
//!   single nodes.
//! * [`KubeControlPlane`]: etcd + kube-apiserver (+ kube-controller-manager) with a generated
//!   PKI and RBAC on, an admin kubeconfig, a kube-rs client, kubectl and helm ("envtest for
//!   Rust").
//! * [`FakeKubelet`]: plays the node of a control plane (binds pods, runs their containers as
//!   local processes in network and mount namespaces on a [`PodNetwork`] bridge, probes,
//!   restarts, status). Needs root.
//! * [`SmtpSink`]: an SMTP server that accepts and records every message, optionally slowly.
//! * [`helm()`]: `helm` with isolated homes, for `helm lint` / `helm template` in chart tests.
//!
//! The binaries are not downloaded at test time. `e2e/tools/build.sh` builds them once from the
//! Go module proxy into `${MAILROOM_TOOLS_DIR:-~/.cache/mailroom/tools}/<tool>-<version>/bin/`,
//! and [`Tool::find`] finds them there (or through `MAILROOM_NATS_SERVER`, `MAILROOM_ETCD`, ...,
//! or on `PATH`).
//!
//! ```no_run
//! # fn main() -> Result<(), mailroom_testkit::TestkitError> {
//! let mut nats = mailroom_testkit::NatsServer::start()?;
//! let url = nats.url(); // nats://127.0.0.1:<port>
//! nats.restart()?; // same port, same JetStream store
//! # let _ = url;
//! # Ok(())
//! # }
//! ```
//!
//! Every server writes its config, log and store under a temp dir that is removed on drop; set
//! `MAILROOM_TESTKIT_KEEP=1` to keep it (the path is printed to stderr) when debugging a test.

mod binary;
mod dns;
mod error;
mod helm;
mod kube;
mod kubelet;
mod nats;
mod nats_cluster;
mod net;
mod process;
mod smtp_sink;
mod wait;

pub use crate::kube::{KubeControlPlane, KubeControlPlaneBuilder};
pub use crate::kubelet::{DEFAULT_NODE_NAME, FakeKubelet, FakeKubeletBuilder, Image, PodNetwork};
pub use binary::{
    NATS_SERVER_ENV, TOOLS_DIR_ENV, Tool, default_tools_dir, nats_server_binary,
    pinned_nats_version,
};
pub use dns::{DEFAULT_TTL, DnsServer, Zone};
pub use error::{Result, TestkitError};
pub use helm::{helm, helm_ok};
pub use nats::{NatsServer, NatsServerBuilder};
pub use nats_cluster::{NatsCluster, NatsClusterBuilder};
pub use smtp_sink::{SinkMessage, SmtpSink};
pub use wait::eventually;
