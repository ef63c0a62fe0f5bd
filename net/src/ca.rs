//! The cluster CA: made once per cluster (`cfs up`, `cfs ca init`),
//! it signs node, administrator and mount certificates.
//!
//! Keys are ECDSA P-256; files are PEM, keys written mode 0600.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::principal::Principal;
use crate::NetError;

/// How long a CA is valid.
pub const CA_VALID_DAYS: i64 = 3650;
/// How long a node or administrator certificate is valid by default.
pub const CERT_VALID_DAYS: i64 = 365;

/// A CA able to sign: its certificate and key.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
    cert_pem: String,
}

/// A certificate request for a mount named `name` (the CA decides what
/// the certificate says): the request DER and the new private key, PEM.
pub fn mount_request(name: &str) -> Result<(Vec<u8>, String), NetError> {
    crate::principal::check_label(name).map_err(|e| NetError::Certificate(e.to_string()))?;
    let key = KeyPair::generate().map_err(rc)?;
    let mut p = CertificateParams::new(vec![format!("client-{name}.{}", crate::principal::DOMAIN)])
        .map_err(rc)?;
    p.distinguished_name
        .push(DnType::CommonName, format!("client {name}"));
    let csr = p.serialize_request(&key).map_err(rc)?;
    Ok((csr.der().to_vec(), key.serialize_pem()))
}

/// A certificate and its key, PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

fn rc(e: rcgen::Error) -> NetError {
    NetError::Certificate(e.to_string())
}

impl Ca {
    /// A new CA for the cluster `cluster_id` (its name, for people).
    pub fn generate(cluster_id: &str) -> Result<Ca, NetError> {
        let key = KeyPair::generate().map_err(rc)?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.distinguished_name.push(
            DnType::CommonName,
            format!("ClaudeFS cluster {cluster_id} CA"),
        );
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(CA_VALID_DAYS);
        let cert = p.self_signed(&key).map_err(rc)?;
        let cert_pem = cert.pem();
        Ok(Ca {
            cert,
            key,
            cert_pem,
        })
    }

    /// The CA in `dir` (`ca.crt`, `ca.key`).
    pub fn load(dir: &Path) -> Result<Ca, NetError> {
        let read = |p: PathBuf| {
            std::fs::read_to_string(&p).map_err(|e| NetError::File {
                path: p.clone(),
                error: e.to_string(),
            })
        };
        let cert_pem = read(dir.join("ca.crt"))?;
        let key = KeyPair::from_pem(&read(dir.join("ca.key"))?).map_err(rc)?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem).map_err(rc)?;
        // Re-signing the same parameters with the same key gives a
        // certificate with the same subject and key: what issuing needs.
        let cert = params.self_signed(&key).map_err(rc)?;
        Ok(Ca {
            cert,
            key,
            cert_pem,
        })
    }

    /// Writes `ca.crt` and `ca.key` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), NetError> {
        write_file(&dir.join("ca.crt"), self.cert_pem.as_bytes(), 0o644)?;
        write_file(
            &dir.join("ca.key"),
            self.key.serialize_pem().as_bytes(),
            0o600,
        )
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The key mount tokens are signed and checked with.
    pub fn token_key(&self) -> crate::token::TokenKey {
        crate::token::TokenKey::from_ca_key(&self.key.serialize_der())
    }

    /// A certificate for `who`, valid `days`.
    pub fn issue(&self, who: &Principal, days: i64) -> Result<Issued, NetError> {
        let key = KeyPair::generate().map_err(rc)?;
        let cert = Self::params(who, days)?
            .signed_by(&key, &self.cert, &self.key)
            .map_err(rc)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A certificate for `who`, valid `days`, for the public key of the
    /// certificate signing request `csr_der` (whose own names and
    /// extensions are ignored: `who` is what the CA grants). The request's
    /// signature proves its sender holds the key.
    pub fn sign_request(
        &self,
        csr_der: &[u8],
        who: &Principal,
        days: i64,
    ) -> Result<String, NetError> {
        let der = rustls_pki_types::CertificateSigningRequestDer::from(csr_der);
        let mut csr = rcgen::CertificateSigningRequestParams::from_der(&der).map_err(rc)?;
        csr.params = Self::params(who, days)?;
        Ok(csr.signed_by(&self.cert, &self.key).map_err(rc)?.pem())
    }

    fn params(who: &Principal, days: i64) -> Result<CertificateParams, NetError> {
        let names = who
            .names()
            .map_err(|e| NetError::Certificate(e.to_string()))?;
        let mut p = CertificateParams::new(names).map_err(rc)?;
        p.distinguished_name
            .push(DnType::CommonName, who.to_string());
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = match who {
            Principal::Node(_) => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            _ => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(days);
        Ok(p)
    }

    /// Issues a certificate for `who` into `dir/<stem>.crt` and
    /// `dir/<stem>.key`, with a copy of `ca.crt` beside them.
    pub fn issue_files(
        &self,
        who: &Principal,
        days: i64,
        dir: &Path,
        stem: &str,
    ) -> Result<(), NetError> {
        let i = self.issue(who, days)?;
        write_file(
            &dir.join(format!("{stem}.crt")),
            i.cert_pem.as_bytes(),
            0o644,
        )?;
        write_file(
            &dir.join(format!("{stem}.key")),
            i.key_pem.as_bytes(),
            0o600,
        )?;
        let ca = dir.join("ca.crt");
        if !ca.exists() {
            write_file(&ca, self.cert_pem.as_bytes(), 0o644)?;
        }
        Ok(())
    }
}

/// Writes `bytes` to a new file at `path` (replacing it) with `mode`.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), NetError> {
    let err = |e: std::io::Error| NetError::File {
        path: path.to_path_buf(),
        error: e.to_string(),
    };
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}
