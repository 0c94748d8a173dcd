//! Step 2, credentials: one password per database role, generated once into an
//! immutable Secret and read back on every later reconcile (never regenerated).

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject};
use kube::runtime::events::EventType;

use super::{Journal, Reason};
use crate::apply::{self, Observed};
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

/// Runs the step: the password of every role, from its Secret or newly generated.
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
        let password = match observed.get("Secret", &name) {
            Some(obj) => password_of(&name, &as_secret(&name, obj)?)?,
            None => {
                let password = generate_password().map_err(|e| Error::Entropy(e.to_string()))?;
                let object = Object::Secret(role_secret(owner, role, &password));
                if apply::create_if_absent(&ctx.client, &owner.namespace, &object).await? {
                    created.push(name.clone());
                    password
                } else {
                    // Created by someone else since we listed: theirs wins.
                    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &owner.namespace);
                    let secret = api
                        .get(&name)
                        .await
                        .map_err(Error::kube(format!("reading Secret/{name}")))?;
                    password_of(&name, &secret)?
                }
            }
        };
        credentials.passwords.insert(role, password);
    }
    if !created.is_empty() {
        journal.event(
            EventType::Normal,
            Reason::CredentialsCreated,
            format!("generated passwords in {}", created.join(", ")),
        );
        journal
            .created
            .extend(created.into_iter().map(|n| format!("Secret/{n}")));
    }
    Ok(credentials)
}
