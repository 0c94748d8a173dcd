//! The store's TLS, for the operator's own connections: with
//! `spec.postgres.tls.secretName`, the CA certificate under `ca.crt` of that Secret
//! (cert-manager's layout, beside `tls.crt` and `tls.key`) in the store's
//! namespace. The bootstrap step reads it each time it connects, so a renewed CA is
//! used at once, and the connections it hands on (migrate, distribute, keys) are
//! checked against it. A missing Secret, or one without a usable `ca.crt`, stops
//! the bootstrap step with [`Reason::TlsSecretMissing`]: the operator never falls
//! back to plaintext for a store that asks for TLS.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use super::{Outcome, Reason, Waiting};
use crate::context::Context;
use crate::db::{PgTls, Verify};
use crate::error::Error;
use crate::validated::Validated;

/// The Secret key holding the CA certificate (PEM).
pub const CA_KEY: &str = "ca.crt";

/// How often to look again for a missing Secret (a Secret the operator does not
/// own does not trigger a reconcile when it appears).
pub const RECHECK: Duration = Duration::from_secs(30);

/// The store's TLS (`None` without `spec.postgres.tls`), or why there is none yet.
pub async fn store_tls(ctx: &Context, v: &Validated) -> Result<Outcome<Option<PgTls>>, Error> {
    let Some(spec) = &v.spec.postgres.tls else {
        return Ok(Outcome::Done(None));
    };
    let (namespace, name) = (&v.owner.namespace, &spec.secret_name);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let secret = secrets.get_opt(name).await.map_err(Error::kube(format!(
        "reading the TLS Secret {namespace}/{name}"
    )))?;
    Ok(match ca_of(secret.as_ref(), namespace, name) {
        Ok(tls) => Outcome::Done(Some(tls)),
        Err(message) => Outcome::Waiting(Waiting::new(
            Reason::TlsSecretMissing,
            message,
            Some(RECHECK),
        )),
    })
}

/// The CA of the TLS Secret `name`, or what is wrong with it (for the condition).
pub fn ca_of(secret: Option<&Secret>, namespace: &str, name: &str) -> Result<PgTls, String> {
    let Some(secret) = secret else {
        return Err(format!(
            "TLS Secret {name} (spec.postgres.tls.secretName) does not exist in namespace \
             {namespace}; create it with keys tls.crt, tls.key and {CA_KEY} (a cert-manager \
             Certificate writes them), or remove spec.postgres.tls"
        ));
    };
    let Some(pem) = secret.data.as_ref().and_then(|d| d.get(CA_KEY)) else {
        return Err(format!(
            "TLS Secret {name} has no {CA_KEY} key: the operator and the data plane check the \
             server's certificate against it; add the CA certificate (PEM) under {CA_KEY}"
        ));
    };
    PgTls::from_ca_pem(
        &pem.0,
        Verify::Full,
        &format!("key {CA_KEY} of TLS Secret {name}"),
    )
    .map_err(|e| format!("{e}; put the PEM certificate of the CA that signed tls.crt there"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;

    use super::*;

    fn secret(data: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Secret::default()
        }
    }

    #[test]
    fn a_missing_secret_or_key_says_which() {
        let missing = ca_of(None, "umstore", "pilot-tls")
            .err()
            .unwrap_or_default();
        assert!(
            missing.starts_with("TLS Secret pilot-tls (spec.postgres.tls.secretName) does not exist in namespace umstore"),
            "{missing}"
        );
        let no_ca = ca_of(Some(&secret(&[("tls.crt", "x")])), "umstore", "pilot-tls")
            .err()
            .unwrap_or_default();
        assert!(
            no_ca.starts_with("TLS Secret pilot-tls has no ca.crt key"),
            "{no_ca}"
        );
        let garbage = ca_of(
            Some(&secret(&[("ca.crt", "garbage")])),
            "umstore",
            "pilot-tls",
        )
        .err()
        .unwrap_or_default();
        assert!(
            garbage
                .starts_with("key ca.crt of TLS Secret pilot-tls holds no usable PEM certificate"),
            "{garbage}"
        );
    }
}
