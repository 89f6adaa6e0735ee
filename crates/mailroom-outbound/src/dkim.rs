//! DKIM signing of outbound mail (RFC 6376), with RSA-SHA256 and Ed25519-SHA256 (RFC 8463) keys.
//!
//! Where it sits: the `dkim` entries of a delivery policy ([`DkimSpec`]) become one
//! [`DkimSigner`] when the policy's workers start. [`DkimSigner::new`] reads and checks every key
//! file then, so a bad key stops the policy with the field to fix instead of failing per message.
//! For each message the worker calls [`DkimSigner::sign`] before DATA and prepends the header
//! fields it returns; `None` means the message goes out unsigned.
//!
//! Choosing the key: the domain of the `From:` address (the author domain that DMARC checks,
//! RFC 7489 §3.1.1) is matched, case-insensitively, against the entries' domains; an entry signs
//! when its domain is the author domain or a parent of it, and the longest such domain wins.
//! Every entry with the winning domain adds a signature (two entries of one domain with different
//! selectors sign with both keys: RSA next to Ed25519, or an old key next to its successor).
//! A message with no `From:`, or with more than one (RFC 5322 §3.6 allows exactly one), is not
//! signed.
//!
//! The signature: `c=relaxed/relaxed` (RFC 6376 §3.4.2, §3.4.4), `t=` and no `l=` (a body length
//! limit lets anyone append text that still verifies, §8.2). `h=` names the configured header
//! fields (default [`DEFAULT_HEADERS`]); a listed field that the message lacks is signed as absent
//! (§5.4), so adding it later breaks the signature, and `From` is always listed twice, so that a
//! second `From:` cannot be added either (oversigning, §8.15).
//!
//! Keys are unencrypted PEM files: RSA as PKCS#1 (`BEGIN RSA PRIVATE KEY`) or PKCS#8 (`BEGIN
//! PRIVATE KEY`), Ed25519 as PKCS#8 (v1 as OpenSSL writes it, or v2). Signing is mail-auth's, on
//! ring. RSA keys under [`MIN_RSA_BITS`] are refused (RFC 8301 §3.2); ring signs with
//! 2048 to 4096-bit RSA keys only, so keys of 1024 to 2047 bits, and above 4096, are refused too,
//! with that reason.

use std::fmt;
use std::fs::File;
use std::io::Read as _;
use std::ops::RangeInclusive;

use hickory_resolver::proto::rr::Name;
use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dkim::{Canonicalization, DkimSigner as MailAuthSigner, Done};
use mail_parser::{HeaderName, MessageParser};
use mailroom_config::{DkimAlgorithm, DkimSpec, syntax};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::{self, PemObject as _};

/// Header fields signed when an entry lists none (the list of the [`DkimSpec::headers`] doc).
/// `From` is added twice to every list (see the module doc).
pub const DEFAULT_HEADERS: [&str; 12] = [
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

/// Smallest RSA key accepted (RFC 8301 §3.2: signers MUST use at least 1024 bits).
pub const MIN_RSA_BITS: usize = 1024;

/// RSA key sizes that the signing backend (ring) accepts.
const SIGNABLE_RSA_BITS: RangeInclusive<usize> = 2048..=4096;

/// A key file larger than this is not a key (a 4096-bit RSA key in PEM is about 3.3 KiB).
const MAX_KEY_FILE: u64 = 64 * 1024;

/// DER tags (X.690 §8) met while reading a private key.
const DER_SEQUENCE: u8 = 0x30;
const DER_INTEGER: u8 = 0x02;
const DER_OCTET_STRING: u8 = 0x04;
const DER_OID: u8 = 0x06;

/// Contents of the DER object identifiers of PKCS#8 key algorithms: rsaEncryption
/// (1.2.840.113549.1.1.1, RFC 8017 Appendix C) and id-Ed25519 (1.3.101.112, RFC 8410 §3).
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

/// A DKIM configuration or signing failure; configuration errors name the policy field to fix
/// (`policies[<name>].dkim[<i>].keyFile`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DkimError {
    /// A setting is wrong: domain, selector, a header name, or a selector used twice.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field path, as `policies[<name>].dkim[<i>].selector`.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The key file cannot be read.
    #[error("{field}: cannot read {path:?}: {source}")]
    ReadKey {
        /// The field path (`...keyFile`).
        field: String,
        /// The file as configured.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key file holds no usable private key.
    #[error("{field}: {path:?}: {reason}")]
    BadKey {
        /// The field path (`...keyFile`).
        field: String,
        /// The file as configured.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An RSA key under [`MIN_RSA_BITS`] (RFC 8301 §3.2).
    #[error(
        "{field}: {path:?}: the RSA key has {bits} bits; DKIM needs at least {MIN_RSA_BITS} \
         (RFC 8301 §3.2), 2048 advised"
    )]
    RsaKeyTooShort {
        /// The field path (`...keyFile`).
        field: String,
        /// The file as configured.
        path: String,
        /// The modulus size.
        bits: usize,
    },
    /// An RSA key of a size the signing backend cannot use (outside 2048 to 4096 bits).
    #[error(
        "{field}: {path:?}: the RSA key has {bits} bits; the signing library (ring) signs with \
         2048 to 4096-bit RSA keys only: make a 2048-bit key"
    )]
    RsaKeySizeUnsupported {
        /// The field path (`...keyFile`).
        field: String,
        /// The file as configured.
        path: String,
        /// The modulus size.
        bits: usize,
    },
    /// `algorithm` names one kind of key and the file holds the other.
    #[error("{field}: {configured} does not match the {found} key in {path:?}")]
    AlgorithmMismatch {
        /// The field path (`...algorithm`).
        field: String,
        /// The configured algorithm (`rsa-sha256`, `ed25519-sha256`).
        configured: &'static str,
        /// The algorithm of the key in the file.
        found: &'static str,
        /// The key file as configured.
        path: String,
    },
    /// Signing a message failed (a crypto library error; not expected with a loaded key).
    #[error("DKIM signing for {domain} (selector {selector}) failed: {reason}")]
    Sign {
        /// `d=`.
        domain: String,
        /// `s=`.
        selector: String,
        /// The library's error.
        reason: String,
    },
}

impl DkimError {
    /// The configuration field this error is about (`None` for [`DkimError::Sign`]).
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Invalid { field, .. }
            | Self::ReadKey { field, .. }
            | Self::BadKey { field, .. }
            | Self::RsaKeyTooShort { field, .. }
            | Self::RsaKeySizeUnsupported { field, .. }
            | Self::AlgorithmMismatch { field, .. } => Some(field),
            Self::Sign { .. } => None,
        }
    }
}

/// The DKIM keys of one delivery policy, loaded and checked; signs messages by their `From:`
/// domain (see the module doc).
pub struct DkimSigner {
    keys: Vec<Entry>,
}

/// One loaded `dkim` entry.
struct Entry {
    /// `d=`, ASCII lowercase (A-labels).
    domain: String,
    /// `s=`.
    selector: String,
    algorithm: DkimAlgorithm,
    signer: MailAuthSigner<DkimKey, Done>,
}

impl fmt::Debug for DkimSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Domains, selectors and algorithms only: never key material.
        let mut list = f.debug_list();
        for key in &self.keys {
            list.entry(&format_args!(
                "{} s={} a={}",
                key.domain,
                key.selector,
                algorithm_name(key.algorithm)
            ));
        }
        list.finish()
    }
}

impl DkimSigner {
    /// Loads and checks the keys of the policy `policy_name` (used in error field paths). Reads
    /// every key file now. No entries give a signer that signs nothing.
    ///
    /// # Errors
    /// A [`DkimError`] naming the first field to fix: a bad domain, selector or header name, a
    /// selector used twice for one domain, an unreadable or unusable key file, an RSA key of an
    /// unusable size, or an `algorithm` that does not match the key.
    pub fn new(policy_name: &str, specs: &[DkimSpec]) -> Result<Self, DkimError> {
        let mut keys: Vec<Entry> = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let at = format!("policies[{policy_name}].dkim[{i}]");
            let key = load_entry(&at, spec)?;
            if let Some(j) = keys.iter().position(|k| {
                k.domain == key.domain && k.selector.eq_ignore_ascii_case(&key.selector)
            }) {
                return Err(DkimError::Invalid {
                    field: format!("{at}.selector"),
                    reason: format!(
                        "{}._domainkey.{} is used by dkim[{j}] already: one selector publishes one \
                         key",
                        key.selector, key.domain
                    ),
                });
            }
            keys.push(key);
        }
        Ok(Self { keys })
    }

    /// Whether any key is configured (a signer without keys returns `None` for every message).
    pub fn signs(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The `DKIM-Signature:` header field(s) to prepend to `message` (a whole RFC 5322 message,
    /// header and body), CRLF-terminated and folded; `None` when no key applies: no or several
    /// `From:` fields, no address in it, or no entry for its domain or a parent of it. One field
    /// per entry of the most specific matching domain. Never panics, whatever the bytes.
    ///
    /// # Errors
    /// [`DkimError::Sign`] when the crypto library fails.
    pub fn sign(&self, message: &[u8]) -> Result<Option<Vec<u8>>, DkimError> {
        if self.keys.is_empty() {
            return Ok(None);
        }
        let Some(author) = author_domain(message) else {
            return Ok(None);
        };
        let Some(best) = self
            .keys
            .iter()
            .filter(|k| covers(&k.domain, &author))
            .map(|k| k.domain.len())
            .max()
        else {
            return Ok(None);
        };
        let mut fields = Vec::new();
        // Domains that cover the author domain and have the same length are the same domain.
        for key in self
            .keys
            .iter()
            .filter(|k| k.domain.len() == best && covers(&k.domain, &author))
        {
            let signature = key.signer.sign(message).map_err(|e| DkimError::Sign {
                domain: key.domain.clone(),
                selector: key.selector.clone(),
                reason: e.to_string(),
            })?;
            signature.write_header(&mut fields);
        }
        Ok(Some(fields))
    }
}

/// Checks one entry and loads its key.
fn load_entry(at: &str, spec: &DkimSpec) -> Result<Entry, DkimError> {
    let invalid = |field: &str, reason: String| DkimError::Invalid {
        field: format!("{at}.{field}"),
        reason,
    };
    syntax::check_domain(&spec.domain, false).map_err(|reason| invalid("domain", reason))?;
    let domain = spec.domain.to_ascii_lowercase();
    check_selector(&spec.selector).map_err(|reason| invalid("selector", reason))?;
    let headers = header_list(at, &spec.headers)?;
    let (key, algorithm) = load_key(at, spec)?;
    let signer = MailAuthSigner::from_key(key)
        .domain(domain.clone())
        .selector(spec.selector.clone())
        .headers(headers)
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed);
    Ok(Entry {
        domain,
        selector: spec.selector.clone(),
        algorithm,
        signer,
    })
}

/// A selector is a dot-separated list of labels of letters, digits and `-` (RFC 6376 §3.1);
/// it is written into the header field as is, so nothing else may pass.
fn check_selector(selector: &str) -> Result<(), String> {
    let ok = !selector.is_empty()
        && selector.len() <= 253
        && selector.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{selector:?}: use letters, digits, '-' and dots (labels of 1 to 63 characters)"
        ))
    }
}

/// The `h=` list: the configured fields (or [`DEFAULT_HEADERS`]) with `From` listed twice.
fn header_list(at: &str, configured: &[String]) -> Result<Vec<String>, DkimError> {
    let mut names: Vec<String> = if configured.is_empty() {
        DEFAULT_HEADERS.iter().map(|&h| h.to_owned()).collect()
    } else {
        for (k, name) in configured.iter().enumerate() {
            // field-name = 1*ftext, ftext = %d33-57 / %d59-126 (RFC 5322 §3.6.8).
            if name.is_empty() || !name.bytes().all(|b| matches!(b, 33..=57 | 59..=126)) {
                return Err(DkimError::Invalid {
                    field: format!("{at}.headers[{k}]"),
                    reason: format!("{name:?} is not a header field name"),
                });
            }
        }
        configured.to_vec()
    };
    let from = names
        .iter()
        .filter(|n| n.eq_ignore_ascii_case("From"))
        .count();
    for _ in from..2 {
        names.insert(0, "From".to_owned());
    }
    Ok(names)
}

/// The key type found in a key file.
#[derive(Debug, Clone, Copy)]
enum KeyKind {
    Rsa { bits: usize },
    Ed25519,
}

impl KeyKind {
    fn algorithm(self) -> DkimAlgorithm {
        match self {
            Self::Rsa { .. } => DkimAlgorithm::RsaSha256,
            Self::Ed25519 => DkimAlgorithm::Ed25519Sha256,
        }
    }
}

/// Reads the entry's key file and makes the signing key, checking type, size and `algorithm`.
fn load_key(at: &str, spec: &DkimSpec) -> Result<(DkimKey, DkimAlgorithm), DkimError> {
    let field = format!("{at}.keyFile");
    let path = spec.key_file.as_str();
    let bad = |reason: String| DkimError::BadKey {
        field: field.clone(),
        path: path.to_owned(),
        reason,
    };
    let pem = read_key_file(path).map_err(|source| DkimError::ReadKey {
        field: field.clone(),
        path: path.to_owned(),
        source,
    })?;
    if pem.len() as u64 > MAX_KEY_FILE {
        return Err(bad(format!(
            "larger than {} KiB: not a key file",
            MAX_KEY_FILE / 1024
        )));
    }
    let der = parse_pem(&pem).map_err(bad)?;
    let kind = classify(&der).map_err(bad)?;
    let algorithm = kind.algorithm();
    if let Some(configured) = spec.algorithm
        && configured != algorithm
    {
        return Err(DkimError::AlgorithmMismatch {
            field: format!("{at}.algorithm"),
            configured: algorithm_name(configured),
            found: algorithm_name(algorithm),
            path: path.to_owned(),
        });
    }
    let key = match (kind, der) {
        (KeyKind::Rsa { bits }, der) => {
            if bits < MIN_RSA_BITS {
                return Err(DkimError::RsaKeyTooShort {
                    field,
                    path: path.to_owned(),
                    bits,
                });
            }
            if !SIGNABLE_RSA_BITS.contains(&bits) {
                return Err(DkimError::RsaKeySizeUnsupported {
                    field,
                    path: path.to_owned(),
                    bits,
                });
            }
            RsaKey::<Sha256>::from_key_der(der)
                .map(DkimKey::Rsa)
                .map_err(|e| bad(format!("unusable RSA key: {e}")))?
        }
        (KeyKind::Ed25519, PrivateKeyDer::Pkcs8(der)) => {
            // "maybe unchecked": PKCS#8 v1 (no public key, as OpenSSL writes it) as well as v2.
            Ed25519Key::from_pkcs8_maybe_unchecked_der(der.secret_pkcs8_der())
                .map(DkimKey::Ed25519)
                .map_err(|e| bad(format!("unusable Ed25519 key: {e}")))?
        }
        (KeyKind::Ed25519, _) => return Err(bad("an Ed25519 key must be PKCS#8".to_owned())),
    };
    Ok((key, algorithm))
}

/// The file's bytes, at most [`MAX_KEY_FILE`] + 1 of them.
fn read_key_file(path: &str) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?
        .take(MAX_KEY_FILE + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The first unencrypted private key of a PEM file.
fn parse_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    if contains(pem, b"-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        return Err(
            "the key is encrypted: store it unencrypted (openssl pkey -in KEY -out PLAIN) and \
             protect the file instead"
                .to_owned(),
        );
    }
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        pem::Error::NoItemsFound => {
            "no private key found: expected \"-----BEGIN PRIVATE KEY-----\" \
                                     (PKCS#8) or \"-----BEGIN RSA PRIVATE KEY-----\" (PKCS#1)"
                .to_owned()
        }
        e => format!("not a PEM private key: {e}"),
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The key type (and RSA size) of a DER private key, read from its ASN.1 structure:
/// RSAPrivateKey (RFC 8017 Appendix A.1.2) or PrivateKeyInfo (RFC 5208 §5).
fn classify(der: &PrivateKeyDer<'_>) -> Result<KeyKind, String> {
    match der {
        PrivateKeyDer::Pkcs1(key) => rsa_private_key_bits(key.secret_pkcs1_der())
            .map(|bits| KeyKind::Rsa { bits })
            .ok_or_else(|| "malformed PKCS#1 RSA key".to_owned()),
        PrivateKeyDer::Pkcs8(key) => classify_pkcs8(key.secret_pkcs8_der()),
        PrivateKeyDer::Sec1(_) => {
            Err("an EC (SEC1) key: DKIM signs with RSA or Ed25519 keys".to_owned())
        }
        _ => Err("unsupported key format: use PKCS#8 or PKCS#1".to_owned()),
    }
}

fn classify_pkcs8(der: &[u8]) -> Result<KeyKind, String> {
    let malformed = || "malformed PKCS#8 key".to_owned();
    let (info, _) = der_expect(der, DER_SEQUENCE).ok_or_else(malformed)?;
    let (_version, rest) = der_expect(info, DER_INTEGER).ok_or_else(malformed)?;
    let (algorithm, rest) = der_expect(rest, DER_SEQUENCE).ok_or_else(malformed)?;
    let (oid, _parameters) = der_expect(algorithm, DER_OID).ok_or_else(malformed)?;
    let (private_key, _) = der_expect(rest, DER_OCTET_STRING).ok_or_else(malformed)?;
    if oid == OID_RSA {
        rsa_private_key_bits(private_key)
            .map(|bits| KeyKind::Rsa { bits })
            .ok_or_else(malformed)
    } else if oid == OID_ED25519 {
        Ok(KeyKind::Ed25519)
    } else {
        Err("neither an RSA nor an Ed25519 key (DKIM signs with those only)".to_owned())
    }
}

/// The modulus size of a DER RSAPrivateKey: `SEQUENCE { version INTEGER, modulus INTEGER, ... }`.
fn rsa_private_key_bits(der: &[u8]) -> Option<usize> {
    let (key, _) = der_expect(der, DER_SEQUENCE)?;
    let (_version, rest) = der_expect(key, DER_INTEGER)?;
    let (modulus, _) = der_expect(rest, DER_INTEGER)?;
    let start = modulus.iter().position(|&b| b != 0)?;
    let significant = modulus.get(start..)?;
    let first = significant.first()?;
    Some((significant.len() - 1) * 8 + (8 - first.leading_zeros() as usize))
}

/// Reads one DER element with tag `tag`: its contents and the bytes after it.
fn der_expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, rest) = input.split_first()?;
    if found != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        // Long form: the low bits count the length octets (X.690 §8.1.3.5).
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let (octets, rest) = rest.split_at_checked(count)?;
        let len = octets
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b));
        (len, rest)
    };
    rest.split_at_checked(len)
}

fn algorithm_name(algorithm: DkimAlgorithm) -> &'static str {
    match algorithm {
        DkimAlgorithm::RsaSha256 => "rsa-sha256",
        DkimAlgorithm::Ed25519Sha256 => "ed25519-sha256",
    }
}

/// The domain of the message's one `From:` address, lowercase, U-labels as A-labels; `None`
/// without exactly one `From:` field or without an address in it.
fn author_domain(message: &[u8]) -> Option<String> {
    let parsed = MessageParser::new()
        .header_address(HeaderName::From)
        .default_header_ignore()
        .parse_headers(message)?;
    let mut from = parsed.header_values(HeaderName::From);
    let value = from.next()?;
    if from.next().is_some() {
        return None;
    }
    let address = value.as_address()?.first()?.address.as_deref()?;
    let (_, domain) = address.rsplit_once('@')?;
    normalize_domain(domain)
}

/// `domain` as compared with the configured (ASCII, lowercase) domains.
fn normalize_domain(domain: &str) -> Option<String> {
    let domain = domain.trim();
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    if domain.is_empty() || domain.starts_with('[') {
        return None;
    }
    if domain.is_ascii() {
        return Some(domain.to_ascii_lowercase());
    }
    // U-labels become A-labels (UTS #46, done by hickory).
    let ascii = Name::from_str_relaxed(domain)
        .ok()?
        .to_lowercase()
        .to_ascii();
    let ascii = ascii.strip_suffix('.').unwrap_or(&ascii);
    (!ascii.is_empty()).then(|| ascii.to_owned())
}

/// Whether the key domain `key` is `author` or a parent domain of it.
fn covers(key: &str, author: &str) -> bool {
    author
        .strip_suffix(key)
        .is_some_and(|rest| rest.is_empty() || rest.ends_with('.'))
}
