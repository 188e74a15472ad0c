//! Development certificates: a throwaway certificate authority and the server and client
//! certificates it signs, for `trustql demo` and tests. Never for production: the keys are
//! generated on the spot and written unencrypted.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

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

/// A certificate and its private key, in PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The private key (PEM, PKCS#8).
    pub key_pem: String,
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

    /// Signs a certificate for `name`, valid as server for `hosts` and as a client.
    pub fn issue(&self, name: &str, hosts: &[&str]) -> Result<Issued, DevCertError> {
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
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().map_err(fail)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(fail)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
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
            .issue("node", &["localhost", "127.0.0.1"])
            .expect("issue");
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
