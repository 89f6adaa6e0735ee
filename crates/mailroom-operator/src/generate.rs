//! CRD generation: the CustomResourceDefinitions of [`crate::crd`] as YAML, for `mailroom crd`
//! and for the files in `crds/` (the repository's copy, checked for staleness by a test).

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::CustomResourceExt;

use crate::crd::{DeliveryPolicy, MailListener};

/// Every CRD of the operator, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![MailListener::crd(), DeliveryPolicy::crd()];
    for crd in &mut crds {
        for version in &mut crd.spec.versions {
            if let Some(schema) = version
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
            {
                kube_formats(schema);
                drop_spec_name(schema);
            }
        }
    }
    crds
}

/// Removes `spec.name`, which both specs get from the shared model: in a custom resource the
/// name is `metadata.name`, so the field would only be a second, conflicting source. The
/// apiserver prunes it when a user sets it anyway.
fn drop_spec_name(root: &mut JSONSchemaProps) {
    let Some(spec) = root.properties.as_mut().and_then(|p| p.get_mut("spec")) else {
        return;
    };
    if let Some(properties) = spec.properties.as_mut() {
        properties.remove("name");
    }
    if let Some(required) = spec.required.as_mut() {
        required.retain(|field| field != "name");
    }
}

/// Rewrites the integer formats schemars emits for Rust's unsigned types (`uint8` ... `uint64`),
/// which the apiserver does not know (it warns on every apply), into the OpenAPI ones:
/// `int32` when the values fit, `int64` for `uint32`, none for `uint64` (`minimum: 0` stays).
fn kube_formats(schema: &mut JSONSchemaProps) {
    schema.format = match schema.format.take().as_deref() {
        Some("uint8" | "uint16" | "int8" | "int16") => Some("int32".to_string()),
        Some("uint32") => Some("int64".to_string()),
        Some("uint64" | "uint" | "int" | "uint128" | "int128") => None,
        other => other.map(str::to_string),
    };
    for child in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
        kube_formats(child);
    }
    match &mut schema.items {
        Some(JSONSchemaPropsOrArray::Schema(item)) => kube_formats(item),
        Some(JSONSchemaPropsOrArray::Schemas(items)) => items.iter_mut().for_each(kube_formats),
        None => {}
    }
    if let Some(JSONSchemaPropsOrBool::Schema(extra)) = &mut schema.additional_properties {
        kube_formats(extra);
    }
    for list in [&mut schema.all_of, &mut schema.any_of, &mut schema.one_of]
        .into_iter()
        .flatten()
    {
        list.iter_mut().for_each(kube_formats);
    }
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
