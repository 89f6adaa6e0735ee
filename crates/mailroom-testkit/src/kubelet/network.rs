//! The pod network of a [`super::FakeKubelet`]: a Linux bridge on the host (`mrbr<N>` with
//! `10.244.<N>.1/24`), and per pod a network namespace joined to it by a veth pair (`eth0` in
//! the pod with `10.244.<N>.<M>/24` and a default route via the bridge). Everything is made
//! with `ip` (iproute2); no NAT, no forwarding: pods reach the host's services on the bridge
//! address, the host (the test) reaches pods on their IP.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::{Result, TestkitError};

/// How many bridges (`mrbr0` .. `mrbr63`) are tried before giving up.
const MAX_BRIDGES: u8 = 64;

/// Runs `ip args...` and returns its stdout, or an error with its stderr.
pub(crate) fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| TestkitError::Spawn {
            binary: "ip".into(),
            command: format!("ip {}", args.join(" ")),
            source,
        })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(TestkitError::CommandFailed {
        command: format!("ip {}", args.join(" ")),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim_end().to_owned(),
    })
}

/// Fails with a clear error unless this process runs as root (network namespaces, bridges,
/// mounts and `setpriv` need it).
pub(crate) fn require_root(what: &str) -> Result<()> {
    if rustix::process::geteuid().is_root() {
        Ok(())
    } else {
        Err(TestkitError::NotRoot {
            what: what.to_owned(),
        })
    }
}

#[derive(Debug)]
struct Inner {
    index: u8,
    bridge: String,
    /// Host numbers (the last octet) in use by pods.
    used: Mutex<BTreeSet<u8>>,
    /// Where the next search for a free host number starts (round robin, so that an address is
    /// not handed out again right after it was freed).
    next: Mutex<u8>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = ip(&["link", "del", &self.bridge]) {
            eprintln!(
                "mailroom-testkit: cannot remove bridge {}: {e}",
                self.bridge
            );
        }
    }
}

/// A Linux bridge for pods: `mrbr<N>` with `10.244.<N>.1/24`, the first `N` (0..64) whose
/// bridge does not exist yet (so several in one machine do not collide). Removed on drop (with
/// it, the routes to its subnet). Create it before the servers that pods must reach, and bind
/// those to [`Self::gateway`]: [`crate::KubeControlPlaneBuilder::apiserver_bind`],
/// [`crate::NatsServerBuilder::listen`], [`crate::DnsServer::start_on`].
///
/// Needs root (`ip link add`). A process killed without unwinding leaves the bridge behind;
/// remove it with `ip link del mrbr<N>`.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    inner: Arc<Inner>,
}

impl PodNetwork {
    /// Creates the bridge and brings it up.
    ///
    /// # Errors
    /// Not root, `ip` missing or failing, or all 64 bridge names taken.
    pub fn create() -> Result<Self> {
        require_root("PodNetwork (creating a bridge)")?;
        for index in 0..MAX_BRIDGES {
            let bridge = format!("mrbr{index}");
            // `ip link add` fails if the name exists: that claims the index atomically.
            if ip(&["link", "add", &bridge, "type", "bridge"]).is_err() {
                continue;
            }
            let net = Self {
                inner: Arc::new(Inner {
                    index,
                    bridge: bridge.clone(),
                    used: Mutex::new(BTreeSet::new()),
                    next: Mutex::new(2),
                }),
            };
            let cidr = format!("{}/24", net.gateway());
            ip(&["addr", "add", &cidr, "dev", &bridge])?;
            ip(&["link", "set", &bridge, "up"])?;
            return Ok(net);
        }
        Err(TestkitError::InvalidOption(format!(
            "no free bridge name mrbr0..mrbr{}: remove stale ones with `ip link del mrbrN`",
            MAX_BRIDGES - 1
        )))
    }

    /// The bridge's address, `10.244.<N>.1`: pods reach the host's services here.
    pub fn gateway(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 244, self.inner.index, 1))
    }

    /// The subnet as `10.244.<N>.0/24`.
    pub fn cidr(&self) -> String {
        format!("10.244.{}.0/24", self.inner.index)
    }

    /// The bridge's name, `mrbr<N>`.
    pub fn bridge(&self) -> &str {
        &self.inner.bridge
    }

    pub(crate) fn index(&self) -> u8 {
        self.inner.index
    }

    /// Takes a free host number (2..=254) for a pod.
    pub(crate) fn allocate(&self) -> Result<u8> {
        let mut used = self
            .inner
            .used
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut next = self
            .inner
            .next
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for _ in 0..253 {
            let candidate = *next;
            *next = if *next >= 254 { 2 } else { *next + 1 };
            if used.insert(candidate) {
                return Ok(candidate);
            }
        }
        Err(TestkitError::InvalidOption(format!(
            "pod network {} is full (253 pods)",
            self.cidr()
        )))
    }

    pub(crate) fn release(&self, host: u8) {
        self.inner
            .used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&host);
    }

    pub(crate) fn pod_ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.inner.index, host)
    }
}

/// The network namespace of one pod (`/run/netns/<name>`) with its veth pair. Removed with
/// [`Self::remove`] (or on drop): deleting the namespace deletes the veth pair.
#[derive(Debug)]
pub(crate) struct PodNetns {
    pub(crate) name: String,
    pub(crate) ip: Ipv4Addr,
    host: u8,
    network: PodNetwork,
    removed: bool,
}

impl PodNetns {
    /// Creates the namespace, the veth pair (`mrv<N>p<M>` on the bridge, `eth0` in the pod),
    /// the pod's address and its default route.
    pub(crate) fn create(network: &PodNetwork) -> Result<Self> {
        let host = network.allocate()?;
        let name = format!("mrpod-{}-{}-{host}", std::process::id(), network.index());
        let mut ns = Self {
            name,
            ip: network.pod_ip(host),
            host,
            network: network.clone(),
            removed: false,
        };
        // A stale namespace of a crashed run with the same name would make `add` fail.
        let _ = ip(&["netns", "del", &ns.name]);
        if let Err(e) = ns.setup() {
            ns.remove();
            return Err(e);
        }
        Ok(ns)
    }

    fn setup(&self) -> Result<()> {
        let veth = format!("mrv{}p{}", self.network.index(), self.host);
        let _ = ip(&["link", "del", &veth]);
        let cidr = format!("{}/24", self.ip);
        let gateway = self.network.gateway().to_string();
        ip(&["netns", "add", &self.name])?;
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &self.name,
        ])?;
        ip(&["link", "set", &veth, "master", self.network.bridge(), "up"])?;
        ip(&["-n", &self.name, "link", "set", "lo", "up"])?;
        ip(&["-n", &self.name, "addr", "add", &cidr, "dev", "eth0"])?;
        ip(&["-n", &self.name, "link", "set", "eth0", "up"])?;
        ip(&["-n", &self.name, "route", "add", "default", "via", &gateway])?;
        Ok(())
    }

    /// `/run/netns/<name>`, for `nsenter --net=`.
    pub(crate) fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Deletes the namespace (the veth pair goes with it) and frees the address. Idempotent.
    pub(crate) fn remove(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("mailroom-testkit: cannot remove netns {}: {e}", self.name);
        }
        self.network.release(self.host);
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        self.remove();
    }
}
