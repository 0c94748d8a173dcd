//! The libpq TLS settings tokio-postgres does not parse: `sslmode=verify-ca`,
//! `sslmode=verify-full` and `sslrootcert=<file>`. They are taken out of the URL
//! (or key=value conninfo) before tokio-postgres parses the rest, and turned into
//! a [`PgTls`] here.

use std::path::PathBuf;

use tokio_postgres::config::SslMode as DriverSslMode;

use super::tls::{PgTls, Verify};

/// libpq's `sslmode` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// Plaintext (libpq would try TLS after a refusal; we never need to).
    Allow,
    /// Plaintext here: the data plane offers no TLS unless asked (as before TLS).
    #[default]
    Prefer,
    /// TLS; the server checked against `sslrootcert` when given (chain only, as
    /// libpq does), else not at all.
    Require,
    /// TLS, the chain checked against `sslrootcert`.
    VerifyCa,
    /// TLS, the chain and the host name checked against `sslrootcert`.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, String> {
        Ok(match value {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, \
                     verify-full"
                ))
            }
        })
    }
}

/// What a URL says about TLS.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SslOptions {
    /// `sslmode` (`prefer` when absent).
    pub mode: SslMode,
    /// `sslrootcert`: the CA certificates (PEM) to check the server against.
    pub root_cert: Option<PathBuf>,
}

impl SslOptions {
    /// The mode tokio-postgres runs with, and the TLS to connect with (`None`:
    /// plaintext, tokio-postgres's `NoTls`). Reads the root certificate file.
    pub fn resolve(&self) -> Result<(DriverSslMode, Option<PgTls>), String> {
        let verified = |verify: Verify| -> Result<Option<PgTls>, String> {
            let Some(path) = &self.root_cert else {
                return Err(format!(
                    "sslmode={} needs sslrootcert=<file of the CA certificate>",
                    if verify == Verify::Full {
                        "verify-full"
                    } else {
                        "verify-ca"
                    }
                ));
            };
            PgTls::from_ca_file(path, verify)
                .map(Some)
                .map_err(|e| e.to_string())
        };
        Ok(match self.mode {
            SslMode::Disable => (DriverSslMode::Disable, None),
            SslMode::Allow | SslMode::Prefer => (DriverSslMode::Prefer, None),
            SslMode::Require if self.root_cert.is_some() => {
                (DriverSslMode::Require, verified(Verify::Chain)?)
            }
            SslMode::Require => (
                DriverSslMode::Require,
                Some(PgTls::unverified().map_err(|e| e.to_string())?),
            ),
            SslMode::VerifyCa => (DriverSslMode::Require, verified(Verify::Chain)?),
            SslMode::VerifyFull => (DriverSslMode::Require, verified(Verify::Full)?),
        })
    }
}

/// Takes `sslmode` and `sslrootcert` out of a `postgres://` URL or a key=value
/// conninfo string: the string without them, and what they said. A string that
/// does not tokenize is returned whole, for tokio-postgres to report.
pub fn split(url: &str) -> Result<(String, SslOptions), String> {
    let mut options = SslOptions::default();
    let mut take = |key: &str, value: String| -> Result<bool, String> {
        match key {
            "sslmode" => options.mode = SslMode::parse(&value)?,
            "sslrootcert" => options.root_cert = Some(PathBuf::from(value)),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_string(), SslOptions::default()));
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(key, percent_decode(value))? {
                kept.push(pair);
            }
        }
        if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else {
        let Some(pairs) = conninfo_pairs(url) else {
            return Ok((url.to_string(), SslOptions::default()));
        };
        let mut rest = String::new();
        let mut last = 0;
        for Pair { key, value, span } in pairs {
            if take(&key, value)? {
                rest.push_str(&url[last..span.start]);
                last = span.end;
            }
        }
        rest.push_str(&url[last..]);
        rest
    };
    Ok((rest, options))
}

/// `%XX` escapes decoded (as tokio-postgres decodes URL parameters).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One `key = value` of a conninfo string.
struct Pair {
    key: String,
    /// Unquoted and unescaped.
    value: String,
    /// Where the pair is in the string.
    span: std::ops::Range<usize>,
}

/// The pairs of a conninfo string; `None` when it does not tokenize.
fn conninfo_pairs(s: &str) -> Option<Vec<Pair>> {
    let b = s.as_bytes();
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let mut pairs = Vec::new();
    let mut i = skip_ws(0);
    while i < b.len() {
        let start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = s.get(start..i)?.to_string();
        i = skip_ws(i);
        if key.is_empty() || b.get(i) != Some(&b'=') {
            return None;
        }
        i = skip_ws(i + 1);
        let mut value = Vec::new();
        if b.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match b.get(i)? {
                    b'\'' => {
                        i += 1;
                        break;
                    }
                    b'\\' => {
                        value.push(*b.get(i + 1)?);
                        i += 2;
                    }
                    c => {
                        value.push(*c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                if b[i] == b'\\' {
                    value.push(*b.get(i + 1)?);
                    i += 2;
                } else {
                    value.push(b[i]);
                    i += 1;
                }
            }
        }
        pairs.push(Pair {
            key,
            value: String::from_utf8(value).ok()?,
            span: start..i,
        });
        i = skip_ws(i);
    }
    Some(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_loses_only_the_tls_parameters() {
        let (rest, opts) = split(
            "postgresql://w:p@h.ns.svc:5432/umstore?sslmode=verify-full\
             &sslrootcert=%2Fetc%2Fumstore%2Fpostgres-tls%2Fca.crt&application_name=x",
        )
        .expect("splits");
        assert_eq!(
            rest,
            "postgresql://w:p@h.ns.svc:5432/umstore?application_name=x"
        );
        assert_eq!(opts.mode, SslMode::VerifyFull);
        assert_eq!(
            opts.root_cert,
            Some(PathBuf::from("/etc/umstore/postgres-tls/ca.crt"))
        );
        let (rest, opts) = split("postgres://w@h/db?sslmode=require").expect("splits");
        assert_eq!(rest, "postgres://w@h/db");
        assert_eq!(opts.mode, SslMode::Require);
        assert_eq!(
            split("postgres://w@h/db").expect("splits").1,
            SslOptions::default()
        );
    }

    #[test]
    fn conninfo_loses_only_the_tls_pairs() {
        let (rest, opts) = split(
            "host=h port=5432 sslmode = 'verify-ca' user=w sslrootcert='/a b/ca.crt' dbname=d",
        )
        .expect("splits");
        assert_eq!(
            rest.split_whitespace().collect::<Vec<_>>(),
            ["host=h", "port=5432", "user=w", "dbname=d"]
        );
        assert_eq!(opts.mode, SslMode::VerifyCa);
        assert_eq!(opts.root_cert, Some(PathBuf::from("/a b/ca.crt")));
        // Quoted values with escapes and an untokenizable string pass through.
        let (rest, _) = split(r"password='it\'s' sslmode=disable").expect("splits");
        assert_eq!(rest.trim(), r"password='it\'s'");
        assert_eq!(split("host").expect("passes").0, "host");
    }

    #[test]
    fn verification_without_a_root_certificate_is_refused() {
        let (_, opts) = split("postgres://w@h/db?sslmode=verify-full").expect("splits");
        let err = opts.resolve().err().unwrap_or_default();
        assert!(err.contains("needs sslrootcert"), "{err}");
        let err = split("postgres://w@h/db?sslmode=verify")
            .err()
            .unwrap_or_default();
        assert!(err.contains("is not one of"), "{err}");
    }

    #[test]
    fn modes_map_to_the_drivers() {
        let mode = |m: SslMode| {
            SslOptions {
                mode: m,
                root_cert: None,
            }
            .resolve()
            .map(|(d, tls)| (d, tls.map(|t| t.verify())))
        };
        assert_eq!(mode(SslMode::Disable), Ok((DriverSslMode::Disable, None)));
        assert_eq!(mode(SslMode::Prefer), Ok((DriverSslMode::Prefer, None)));
        assert_eq!(
            mode(SslMode::Require),
            Ok((DriverSslMode::Require, Some(Verify::Nothing)))
        );
        let missing = SslOptions {
            mode: SslMode::Require,
            root_cert: Some(PathBuf::from("/nonexistent/ca.crt")),
        };
        let err = missing.resolve().err().unwrap_or_default();
        assert!(
            err.contains("cannot read the root certificate file /nonexistent/ca.crt"),
            "{err}"
        );
    }
}
