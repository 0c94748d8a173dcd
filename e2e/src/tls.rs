//! Throwaway certificates for TLS tests, made with the `openssl` CLI: a CA
//! ([`TestCa::new`]) and server certificates it signs for given names
//! ([`TestCa::issue`]), ECDSA P-256, valid for two days. Files are owned by
//! `postgres` when we are root, so a server running as `postgres` can read its key.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use umstore_localpg::chown_to_postgres_if_root;

use crate::process::find_program;
use crate::testdir::random_hex;
use crate::HarnessError;

/// A certificate authority: its certificate and key in a directory.
#[derive(Debug, Clone)]
pub struct TestCa {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A server certificate and its key (PEM files).
#[derive(Debug, Clone)]
pub struct ServerCert {
    /// The certificate (`tls.crt`).
    pub cert: PathBuf,
    /// The unencrypted private key (`tls.key`), mode 0600.
    pub key: PathBuf,
}

impl TestCa {
    /// Makes a CA named `name` in `dir` (created if missing): `<name>-ca.crt` and
    /// `<name>-ca.key`.
    pub fn new(dir: &Path, name: &str) -> Result<Self, HarnessError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
        chown_to_postgres_if_root(dir)?;
        let config = dir.join(format!("{name}-ca.cnf"));
        write(
            &config,
            &format!(
                "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = {name} test CA\n\
                 [v3_ca]\nbasicConstraints = critical, CA:TRUE\n\
                 keyUsage = critical, keyCertSign, cRLSign\nsubjectKeyIdentifier = hash\n"
            ),
        )?;
        let ca = Self {
            dir: dir.to_path_buf(),
            cert: dir.join(format!("{name}-ca.crt")),
            key: dir.join(format!("{name}-ca.key")),
        };
        openssl(
            Command::new(program()?)
                .args(["req", "-x509", "-config"])
                .arg(&config)
                .args(["-extensions", "v3_ca", "-newkey", "ec", "-pkeyopt"])
                .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
                .arg("-keyout")
                .arg(&ca.key)
                .arg("-out")
                .arg(&ca.cert),
        )?;
        Ok(ca)
    }

    /// The CA certificate's file (what a client trusts: `ca.crt`).
    pub fn cert(&self) -> &Path {
        &self.cert
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> Result<String, HarnessError> {
        std::fs::read_to_string(&self.cert)
            .map_err(|e| HarnessError::io(format!("reading {}", self.cert.display()), e))
    }

    /// A server certificate named `name` (`<name>.crt`, `<name>.key` beside the CA)
    /// for `subject_alt_names` as openssl writes them (`DNS:host.ns.svc`,
    /// `IP:127.0.0.1`).
    pub fn issue(
        &self,
        name: &str,
        subject_alt_names: &[&str],
    ) -> Result<ServerCert, HarnessError> {
        let config = self.dir.join(format!("{name}.cnf"));
        write(
            &config,
            &format!(
                "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = {name}\n\
                 [v3_server]\nbasicConstraints = critical, CA:FALSE\n\
                 keyUsage = critical, digitalSignature, keyEncipherment\n\
                 extendedKeyUsage = serverAuth\nsubjectAltName = {}\n",
                subject_alt_names.join(", ")
            ),
        )?;
        let csr = self.dir.join(format!("{name}.csr"));
        let cert = ServerCert {
            cert: self.dir.join(format!("{name}.crt")),
            key: self.dir.join(format!("{name}.key")),
        };
        openssl(
            Command::new(program()?)
                .args(["req", "-new", "-config"])
                .arg(&config)
                .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
                .arg("-nodes")
                .arg("-keyout")
                .arg(&cert.key)
                .arg("-out")
                .arg(&csr),
        )?;
        openssl(
            Command::new(program()?)
                .args(["x509", "-req", "-in"])
                .arg(&csr)
                .arg("-CA")
                .arg(&self.cert)
                .arg("-CAkey")
                .arg(&self.key)
                .arg("-set_serial")
                .arg(format!("0x{}", random_hex(8)?))
                .args(["-days", "2", "-extfile"])
                .arg(&config)
                .args(["-extensions", "v3_server", "-out"])
                .arg(&cert.cert),
        )?;
        for file in [&cert.cert, &cert.key] {
            chown_to_postgres_if_root(file)?;
        }
        std::fs::set_permissions(&cert.key, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| HarnessError::io(format!("chmod 600 {}", cert.key.display()), e))?;
        Ok(cert)
    }
}

/// The `openssl` CLI, or why there is none.
fn program() -> Result<PathBuf, HarnessError> {
    find_program("openssl", &[]).ok_or_else(|| HarnessError::ProgramNotFound {
        program: "openssl",
        looked_in: "PATH".into(),
        install: "apt-get install openssl",
    })
}

fn write(path: &Path, text: &str) -> Result<(), HarnessError> {
    std::fs::write(path, text)
        .map_err(|e| HarnessError::io(format!("writing {}", path.display()), e))
}

fn openssl(cmd: &mut Command) -> Result<(), HarnessError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| HarnessError::io("could not run openssl", e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(HarnessError::CommandFailed {
        command: format!("{cmd:?}"),
        output: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
