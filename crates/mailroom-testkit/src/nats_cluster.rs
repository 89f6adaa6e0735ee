//! A routed `nats-server` cluster with clustered JetStream on loopback, for fault tests: kill a
//! node, check the rest stays healthy, restart it on the same ports and store dir.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::error::{Result, TestkitError};
use crate::nats::{
    ClusterConfig, NatsOptions, NatsServer, PORT_ATTEMPTS, STOP_GRACE, is_port_collision,
    new_tempdir, release_tempdir, unique_name,
};
use crate::net::free_ports;

/// Default time a cluster may take to elect a JetStream meta leader (2-core CI under load;
/// a raft election alone takes a few seconds).
const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

/// Builder for [`NatsCluster`]; see [`NatsCluster::builder`].
#[derive(Debug, Clone)]
pub struct NatsClusterBuilder {
    size: usize,
    opts: NatsOptions,
    health_timeout: Duration,
}

impl Default for NatsClusterBuilder {
    fn default() -> Self {
        Self {
            size: 3,
            opts: NatsOptions::default(),
            health_timeout: DEFAULT_HEALTH_TIMEOUT,
        }
    }
}

impl NatsClusterBuilder {
    /// Number of nodes, at least 2 (default 3; JetStream needs 3 to survive losing one).
    #[must_use]
    pub fn size(mut self, nodes: usize) -> Self {
        self.size = nodes;
        self
    }

    /// Use this binary instead of [`crate::nats_server_binary`].
    #[must_use]
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.opts.binary = Some(path.into());
        self
    }

    /// `max_payload` in bytes on every node.
    #[must_use]
    pub fn max_payload(mut self, bytes: u32) -> Self {
        self.opts.max_payload = Some(bytes);
        self
    }

    /// Require this client token on every node.
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.opts.auth = crate::nats::Auth::Token(token.into());
        self
    }

    /// Require this client user and password on every node.
    #[must_use]
    pub fn user_password(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.opts.auth = crate::nats::Auth::UserPassword(user.into(), password.into());
        self
    }

    /// Append a raw line to every node's config.
    #[must_use]
    pub fn extra_config(mut self, line: impl Into<String>) -> Self {
        self.opts.extra_config.push(line.into());
        self
    }

    /// How long one node may take to start (default 30 s).
    #[must_use]
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.opts.startup_timeout = timeout;
        self
    }

    /// How long start, restart and [`NatsCluster::wait_healthy`] wait for a healthy cluster
    /// (default 60 s).
    #[must_use]
    pub fn health_timeout(mut self, timeout: Duration) -> Self {
        self.health_timeout = timeout;
        self
    }

    /// Starts all nodes and waits until the cluster is healthy.
    ///
    /// # Errors
    /// Invalid options, binary not found, a node did not start, or no JetStream meta leader was
    /// agreed on in time.
    pub fn start(self) -> Result<NatsCluster> {
        NatsCluster::start_with(self)
    }
}

/// N `nats-server` nodes with routes between them and clustered JetStream, each with its own
/// ports and store dir under one temp dir. All nodes are stopped on drop.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
    name: String,
    health_timeout: Duration,
    dir: PathBuf,
    tempdir: Option<TempDir>,
}

impl NatsCluster {
    /// Starts `size` nodes (at least 2; use 3) and waits until every node is healthy and all
    /// agree on a JetStream meta leader.
    ///
    /// # Errors
    /// See [`NatsClusterBuilder::start`].
    pub fn start(size: usize) -> Result<Self> {
        Self::builder().size(size).start()
    }

    /// A builder for non-default options.
    pub fn builder() -> NatsClusterBuilder {
        NatsClusterBuilder::default()
    }

    fn start_with(b: NatsClusterBuilder) -> Result<Self> {
        if b.size < 2 {
            return Err(TestkitError::InvalidOption(format!(
                "a nats cluster needs at least 2 nodes, not {} (use NatsServer for one)",
                b.size
            )));
        }
        b.opts.validate()?;
        let binary = b.opts.binary()?;
        let tempdir = new_tempdir("mailroom-nats-cluster-")?;
        let mut cluster = Self {
            nodes: Vec::new(),
            name: unique_name(),
            health_timeout: b.health_timeout,
            dir: tempdir.path().to_path_buf(),
            tempdir: Some(tempdir),
        };
        let mut attempt = 1;
        loop {
            match cluster.launch_nodes(&binary, &b.opts, b.size) {
                Ok(()) => break,
                Err(e) if is_port_collision(&e) && attempt < PORT_ATTEMPTS => {
                    attempt += 1;
                    cluster.stop_all();
                    cluster.nodes.clear();
                }
                Err(e) => return Err(e),
            }
        }
        cluster.wait_healthy()?;
        Ok(cluster)
    }

    /// Creates fresh node dirs and configs on new ports, spawns every node, then waits for
    /// each to be ready on its own (the meta leader comes later).
    fn launch_nodes(&mut self, binary: &Path, opts: &NatsOptions, size: usize) -> Result<()> {
        let ports = free_ports(3 * size)?;
        let cluster_ports: Vec<u16> = ports[2 * size..].to_vec();
        for i in 0..size {
            let dir = self.dir.join(format!("n{i}"));
            if dir.exists() {
                fs::remove_dir_all(&dir).map_err(|source| TestkitError::Io {
                    what: "cannot clean",
                    path: dir.clone(),
                    source,
                })?;
            }
            let routes = cluster_ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| *p)
                .collect();
            let node = NatsServer::new(
                binary.to_path_buf(),
                opts.clone(),
                format!("{}-n{i}", self.name),
                dir,
                None,
                (ports[2 * i], ports[2 * i + 1]),
                Some(ClusterConfig {
                    name: self.name.clone(),
                    port: cluster_ports[i],
                    routes,
                }),
            );
            node.write_config()?;
            self.nodes.push(node);
        }
        for node in &mut self.nodes {
            node.spawn()?;
        }
        for node in &mut self.nodes {
            node.wait_ready(opts.startup_timeout)?;
        }
        Ok(())
    }

    /// Number of nodes (running or not).
    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// The cluster name (unique per test process).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Root dir holding one `n<i>/` dir per node.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Client URLs of all nodes, `nats://127.0.0.1:<port>`, in node order (including stopped
    /// ones: clients are expected to fail over).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// All nodes.
    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    /// Node `index`.
    ///
    /// # Errors
    /// [`TestkitError::NoSuchNode`] when out of range.
    pub fn node(&self, index: usize) -> Result<&NatsServer> {
        let size = self.nodes.len();
        self.nodes
            .get(index)
            .ok_or(TestkitError::NoSuchNode { index, size })
    }

    /// Node `index`, mutable (for `is_running`, `stop`, ...).
    ///
    /// # Errors
    /// [`TestkitError::NoSuchNode`] when out of range.
    pub fn node_mut(&mut self, index: usize) -> Result<&mut NatsServer> {
        let size = self.nodes.len();
        self.nodes
            .get_mut(index)
            .ok_or(TestkitError::NoSuchNode { index, size })
    }

    /// SIGKILL node `index` (a crash). Does not wait for the rest to recover: use
    /// [`Self::wait_healthy`].
    ///
    /// # Errors
    /// No such node, or signalling failed.
    pub fn kill(&mut self, index: usize) -> Result<()> {
        self.node_mut(index)?.kill()
    }

    /// Gracefully stop node `index`.
    ///
    /// # Errors
    /// No such node, or signalling failed.
    pub fn stop(&mut self, index: usize) -> Result<()> {
        self.node_mut(index)?.stop()
    }

    /// (Re)starts node `index` on the same ports and store dir, then waits until the whole
    /// cluster is healthy again.
    ///
    /// # Errors
    /// No such node, the node did not start, or the cluster did not become healthy.
    pub fn restart(&mut self, index: usize) -> Result<()> {
        self.node_mut(index)?.restart()?;
        self.wait_healthy()
    }

    /// The JetStream meta leader's server name as seen by the first running node (`None` when
    /// no leader is known or no node runs).
    ///
    /// # Errors
    /// The monitoring request failed.
    pub fn meta_leader(&mut self) -> Result<Option<String>> {
        for node in &mut self.nodes {
            if node.is_running() {
                return meta_leader_of(node);
            }
        }
        Ok(None)
    }

    /// Index of the node that is JetStream meta leader, if one is known.
    ///
    /// # Errors
    /// The monitoring request failed.
    pub fn meta_leader_index(&mut self) -> Result<Option<usize>> {
        let leader = self.meta_leader()?;
        Ok(leader.and_then(|name| self.nodes.iter().position(|n| n.server_name() == name)))
    }

    /// Waits (up to the builder's health timeout, default 60 s) until every running node
    /// answers the full `/healthz` with 200 and all of them name the same JetStream meta
    /// leader, which must itself be one of the running nodes.
    ///
    /// # Errors
    /// [`TestkitError::ClusterNotHealthy`] with the last state of each node.
    pub fn wait_healthy(&mut self) -> Result<()> {
        self.wait_healthy_for(self.health_timeout)
    }

    /// [`Self::wait_healthy`] with an explicit timeout.
    ///
    /// # Errors
    /// [`TestkitError::ClusterNotHealthy`] with the last state of each node.
    pub fn wait_healthy_for(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.probe_health() {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                return Err(TestkitError::ClusterNotHealthy {
                    dir: self.dir.clone(),
                    timeout,
                    last,
                });
            }
            thread::sleep(POLL);
        }
    }

    fn probe_health(&mut self) -> std::result::Result<(), String> {
        let mut running = Vec::new();
        let mut problems = Vec::new();
        let mut leaders = Vec::new();
        for node in &mut self.nodes {
            if !node.is_running() {
                continue;
            }
            running.push(node.server_name().to_owned());
            if !node.is_healthy() {
                problems.push(format!("{}: /healthz not ok", node.server_name()));
            }
            match meta_leader_of(node) {
                Ok(Some(leader)) => leaders.push(leader),
                Ok(None) => problems.push(format!("{}: no meta leader", node.server_name())),
                Err(e) => problems.push(format!("{}: {e}", node.server_name())),
            }
        }
        if running.is_empty() {
            return Err("no node is running".to_owned());
        }
        if let Some(first) = leaders.first() {
            if leaders.iter().any(|l| l != first) {
                problems.push(format!("nodes disagree on the meta leader: {leaders:?}"));
            } else if !running.contains(first) {
                problems.push(format!("meta leader {first} is not running"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// SIGTERM every node at once, then wait for all (SIGKILL after the grace period).
    fn stop_all(&mut self) {
        for node in &mut self.nodes {
            node.begin_stop();
        }
        let deadline = Instant::now() + STOP_GRACE;
        for node in &mut self.nodes {
            node.finish_stop(deadline);
        }
    }
}

fn meta_leader_of(node: &NatsServer) -> Result<Option<String>> {
    let jsz = node.monitor_json("/jsz")?;
    Ok(jsz
        .get("meta_cluster")
        .and_then(|m| m.get("leader"))
        .and_then(serde_json::Value::as_str)
        .filter(|l| !l.is_empty())
        .map(str::to_owned))
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        self.stop_all();
        self.nodes.clear();
        if let Some(dir) = self.tempdir.take() {
            release_tempdir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_clusters_smaller_than_two() {
        for size in [0, 1] {
            let err = NatsCluster::builder()
                .size(size)
                .binary("/nonexistent")
                .start()
                .expect_err("too small");
            assert!(matches!(err, TestkitError::InvalidOption(_)), "{err}");
        }
    }
}
