//! CRD generation: the CustomResourceDefinitions of [`crate::crd`] as YAML, for `mailroom crd`
//! and for the files in `crds/` (the repository's copy, checked for staleness by a test).

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::crd::{DeliveryPolicy, MailListener};

/// Every CRD of the operator, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![MailListener::crd(), DeliveryPolicy::crd()]
}

/// One CRD as a YAML document (without the `---` separator).
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_saphyr::ser::Error> {
    serde_saphyr::to_string(crd)
}

/// Every CRD as one multi-document YAML stream, as `mailroom crd` prints it.
pub fn all_yaml() -> Result<String, serde_saphyr::ser::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&to_yaml(&crd)?);
    }
    Ok(out)
}

/// The file name of a CRD in `crds/`: `<group>_<plural>.yaml`, as controller-gen names them.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural)
}

/// The repository's `crds/` directory.
pub fn repo_crds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds")
}

/// The files `crds/` should hold: file name and contents.
pub fn files() -> Result<Vec<(String, String)>, serde_saphyr::ser::Error> {
    crds()
        .iter()
        .map(|crd| Ok((file_name(crd), to_yaml(crd)?)))
        .collect()
}

/// Writes every CRD file into `dir` and returns the paths written.
pub fn write_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let files = files().map_err(std::io::Error::other)?;
    std::fs::create_dir_all(dir)?;
    files
        .into_iter()
        .map(|(name, text)| {
            let path = dir.join(name);
            std::fs::write(&path, text)?;
            Ok(path)
        })
        .collect()
}
