//! Temporary directories that survive a failing test.

use std::path::{Path, PathBuf};

use umstore_localpg::chown_to_postgres_if_root;

use crate::HarnessError;

/// Set to `1` to keep every test directory.
pub const KEEP_ENV: &str = "UMSTORE_KEEP_TEST_DIRS";

pub(crate) fn keep_requested() -> bool {
    std::env::var(KEEP_ENV).is_ok_and(|v| v == "1")
}

/// A temporary directory under `/tmp`, owned by `postgres` when we are root (so servers
/// running as `postgres` can use it). Removed on drop, unless the thread is panicking
/// or `UMSTORE_KEEP_TEST_DIRS=1`: then it is kept and its path printed.
#[derive(Debug)]
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    /// Creates `/tmp/umstore-<label>-XXXXXX`.
    pub fn new(label: &str) -> Result<Self, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("umstore-{label}-"))
            .tempdir_in("/tmp")
            .map_err(|e| HarnessError::io("could not create a directory in /tmp", e))?;
        chown_to_postgres_if_root(dir.path())?;
        let path = dir.path().to_path_buf();
        Ok(Self {
            dir: Some(dir),
            path,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves removal to the process-exit hook (for shared servers in statics, which
    /// are never dropped).
    pub(crate) fn remove_at_exit(&mut self) {
        if let Some(dir) = self.dir.take() {
            crate::keeper::remove_at_exit(dir.keep());
        }
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            if std::thread::panicking() || keep_requested() {
                let path = dir.keep();
                eprintln!("umstore-e2e: kept {} (server logs inside)", path.display());
            }
        }
    }
}

/// Writes `contents` to `path`, naming the file when it cannot.
pub(crate) fn write_file(path: &Path, contents: &str) -> Result<(), HarnessError> {
    std::fs::write(path, contents)
        .map_err(|e| HarnessError::io(format!("could not write {}", path.display()), e))
}

/// `bytes` random bytes from `/dev/urandom`, as lowercase hex (tokens, passwords and
/// names that must not collide between tests).
pub(crate) fn random_hex(bytes: usize) -> Result<String, HarnessError> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| HarnessError::io("could not read /dev/urandom", e))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
