//! Step 2, credentials: one password per database role and one API bearer token
//! per purpose, generated once into immutable Secrets and read back on every later
//! reconcile (never regenerated while their Secret exists).

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject};
use kube::runtime::events::EventType;

use super::{Journal, Reason};
use crate::apply::{self, Observed};
use crate::builders::api_tokens::{tokens_secret, tokens_secret_name, ApiTokens};
use crate::builders::backup;
use crate::builders::credentials::{generate_password, role_secret, Credentials, Role};
use crate::builders::Object;
use crate::context::Context;
use crate::error::Error;
use crate::validated::Validated;

/// Reads the `password` key of a role Secret.
fn password_of(name: &str, secret: &Secret) -> Result<String, Error> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get("password"))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .filter(|p| !p.is_empty())
        .ok_or_else(|| Error::CorruptSecret {
            name: name.to_string(),
        })
}

/// Reads every purpose's token from the tokens Secret.
fn tokens_of(name: &str, secret: &Secret) -> Result<ApiTokens, Error> {
    ApiTokens::from_secret(secret).map_err(|missing| Error::CorruptApiTokens {
        name: name.to_string(),
        key: missing.0,
    })
}

fn as_secret(name: &str, obj: &DynamicObject) -> Result<Secret, Error> {
    let mut value = serde_json::to_value(obj).map_err(|source| Error::Serialize {
        what: format!("Secret/{name}"),
        source,
    })?;
    // List items carry no apiVersion/kind; the typed Secret wants them.
    value["apiVersion"] = "v1".into();
    value["kind"] = "Secret".into();
    serde_json::from_value(value).map_err(|source| Error::Serialize {
        what: format!("Secret/{name}"),
        source,
    })
}

/// What the Secret `name` holds, read by `read`: from the reconcile's LIST, or,
/// when it is absent, `fresh` written into the Secret `build` makes of it. Returns
/// whether this call created it.
async fn read_or_create<T>(
    ctx: &Context,
    v: &Validated,
    observed: &Observed,
    name: &str,
    read: impl Fn(&str, &Secret) -> Result<T, Error>,
    fresh: impl FnOnce() -> Result<T, Error>,
    build: impl FnOnce(&T) -> Secret,
) -> Result<(T, bool), Error> {
    if let Some(obj) = observed.get("Secret", name) {
        return Ok((read(name, &as_secret(name, obj)?)?, false));
    }
    let value = fresh()?;
    let object = Object::Secret(build(&value));
    if apply::create_if_absent(&ctx.client, &v.owner.namespace, &object).await? {
        return Ok((value, true));
    }
    // Created by someone else since we listed: theirs wins.
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &v.owner.namespace);
    let secret = api
        .get(name)
        .await
        .map_err(Error::kube(format!("reading Secret/{name}")))?;
    Ok((read(name, &secret)?, false))
}

/// Runs the step: the password of every role and the API tokens, from their
/// Secrets or newly generated.
pub async fn run(
    ctx: &Context,
    v: &Validated,
    observed: &Observed,
    journal: &mut Journal,
) -> Result<Credentials, Error> {
    let owner = &v.owner;
    let mut credentials = Credentials::default();
    let mut created = Vec::new();
    for role in Role::ALL {
        let name = role.secret_name(owner);
        let (password, new) = read_or_create(
            ctx,
            v,
            observed,
            &name,
            password_of,
            || generate_password().map_err(|e| Error::Entropy(e.to_string())),
            |password| role_secret(owner, role, password),
        )
        .await?;
        if new {
            created.push(name);
        }
        credentials.passwords.insert(role, password);
    }
    let name = tokens_secret_name(owner);
    let (tokens, new) = read_or_create(
        ctx,
        v,
        observed,
        &name,
        tokens_of,
        || ApiTokens::generate().map_err(|e| Error::Entropy(e.to_string())),
        |tokens| tokens_secret(owner, tokens),
    )
    .await?;
    credentials.api_tokens = tokens;
    let tokens_created = new.then_some(name);
    if v.spec.backup.is_some() {
        // The backup repository's passphrase (never regenerated: the backups made
        // under it need it) and the backup TLS material.
        let name = backup::passphrase_secret_name(owner);
        let (_, new) = read_or_create(
            ctx,
            v,
            observed,
            &name,
            |name, secret| {
                secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(backup::PASSPHRASE_KEY))
                    .filter(|b| !b.0.is_empty())
                    // Only whether it is there: the operator never needs it.
                    .map(|_| None)
                    .ok_or_else(|| Error::CorruptSecret {
                        name: name.to_string(),
                    })
            },
            || {
                generate_password()
                    .map(Some)
                    .map_err(|e| Error::Entropy(e.to_string()))
            },
            |passphrase: &Option<String>| {
                backup::passphrase_secret(owner, passphrase.as_deref().unwrap_or_default())
            },
        )
        .await?;
        if new {
            created.push(name);
        }
        let name = backup::tls_secret_name(owner);
        let (_, new) = read_or_create(
            ctx,
            v,
            observed,
            &name,
            |name, secret| {
                let data = secret.data.clone().unwrap_or_default();
                backup::BackupTls::from_data(&data).map_err(|_| Error::CorruptSecret {
                    name: name.to_string(),
                })
            },
            || {
                backup::generate_tls(&owner.namespace)
                    .map_err(|e| Error::Entropy(format!("backup TLS material: {e}")))
            },
            |tls| backup::tls_secret(owner, tls),
        )
        .await?;
        if new {
            created.push(name);
        }
    }

    if !created.is_empty() || tokens_created.is_some() {
        let mut parts = Vec::new();
        if !created.is_empty() {
            parts.push(format!("generated passwords in {}", created.join(", ")));
        }
        if let Some(name) = &tokens_created {
            parts.push(format!(
                "generated API tokens in {name} (clients read theirs from it)"
            ));
        }
        journal.event(
            EventType::Normal,
            Reason::CredentialsCreated,
            parts.join("; "),
        );
        journal.created.extend(
            created
                .into_iter()
                .chain(tokens_created)
                .map(|n| format!("Secret/{n}")),
        );
    }
    Ok(credentials)
}
