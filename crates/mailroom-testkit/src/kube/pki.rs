//! The test PKI of a [`super::KubeControlPlane`], made with `rcgen` (no openssl): one CA for the
//! serving and the client certs, and a service-account signing key. All keys are ECDSA P-256
//! (rcgen with ring cannot generate RSA keys).
//!
//! Service-account key: `--service-account-signing-key-file` (apiserver) and
//! `--service-account-private-key-file` (controller manager) take the PKCS#8 private key
//! `sa.key`, but `--service-account-key-file` (verification) does not: client-go's
//! `keyutil.ParsePublicKeysPEM` reads EC private keys only in SEC1 form ("EC PRIVATE KEY") and
//! fails on PKCS#8 with "data does not contain any valid RSA or ECDSA public keys". It gets the
//! public key `sa.pub` (SPKI "PUBLIC KEY") instead. Tokens are ES256.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::{Result, TestkitError};

/// Paths of the PEM files in `<dir>/pki/`, plus a rustls config for probing the apiserver as
/// the admin user.
pub(crate) struct Pki {
    pub(crate) dir: PathBuf,
    pub(crate) ca_cert: PathBuf,
    pub(crate) apiserver_cert: PathBuf,
    pub(crate) apiserver_key: PathBuf,
    pub(crate) admin_cert: PathBuf,
    pub(crate) admin_key: PathBuf,
    pub(crate) sa_key: PathBuf,
    pub(crate) sa_pub: PathBuf,
    /// Trusts the CA, presents the admin client cert.
    pub(crate) admin_tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn pki_err(what: &'static str) -> impl Fn(rcgen::Error) -> TestkitError {
    move |e| TestkitError::Pki {
        what,
        reason: e.to_string(),
    }
}

fn name(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    if let Some(org) = org {
        dn.push(DnType::OrganizationName, org);
    }
    dn.push(DnType::CommonName, cn);
    dn
}

/// Parameters of a leaf certificate (validity: rcgen's default 1975..4096, so clock skew never
/// matters in a test).
fn leaf(
    sans: Vec<String>,
    dn: DistinguishedName,
    eku: ExtendedKeyUsagePurpose,
    what: &'static str,
) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(sans).map_err(pki_err(what))?;
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![eku];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Writes `contents` to `path`, readable by the owner only when `secret`.
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<()> {
    let io_err = |source| TestkitError::Io {
        what: "cannot write",
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io_err)?;
    file.write_all(contents.as_bytes()).map_err(io_err)
}

/// Generates the CA, the apiserver serving cert (IP 127.0.0.1, DNS localhost, and `extra_ips`),
/// the admin client cert (`O=system:masters`, `CN=admin`) and the service-account key into
/// `<dir>/pki/`.
pub(crate) fn generate(dir: &Path, extra_ips: &[IpAddr]) -> Result<Pki> {
    let pki_dir = dir.join("pki");
    fs::create_dir_all(&pki_dir).map_err(|source| TestkitError::Io {
        what: "cannot create",
        path: pki_dir.clone(),
        source,
    })?;
    let path = |file: &str| pki_dir.join(file);

    // CA
    let ca_key = KeyPair::generate().map_err(pki_err("the CA key"))?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = name("mailroom-testkit-ca", Some("mailroom-testkit"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(pki_err("the CA cert"))?;
    write_file(&path("ca.crt"), &ca.pem(), false)?;
    // Not used by any component; kept so a debugging session (MAILROOM_TESTKIT_KEEP=1) can sign
    // more client certs with openssl.
    write_file(&path("ca.key"), &ca_key_pem, true)?;

    // apiserver serving cert
    let server_key = KeyPair::generate().map_err(pki_err("the apiserver key"))?;
    let mut sans = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
    sans.extend(extra_ips.iter().map(ToString::to_string));
    let server = leaf(
        sans,
        name("kube-apiserver", None),
        ExtendedKeyUsagePurpose::ServerAuth,
        "the apiserver cert",
    )?
    .signed_by(&server_key, &ca)
    .map_err(pki_err("the apiserver cert"))?;
    write_file(&path("apiserver.crt"), &server.pem(), false)?;
    write_file(&path("apiserver.key"), &server_key.serialize_pem(), true)?;

    // admin client cert: group system:masters (RBAC superuser), user admin
    let admin_key = KeyPair::generate().map_err(pki_err("the admin key"))?;
    let admin = leaf(
        Vec::new(),
        name("admin", Some("system:masters")),
        ExtendedKeyUsagePurpose::ClientAuth,
        "the admin client cert",
    )?
    .signed_by(&admin_key, &ca)
    .map_err(pki_err("the admin client cert"))?;
    write_file(&path("admin.crt"), &admin.pem(), false)?;
    write_file(&path("admin.key"), &admin_key.serialize_pem(), true)?;

    // service-account token signing key, and its public half for verification
    let sa_key = KeyPair::generate().map_err(pki_err("the service-account key"))?;
    write_file(&path("sa.key"), &sa_key.serialize_pem(), true)?;
    write_file(&path("sa.pub"), &sa_key.public_key_pem(), false)?;

    let admin_tls = client_config(
        ca.der().clone(),
        admin.der().clone(),
        PrivatePkcs8KeyDer::from(admin_key.serialize_der()).into(),
    )?;

    Ok(Pki {
        ca_cert: path("ca.crt"),
        apiserver_cert: path("apiserver.crt"),
        apiserver_key: path("apiserver.key"),
        admin_cert: path("admin.crt"),
        admin_key: path("admin.key"),
        sa_key: path("sa.key"),
        sa_pub: path("sa.pub"),
        dir: pki_dir,
        admin_tls,
    })
}

/// A rustls client config with the ring provider (explicit, so it works whatever process-wide
/// provider is or is not installed), trusting only `ca`, authenticating with `cert` + `key`.
fn client_config(
    ca: CertificateDer<'static>,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ClientConfig>> {
    let tls_err = |e: rustls::Error| TestkitError::Pki {
        what: "a rustls client config for the admin user",
        reason: e.to_string(),
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).map_err(tls_err)?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(tls_err)?
    .with_root_certificates(roots)
    .with_client_auth_cert(vec![cert], key)
    .map_err(tls_err)?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_pem_files_with_private_keys_owner_only() {
        use std::os::unix::fs::PermissionsExt;

        let tmp = tempfile::tempdir().expect("tempdir");
        let pki = generate(tmp.path(), &["10.244.0.1".parse().expect("ip")]).expect("pki");
        for cert in [&pki.ca_cert, &pki.apiserver_cert, &pki.admin_cert] {
            let text = fs::read_to_string(cert).expect("read cert");
            assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{text}");
        }
        for key in [&pki.apiserver_key, &pki.admin_key, &pki.sa_key] {
            let text = fs::read_to_string(key).expect("read key");
            assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{text}");
            let mode = fs::metadata(key).expect("stat").permissions().mode();
            assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", key.display());
        }
        assert!(pki.dir.join("ca.key").is_file());
        let public = fs::read_to_string(&pki.sa_pub).expect("read sa.pub");
        assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"), "{public}");
    }
}
