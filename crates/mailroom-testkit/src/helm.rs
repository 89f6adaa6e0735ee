//! Running `helm` ([`Tool::Helm`], built by `e2e/tools/build.sh helm`) for chart tests, offline
//! and isolated: its cache, config and data homes (`HELM_CACHE_HOME`, `HELM_CONFIG_HOME`,
//! `HELM_DATA_HOME`) are under a directory of the test, so no repository index, plugin, registry
//! login or kubeconfig of the user is read or written. [`KubeControlPlane::helm`] runs it against
//! a test control plane.
//!
//! [`KubeControlPlane::helm`]: crate::KubeControlPlane::helm

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::binary::Tool;
use crate::error::{Result, TestkitError};
use crate::process::command_line;

/// Runs `helm <args...>` (blocking) with its homes under `home` (created by helm as needed) and
/// without `KUBECONFIG`, and returns its output whatever the exit status. For commands that need
/// no cluster: `lint`, `template`, `show`, `package`.
///
/// # Errors
/// helm not found ([`TestkitError::BinaryNotFound`] says how to build it) or not spawnable.
pub fn helm(home: &Path, args: &[&str]) -> Result<Output> {
    run(home, None, args)
}

/// [`helm`], and its stdout if it exited with 0.
///
/// # Errors
/// helm not found, or [`TestkitError::CommandFailed`] with its stderr.
pub fn helm_ok(home: &Path, args: &[&str]) -> Result<String> {
    success("helm", args, helm(home, args)?)
}

/// `helm [--kubeconfig <kubeconfig>] <args...>` with isolated homes under `home`.
pub(crate) fn run(home: &Path, kubeconfig: Option<&Path>, args: &[&str]) -> Result<Output> {
    let binary = Tool::Helm.find()?;
    let mut all: Vec<&OsStr> = Vec::with_capacity(args.len() + 2);
    if let Some(kubeconfig) = kubeconfig {
        all.extend(["--kubeconfig".as_ref(), kubeconfig.as_os_str()]);
    }
    all.extend(args.iter().map(OsStr::new));
    Command::new(&binary)
        .args(&all)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env_remove("KUBECONFIG")
        .env_remove("HELM_KUBECONTEXT")
        .env_remove("HELM_NAMESPACE")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| TestkitError::Spawn {
            command: command_line(&binary, &all),
            binary,
            source,
        })
}

/// The stdout of a successful run of `tool`, else [`TestkitError::CommandFailed`] with stderr
/// (or stdout when stderr is empty).
pub(crate) fn success(tool: &str, args: &[&str], out: Output) -> Result<String> {
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = if out.stderr.is_empty() {
        &out.stdout
    } else {
        &out.stderr
    };
    Err(TestkitError::CommandFailed {
        command: format!("{tool} {}", args.join(" ")),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(stderr).trim_end().to_owned(),
    })
}
