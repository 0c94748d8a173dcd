//! The data plane's API bearer tokens, one per purpose (`writer`, `ai`, `rules`,
//! `json-generator`, `dashboard`, `analytics`, `admin`):
//!
//! - `<store>-api-tokens` holds the tokens, one key per purpose slug. The
//!   credentials step creates it once (immutable); clients read their token from
//!   it. Deleting it by hand has the next reconcile generate new tokens.
//! - `<store>-api-token-digests` holds `sha256:<hex>` of each token, under the same
//!   keys. The topology step applies it like any owned object, so it follows the
//!   tokens; it is the only one the data-plane pods mount, so a pod never holds a
//!   usable token.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use sha2::{Digest, Sha256};
use umstore_migrations::roles::Purpose;

use super::credentials::generate_password;
use crate::meta::{Owner, CREDENTIAL_LABEL};

/// Name of the Secret that holds the tokens.
pub fn tokens_secret_name(owner: &Owner) -> String {
    owner.child("api-tokens")
}

/// Name of the Secret that holds their digests.
pub fn digests_secret_name(owner: &Owner) -> String {
    owner.child("api-token-digests")
}

/// The `CREDENTIAL_LABEL` value of the tokens Secret.
pub const TOKENS_CREDENTIAL: &str = "api-tokens";

/// The bearer token of each purpose. Its `Debug` names the purposes only.
#[derive(Clone, Default, PartialEq)]
pub struct ApiTokens {
    by_purpose: BTreeMap<Purpose, String>,
}

impl std::fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let purposes: Vec<&str> = self.by_purpose.keys().map(|p| p.slug()).collect();
        f.debug_struct("ApiTokens")
            .field("purposes", &purposes)
            .finish_non_exhaustive()
    }
}

/// Why a tokens Secret cannot be used: the key that is missing or unusable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingToken(pub &'static str);

impl ApiTokens {
    /// A new random token for every purpose: 32 bytes from the OS, hex encoded.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut by_purpose = BTreeMap::new();
        for purpose in Purpose::ALL {
            by_purpose.insert(purpose, generate_password()?);
        }
        Ok(Self { by_purpose })
    }

    /// Fixed tokens, for golden files and tests.
    pub fn fixed_for_tests() -> Self {
        Self {
            by_purpose: Purpose::ALL
                .iter()
                .map(|p| (*p, format!("{}-api-token-for-tests", p.slug())))
                .collect(),
        }
    }

    /// The tokens in a tokens Secret's `data`: every purpose's key must hold a
    /// non-empty UTF-8 token without whitespace.
    pub fn from_secret(secret: &Secret) -> Result<Self, MissingToken> {
        let mut by_purpose = BTreeMap::new();
        for purpose in Purpose::ALL {
            let token = secret
                .data
                .as_ref()
                .and_then(|d| d.get(purpose.slug()))
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty() && !t.contains(char::is_whitespace))
                .ok_or(MissingToken(purpose.slug()))?;
            by_purpose.insert(purpose, token);
        }
        Ok(Self { by_purpose })
    }

    /// The token of `purpose`.
    pub fn token(&self, purpose: Purpose) -> Option<&str> {
        self.by_purpose.get(&purpose).map(String::as_str)
    }

    /// `sha256:<hex>` of each token, by purpose slug: the data plane's token-file
    /// format for a digest.
    pub fn digests(&self) -> BTreeMap<String, String> {
        self.by_purpose
            .iter()
            .map(|(p, token)| (p.slug().to_string(), digest(token)))
            .collect()
    }
}

/// `sha256:<64 lowercase hex digits>` of `token`'s UTF-8 bytes.
pub fn digest(token: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(token.as_bytes())))
}

/// Secret `data` from string pairs.
fn bytes(pairs: impl IntoIterator<Item = (String, String)>) -> BTreeMap<String, ByteString> {
    pairs
        .into_iter()
        .map(|(k, v)| (k, ByteString(v.into_bytes())))
        .collect()
}

/// The tokens Secret: created once by the credentials step and immutable, so no
/// reconcile changes a token under the clients that read it.
pub fn tokens_secret(owner: &Owner, tokens: &ApiTokens) -> Secret {
    let mut labels = owner.component_labels("credentials");
    labels.insert(CREDENTIAL_LABEL.to_string(), TOKENS_CREDENTIAL.to_string());
    Secret {
        metadata: owner.object_meta(&tokens_secret_name(owner), labels),
        immutable: Some(true),
        type_: Some("Opaque".into()),
        data: Some(bytes(
            tokens
                .by_purpose
                .iter()
                .map(|(p, token)| (p.slug().to_string(), token.clone())),
        )),
        ..Secret::default()
    }
}

/// The digests Secret the data-plane pods mount (`UMSTORE_API_TOKENS_DIR`).
pub fn digests_secret(owner: &Owner, tokens: &ApiTokens) -> Secret {
    Secret {
        metadata: owner.object_meta(
            &digests_secret_name(owner),
            owner.component_labels("credentials"),
        ),
        type_: Some("Opaque".into()),
        data: Some(bytes(tokens.digests())),
        ..Secret::default()
    }
}

/// A hash of the digests, for the data plane's pod template: the data plane reads
/// its token files at start, so new tokens roll its pods.
pub fn digests_hash(tokens: &ApiTokens) -> String {
    let mut hasher = Sha256::new();
    for (slug, digest) in tokens.digests() {
        hasher.update(slug.as_bytes());
        hasher.update(b"=");
        hasher.update(digest.as_bytes());
        hasher.update(b"\n");
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Owner {
        Owner {
            name: "s".into(),
            namespace: "ns".into(),
            uid: "u".into(),
        }
    }

    fn data(secret: &Secret) -> BTreeMap<String, String> {
        secret
            .data
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8(v.0).expect("utf-8")))
            .collect()
    }

    const SLUGS: [&str; 7] = [
        "admin",
        "ai",
        "analytics",
        "dashboard",
        "json-generator",
        "rules",
        "writer",
    ];

    #[test]
    fn every_purpose_gets_its_own_random_token() {
        let a = ApiTokens::generate().expect("entropy");
        let b = ApiTokens::generate().expect("entropy");
        let tokens: Vec<&str> = Purpose::ALL.iter().filter_map(|p| a.token(*p)).collect();
        assert_eq!(tokens.len(), 7);
        let mut distinct = tokens.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 7, "no two purposes share a token");
        assert!(tokens.iter().all(|t| t.len() == 64));
        assert_ne!(a, b);
    }

    #[test]
    fn the_tokens_secret_is_immutable_labelled_and_keyed_by_slug() {
        let tokens = ApiTokens::fixed_for_tests();
        let secret = tokens_secret(&owner(), &tokens);
        assert_eq!(secret.metadata.name.as_deref(), Some("s-api-tokens"));
        assert_eq!(secret.immutable, Some(true));
        let labels = secret.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get(CREDENTIAL_LABEL).map(String::as_str),
            Some("api-tokens")
        );
        assert_eq!(
            labels.get(crate::meta::COMPONENT_LABEL).map(String::as_str),
            Some("credentials")
        );
        let data = data(&secret);
        assert_eq!(data.keys().map(String::as_str).collect::<Vec<_>>(), SLUGS);
        assert_eq!(data["ai"], "ai-api-token-for-tests");
        assert_eq!(ApiTokens::from_secret(&secret), Ok(tokens));
    }

    #[test]
    fn the_digests_secret_holds_the_sha256_of_each_token_and_no_token() {
        let tokens = ApiTokens::generate().expect("entropy");
        let secret = digests_secret(&owner(), &tokens);
        assert_eq!(secret.metadata.name.as_deref(), Some("s-api-token-digests"));
        assert_ne!(secret.immutable, Some(true), "it follows the tokens");
        let data = data(&secret);
        assert_eq!(data.keys().map(String::as_str).collect::<Vec<_>>(), SLUGS);
        for purpose in Purpose::ALL {
            let token = tokens.token(purpose).expect("token");
            let entry = &data[purpose.slug()];
            let hex = entry.strip_prefix("sha256:").expect("sha256: prefix");
            assert_eq!(hex.len(), 64);
            assert!(hex
                .chars()
                .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase()));
            assert_eq!(
                hex,
                hex::encode(Sha256::digest(token.as_bytes())),
                "{purpose:?}"
            );
            assert!(
                data.values().all(|v| !v.contains(token)),
                "no token in the digests"
            );
        }
    }

    #[test]
    fn a_known_digest() {
        // `printf %s abc | sha256sum`
        assert_eq!(
            digest("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_tokens_secret_without_a_purpose_is_refused_naming_it() {
        let mut secret = tokens_secret(&owner(), &ApiTokens::fixed_for_tests());
        if let Some(d) = secret.data.as_mut() {
            d.remove("json-generator");
        }
        assert_eq!(
            ApiTokens::from_secret(&secret),
            Err(MissingToken("json-generator"))
        );
    }

    #[test]
    fn the_debug_form_names_purposes_not_tokens() {
        let tokens = ApiTokens::fixed_for_tests();
        let shown = format!("{tokens:?}");
        assert!(!shown.contains("api-token-for-tests"), "{shown}");
        assert!(shown.contains("json-generator"), "{shown}");
    }

    #[test]
    fn new_tokens_change_the_pod_template_hash() {
        let fixed = ApiTokens::fixed_for_tests();
        assert_eq!(digests_hash(&fixed), digests_hash(&fixed.clone()));
        let fresh = ApiTokens::generate().expect("entropy");
        assert_ne!(digests_hash(&fixed), digests_hash(&fresh));
    }
}
