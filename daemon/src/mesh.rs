//! The mesh identity: a root CA made by `drover ca init` (rcgen, ECDSA P-256) and short-lived
//! workload certificates whose URI SAN is `spiffe://<trust-domain>/ns/<namespace>/sa/<account>`,
//! issued by `drover run --mesh-ca` for the enrolled workloads and renewed at half-life.
//!
//! Invariants: the CA key never leaves its directory; a workload certificate is written to the
//! identity directory by rename (readers never see half a file), so the configuration watcher
//! treats a renewal like any certificate rotation; an expired or unreadable root is an error at
//! start-up naming the file, never a silent fallback.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};

/// File names inside the CA directory.
pub const ROOT_CERT: &str = "root-cert.pem";
pub const ROOT_KEY: &str = "root-key.pem";
/// Default lifetime of workload certificates (renewed at half of it).
pub const WORKLOAD_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Errors of the mesh CA.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{0} already holds a mesh CA; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("{path}: the mesh root expired at {expired:?}")]
    Expired { path: PathBuf, expired: SystemTime },
    #[error("issuing a certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("invalid SPIFFE identity {0:?} (expected spiffe://TRUST-DOMAIN/…)")]
    Spiffe(String),
    #[error("CA {address}: {reason}")]
    Remote { address: String, reason: String },
}

pub mod remote;

/// Who signs the workload certificates: the local CA directory (`--mesh-ca`) or Istio's CA API
/// (`--ca-address`).
#[derive(Clone, Debug)]
pub enum Authority {
    Local(PathBuf),
    Remote(remote::RemoteCa),
}

impl Authority {
    /// Issues `spiffe` into `dir` (waiting for a remote CA on a thread of its own).
    pub fn issue_into(
        &self,
        dir: &Path,
        spiffe: &str,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<IdentityFiles, Error> {
        match self {
            Authority::Local(ca_dir) => {
                Ca::load(ca_dir)?.issue_into(dir, spiffe, trust_domain, lifetime)
            }
            Authority::Remote(r) => r.issue_into_blocking(dir, spiffe, trust_domain, lifetime),
        }
    }

    async fn reissue(
        &self,
        dir: &Path,
        files: &IdentityFiles,
        lifetime: Duration,
    ) -> Result<(), Error> {
        match self {
            Authority::Local(ca_dir) => {
                Ca::load(ca_dir)?.issue_into(dir, &files.spiffe, &files.trust_domain, lifetime)?
            }
            Authority::Remote(r) => {
                r.issue_into(dir, &files.spiffe, &files.trust_domain, lifetime)
                    .await?
            }
        };
        Ok(())
    }
}

/// A loaded mesh CA.
pub struct Ca {
    issuer: rcgen::Issuer<'static, KeyPair>,
    pub root_path: PathBuf,
    root_pem: String,
}

/// Files of an issued workload identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityFiles {
    pub spiffe: String,
    pub trust_domain: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub root: PathBuf,
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// `drover ca init`: a new root in `dir` (ten years).
pub fn init(dir: &Path) -> Result<PathBuf, Error> {
    let cert_path = dir.join(ROOT_CERT);
    if cert_path.exists() {
        return Err(Error::Exists(dir.to_path_buf()));
    }
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "drover mesh");
    params
        .distinguished_name
        .push(DnType::CommonName, "drover mesh root");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(3650);
    let key = KeyPair::generate()?;
    write_private(&dir.join(ROOT_KEY), &key.serialize_pem())?;
    let root = CertifiedIssuer::self_signed(params, key)?;
    write_atomic(&cert_path, root.pem().as_bytes())?;
    Ok(cert_path)
}

// === impl Ca ===

impl Ca {
    /// Loads the root from `dir`; an expired root is refused.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let (cert_path, key_path) = (dir.join(ROOT_CERT), dir.join(ROOT_KEY));
        let root_pem = std::fs::read_to_string(&cert_path).map_err(|e| file_err(&cert_path, e))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(|e| file_err(&key_path, e))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| file_err(&key_path, e))?;
        let der: rustls::pki_types::CertificateDer<'_> =
            rustls::pki_types::pem::PemObject::from_pem_slice(root_pem.as_bytes())
                .map_err(|e| file_err(&cert_path, e))?;
        let (_, parsed) =
            <x509_parser::certificate::X509Certificate<'_> as x509_parser::prelude::FromDer<
                '_,
                _,
            >>::from_der(der.as_ref())
            .map_err(|e| file_err(&cert_path, e))?;
        let expired = SystemTime::UNIX_EPOCH
            + Duration::from_secs(parsed.validity().not_after.timestamp().max(0) as u64);
        if expired <= SystemTime::now() {
            return Err(Error::Expired {
                path: cert_path,
                expired,
            });
        }
        let issuer =
            rcgen::Issuer::from_ca_cert_pem(&root_pem, key).map_err(|e| file_err(&cert_path, e))?;
        Ok(Self {
            issuer,
            root_path: cert_path,
            root_pem,
        })
    }

    /// A leaf certificate for `spiffe` (plus `dns` names), valid for `lifetime`: (chain PEM,
    /// key PEM). The chain is the leaf; verifiers anchor on the root file.
    pub fn issue(
        &self,
        spiffe: &str,
        dns: &[String],
        lifetime: Duration,
    ) -> Result<(String, String), Error> {
        if !spiffe.starts_with("spiffe://") || spiffe.len() <= "spiffe://".len() {
            return Err(Error::Spiffe(spiffe.to_string()));
        }
        let mut params = CertificateParams::new(dns.to_vec())?;
        let uri = rcgen::string::Ia5String::try_from(spiffe.to_string())
            .map_err(|_| Error::Spiffe(spiffe.to_string()))?;
        params.subject_alt_names.push(SanType::URI(uri));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::seconds(lifetime.as_secs() as i64);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issues the identity `spiffe` into `dir` (`<name>.pem`, `<name>-key.pem`, and the root
    /// copied as `root-cert.pem`), replacing files atomically.
    pub fn issue_into(
        &self,
        dir: &Path,
        spiffe: &str,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<IdentityFiles, Error> {
        let (cert, key) = self.issue(spiffe, &[], lifetime)?;
        IdentityFiles::write(dir, (spiffe, trust_domain), &self.root_pem, &key, &cert)
    }
}

impl IdentityFiles {
    /// Writes an identity into `dir` (`workload.pem`, `workload-key.pem` owner-only, and the
    /// trust anchor as `root-cert.pem`), each file replaced atomically.
    pub fn write(
        dir: &Path,
        (spiffe, trust_domain): (&str, &str),
        root_pem: &str,
        key_pem: &str,
        cert_pem: &str,
    ) -> Result<Self, Error> {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        let files = IdentityFiles {
            spiffe: spiffe.to_string(),
            trust_domain: trust_domain.to_string(),
            cert: dir.join("workload.pem"),
            key: dir.join("workload-key.pem"),
            root: dir.join(ROOT_CERT),
        };
        write_atomic(&files.root, root_pem.as_bytes())?;
        write_private(&files.key, key_pem)?;
        write_atomic(&files.cert, cert_pem.as_bytes())?;
        Ok(files)
    }
}

/// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>` (`@` in the trust domain
/// becomes `.`, as Istio does).
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!(
        "spiffe://{}/ns/{namespace}/sa/{service_account}",
        trust_domain.replace('@', ".")
    )
}

/// Issues (once) and renews the mesh identity of each (namespace, service account) the daemon's
/// workloads run as, under `dir/<namespace>/<service account>/`.
#[derive(Debug)]
pub struct Issuer {
    pub authority: Authority,
    pub trust_domain: String,
    pub dir: PathBuf,
    issued: std::sync::Mutex<std::collections::HashMap<(String, String), IdentityFiles>>,
}

impl Issuer {
    pub fn new(authority: Authority, trust_domain: String, dir: PathBuf) -> Self {
        Self {
            authority,
            trust_domain,
            dir,
            issued: Default::default(),
        }
    }

    /// The identity of service account `sa` in `namespace`: issued the first time (and renewed
    /// from then on, which needs a tokio runtime), the same files afterwards.
    pub fn identity(&self, namespace: &str, sa: &str) -> Result<IdentityFiles, Error> {
        let key = (namespace.to_string(), sa.to_string());
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(files) = issued.get(&key) {
            return Ok(files.clone());
        }
        let spiffe = spiffe_id(&self.trust_domain, namespace, sa);
        let dir = self.dir.join(namespace).join(sa);
        let files =
            (self.authority).issue_into(&dir, &spiffe, &self.trust_domain, WORKLOAD_LIFETIME)?;
        tracing::info!(identity = %spiffe, cert = %files.cert.display(), "workload identity issued");
        tokio::spawn(renew(
            self.authority.clone(),
            dir,
            files.clone(),
            WORKLOAD_LIFETIME,
        ));
        issued.insert(key, files.clone());
        Ok(files)
    }
}

/// Keeps `files` fresh: re-issues at half of `lifetime` (a minute after a failure), forever
/// (until the task is dropped). Open connections keep the certificate they were made with.
pub async fn renew(authority: Authority, dir: PathBuf, files: IdentityFiles, lifetime: Duration) {
    let mut wait = lifetime / 2;
    loop {
        tokio::time::sleep(wait).await;
        wait = lifetime / 2;
        match authority.reissue(&dir, &files, lifetime).await {
            Ok(_) => tracing::info!(identity = %files.spiffe, "workload certificate renewed"),
            Err(e) => {
                tracing::error!(error = %e, "workload certificate renewal failed; retrying in 60 s");
                wait = Duration::from_secs(60).min(lifetime / 2);
            }
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| file_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_err(path, e))
}

fn write_private(path: &Path, pem: &str) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| file_err(&tmp, e))?;
    std::io::Write::write_all(&mut f, pem.as_bytes()).map_err(|e| file_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_then_workload_certificate_with_spiffe_san() {
        let dir = std::env::temp_dir().join(format!("drover-mesh-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        init(&dir).unwrap();
        assert!(
            matches!(init(&dir), Err(Error::Exists(_))),
            "never overwrites a CA"
        );
        let ca = Ca::load(&dir).unwrap();
        let id = spiffe_id("cluster.local", "demo", "reviews");
        assert_eq!(id, "spiffe://cluster.local/ns/demo/sa/reviews");
        let files = ca
            .issue_into(&dir.join("id"), &id, "cluster.local", WORKLOAD_LIFETIME)
            .unwrap();
        let der = rustls::pki_types::pem::PemObject::from_pem_file(&files.cert)
            .map(|c: rustls::pki_types::CertificateDer<'static>| c)
            .unwrap();
        assert_eq!(crate::tls::certificate_names(&der), vec![id]);
        assert!(matches!(
            ca.issue("not-spiffe", &[], WORKLOAD_LIFETIME),
            Err(Error::Spiffe(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_expired_root_is_refused_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("drover-mesh-old-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let key = KeyPair::generate().unwrap();
        std::fs::write(dir.join(ROOT_KEY), key.serialize_pem()).unwrap();
        let root = CertifiedIssuer::self_signed(params, key).unwrap();
        std::fs::write(dir.join(ROOT_CERT), root.pem()).unwrap();
        let err = Ca::load(&dir).err().expect("expired root refused");
        assert!(matches!(err, Error::Expired { .. }), "{err}");
        assert!(err.to_string().contains(ROOT_CERT), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn renewal_rewrites_the_identity_at_half_life() {
        let dir = std::env::temp_dir().join(format!("drover-mesh-renew-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        init(&dir).unwrap();
        let ca = Ca::load(&dir).unwrap();
        let id = spiffe_id("cluster.local", "demo", "reviews");
        let lifetime = Duration::from_secs(3600);
        let files = ca
            .issue_into(&dir.join("id"), &id, "cluster.local", lifetime)
            .unwrap();
        let before = std::fs::read_to_string(&files.cert).unwrap();
        let authority = Authority::Local(dir.clone());
        let task = tokio::spawn(renew(authority, dir.join("id"), files.clone(), lifetime));
        // Paused clock: nothing before half-life, a new certificate right after it.
        tokio::time::sleep(Duration::from_secs(1790)).await;
        assert_eq!(std::fs::read_to_string(&files.cert).unwrap(), before);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let now = std::fs::read_to_string(&files.cert).unwrap_or_default();
            if !now.is_empty() && now != before {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "not renewed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        task.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
