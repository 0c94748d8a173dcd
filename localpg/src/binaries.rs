//! Finding the PostgreSQL server binaries.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::LocalPgError;

/// Oldest PostgreSQL major version umstore runs on.
pub const MIN_MAJOR: u32 = 15;

/// Environment variable naming the directory that holds `postgres` and `initdb`.
pub const BINDIR_ENV: &str = "UMSTORE_PG_BINDIR";

/// Where Debian and Ubuntu install versioned PostgreSQL server binaries.
const DEBIAN_LIB_ROOT: &str = "/usr/lib/postgresql";

/// The directory holding the PostgreSQL server binaries (`postgres`, `initdb`,
/// `pg_basebackup`, `pg_isready`, `psql`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBinaries {
    /// The bin directory, e.g. `/usr/lib/postgresql/15/bin`.
    pub bindir: PathBuf,
}

impl PgBinaries {
    /// Finds the server binaries: `$UMSTORE_PG_BINDIR` when set, else `pg_config --bindir`
    /// when that directory holds `postgres` and `initdb` of version 15 or newer, else the
    /// newest `/usr/lib/postgresql/<N>/bin` with N >= 15.
    pub fn discover() -> Result<Self, LocalPgError> {
        let env_dir = std::env::var_os(BINDIR_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let pg_config_dir = pg_config("--bindir");
        discover_in(env_dir, pg_config_dir, Path::new(DEBIAN_LIB_ROOT))
    }

    /// The path of one program in the bin directory.
    pub fn program(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }

    /// `pg_config --pkglibdir` of this installation (where extensions such as `citus.so`
    /// live), preferring the `pg_config` beside the server binaries.
    pub fn pkglibdir(&self) -> Option<PathBuf> {
        let local = self.program("pg_config");
        if local.is_file() {
            if let Some(dir) = run_pg_config(&local, "--pkglibdir") {
                return Some(dir);
            }
        }
        pg_config("--pkglibdir")
    }

    /// Whether the Citus extension library (`citus.so`) is installed for these binaries.
    pub fn has_citus(&self) -> bool {
        self.pkglibdir()
            .is_some_and(|dir| dir.join("citus.so").is_file())
    }

    /// The major version reported by `postgres --version`.
    pub fn major_version(&self) -> Result<u32, LocalPgError> {
        let program = self.program("postgres");
        let out = Command::new(&program)
            .arg("--version")
            .output()
            .map_err(|source| LocalPgError::Spawn {
                program: program.clone(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        parse_major_version(&text).ok_or_else(|| LocalPgError::CommandFailed {
            program,
            status: out.status,
            output: format!("unexpected version output {text:?}"),
        })
    }
}

/// Discovery with its inputs made explicit (what [`PgBinaries::discover`] does).
fn discover_in(
    env_dir: Option<PathBuf>,
    pg_config_dir: Option<PathBuf>,
    lib_root: &Path,
) -> Result<PgBinaries, LocalPgError> {
    if let Some(dir) = env_dir {
        return if has_server_binaries(&dir) {
            Ok(PgBinaries { bindir: dir })
        } else {
            Err(LocalPgError::BadBinDirEnv { dir })
        };
    }
    let mut looked_in = Vec::new();
    if let Some(dir) = pg_config_dir {
        looked_in.push(format!("{} (pg_config --bindir)", dir.display()));
        if has_server_binaries(&dir) {
            let bins = PgBinaries { bindir: dir };
            if bins.major_version().is_ok_and(|v| v >= MIN_MAJOR) {
                return Ok(bins);
            }
        }
    } else {
        looked_in.push("pg_config on PATH".to_owned());
    }
    looked_in.push(format!("{}/<15+>/bin", lib_root.display()));
    newest_versioned_bindir(lib_root)
        .map(|bindir| PgBinaries { bindir })
        .ok_or_else(|| LocalPgError::BinariesNotFound {
            looked_in: looked_in.join(", "),
        })
}

/// The newest `<root>/<N>/bin` with N >= 15 that holds the server binaries.
fn newest_versioned_bindir(root: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(root).ok()?;
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            let bindir = e.path().join("bin");
            (major >= MIN_MAJOR && has_server_binaries(&bindir)).then_some((major, bindir))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, dir)| dir)
}

fn has_server_binaries(dir: &Path) -> bool {
    dir.join("postgres").is_file() && dir.join("initdb").is_file()
}

fn pg_config(flag: &str) -> Option<PathBuf> {
    run_pg_config(Path::new("pg_config"), flag)
}

fn run_pg_config(program: &Path, flag: &str) -> Option<PathBuf> {
    let out = Command::new(program).arg(flag).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let line = text.trim();
    (!line.is_empty()).then(|| PathBuf::from(line))
}

/// Parses `postgres (PostgreSQL) 15.8 (Debian 15.8-1)` into 15.
fn parse_major_version(text: &str) -> Option<u32> {
    let after = text.split("(PostgreSQL)").nth(1)?.trim_start();
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_bindir(root: &Path, major: &str) -> PathBuf {
        let bin = root.join(major).join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("postgres"), "").unwrap();
        std::fs::write(bin.join("initdb"), "").unwrap();
        bin
    }

    #[test]
    fn newest_supported_debian_bindir_wins() {
        let root = tempfile::tempdir().unwrap();
        fake_bindir(root.path(), "14");
        fake_bindir(root.path(), "15");
        let newest = fake_bindir(root.path(), "17");
        std::fs::create_dir_all(root.path().join("18/bin")).unwrap(); // no binaries
        let found = discover_in(None, None, root.path()).unwrap();
        assert_eq!(found.bindir, newest);
    }

    #[test]
    fn env_bindir_is_honoured_and_checked() {
        let root = tempfile::tempdir().unwrap();
        let bin = fake_bindir(root.path(), "16");
        let found = discover_in(Some(bin.clone()), None, Path::new("/nonexistent")).unwrap();
        assert_eq!(found.bindir, bin);

        let err = discover_in(Some(root.path().join("nope")), None, root.path()).unwrap_err();
        assert!(matches!(err, LocalPgError::BadBinDirEnv { .. }));
        assert!(err.to_string().contains("UMSTORE_PG_BINDIR"));
    }

    #[test]
    fn missing_binaries_error_says_what_to_install() {
        let root = tempfile::tempdir().unwrap();
        fake_bindir(root.path(), "13");
        let err = discover_in(None, Some(root.path().join("x")), root.path()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("PostgreSQL 15+ server binaries not found (looked in "));
        assert!(msg.contains("pg_config --bindir"), "{msg}");
        assert!(msg.contains(&root.path().display().to_string()), "{msg}");
        assert!(msg.contains("apt-get install postgresql-15"), "{msg}");
        assert!(msg.contains("--database-url"), "{msg}");
    }

    #[test]
    fn version_output_is_parsed() {
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 15.8 (Debian 15.8-0+deb12u1)\n"),
            Some(15)
        );
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 17devel"),
            Some(17)
        );
        assert_eq!(parse_major_version("garbage"), None);
    }

    #[test]
    fn installed_binaries_are_found_when_present() {
        // Runs against the real machine: only asserts consistency when PostgreSQL exists.
        if let Ok(bins) = PgBinaries::discover() {
            assert!(bins.program("postgres").is_file());
            assert!(bins.major_version().unwrap() >= MIN_MAJOR);
        }
    }
}
