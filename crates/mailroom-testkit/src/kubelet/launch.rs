//! How a container becomes a process: one command line
//!
//! ```text
//! nsenter --net=/run/netns/<pod> -- unshare --mount --uts --propagation private -- \
//!   /bin/sh -c <mount script> testkit-pod \
//!   setpriv --reuid=U --regid=G --groups=... [--no-new-privs] -- \
//!   env -i --chdir=<workingDir> K=V ... <entrypoint or command> <args>
//! ```
//!
//! Every step `exec`s the next, so the container's process is the one we spawned (and the
//! leader of its own process group). The script runs as root in the pod's new mount namespace:
//! it builds the container's root as a copy-on-write overlay of the host's `/` (upper layer on
//! a private tmpfs, so nothing reaches the host), binds the host's other mounts and the
//! volumes into it (read-only when the mount says so), makes it read-only for
//! `readOnlyRootFilesystem`, sets the hostname to the pod name and `chroot`s into it.

use std::fs;
use std::path::{Component, Path, PathBuf};

/// A bind mount into the container.
#[derive(Debug, Clone)]
pub(crate) struct BindMount {
    /// Host path (a materialised volume, or a file/dir inside it for `subPath`).
    pub(crate) source: PathBuf,
    /// The container's `mountPath`.
    pub(crate) target: String,
    pub(crate) read_only: bool,
}

/// The identity the process runs as.
#[derive(Debug, Clone, Default)]
pub(crate) struct Identity {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// Supplementary groups (fsGroup, supplementalGroups).
    pub(crate) groups: Vec<u32>,
    pub(crate) no_new_privs: bool,
    /// Capabilities the container drops `ALL` of, keeping these (matters for uid 0 only:
    /// a non-root process has none after the uid change).
    pub(crate) drop_all_keep: Option<Vec<String>>,
}

/// Everything needed to start one container process.
#[derive(Debug, Clone)]
pub(crate) struct LaunchSpec {
    pub(crate) netns_path: String,
    pub(crate) hostname: String,
    /// Host dir for the script's tmpfs (overlay upper/work dirs); must exist.
    pub(crate) scratch: PathBuf,
    pub(crate) mounts: Vec<BindMount>,
    pub(crate) read_only_root: bool,
    /// Allow binding ports < 1024 without the capability (NET_BIND_SERVICE added).
    pub(crate) unprivileged_ports: bool,
    pub(crate) identity: Identity,
    pub(crate) working_dir: String,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) argv: Vec<String>,
}

/// Single-quotes `s` for `sh`.
pub(crate) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// `/a/./b/` -> `/a/b`; rejects relative paths and `..`.
fn normalise(path: &str) -> Result<PathBuf, String> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!("mountPath {path:?} is not absolute"));
    }
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("mountPath {path:?} contains .."));
            }
        }
    }
    Ok(out)
}

/// Mount points of this process' mount namespace (`/proc/self/mountinfo`, field 5), unescaped.
fn host_mount_points() -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .collect()
}

/// `\040` and friends (octal escapes of space, tab, newline, backslash).
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where a mount target ends up: the canonical (symlink-free) host path of its deepest
/// existing ancestor, plus the missing rest.
fn resolve_target(target: &Path) -> Result<(PathBuf, PathBuf), String> {
    let mut existing = target.to_path_buf();
    let mut missing = Vec::new();
    while !existing.exists() {
        let Some(name) = existing.file_name() else {
            break;
        };
        missing.push(name.to_owned());
        existing.pop();
    }
    let canonical = existing
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", existing.display()))?;
    let mut rest = PathBuf::new();
    for part in missing.iter().rev() {
        rest.push(part);
    }
    Ok((canonical, rest))
}

/// Mount points to bring into the container's root: the outermost mounts of this process'
/// namespace other than `/` (`/proc`, `/dev`, `/sys`, a separate `/tmp`, ...), without the
/// network namespace handles under `/run/netns`.
fn submounts_to_carry() -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = host_mount_points()
        .into_iter()
        .filter(|m| m != Path::new("/") && !m.starts_with("/run/netns"))
        .collect();
    all.sort();
    all.dedup();
    all.iter()
        .filter(|m| !all.iter().any(|o| o != *m && m.starts_with(o)))
        .cloned()
        .collect()
}

/// Whether a carried mount stays writable under `readOnlyRootFilesystem` (as a container's
/// `/dev`, `/proc` and `/sys` are runtime mounts, not part of its root filesystem).
fn stays_writable(m: &Path) -> bool {
    ["/dev", "/proc", "/sys"].iter().any(|p| m.starts_with(p))
}

/// `root` + an absolute path.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// The `sh` script that prepares the mount namespace, then `exec chroot <root> "$@"`.
///
/// The container's root is an overlay with the host's `/` as its read-only lower layer and a
/// tmpfs (in the scratch dir, private to this mount namespace) as its upper layer, so mount
/// points that do not exist on the host can be created and nothing the container writes
/// reaches the host. The host's other mounts (`/proc`, `/dev`, ...) are bound into it, then
/// each volume at its `mountPath` (symlinks in the path, such as `/var/run` -> `/run`, resolved
/// as on the host, which is the lower layer).
pub(crate) fn mount_script(spec: &LaunchSpec) -> Result<String, String> {
    let q = |p: &Path| sh_quote(&p.to_string_lossy());
    let scratch = &spec.scratch;
    if scratch.to_string_lossy().contains([',', ':']) {
        return Err(format!(
            "pod dir {} contains ',' or ':' (overlay options)",
            scratch.display()
        ));
    }
    let (upper, work, root) = (
        scratch.join("upper"),
        scratch.join("work"),
        scratch.join("root"),
    );
    let mut lines = vec![
        "set -e".to_owned(),
        format!("mount -t tmpfs -o mode=0755 testkit-scratch {}", q(scratch)),
        format!("mkdir -p {} {} {}", q(&upper), q(&work), q(&root)),
        format!(
            "mount -t overlay testkit-root -o {} {}",
            sh_quote(&format!(
                "lowerdir=/,upperdir={},workdir={}",
                upper.display(),
                work.display()
            )),
            q(&root)
        ),
    ];
    let carried = submounts_to_carry();
    for m in &carried {
        lines.push(format!(
            "mount --rbind {} {} || true",
            q(m),
            q(&under(&root, m))
        ));
    }

    // Targets in depth order (parents first), resolved on the host.
    let mut mounts: Vec<(PathBuf, &BindMount)> = Vec::new();
    for m in &spec.mounts {
        mounts.push((normalise(&m.target)?, m));
    }
    mounts.sort_by_key(|(t, _)| t.components().count());
    // (mountPath, where it is inside the root)
    let mut planned: Vec<(PathBuf, PathBuf, &BindMount)> = Vec::new();
    for (target, m) in &mounts {
        // Inside another volume's mountPath: resolved within that volume.
        let parent = planned
            .iter()
            .rev()
            .find(|(t, _, _)| target.starts_with(t) && target != t)
            .map(|(t, resolved, _)| (t.clone(), resolved.clone()));
        let resolved = match parent {
            Some((parent_target, parent_resolved)) => {
                let rel = target.strip_prefix(&parent_target).unwrap_or(target);
                parent_resolved.join(rel)
            }
            None => {
                let (base, rest) = resolve_target(target)?;
                if !rest.as_os_str().is_empty() && !base.is_dir() {
                    return Err(format!(
                        "mountPath {}: {} is not a directory",
                        target.display(),
                        base.display()
                    ));
                }
                base.join(rest)
            }
        };
        planned.push((target.clone(), resolved, m));
    }
    for (_, resolved, m) in &planned {
        let inside = under(&root, resolved);
        if m.source.is_dir() {
            lines.push(format!("mkdir -p {}", q(&inside)));
        } else {
            if let Some(parent) = inside.parent() {
                lines.push(format!("mkdir -p {}", q(parent)));
            }
            lines.push(format!("[ -e {0} ] || touch {0}", q(&inside)));
        }
        lines.push(format!("mount --rbind {} {}", q(&m.source), q(&inside)));
        if m.read_only {
            lines.push(format!("mount -o remount,bind,ro {}", q(&inside)));
        }
    }
    if spec.unprivileged_ports {
        lines.push("echo 0 > /proc/sys/net/ipv4/ip_unprivileged_port_start".to_owned());
    }
    if spec.read_only_root {
        // `bind`: changes only this namespace's mount, never the host's filesystem.
        lines.push(format!("mount -o remount,bind,ro {}", q(&root)));
        for m in carried.iter().filter(|m| !stays_writable(m)) {
            lines.push(format!(
                "mount -o remount,bind,ro {} 2>/dev/null || true",
                q(&under(&root, m))
            ));
        }
    }
    lines.push(format!("hostname {}", sh_quote(&spec.hostname)));
    lines.push(format!("exec chroot {} \"$@\"", q(&root)));
    Ok(lines.join("\n"))
}

/// `setpriv ... -- env -i --chdir=<dir> K=V ... argv...`: what the script `exec`s in the
/// container's root.
pub(crate) fn exec_argv(
    identity: &Identity,
    working_dir: &str,
    env: &[(String, String)],
    argv: &[String],
) -> Vec<String> {
    let mut out = Vec::new();
    let id = identity;
    let needs_setpriv = id.uid != 0
        || id.gid != 0
        || !id.groups.is_empty()
        || id.no_new_privs
        || id.drop_all_keep.is_some();
    if needs_setpriv {
        out.push("setpriv".to_owned());
        out.push(format!("--reuid={}", id.uid));
        out.push(format!("--regid={}", id.gid));
        if id.groups.is_empty() {
            out.push("--clear-groups".to_owned());
        } else {
            let groups: Vec<String> = id.groups.iter().map(ToString::to_string).collect();
            out.push(format!("--groups={}", groups.join(",")));
        }
        if id.no_new_privs {
            out.push("--no-new-privs".to_owned());
        }
        if id.uid == 0
            && let Some(keep) = &id.drop_all_keep
        {
            let mut set = vec!["-all".to_owned()];
            set.extend(keep.iter().map(|c| format!("+{}", c.to_lowercase())));
            out.push(format!("--bounding-set={}", set.join(",")));
            out.push("--inh-caps=-all".to_owned());
        }
        out.push("--".to_owned());
    }
    out.push("env".to_owned());
    out.push("-i".to_owned());
    out.push(format!("--chdir={working_dir}"));
    for (k, v) in env {
        out.push(format!("{k}={v}"));
    }
    out.extend(argv.iter().cloned());
    out
}

/// The whole command line: `nsenter`, `unshare`, `sh -c script`, then [`exec_argv`].
pub(crate) fn command_line(spec: &LaunchSpec) -> Result<Vec<String>, String> {
    let script = mount_script(spec)?;
    let mut cmd = vec![
        "nsenter".to_owned(),
        format!("--net={}", spec.netns_path),
        "--".to_owned(),
        "unshare".to_owned(),
        "--mount".to_owned(),
        "--uts".to_owned(),
        "--propagation".to_owned(),
        "private".to_owned(),
        "--".to_owned(),
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        script,
        "testkit-pod".to_owned(),
    ];
    cmd.extend(exec_argv(
        &spec.identity,
        &spec.working_dir,
        &spec.env,
        &spec.argv,
    ));
    Ok(cmd)
}

/// Kubernetes' `$(VAR)` expansion in command, args and env values: references to variables
/// defined so far are replaced, `$$` is a literal `$`, unknown references stay as written.
pub(crate) fn expand(input: &str, vars: &[(String, String)]) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match vars.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(sh_quote("a'b"), "'a'\\''b'");
    }

    #[test]
    fn dollar_paren_expansion() {
        let vars = vec![("A".to_owned(), "1".to_owned())];
        assert_eq!(expand("x$(A)y", &vars), "x1y");
        assert_eq!(expand("$$(A)", &vars), "$(A)");
        assert_eq!(expand("$(B)", &vars), "$(B)");
        assert_eq!(expand("a$b", &vars), "a$b");
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    #[test]
    fn script_builds_an_overlay_root_with_the_volumes_and_chroots() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let vol = tmp.path().join("vol");
        fs::create_dir_all(&vol).expect("mkdir");
        let spec = LaunchSpec {
            netns_path: "/run/netns/x".to_owned(),
            hostname: "pod-1".to_owned(),
            scratch: tmp.path().join("scratch"),
            mounts: vec![
                BindMount {
                    source: vol.clone(),
                    target: "/etc/mailroom-testkit-nonexistent/config".to_owned(),
                    read_only: true,
                },
                BindMount {
                    source: vol.clone(),
                    target: "/data/sub".to_owned(),
                    read_only: false,
                },
                BindMount {
                    source: vol,
                    target: "/data".to_owned(),
                    read_only: false,
                },
            ],
            read_only_root: true,
            unprivileged_ports: false,
            identity: Identity {
                uid: 65532,
                gid: 65532,
                groups: vec![65532],
                no_new_privs: true,
                drop_all_keep: None,
            },
            working_dir: "/".to_owned(),
            env: vec![("A".to_owned(), "b c".to_owned())],
            argv: vec!["/bin/true".to_owned()],
        };
        let script = mount_script(&spec).expect("script");
        let root = tmp.path().join("scratch/root").display().to_string();
        assert!(script.contains("lowerdir=/,"), "{script}");
        assert!(
            script.contains(&format!(
                "mount -o remount,bind,ro '{root}/etc/mailroom-testkit-nonexistent/config'"
            )),
            "{script}"
        );
        // Parents first: /data before /data/sub.
        let data = script
            .find(&format!("mkdir -p '{root}/data'\n"))
            .expect("data");
        let sub = script
            .find(&format!("mkdir -p '{root}/data/sub'"))
            .expect("sub");
        assert!(data < sub, "{script}");
        assert!(
            script.contains(&format!("mount -o remount,bind,ro '{root}'\n")),
            "{script}"
        );
        assert!(
            script.ends_with(&format!("exec chroot '{root}' \"$@\"")),
            "{script}"
        );
        let argv = exec_argv(&spec.identity, "/work", &spec.env, &spec.argv);
        assert_eq!(
            argv,
            [
                "setpriv",
                "--reuid=65532",
                "--regid=65532",
                "--groups=65532",
                "--no-new-privs",
                "--",
                "env",
                "-i",
                "--chdir=/work",
                "A=b c",
                "/bin/true"
            ]
        );
    }
}
