//! TLS for listeners (STARTTLS and implicit TLS) with tokio-rustls. The certificate and key come
//! from PEM files and are reloaded when the files change, without a restart: a background task
//! checks their modification times every `tls.reloadInterval` and swaps the certified key in
//! place. A reload that fails (half-written file, key not matching) keeps the previous key and
//! logs why.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::InboundError;

/// Serves the current certified key and swaps it when the files change.
#[derive(Debug)]
pub struct ReloadingCert {
    current: ArcSwap<CertifiedKey>,
    cert_file: PathBuf,
    key_file: PathBuf,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Loads a certificate chain and its private key from PEM files; the error names the file.
pub fn load_certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| format!("{}: cannot read certificates: {e}", cert_file.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: bad PEM certificate: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no CERTIFICATE block found",
            cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("{}: cannot read a private key: {e}", key_file.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("{}: unsupported private key: {e}", key_file.display()))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(|e| {
        format!(
            "{} and {}: the key does not match the certificate: {e}",
            key_file.display(),
            cert_file.display()
        )
    })?;
    Ok(ck)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl ReloadingCert {
    /// Loads the files once; fails when they cannot be used.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Arc<Self>, String> {
        let ck = load_certified_key(cert_file, key_file)?;
        Ok(Arc::new(ReloadingCert {
            current: ArcSwap::from_pointee(ck),
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
        }))
    }

    /// Watches the files until `shutdown`, reloading on change.
    pub fn spawn_watcher(self: &Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut seen = (modified(&me.cert_file), modified(&me.key_file));
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let now = (modified(&me.cert_file), modified(&me.key_file));
                if now == seen {
                    continue;
                }
                match load_certified_key(&me.cert_file, &me.key_file) {
                    Ok(ck) => {
                        me.current.store(Arc::new(ck));
                        seen = now;
                        tracing::info!(cert = %me.cert_file.display(), "TLS certificate reloaded");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS certificate changed but cannot be loaded; keeping the previous one")
                    }
                }
            }
        });
    }
}

/// Builds the acceptor of a listener; `listener` names it in errors.
pub fn acceptor(listener: &str, cert: Arc<ReloadingCert>) -> Result<TlsAcceptor, InboundError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| InboundError::Tls {
            listener: listener.to_string(),
            reason: e.to_string(),
        })?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    Ok(TlsAcceptor::from(Arc::new(config)))
}
