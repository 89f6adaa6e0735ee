//! Volumes of a pod, materialised as directories under the pod dir (bind-mounted into the
//! containers by [`super::launch`]): `configMap`, `secret`, `emptyDir`, `downwardAPI`,
//! `projected` (service-account token via a TokenRequest bound to the pod, ConfigMap, Secret,
//! downward API) and `hostPath`. File modes follow `items[].mode` / `defaultMode` (default
//! 0644); with `fsGroup` the files are given to that group and made group-readable (group
//! read-write for `emptyDir`), directories get the setgid bit, as the kubelet does.
//! ConfigMap and Secret contents are written once, when the pod starts (no live updates).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{PermissionsExt, lchown};
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, ObjectFieldSelector, Pod, Secret, ServiceAccount,
    Volume,
};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};

/// Why a volume is not ready.
#[derive(Debug)]
pub(crate) enum VolumeError {
    /// Something it needs does not exist (yet): retry, as the kubelet does (`FailedMount`).
    Retry(String),
    /// It can never work here.
    Fatal(String),
}

impl std::fmt::Display for VolumeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Retry(m) | Self::Fatal(m) => f.write_str(m),
        }
    }
}

fn io_fatal(what: &str, path: &Path, e: &std::io::Error) -> VolumeError {
    VolumeError::Fatal(format!("{what} {}: {e}", path.display()))
}

/// A materialised volume.
#[derive(Debug, Clone)]
pub(crate) struct Materialised {
    /// The directory (or, for a file `hostPath`, the file) to bind-mount.
    pub(crate) path: PathBuf,
}

/// What the downward API can see of the pod besides its object.
#[derive(Debug, Clone)]
pub(crate) struct PodFacts {
    pub(crate) pod_ip: String,
    pub(crate) host_ip: String,
    pub(crate) node_name: String,
}

/// Writes every volume of `pod` under `dir/<volume name>`.
pub(crate) async fn materialise_all(
    client: &Client,
    pod: &Pod,
    facts: &PodFacts,
    dir: &Path,
) -> Result<BTreeMap<String, Materialised>, VolumeError> {
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| VolumeError::Fatal("pod has no spec".to_owned()))?;
    let security = spec.security_context.as_ref();
    let fs_group = security.and_then(|s| s.fs_group);
    let run_as_user = security.and_then(|s| s.run_as_user);
    let mut out = BTreeMap::new();
    for volume in spec.volumes.iter().flatten() {
        let path = dir.join(&volume.name);
        let m = materialise(client, pod, facts, volume, &path, fs_group, run_as_user).await?;
        out.insert(volume.name.clone(), m);
    }
    Ok(out)
}

/// Kind of a volume for the fsGroup rules.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// ConfigMap, Secret, downward API, projected: group read.
    ReadOnly,
    /// emptyDir: group read-write.
    ReadWrite,
}

#[allow(clippy::too_many_arguments)]
async fn materialise(
    client: &Client,
    pod: &Pod,
    facts: &PodFacts,
    volume: &Volume,
    path: &Path,
    fs_group: Option<i64>,
    run_as_user: Option<i64>,
) -> Result<Materialised, VolumeError> {
    let ns = pod.namespace().unwrap_or_else(|| "default".to_owned());
    // Rewritten from scratch at each (re)start of the pod worker.
    let _ = fs::remove_dir_all(path);
    let access;
    let mut token_files = Vec::new();
    if let Some(cm) = &volume.config_map {
        mkdir(path, 0o755)?;
        let name = cm.name.clone();
        let optional = cm.optional.unwrap_or(false);
        let files = config_map_files(client, &ns, &name, cm.items.as_deref(), optional).await?;
        write_files(path, files, cm.default_mode)?;
        access = Access::ReadOnly;
    } else if let Some(secret) = &volume.secret {
        mkdir(path, 0o755)?;
        let name = secret.secret_name.clone().unwrap_or_default();
        let optional = secret.optional.unwrap_or(false);
        let files = secret_files(client, &ns, &name, secret.items.as_deref(), optional).await?;
        write_files(path, files, secret.default_mode)?;
        access = Access::ReadOnly;
    } else if volume.empty_dir.is_some() {
        mkdir(path, 0o777)?;
        access = Access::ReadWrite;
    } else if let Some(downward) = &volume.downward_api {
        mkdir(path, 0o755)?;
        let files = downward_files(pod, facts, downward.items.as_deref().unwrap_or_default())?;
        write_files(path, files, downward.default_mode)?;
        access = Access::ReadOnly;
    } else if let Some(projected) = &volume.projected {
        mkdir(path, 0o755)?;
        let mut files = Vec::new();
        for source in projected.sources.iter().flatten() {
            if let Some(cm) = &source.config_map {
                let optional = cm.optional.unwrap_or(false);
                files.extend(
                    config_map_files(client, &ns, &cm.name, cm.items.as_deref(), optional).await?,
                );
            } else if let Some(secret) = &source.secret {
                let optional = secret.optional.unwrap_or(false);
                files.extend(
                    secret_files(client, &ns, &secret.name, secret.items.as_deref(), optional)
                        .await?,
                );
            } else if let Some(downward) = &source.downward_api {
                files.extend(downward_files(
                    pod,
                    facts,
                    downward.items.as_deref().unwrap_or_default(),
                )?);
            } else if let Some(token) = &source.service_account_token {
                let jwt = request_token(
                    client,
                    pod,
                    token.audience.clone(),
                    token.expiration_seconds.unwrap_or(3600),
                )
                .await?;
                token_files.push(token.path.clone());
                files.push(File {
                    path: token.path.clone(),
                    data: jwt.into_bytes(),
                    mode: None,
                });
            } else {
                return Err(VolumeError::Fatal(format!(
                    "volume {}: projected source not supported by FakeKubelet",
                    volume.name
                )));
            }
        }
        write_files(path, files, projected.default_mode)?;
        access = Access::ReadOnly;
    } else if let Some(host) = &volume.host_path {
        let host_path = PathBuf::from(&host.path);
        let kind = host.type_.as_deref().unwrap_or_default();
        if !host_path.exists() {
            match kind {
                "DirectoryOrCreate" => mkdir(&host_path, 0o755)?,
                "FileOrCreate" => fs::write(&host_path, b"")
                    .map_err(|e| io_fatal("cannot create", &host_path, &e))?,
                _ => {
                    return Err(VolumeError::Retry(format!(
                        "volume {}: hostPath {} does not exist",
                        volume.name, host.path
                    )));
                }
            }
        }
        return Ok(Materialised { path: host_path });
    } else {
        return Err(VolumeError::Fatal(format!(
            "volume {}: this volume type is not supported by FakeKubelet (configMap, secret, \
             emptyDir, downwardAPI, projected and hostPath are)",
            volume.name
        )));
    }
    if let Some(gid) = fs_group {
        apply_fs_group(path, gid, access)?;
    } else if let Some(uid) = run_as_user {
        // Without fsGroup the kubelet gives a projected token to the pod's user, mode 0600.
        for rel in &token_files {
            let file = path.join(rel);
            let owner = u32::try_from(uid).ok();
            lchown(&file, owner, None).map_err(|e| io_fatal("cannot chown", &file, &e))?;
            set_mode(&file, 0o600)?;
        }
    }
    Ok(Materialised {
        path: path.to_path_buf(),
    })
}

/// A file to write into a volume: relative path, contents, mode (else the default mode).
struct File {
    path: String,
    data: Vec<u8>,
    mode: Option<i32>,
}

fn mkdir(path: &Path, mode: u32) -> Result<(), VolumeError> {
    fs::create_dir_all(path).map_err(|e| io_fatal("cannot create", path, &e))?;
    set_mode(path, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), VolumeError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| io_fatal("cannot chmod", path, &e))
}

/// A relative path without `..`, as the API server validates `items[].path`.
fn safe_relative(rel: &str) -> Result<&Path, VolumeError> {
    let path = Path::new(rel);
    if rel.is_empty()
        || path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(VolumeError::Fatal(format!(
            "invalid volume file path {rel:?}"
        )));
    }
    Ok(path)
}

fn write_files(dir: &Path, files: Vec<File>, default_mode: Option<i32>) -> Result<(), VolumeError> {
    let default_mode = default_mode.unwrap_or(0o644);
    for file in files {
        let target = dir.join(safe_relative(&file.path)?);
        if let Some(parent) = target.parent() {
            mkdir(parent, 0o755)?;
        }
        fs::write(&target, &file.data).map_err(|e| io_fatal("cannot write", &target, &e))?;
        let mode = u32::try_from(file.mode.unwrap_or(default_mode) & 0o777).unwrap_or(0o644);
        set_mode(&target, mode)?;
    }
    Ok(())
}

/// The kubelet's `SetVolumeOwnership`: group `gid`, mode | 0440 (read-only volumes) or 0660,
/// directories also setgid and group-searchable.
fn apply_fs_group(path: &Path, gid: i64, access: Access) -> Result<(), VolumeError> {
    let gid = u32::try_from(gid).map_err(|_| VolumeError::Fatal(format!("fsGroup {gid}")))?;
    let meta = fs::symlink_metadata(path).map_err(|e| io_fatal("cannot stat", path, &e))?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    lchown(path, None, Some(gid)).map_err(|e| io_fatal("cannot chown", path, &e))?;
    let mut mask = match access {
        Access::ReadOnly => 0o440,
        Access::ReadWrite => 0o660,
    };
    if meta.is_dir() {
        mask |= 0o2110;
    }
    set_mode(path, (meta.permissions().mode() & 0o7777) | mask)?;
    if meta.is_dir() {
        let entries = fs::read_dir(path).map_err(|e| io_fatal("cannot list", path, &e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_fatal("cannot list", path, &e))?;
            apply_fs_group(&entry.path(), i64::from(gid), access)?;
        }
    }
    Ok(())
}

fn select(
    what: &str,
    name: &str,
    mut all: BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    optional: bool,
) -> Result<Vec<File>, VolumeError> {
    match items {
        None => Ok(all
            .into_iter()
            .map(|(key, data)| File {
                path: key,
                data,
                mode: None,
            })
            .collect()),
        Some(items) => {
            let mut files = Vec::new();
            for item in items {
                match all.remove(&item.key) {
                    Some(data) => files.push(File {
                        path: item.path.clone(),
                        data,
                        mode: item.mode,
                    }),
                    None if optional => {}
                    None => {
                        return Err(VolumeError::Retry(format!(
                            "{what} {name} has no key {:?}",
                            item.key
                        )));
                    }
                }
            }
            Ok(files)
        }
    }
}

/// The object `ns/name`, `None` when it is missing and the volume says `optional`.
async fn fetch<K>(
    client: &Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> Result<Option<K>, VolumeError>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let what = K::kind(&()).to_lowercase();
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    match api
        .get_opt(name)
        .await
        .map_err(|e| VolumeError::Retry(format!("get {what} {ns}/{name}: {e}")))?
    {
        Some(object) => Ok(Some(object)),
        None if optional => Ok(None),
        None => Err(VolumeError::Retry(format!(
            "{what} \"{name}\" not found in namespace {ns}"
        ))),
    }
}

async fn config_map_files(
    client: &Client,
    ns: &str,
    name: &str,
    items: Option<&[KeyToPath]>,
    optional: bool,
) -> Result<Vec<File>, VolumeError> {
    let Some(cm) = fetch::<ConfigMap>(client, ns, name, optional).await? else {
        return Ok(Vec::new());
    };
    let mut all: BTreeMap<String, Vec<u8>> = cm
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    for (k, v) in cm.binary_data.unwrap_or_default() {
        all.insert(k, v.0);
    }
    select("configmap", name, all, items, optional)
}

async fn secret_files(
    client: &Client,
    ns: &str,
    name: &str,
    items: Option<&[KeyToPath]>,
    optional: bool,
) -> Result<Vec<File>, VolumeError> {
    let Some(secret) = fetch::<Secret>(client, ns, name, optional).await? else {
        return Ok(Vec::new());
    };
    let mut all: BTreeMap<String, Vec<u8>> = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    for (k, v) in secret.string_data.unwrap_or_default() {
        all.insert(k, v.into_bytes());
    }
    select("secret", name, all, items, optional)
}

fn downward_files(
    pod: &Pod,
    facts: &PodFacts,
    items: &[DownwardAPIVolumeFile],
) -> Result<Vec<File>, VolumeError> {
    let mut files = Vec::new();
    for item in items {
        let value = match (&item.field_ref, &item.resource_field_ref) {
            (Some(field), _) => field_value(pod, facts, field)
                .map_err(|m| VolumeError::Fatal(format!("downwardAPI {}: {m}", item.path)))?,
            (None, Some(res)) => resource_value(pod, res.container_name.as_deref(), &res.resource),
            (None, None) => String::new(),
        };
        files.push(File {
            path: item.path.clone(),
            data: value.into_bytes(),
            mode: item.mode,
        });
    }
    Ok(files)
}

/// `key="value"` lines, sorted, as the kubelet writes labels and annotations.
fn format_map(map: Option<&BTreeMap<String, String>>) -> String {
    map.into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}\n", serde_json::Value::from(v.as_str())))
        .collect()
}

/// The value of a `fieldRef` (env or downward API volume).
pub(crate) fn field_value(
    pod: &Pod,
    facts: &PodFacts,
    field: &ObjectFieldSelector,
) -> Result<String, String> {
    let path = field.field_path.as_str();
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let lookup = |map: Option<&BTreeMap<String, String>>, prefix: &str| {
        let key = path
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix("']"))
            .unwrap_or_default();
        map.and_then(|m| m.get(key)).cloned().unwrap_or_default()
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => format_map(meta.labels.as_ref()),
        "metadata.annotations" => format_map(meta.annotations.as_ref()),
        "spec.nodeName" => facts.node_name.clone(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.podIPs" => facts.pod_ip.clone(),
        "status.hostIP" | "status.hostIPs" => facts.host_ip.clone(),
        p if p.starts_with("metadata.labels['") => {
            lookup(meta.labels.as_ref(), "metadata.labels['")
        }
        p if p.starts_with("metadata.annotations['") => {
            lookup(meta.annotations.as_ref(), "metadata.annotations['")
        }
        other => return Err(format!("fieldPath {other:?} is not supported")),
    })
}

/// A `resourceFieldRef` value: the container's limit or request as written in the spec (no
/// node allocatable to fall back to; "0" when unset).
pub(crate) fn resource_value(pod: &Pod, container: Option<&str>, resource: &str) -> String {
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    let container = match container {
        Some(name) => containers.iter().find(|c| c.name == name),
        None => containers.first(),
    };
    let resources = container.and_then(|c| c.resources.as_ref());
    let (kind, name) = resource.split_once('.').unwrap_or(("limits", resource));
    let map = match kind {
        "requests" => resources.and_then(|r| r.requests.as_ref()),
        _ => resources.and_then(|r| r.limits.as_ref()),
    };
    map.and_then(|m| m.get(name))
        .map_or_else(|| "0".to_owned(), |q| q.0.clone())
}

/// A service-account token for the pod (TokenRequest bound to the pod object).
async fn request_token(
    client: &Client,
    pod: &Pod,
    audience: Option<String>,
    expiration_seconds: i64,
) -> Result<String, VolumeError> {
    let ns = pod.namespace().unwrap_or_else(|| "default".to_owned());
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".to_owned());
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            // Empty: the apiserver's own audiences.
            audiences: audience.filter(|a| !a.is_empty()).map(|a| vec![a]),
            expiration_seconds: Some(expiration_seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        }),
        ..TokenRequest::default()
    };
    let response: TokenRequest = api
        .create_subresource("token", &sa, &PostParams::default(), &request)
        .await
        .map_err(|e| {
            VolumeError::Retry(format!(
                "token request for serviceaccount {ns}/{sa} failed: {e}"
            ))
        })?;
    response
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| VolumeError::Retry(format!("token request for {ns}/{sa}: no token")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_must_stay_inside() {
        assert!(safe_relative("a/b.txt").is_ok());
        assert!(safe_relative("../x").is_err());
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("").is_err());
    }

    #[test]
    fn fs_group_makes_files_group_readable_and_dirs_setgid() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("v");
        mkdir(&dir, 0o755).expect("mkdir");
        write_files(
            &dir,
            vec![File {
                path: "sub/key".to_owned(),
                data: b"x".to_vec(),
                mode: None,
            }],
            Some(0o400),
        )
        .expect("write");
        // The current group: works without root.
        let gid = i64::from(rustix::process::getegid().as_raw());
        apply_fs_group(&dir, gid, Access::ReadOnly).expect("fs group");
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode(&dir.join("sub/key")), 0o440);
        assert_eq!(mode(&dir), 0o2755);
    }

    #[test]
    fn labels_are_written_sorted_and_quoted() {
        let mut map = BTreeMap::new();
        map.insert("b".to_owned(), "2".to_owned());
        map.insert("a".to_owned(), "x\"y".to_owned());
        assert_eq!(format_map(Some(&map)), "a=\"x\\\"y\"\nb=\"2\"\n");
    }
}
