//! Process-wide TLS setup: rustls with the `ring` provider (no OpenSSL anywhere, clean ARM builds),
//! and the client side of a TLS connection to an MQTT broker: trusted roots from a PEM CA file
//! (or the platform's store), an optional client certificate, loaded from PEM files so that
//! every problem names its config key and nothing panics on a bad file (issue 11 item 20).
//! Opens only the files it is given; never sockets.

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use std::path::Path;
use std::sync::{Arc, Once};

static INSTALL: Once = Once::new();

/// Installs `ring` as rustls' process-wide crypto provider; idempotent.
pub fn install_crypto_provider() {
    INSTALL.call_once(|| {
        // Err only when another provider was installed first, which is just as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Largest CA bundle or certificate chain read, in bytes (Debian's whole ca-certificates
/// bundle is about 220 KiB).
pub const MAX_PEM_FILE_BYTES: u64 = 1024 * 1024;

/// Largest private key file read, in bytes (an RSA 8192 key is about 6.4 KiB of PEM).
pub const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// The TLS files of a client as configured: `ca_file` (`None`: the platform's CA
/// certificates) and the client certificate `(cert_file, key_file)`.
#[derive(Debug, Clone, Copy)]
pub struct ClientFiles<'a> {
    /// PEM bundle of the CAs that sign the server's certificate.
    pub ca_file: Option<&'a Path>,
    /// PEM certificate chain (leaf first) and its PEM private key.
    pub client_cert: Option<(&'a Path, &'a Path)>,
}

/// A problem with one TLS setting, named by its key in the component's table (`tls`,
/// `ca_file`, `cert_file`, `key_file`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct FileError {
    /// The key the problem concerns.
    pub key: &'static str,
    /// What is wrong, naming the file; never the content of a key file.
    pub problem: String,
}

/// Builds a rustls client configuration (`ring` provider, TLS 1.2 and 1.3) from `files`.
///
/// # Errors
/// Every problem found, each naming its key: a file that cannot be read, is not a regular
/// file, is too large or holds no usable PEM item; a private key file readable by group or
/// others; a key that does not belong to the certificate; no platform CA certificates.
pub fn client_config(files: ClientFiles<'_>) -> Result<ClientConfig, Vec<FileError>> {
    let mut errors = Vec::new();
    let roots = match files.ca_file {
        Some(path) => load_roots(path).map_err(|problem| FileError {
            key: "ca_file",
            problem,
        }),
        None => platform_roots().map_err(|problem| FileError {
            key: "tls",
            problem,
        }),
    }
    .map_err(|e| errors.push(e))
    .ok();
    let client = files.client_cert.map(|(cert_path, key_path)| {
        let chain = load_chain(cert_path).map_err(|problem| FileError {
            key: "cert_file",
            problem,
        });
        let key = load_key(key_path).map_err(|problem| FileError {
            key: "key_file",
            problem,
        });
        (
            cert_path,
            key_path,
            chain.map_err(|e| errors.push(e)).ok(),
            key.map_err(|e| errors.push(e)).ok(),
        )
    });
    let (Some(roots), true) = (roots, errors.is_empty()) else {
        return Err(errors);
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| {
            vec![FileError {
                key: "tls",
                problem: format!("the TLS provider refused the default protocol versions: {e}"),
            }]
        })?
        .with_root_certificates(roots);
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert_path, key_path, Some(chain), Some(key))) => {
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                let (key_shown, cert_shown) = (key_path.display(), cert_path.display());
                let problem = match e {
                    rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                        format!("{key_shown} is not the key of the certificate in {cert_shown}")
                    }
                    e => format!(
                        "{key_shown} cannot be used with the certificate in {cert_shown}: {e}"
                    ),
                };
                vec![FileError {
                    key: "key_file",
                    problem,
                }]
            })
        }
        // Not reached: a chain or key that did not load recorded an error, returned above.
        Some(_) => Err(errors),
    }
}

/// Reads a public PEM file (CA bundle, certificate chain): opened once without blocking (a FIFO
/// is refused, not waited on), a regular file of at most [`MAX_PEM_FILE_BYTES`]. A bare name
/// is a systemd credential ([`crate::config::resolve_secret_path`]).
fn read_public(path: &Path) -> Result<Vec<u8>, String> {
    let path = crate::config::resolve_secret_path(path)?;
    let shown = path.display();
    crate::config::read_regular_file(&path, "", MAX_PEM_FILE_BYTES, |_| Ok(()), &|| {
        format!(
            "{shown} is larger than {MAX_PEM_FILE_BYTES} bytes; it must hold PEM certificates only"
        )
    })
}

/// Why a PEM text did not decode, without quoting it (a key file's lines are secret).
fn pem_problem(e: &pem::Error) -> &'static str {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line",
        pem::Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed",
        pem::Error::Base64Decode(_) => "a PEM section is not valid base64",
        pem::Error::SectionTooLarge => "a PEM section is too large",
        _ => "it is not valid PEM",
    }
}

/// Every certificate of a PEM file; at least one.
fn load_certs(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not valid PEM: {}", path.display(), pem_problem(&e)))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The CA certificates of a PEM bundle as trust anchors; every one must be usable.
fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let bytes = read_public(path)?;
    let certs = load_certs(path, &bytes)?;
    let mut roots = RootCertStore::empty();
    for (i, c) in certs.into_iter().enumerate() {
        roots.add(c).map_err(|e| {
            let why = match e {
                rustls::Error::InvalidCertificate(c) => format!("{c:?}"),
                e => e.to_string(),
            };
            format!(
                "certificate {} in {} is not a usable CA certificate: {why}",
                i + 1,
                path.display()
            )
        })?;
    }
    Ok(roots)
}

/// The platform's CA certificates (`SSL_CERT_FILE`/`SSL_CERT_DIR`, else the distribution's
/// bundle, e.g. /etc/ssl/certs/ca-certificates.crt); unparsable ones are skipped, none at all is
/// an error.
fn platform_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let why = found
            .errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        return Err(format!(
            "true without ca_file trusts the platform's CA certificates, but none were found{}; \
             set ca_file to the PEM file of the CA that signed the broker's certificate \
             (or install ca-certificates)",
            if why.is_empty() {
                String::new()
            } else {
                format!(" ({why})")
            }
        ));
    }
    Ok(roots)
}

/// A client certificate chain (leaf first).
fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read_public(path)?;
    load_certs(path, &bytes)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) of a key file, read like a secret file
/// ([`crate::config::read_private_file`]: mode, owner, regular file, size).
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let (resolved, bytes) = crate::config::read_private_file(path, MAX_KEY_FILE_BYTES)?;
    let shown = resolved.display();
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => format!(
            "{shown} holds no PEM private key (-----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or \
             EC PRIVATE KEY)"
        ),
        e => format!("{shown} is not valid PEM: {}", pem_problem(&e)),
    })
}
