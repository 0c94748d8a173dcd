//! Who is calling: bearer tokens that map to a purpose.
//!
//! The tokens live in a directory with one file per purpose, named by its slug
//! (`writer`, `ai`, `rules`, `json-generator`, `dashboard`, `analytics`,
//! `admin`). A file holds the token itself (a local run makes them) or its
//! SHA-256 digest as `sha256:<64 hex digits>` (what the operator mounts, so a
//! data-plane pod never holds a usable token). Only digests are kept in memory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use thiserror::Error;
use umstore_migrations::roles::Purpose;

use super::error::ApiError;
use super::AppState;

/// The shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why the token directory cannot be used.
#[derive(Debug, Error)]
pub enum TokenError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A file's content is neither a token nor a digest.
    #[error(
        "{path}: holds neither a token (at least {MIN_TOKEN_LEN} characters, no spaces) nor \
         `sha256:<64 hex digits>`; write one of them"
    )]
    Malformed {
        /// The file.
        path: PathBuf,
    },
    /// Two purposes share a token: the purpose of a request would be ambiguous.
    #[error("the tokens of {first} and {second} are the same; give each purpose its own")]
    Shared {
        /// One purpose.
        first: &'static str,
        /// The other.
        second: &'static str,
    },
}

/// The accepted tokens, by digest.
#[derive(Clone, Default)]
pub struct ApiTokens {
    by_digest: HashMap<[u8; 32], Purpose>,
}

impl std::fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut purposes: Vec<&str> = self.by_digest.values().map(|p| p.slug()).collect();
        purposes.sort_unstable();
        f.debug_struct("ApiTokens")
            .field("purposes", &purposes)
            .finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The purpose whose token file is named `slug`.
pub fn purpose_from_slug(slug: &str) -> Option<Purpose> {
    Purpose::ALL.into_iter().find(|p| p.slug() == slug)
}

impl ApiTokens {
    /// Reads `dir`: every file named after a purpose; other files are ignored,
    /// a purpose without a file gets no token (its callers are refused).
    pub fn load(dir: &Path) -> Result<Self, TokenError> {
        let mut tokens = Self::default();
        for purpose in Purpose::ALL {
            let path = dir.join(purpose.slug());
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(TokenError::Io { path, source }),
            };
            let digest = parse_entry(text.trim()).ok_or(TokenError::Malformed { path })?;
            if let Some(first) = tokens.by_digest.insert(digest, purpose) {
                return Err(TokenError::Shared {
                    first: first.slug(),
                    second: purpose.slug(),
                });
            }
        }
        Ok(tokens)
    }

    /// Makes `dir` (owner only) and a random token for every purpose that has
    /// no file yet, then reads it. For local runs.
    pub fn generate(dir: &Path) -> Result<Self, TokenError> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TokenError::Io { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        for purpose in Purpose::ALL {
            let path = dir.join(purpose.slug());
            // Two v4 UUIDs: 244 random bits from the OS.
            let token = format!(
                "{}{}\n",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            );
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(mut file) => file.write_all(token.as_bytes()).map_err(io(&path))?,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(TokenError::Io { path, source }),
            }
        }
        Self::load(dir)
    }

    /// Accepts `token` for `purpose` (tests and embedders).
    pub fn with(mut self, purpose: Purpose, token: &str) -> Self {
        self.by_digest.insert(digest(token), purpose);
        self
    }

    /// The purposes that have a token.
    pub fn purposes(&self) -> Vec<Purpose> {
        let mut p: Vec<Purpose> = self.by_digest.values().copied().collect();
        p.sort_unstable();
        p
    }

    /// The purpose of the request's bearer token; `None` when it has none or
    /// an unknown one.
    pub fn purpose_of(&self, headers: &HeaderMap) -> Option<Purpose> {
        let token = headers
            .get(header::AUTHORIZATION)?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")?
            .trim();
        self.by_digest.get(&digest(token)).copied()
    }
}

/// A token file's digest: `sha256:<hex>`, or the digest of the token itself.
fn parse_entry(text: &str) -> Option<[u8; 32]> {
    if let Some(hex_digest) = text.strip_prefix("sha256:") {
        let bytes = hex::decode(hex_digest).ok()?;
        return bytes.try_into().ok();
    }
    (text.len() >= MIN_TOKEN_LEN && !text.contains(char::is_whitespace)).then(|| digest(text))
}

/// The authenticated caller's purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller(pub Purpose);

impl Caller {
    /// Refuses (403) unless the caller's purpose is one of `allowed`.
    pub fn require(self, allowed: &[Purpose]) -> Result<Purpose, ApiError> {
        if allowed.contains(&self.0) {
            Ok(self.0)
        } else {
            Err(ApiError::Forbidden {
                purpose: self.0,
                allowed: allowed.to_vec(),
            })
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        state
            .tokens
            .purpose_of(&parts.headers)
            .map(Caller)
            .ok_or(ApiError::Unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_of_tokens_and_digests_maps_each_to_its_purpose() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ai"), "ai-token-0123456789\n").expect("write");
        let rules = hex::encode(digest("rules-token-0123456789"));
        std::fs::write(dir.path().join("rules"), format!("sha256:{rules}")).expect("write");
        std::fs::write(dir.path().join("README"), "ignored").expect("write");
        let tokens = ApiTokens::load(dir.path()).expect("load");
        let ask = |t: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                format!("Bearer {t}").parse().expect("header"),
            );
            tokens.purpose_of(&h)
        };
        assert_eq!(ask("ai-token-0123456789"), Some(Purpose::Ai));
        assert_eq!(ask("rules-token-0123456789"), Some(Purpose::Rules));
        assert_eq!(ask("sha256:{rules}"), None);
        assert_eq!(ask("nope-nope-nope-nope"), None);
        assert_eq!(tokens.purposes(), vec![Purpose::Ai, Purpose::Rules]);
    }

    #[test]
    fn short_malformed_and_shared_tokens_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("dashboard"), "short").expect("write");
        let e = ApiTokens::load(dir.path()).expect_err("short");
        assert!(e.to_string().contains("dashboard"), "{e}");
        std::fs::write(dir.path().join("dashboard"), "sha256:abcd").expect("write");
        assert!(ApiTokens::load(dir.path()).is_err());
        std::fs::write(dir.path().join("dashboard"), "same-token-0123456789").expect("write");
        std::fs::write(dir.path().join("admin"), "same-token-0123456789").expect("write");
        let e = ApiTokens::load(dir.path()).expect_err("shared");
        assert!(e.to_string().contains("the same"), "{e}");
    }

    #[test]
    fn generate_makes_private_files_once_and_keeps_them() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let at = dir.path().join("api-tokens");
        let first = ApiTokens::generate(&at).expect("generate");
        assert_eq!(first.purposes().len(), Purpose::ALL.len());
        let ai = std::fs::read_to_string(at.join("ai")).expect("read");
        let mode = std::fs::metadata(at.join("ai"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        ApiTokens::generate(&at).expect("again");
        assert_eq!(std::fs::read_to_string(at.join("ai")).expect("read"), ai);
    }
}
