//! Development certificates: a throwaway certificate authority and the server and client
//! certificates it signs, and the coordinator's request-signing key, for `trustql demo` and
//! tests. Never for production: the keys are generated on the spot and written unencrypted.
//!
//! Server and client certificates are separate, each with its one extended key usage, so a
//! server's certificate (a node's, or the coordinator's researcher-facing one) cannot be used
//! to call a node.

// Library code returns errors; only tests may expect().
#![cfg_attr(not(test), deny(clippy::expect_used))]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use sha2::{Digest, Sha256};

/// Errors making or writing development certificates.
#[derive(Debug, thiserror::Error)]
pub enum DevCertError {
    /// rcgen could not build a certificate.
    #[error("cannot generate the certificate {name}: {reason}")]
    Generate {
        /// Which certificate.
        name: String,
        /// Why.
        reason: String,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {reason}")]
    Write {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// A throwaway certificate authority.
pub struct DevCa {
    name: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// What a certificate may be used for (its extended key usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// TLS server only.
    Server,
    /// TLS client only.
    Client,
    /// Both, as some CAs issue: only to test that nodes refuse such certificates as clients
    /// unless pinned.
    ServerAndClient,
    /// No extended key usage at all (any use, to TLS libraries): only for tests.
    Unrestricted,
}

/// A certificate and its private key, in PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The private key (PEM, PKCS#8).
    pub key_pem: String,
    /// The certificate (DER).
    pub cert_der: Vec<u8>,
}

/// An Ed25519 key pair for signing site requests, in PEM.
#[derive(Debug, Clone)]
pub struct SigningKey {
    /// The private key (PEM, PKCS#8), for the coordinator.
    pub key_pem: String,
    /// The public key (PEM, SubjectPublicKeyInfo), for the nodes.
    pub public_pem: String,
}

/// Where [`SigningKey::write`] put a key pair.
#[derive(Debug, Clone)]
pub struct SigningKeyFiles {
    /// The private key.
    pub key: PathBuf,
    /// The public key.
    pub public: PathBuf,
}

/// Where [`Issued::write`] put a certificate and its key.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

impl DevCa {
    /// A new CA whose subject is `name`.
    pub fn new(name: &str) -> Result<Self, DevCertError> {
        let fail = |e: rcgen::Error| DevCertError::Generate {
            name: name.to_string(),
            reason: e.to_string(),
        };
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
        params.distinguished_name = subject(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(fail)?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(fail)?;
        Ok(DevCa {
            name: name.to_string(),
            issuer,
        })
    }

    /// The CA certificate (PEM), for the trust store of whoever checks what it signed.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Signs a server certificate for `name`, valid for `hosts` (serverAuth only).
    pub fn issue_server(&self, name: &str, hosts: &[&str]) -> Result<Issued, DevCertError> {
        self.issue(name, hosts, Usage::Server)
    }

    /// Signs a client certificate for `name` (clientAuth only).
    pub fn issue_client(&self, name: &str) -> Result<Issued, DevCertError> {
        self.issue(name, &[], Usage::Client)
    }

    /// Signs a certificate for `name`, valid for `hosts`, with the given usage.
    pub fn issue(&self, name: &str, hosts: &[&str], usage: Usage) -> Result<Issued, DevCertError> {
        let fail = |e: rcgen::Error| DevCertError::Generate {
            name: name.to_string(),
            reason: e.to_string(),
        };
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let mut params = CertificateParams::new(hosts).map_err(fail)?;
        params.distinguished_name = subject(name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = match usage {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::ServerAndClient => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Usage::Unrestricted => Vec::new(),
        };
        let key = KeyPair::generate().map_err(fail)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(fail)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
        })
    }

    /// Writes the CA certificate to `dir/<file>` and returns its path.
    pub fn write_cert(&self, dir: &Path, file: &str) -> Result<PathBuf, DevCertError> {
        let path = dir.join(file);
        write(&path, self.cert_pem().as_bytes(), false)?;
        Ok(path)
    }

    /// The CA's subject name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Issued {
    /// Writes `dir/<stem>.pem` and `dir/<stem>.key` (the key readable by its owner only).
    pub fn write(&self, dir: &Path, stem: &str) -> Result<CertFiles, DevCertError> {
        let files = CertFiles {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        };
        write(&files.cert, self.cert_pem.as_bytes(), false)?;
        write(&files.key, self.key_pem.as_bytes(), true)?;
        Ok(files)
    }
}

impl Issued {
    /// SHA-256 of the certificate's DER, in hex: what a node pins its coordinator by.
    pub fn sha256_fingerprint(&self) -> String {
        Sha256::digest(&self.cert_der)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl SigningKey {
    /// A new Ed25519 key pair.
    pub fn generate() -> Result<Self, DevCertError> {
        let fail = |e: rcgen::Error| DevCertError::Generate {
            name: "request-signing key".into(),
            reason: e.to_string(),
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(fail)?;
        Ok(SigningKey {
            key_pem: key.serialize_pem(),
            public_pem: key.public_key_pem(),
        })
    }

    /// Writes `dir/<stem>.key` (readable by its owner only) and `dir/<stem>.pub`.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<SigningKeyFiles, DevCertError> {
        let files = SigningKeyFiles {
            key: dir.join(format!("{stem}.key")),
            public: dir.join(format!("{stem}.pub")),
        };
        write(&files.key, self.key_pem.as_bytes(), true)?;
        write(&files.public, self.public_pem.as_bytes(), false)?;
        Ok(files)
    }
}

fn subject(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "TrustQL development");
    dn
}

fn write(path: &Path, bytes: &[u8], private: bool) -> Result<(), DevCertError> {
    let fail = |e: std::io::Error| DevCertError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(fail)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(fail)?;
    std::io::Write::write_all(&mut file, bytes).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_are_pem_and_written_privately() {
        let ca = DevCa::new("test CA").expect("ca");
        let issued = ca
            .issue_server("node", &["localhost", "127.0.0.1"])
            .expect("issue");
        assert_eq!(issued.sha256_fingerprint().len(), 64);
        assert!(issued.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(issued.key_pem.contains("PRIVATE KEY"));
        assert_ne!(issued.cert_pem, ca.cert_pem());
        let dir = tempfile::tempdir().expect("tempdir");
        let files = issued.write(dir.path(), "node").expect("write");
        assert_eq!(
            std::fs::read_to_string(&files.cert).expect("read"),
            issued.cert_pem
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&files.key)
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "the key must not be readable by others");
        }
    }
}
