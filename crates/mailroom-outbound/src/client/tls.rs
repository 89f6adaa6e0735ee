//! TLS for the client with tokio-rustls and the ring provider: the trust anchors
//! ([`TlsRoots`]), the two rustls configurations built from them (verifying, and the
//! opportunistic one that accepts any certificate), the handshake, and what a connection
//! reports about its TLS session ([`TlsInfo`]).

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::error::{ClientError, Peer, Stage};

/// CA bundles of common distributions, tried in order by [`TlsRoots::system`] after
/// `$SSL_CERT_FILE`.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Why trust anchors could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    /// The file cannot be read.
    #[error("{}: cannot read CA certificates: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The PEM text is broken.
    #[error("{origin}: bad PEM: {reason}")]
    Pem {
        /// The file, or `PEM data`.
        origin: String,
        /// The parser's message.
        reason: String,
    },
    /// No usable CERTIFICATE block.
    #[error("{origin}: no usable CA certificate found")]
    NoCertificates {
        /// The file, or `PEM data`.
        origin: String,
    },
    /// No CA bundle was found in the usual places.
    #[error("no system CA bundle found ($SSL_CERT_FILE or {})", SYSTEM_BUNDLES.join(", "))]
    NoSystemBundle,
}

/// The trust anchors of a [`ClientConfig`](super::ClientConfig), with the rustls client
/// configurations built from them on first use and shared by every clone (building a
/// verifier over a system bundle is not free). Default: no anchors, so `Required` fails
/// until roots are given.
#[derive(Clone)]
pub struct TlsRoots {
    inner: Arc<RootsInner>,
}

struct RootsInner {
    store: Arc<RootCertStore>,
    verifying: OnceLock<Result<TlsConnector, String>>,
    opportunistic: OnceLock<Result<TlsConnector, String>>,
}

impl fmt::Debug for TlsRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsRoots")
            .field("anchors", &self.len())
            .finish()
    }
}

impl Default for TlsRoots {
    fn default() -> Self {
        TlsRoots::new(RootCertStore::empty())
    }
}

impl TlsRoots {
    /// Trust anchors from a rustls store.
    pub fn new(store: RootCertStore) -> TlsRoots {
        TlsRoots {
            inner: Arc::new(RootsInner {
                store: Arc::new(store),
                verifying: OnceLock::new(),
                opportunistic: OnceLock::new(),
            }),
        }
    }

    /// The CA certificates in PEM text (`-----BEGIN CERTIFICATE-----` blocks; other blocks
    /// are skipped).
    pub fn from_pem(pem: &[u8]) -> Result<TlsRoots, RootsError> {
        Self::parse(pem, "PEM data")
    }

    /// The CA certificates of a PEM file, e.g. a private CA for a relay (`caFile`).
    pub fn from_pem_file(path: &Path) -> Result<TlsRoots, RootsError> {
        let pem = std::fs::read(path).map_err(|source| RootsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&pem, &path.display().to_string())
    }

    /// The system's CA bundle: `$SSL_CERT_FILE`, else the first of the usual distribution
    /// paths that exists (`/etc/ssl/certs/ca-certificates.crt`, ...).
    pub fn system() -> Result<TlsRoots, RootsError> {
        if let Some(path) = std::env::var_os("SSL_CERT_FILE") {
            return Self::from_pem_file(Path::new(&path));
        }
        SYSTEM_BUNDLES
            .iter()
            .map(Path::new)
            .find(|p| p.is_file())
            .ok_or(RootsError::NoSystemBundle)
            .and_then(Self::from_pem_file)
    }

    fn parse(pem: &[u8], origin: &str) -> Result<TlsRoots, RootsError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| RootsError::Pem {
                origin: origin.to_owned(),
                reason: e.to_string(),
            })?;
        let mut store = RootCertStore::empty();
        let (added, _ignored) = store.add_parsable_certificates(certs);
        if added == 0 {
            return Err(RootsError::NoCertificates {
                origin: origin.to_owned(),
            });
        }
        Ok(Self::new(store))
    }

    /// Number of trust anchors.
    pub fn len(&self) -> usize {
        self.inner.store.len()
    }

    /// True without any anchor.
    pub fn is_empty(&self) -> bool {
        self.inner.store.is_empty()
    }

    /// The connector that verifies certificates against these roots, or that accepts any
    /// certificate (opportunistic TLS).
    fn connector(&self, verify: bool) -> Result<TlsConnector, String> {
        let cell = if verify {
            &self.inner.verifying
        } else {
            &self.inner.opportunistic
        };
        cell.get_or_init(|| build_connector(&self.inner.store, verify))
            .clone()
    }
}

fn build_connector(store: &Arc<RootCertStore>, verify: bool) -> Result<TlsConnector, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = if verify {
        if store.is_empty() {
            return Err("no trusted CA certificates are configured".to_owned());
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::clone(store),
            provider,
        )
        .build()
        .map_err(|e| e.to_string())?;
        builder.with_webpki_verifier(verifier).with_no_client_auth()
    } else {
        let verifier = AnyCertificate {
            algorithms: provider.signature_verification_algorithms,
        };
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth()
    };
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Opportunistic TLS (RFC 7435): any certificate is accepted, since an unverified channel
/// still beats plaintext, but the handshake signature must be made by the key of the
/// certificate presented, so the session keys are really shared with the certificate holder.
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The TLS session of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLSv1.3` or `TLSv1.2`.
    pub protocol: String,
    /// The IANA-style suite name, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher_suite: String,
    /// True when the certificate chain was verified against the roots for the host name.
    pub verified: bool,
    /// Implicit TLS (true) or STARTTLS (false).
    pub implicit: bool,
}

/// The name for SNI and verification. A name that is not a valid DNS name (or IP literal)
/// cannot be verified; without verification the peer's IP address stands in (no SNI sent).
fn server_name(host: &str, ip: IpAddr, verify: bool) -> Result<ServerName<'static>, String> {
    let host = host.trim_end_matches('.');
    match ServerName::try_from(host.to_owned()) {
        Ok(name) => Ok(name),
        Err(_) if !verify => Ok(ServerName::IpAddress(ip.into())),
        Err(e) => Err(format!("cannot verify host name {host:?}: {e}")),
    }
}

/// Runs the client handshake over `tcp` within `timeout`.
pub(crate) async fn handshake(
    tcp: TcpStream,
    peer: &Peer,
    roots: &TlsRoots,
    verify: bool,
    implicit: bool,
    timeout: Duration,
) -> Result<(TlsStream<TcpStream>, TlsInfo), ClientError> {
    let tls_error = |reason: String| ClientError::Tls {
        peer: peer.clone(),
        reason,
    };
    let connector = roots.connector(verify).map_err(tls_error)?;
    let name = server_name(&peer.host, peer.addr.ip(), verify).map_err(tls_error)?;
    let stream = match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
        Err(_) => {
            return Err(ClientError::Timeout {
                peer: peer.clone(),
                stage: Stage::TlsHandshake,
                after: timeout,
            });
        }
        Ok(Err(e)) => return Err(tls_error(e.to_string())),
        Ok(Ok(s)) => s,
    };
    let session = stream.get_ref().1;
    let protocol = match session.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
        Some(other) => format!("{other:?}"),
        None => "unknown".to_owned(),
    };
    let cipher_suite = session
        .negotiated_cipher_suite()
        .map(|s| {
            let suite = s.suite();
            suite
                .as_str()
                .map_or_else(|| format!("{suite:?}"), str::to_owned)
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let info = TlsInfo {
        protocol,
        cipher_suite,
        verified: verify,
        implicit,
    };
    Ok((stream, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_from_pem() {
        assert!(matches!(
            TlsRoots::from_pem(b"no pem here"),
            Err(RootsError::NoCertificates { .. })
        ));
        assert!(matches!(
            TlsRoots::from_pem_file(Path::new("/nonexistent/ca.pem")),
            Err(RootsError::Read { .. })
        ));
        let empty = TlsRoots::default();
        assert!(empty.is_empty());
        assert!(empty.connector(true).is_err(), "no roots, no verification");
        assert!(empty.connector(false).is_ok());
    }

    #[test]
    fn server_names() {
        let ip = IpAddr::from([192, 0, 2, 1]);
        assert!(matches!(
            server_name("mx.example.com.", ip, true),
            Ok(ServerName::DnsName(_))
        ));
        assert!(matches!(
            server_name("192.0.2.7", ip, true),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(server_name("bad name", ip, true).is_err());
        assert!(matches!(
            server_name("bad name", ip, false),
            Ok(ServerName::IpAddress(_))
        ));
    }
}
