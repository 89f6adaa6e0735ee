//! Finding the third-party binaries that `e2e/tools/build.sh` builds.
//!
//! Lookup order for each [`Tool`]:
//! 1. its environment variable (e.g. `MAILROOM_NATS_SERVER`, `MAILROOM_KUBE_APISERVER`), which
//!    must then be an executable file;
//! 2. the tools cache `${MAILROOM_TOOLS_DIR:-$HOME/.cache/mailroom/tools}`: first
//!    `<tool>-<version>/bin/<tool>` for the version pinned in the tool's `go.mod` under
//!    `e2e/tools/`, then `bin/<tool>` (build.sh's link to the version it built last), else the
//!    newest `<tool>-v*/bin/<tool>` there;
//! 3. `<tool>` on `PATH`.

use std::env;
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, TestkitError};

/// Environment variable naming the `nats-server` binary to use.
pub const NATS_SERVER_ENV: &str = "MAILROOM_NATS_SERVER";
/// Environment variable overriding the tools cache root.
pub const TOOLS_DIR_ENV: &str = "MAILROOM_TOOLS_DIR";

/// The command that builds the Kubernetes test tools into the cache.
const BUILD_KUBE_TOOLS: &str =
    "e2e/tools/build.sh etcd kube-apiserver kube-controller-manager kubectl";

/// A third-party binary that `e2e/tools/build.sh` builds and the testkit runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Tool {
    /// `nats-server` (pinned in `e2e/tools/go.mod`).
    NatsServer,
    /// `etcd` (pinned in `e2e/tools/etcd/go.mod`).
    Etcd,
    /// `kube-apiserver` (pinned in `e2e/tools/k8s/go.mod`).
    KubeApiserver,
    /// `kube-controller-manager` (pinned in `e2e/tools/k8s/go.mod`).
    KubeControllerManager,
    /// `kubectl` (pinned in `e2e/tools/k8s/go.mod`).
    Kubectl,
    /// `helm` v3 (pinned in `e2e/tools/helm/go.mod`), for the chart tests.
    Helm,
}

impl Tool {
    /// Binary (and cache dir) name, e.g. `kube-apiserver`.
    pub fn name(self) -> &'static str {
        match self {
            Self::NatsServer => "nats-server",
            Self::Etcd => "etcd",
            Self::KubeApiserver => "kube-apiserver",
            Self::KubeControllerManager => "kube-controller-manager",
            Self::Kubectl => "kubectl",
            Self::Helm => "helm",
        }
    }

    /// The environment variable that overrides the lookup, e.g. `MAILROOM_KUBE_APISERVER`
    /// (the names `build.sh` writes to `current.env`).
    pub fn env_var(self) -> &'static str {
        match self {
            Self::NatsServer => NATS_SERVER_ENV,
            Self::Etcd => "MAILROOM_ETCD",
            Self::KubeApiserver => "MAILROOM_KUBE_APISERVER",
            Self::KubeControllerManager => "MAILROOM_KUBE_CONTROLLER_MANAGER",
            Self::Kubectl => "MAILROOM_KUBECTL",
            Self::Helm => "MAILROOM_HELM",
        }
    }

    /// The command that builds it (shown in "not found" errors).
    pub fn build_command(self) -> &'static str {
        match self {
            // Built by default (CI runs build.sh without arguments).
            Self::NatsServer => "e2e/tools/build.sh",
            Self::Etcd | Self::KubeApiserver | Self::KubeControllerManager | Self::Kubectl => {
                BUILD_KUBE_TOOLS
            }
            Self::Helm => "e2e/tools/build.sh helm",
        }
    }

    /// The dir under `e2e/tools/` whose `go.mod` pins the tool, and the pinned module.
    fn pin(self) -> (&'static str, &'static str) {
        match self {
            Self::NatsServer => ("", "github.com/nats-io/nats-server/v2"),
            Self::Etcd => ("etcd", "go.etcd.io/etcd/server/v3"),
            Self::KubeApiserver | Self::KubeControllerManager | Self::Kubectl => {
                ("k8s", "k8s.io/kubernetes")
            }
            Self::Helm => ("helm", "helm.sh/helm/v3"),
        }
    }

    /// The version pinned for this tool in `e2e/tools/**/go.mod` (e.g. `v1.36.3`), if that file
    /// is readable from this source tree.
    pub fn pinned_version(self) -> Option<String> {
        let (dir, module) = self.pin();
        let go_mod = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../e2e/tools")
            .join(dir)
            .join("go.mod");
        let text = fs::read_to_string(go_mod).ok()?;
        module_version(&text, module)
    }

    /// Path of the binary to run (see the module docs for the lookup order).
    ///
    /// # Errors
    /// [`TestkitError::BadBinaryOverride`] when the environment variable is set but not an
    /// executable file, [`TestkitError::BinaryNotFound`] (telling which `e2e/tools/build.sh`
    /// command builds it) when nothing is found.
    pub fn find(self) -> Result<PathBuf> {
        resolve(&Lookup {
            tool: self,
            env_value: env::var_os(self.env_var()),
            tools_dir: default_tools_dir(),
            pinned: self.pinned_version(),
            path_var: env::var_os("PATH"),
        })
    }
}

impl fmt::Display for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The tools cache root: `$MAILROOM_TOOLS_DIR`, else `$HOME/.cache/mailroom/tools`.
/// `None` only when neither variable is set.
pub fn default_tools_dir() -> Option<PathBuf> {
    match env::var_os(TOOLS_DIR_ENV) {
        Some(dir) if !dir.is_empty() => Some(PathBuf::from(dir)),
        _ => env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|home| PathBuf::from(home).join(".cache/mailroom/tools")),
    }
}

/// The nats-server version pinned in `e2e/tools/go.mod` (e.g. `v2.15.3`), if that file is
/// readable from this source tree.
pub fn pinned_nats_version() -> Option<String> {
    Tool::NatsServer.pinned_version()
}

/// Path of the `nats-server` binary to run: [`Tool::find`] for [`Tool::NatsServer`].
///
/// # Errors
/// [`TestkitError::BadBinaryOverride`] when `MAILROOM_NATS_SERVER` is set but not executable,
/// [`TestkitError::BinaryNotFound`] (telling to run `e2e/tools/build.sh`) when nothing is found.
pub fn nats_server_binary() -> Result<PathBuf> {
    Tool::NatsServer.find()
}

/// Inputs of a lookup, separated from the process environment so it can be unit-tested.
#[derive(Debug)]
struct Lookup {
    tool: Tool,
    env_value: Option<OsString>,
    tools_dir: Option<PathBuf>,
    pinned: Option<String>,
    path_var: Option<OsString>,
}

fn resolve(l: &Lookup) -> Result<PathBuf> {
    let (tool, env) = (l.tool.name(), l.tool.env_var());
    if let Some(value) = l.env_value.as_ref().filter(|v| !v.is_empty()) {
        let path = PathBuf::from(value);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(TestkitError::BadBinaryOverride {
                env,
                path,
                build: l.tool.build_command(),
            })
        };
    }
    let mut searched = vec![format!("${env} (unset)")];
    if let Some(dir) = &l.tools_dir {
        if let Some(found) = find_in_cache(dir, tool, l.pinned.as_deref()) {
            return Ok(found);
        }
        searched.push(format!(
            "{dir}/{tool}-v*/bin/{tool}, {dir}/bin/{tool}",
            dir = dir.display()
        ));
    }
    if let Some(path_var) = &l.path_var {
        for dir in env::split_paths(path_var) {
            if dir.as_os_str().is_empty() {
                continue;
            }
            let candidate = dir.join(tool);
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
        searched.push("PATH".to_owned());
    }
    Err(TestkitError::BinaryNotFound {
        binary: tool,
        env,
        build: l.tool.build_command(),
        cache: l
            .tools_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("~/.cache/mailroom/tools")),
        searched: searched.join(", "),
    })
}

/// `<dir>/<tool>-<pinned>/bin/<tool>` if present, else `<dir>/bin/<tool>`, else the newest
/// `<tool>-v*` version there.
fn find_in_cache(dir: &Path, tool: &str, pinned: Option<&str>) -> Option<PathBuf> {
    let bin_of = |version: &str| dir.join(format!("{tool}-{version}")).join("bin").join(tool);
    if let Some(version) = pinned {
        let bin = bin_of(version);
        if is_executable(&bin) {
            return Some(bin);
        }
    }
    let current = dir.join("bin").join(tool);
    if is_executable(&current) {
        return Some(current);
    }
    let prefix = format!("{tool}-");
    fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter_map(|name| {
            let version = name.strip_prefix(&prefix)?.to_owned();
            let key = version_key(&version)?;
            Some((key, version))
        })
        .filter(|(_, version)| is_executable(&bin_of(version)))
        .max()
        .map(|(_, version)| bin_of(&version))
}

/// Sort key of `v1.2.3` / `v1.2.3-rc.1`: releases sort above their pre-releases.
fn version_key(version: &str) -> Option<(u64, u64, u64, bool, String)> {
    let v = version.strip_prefix('v')?;
    let (core, pre) = match v.split_once('-') {
        Some((core, pre)) => (core, Some(pre)),
        None => (v, None),
    };
    let mut parts = core.split('.').map(str::parse::<u64>);
    let major = parts.next()?.ok()?;
    let minor = parts.next()?.ok()?;
    let patch = parts.next()?.ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some((
        major,
        minor,
        patch,
        pre.is_none(),
        pre.unwrap_or_default().to_owned(),
    ))
}

/// The version that a go.mod requires `module` at (block or single-line `require`). Comments
/// and `replace` directives (whose left side may name the module too) are ignored.
fn module_version(go_mod: &str, module: &str) -> Option<String> {
    go_mod.lines().find_map(|line| {
        let code = line.split_once("//").map_or(line, |(code, _)| code);
        if code.contains("=>") || code.trim_start().starts_with("replace") {
            return None;
        }
        let mut fields = code.split_whitespace();
        while let Some(field) = fields.next() {
            if field == module {
                return fields
                    .next()
                    .filter(|v| version_key(v).is_some())
                    .map(str::to_owned);
            }
        }
        None
    })
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_bin(dir: &Path, rel: &str) -> PathBuf {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, "#!/bin/sh\n").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    const NATS_MODULE: &str = "github.com/nats-io/nats-server/v2";

    fn lookup(tools_dir: Option<PathBuf>, pinned: Option<&str>) -> Lookup {
        Lookup {
            tool: Tool::NatsServer,
            env_value: None,
            tools_dir,
            pinned: pinned.map(str::to_owned),
            path_var: Some(OsString::new()),
        }
    }

    #[test]
    fn version_keys_order_releases_above_prereleases() {
        let mut versions = ["v2.15.0-RC.1", "v2.9.10", "v2.15.0", "v2.14.10", "v2.15.3"];
        versions.sort_by_key(|v| version_key(v).expect("parses"));
        assert_eq!(
            versions,
            ["v2.9.10", "v2.14.10", "v2.15.0-RC.1", "v2.15.0", "v2.15.3"]
        );
        assert!(version_key("2.15.0").is_none());
        assert!(version_key("vX.1.2").is_none());
    }

    #[test]
    fn module_version_reads_block_and_single_line_requires() {
        let block = "module x\n\nrequire (\n\tgithub.com/a/b v1.0.0 // indirect\n\tgithub.com/nats-io/nats-server/v2 v2.15.3 // indirect\n)\n";
        assert_eq!(
            module_version(block, NATS_MODULE).as_deref(),
            Some("v2.15.3")
        );
        let single = "require github.com/nats-io/nats-server/v2 v2.14.9\n";
        assert_eq!(
            module_version(single, NATS_MODULE).as_deref(),
            Some("v2.14.9")
        );
        // The `tool` line names the module without a version.
        assert_eq!(
            module_version("tool github.com/nats-io/nats-server/v2\n", NATS_MODULE),
            None
        );

        // Comments and replace directives name modules too; only the require line counts.
        let k8s = "// builds the tools below from k8s.io/kubernetes v1.36.3. Generated\n\
                   module x\n\
                   replace k8s.io/kubernetes => k8s.io/kubernetes v1.0.0\n\
                   require (\n\tk8s.io/kubernetes v1.36.3 // indirect\n)\n";
        assert_eq!(
            module_version(k8s, "k8s.io/kubernetes").as_deref(),
            Some("v1.36.3")
        );
    }

    #[test]
    fn repo_pins_the_kubernetes_tools() {
        let kube = Tool::KubeApiserver
            .pinned_version()
            .expect("k8s/go.mod pin");
        assert_eq!(
            Tool::KubeControllerManager.pinned_version(),
            Some(kube.clone())
        );
        assert_eq!(Tool::Kubectl.pinned_version(), Some(kube.clone()));
        let (major, minor, ..) = version_key(&kube).expect("semver");
        assert!((major, minor) >= (1, 36), "pinned {kube}");
        let etcd = Tool::Etcd.pinned_version().expect("etcd/go.mod pin");
        assert!(version_key(&etcd).expect("semver").0 == 3, "pinned {etcd}");
        let helm = Tool::Helm.pinned_version().expect("helm/go.mod pin");
        assert!(version_key(&helm).expect("semver").0 == 3, "pinned {helm}");
    }

    #[test]
    fn helm_is_found_through_its_variable_and_explains_its_build() {
        let mut l = lookup(None, None);
        l.tool = Tool::Helm;
        let msg = resolve(&l).expect_err("nothing there").to_string();
        assert!(msg.contains("e2e/tools/build.sh helm"), "{msg}");
        assert!(msg.contains("MAILROOM_HELM"), "{msg}");

        let tmp = tempfile::tempdir().expect("tempdir");
        let bin = fake_bin(tmp.path(), "helm-v3.22.0/bin/helm");
        l.tools_dir = Some(tmp.path().to_path_buf());
        l.pinned = Some("v3.22.0".to_owned());
        assert_eq!(resolve(&l).expect("found"), bin);
    }

    #[test]
    fn kube_tools_explain_which_build_command_to_run() {
        for tool in [
            Tool::Etcd,
            Tool::KubeApiserver,
            Tool::KubeControllerManager,
            Tool::Kubectl,
        ] {
            let mut l = lookup(None, None);
            l.tool = tool;
            let msg = resolve(&l).expect_err("nothing there").to_string();
            assert!(
                msg.contains(
                    "e2e/tools/build.sh etcd kube-apiserver kube-controller-manager kubectl"
                ),
                "{msg}"
            );
            assert!(msg.contains(tool.env_var()), "{msg}");
        }
    }

    #[test]
    fn repo_pins_a_current_nats_server() {
        let pinned = pinned_nats_version().expect("e2e/tools/go.mod pins nats-server");
        let (major, minor, ..) = version_key(&pinned).expect("semver");
        assert!((major, minor) >= (2, 12), "pinned {pinned}");
    }

    #[test]
    fn prefers_pinned_version_then_newest_in_cache() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let old = fake_bin(tmp.path(), "nats-server-v2.14.9/bin/nats-server");
        let new = fake_bin(tmp.path(), "nats-server-v2.15.3/bin/nats-server");
        // A failed build leaves an empty version dir: it must be ignored.
        fs::create_dir_all(tmp.path().join("nats-server-v9.0.0/bin")).expect("mkdir");
        fs::create_dir_all(tmp.path().join("bin")).expect("mkdir");

        let found = resolve(&lookup(Some(tmp.path().to_path_buf()), Some("v2.14.9")));
        assert_eq!(found.expect("found"), old);
        let found = resolve(&lookup(Some(tmp.path().to_path_buf()), Some("v2.99.0")));
        assert_eq!(found.expect("found"), new);
        let found = resolve(&lookup(Some(tmp.path().to_path_buf()), None));
        assert_eq!(found.expect("found"), new);

        // build.sh's `bin/<tool>` link (the version it built last) beats "newest".
        let current = fake_bin(tmp.path(), "bin/nats-server");
        let found = resolve(&lookup(Some(tmp.path().to_path_buf()), None));
        assert_eq!(found.expect("found"), current);
        let found = resolve(&lookup(Some(tmp.path().to_path_buf()), Some("v2.14.9")));
        assert_eq!(found.expect("found"), old);
    }

    #[test]
    fn env_override_wins_and_must_be_executable() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let custom = fake_bin(tmp.path(), "custom/nats-server");
        fake_bin(tmp.path(), "cache/nats-server-v2.15.3/bin/nats-server");
        let mut l = lookup(Some(tmp.path().join("cache")), None);
        l.env_value = Some(custom.clone().into_os_string());
        assert_eq!(resolve(&l).expect("found"), custom);

        l.env_value = Some(tmp.path().join("missing").into_os_string());
        let err = resolve(&l).expect_err("not executable");
        assert!(
            matches!(err, TestkitError::BadBinaryOverride { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("MAILROOM_NATS_SERVER="), "{err}");
    }

    #[test]
    fn falls_back_to_path_then_explains_how_to_build() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let on_path = fake_bin(tmp.path(), "pathdir/nats-server");
        let mut l = lookup(Some(tmp.path().join("empty-cache")), None);
        l.path_var = Some(env::join_paths([tmp.path().join("pathdir")]).expect("join"));
        assert_eq!(resolve(&l).expect("found"), on_path);

        l.path_var = Some(OsString::new());
        let err = resolve(&l).expect_err("nothing there");
        let msg = err.to_string();
        assert!(msg.contains("e2e/tools/build.sh"), "{msg}");
        assert!(msg.contains("empty-cache"), "{msg}");
        assert!(msg.contains("MAILROOM_NATS_SERVER"), "{msg}");
    }
}
