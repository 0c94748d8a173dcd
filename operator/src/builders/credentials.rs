//! Database roles, their generated passwords, and the Secrets that hold them:
//! per-role Secrets (created once, immutable) and per-purpose connection Secrets
//! for clients (uri, host, port, dbname, user, password).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;

use crate::meta::{Owner, CREDENTIAL_LABEL, DATABASE, PGBOUNCER_PORT, PG_PORT};
use crate::validated::Validated;
use umstore_crds::ReplicaPurpose;
use umstore_migrations::roles::{Purpose, REPLICATOR, SUPERUSER};

/// A database role. Each has its own password Secret `<store>-role-<role>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// The superuser (`postgres`), for the operator's bootstrap and migrations.
    Admin,
    /// Streaming replication.
    Replicator,
    /// The data plane's write path.
    Writer,
    /// AI core.
    Ai,
    /// Eligibility rules engine.
    Rules,
    /// JSON profile generator.
    JsonGenerator,
    /// Dashboard.
    Dashboard,
    /// Analytics (sees no PII columns).
    Analytics,
}

impl Role {
    /// Every role, in a fixed order.
    pub const ALL: [Role; 8] = [
        Role::Admin,
        Role::Replicator,
        Role::Writer,
        Role::Ai,
        Role::Rules,
        Role::JsonGenerator,
        Role::Dashboard,
        Role::Analytics,
    ];

    /// Client-facing roles: each gets a connection Secret.
    pub const CLIENTS: [Role; 6] = [
        Role::Writer,
        Role::Ai,
        Role::Rules,
        Role::JsonGenerator,
        Role::Dashboard,
        Role::Analytics,
    ];

    /// The database purpose of a client role.
    pub fn purpose(self) -> Option<Purpose> {
        match self {
            Role::Admin | Role::Replicator => None,
            Role::Writer => Some(Purpose::Writer),
            Role::Ai => Some(Purpose::Ai),
            Role::Rules => Some(Purpose::Rules),
            Role::JsonGenerator => Some(Purpose::JsonGenerator),
            Role::Dashboard => Some(Purpose::Dashboard),
            Role::Analytics => Some(Purpose::Analytics),
        }
    }

    /// Kebab-case name used in object names.
    pub fn slug(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Replicator => "replicator",
            _ => self.purpose().map_or("admin", Purpose::slug),
        }
    }

    /// The PostgreSQL user this role logs in as. Client roles log in as their own
    /// user, a member of the purpose's group role that the migrations grant to
    /// (see [`Role::group`]); the bootstrap step creates both.
    pub fn user(self) -> &'static str {
        match self.purpose() {
            None if self == Role::Replicator => REPLICATOR,
            None => SUPERUSER,
            Some(p) => p.login().unwrap_or(SUPERUSER),
        }
    }

    /// The group role whose grants this role's user receives.
    pub fn group(self) -> Option<&'static str> {
        self.purpose().map(Purpose::group)
    }

    /// The replica pool that serves this role's reads, if it reads from one.
    pub fn read_pool(self) -> Option<ReplicaPurpose> {
        match self {
            Role::Ai | Role::Rules | Role::JsonGenerator => Some(ReplicaPurpose::Ai),
            Role::Dashboard | Role::Analytics => Some(ReplicaPurpose::Analytics),
            Role::Admin | Role::Replicator | Role::Writer => None,
        }
    }

    /// Name of this role's password Secret.
    pub fn secret_name(self, owner: &Owner) -> String {
        owner.child(&format!("role-{}", self.slug()))
    }

    /// Name of this role's client connection Secret.
    pub fn connection_secret_name(self, owner: &Owner) -> String {
        owner.child(&format!("conn-{}", self.slug()))
    }
}

/// The passwords of every role, read from (or just written to) their Secrets.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Credentials {
    /// Password by role.
    pub passwords: BTreeMap<Role, String>,
}

impl Credentials {
    /// The password of `role`; empty when unknown (never the case after the
    /// credentials step).
    pub fn password(&self, role: Role) -> &str {
        self.passwords
            .get(&role)
            .map(String::as_str)
            .unwrap_or_default()
    }

    /// Fixed passwords, for golden files and tests.
    pub fn fixed_for_tests() -> Self {
        Self {
            passwords: Role::ALL
                .iter()
                .map(|r| (*r, format!("{}-password", r.slug())))
                .collect(),
        }
    }
}

/// Secret `data` from string pairs.
pub fn secret_data<const N: usize>(pairs: [(String, String); N]) -> BTreeMap<String, ByteString> {
    pairs
        .into_iter()
        .map(|(k, v)| (k, ByteString(v.into_bytes())))
        .collect()
}

/// Generates a password: 32 random bytes from the OS, hex encoded.
pub fn generate_password() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// A role's password Secret: created once and immutable, so no later reconcile (or
/// anyone else) can change the password under a running database.
pub fn role_secret(owner: &Owner, role: Role, password: &str) -> Secret {
    let mut labels = owner.component_labels("credentials");
    labels.insert(CREDENTIAL_LABEL.to_string(), "role".to_string());
    Secret {
        metadata: owner.object_meta(&role.secret_name(owner), labels),
        immutable: Some(true),
        type_: Some("kubernetes.io/basic-auth".into()),
        data: Some(secret_data([
            ("username".to_string(), role.user().to_string()),
            ("password".to_string(), password.to_string()),
        ])),
        ..Secret::default()
    }
}

/// Where a client role connects: (host, port).
pub fn endpoint_for(v: &Validated, role: Role) -> (String, i32) {
    let owner = &v.owner;
    if let Some(pool) = role.read_pool() {
        if v.pool_purposes().contains(&pool) {
            return (
                owner.service_host(&owner.child(&format!("replica-{}", pool.as_str()))),
                PG_PORT,
            );
        }
    }
    read_write_endpoint(v)
}

/// The read-write endpoint: PgBouncer from tier 2, the primary below.
pub fn read_write_endpoint(v: &Validated) -> (String, i32) {
    let owner = &v.owner;
    if v.pooled() {
        (
            owner.service_host(&owner.child("pgbouncer")),
            PGBOUNCER_PORT,
        )
    } else {
        (owner.service_host(&owner.child("coordinator")), PG_PORT)
    }
}

/// A client role's connection Secret.
pub fn connection_secret(v: &Validated, role: Role, creds: &Credentials) -> Secret {
    let owner = &v.owner;
    let (host, port) = endpoint_for(v, role);
    let user = role.user();
    let password = creds.password(role);
    let sslmode = if v.spec.postgres.tls.is_some() {
        "require"
    } else {
        "prefer"
    };
    let uri = format!("postgresql://{user}:{password}@{host}:{port}/{DATABASE}?sslmode={sslmode}");
    Secret {
        metadata: owner.object_meta(
            &role.connection_secret_name(owner),
            owner.component_labels("credentials"),
        ),
        type_: Some("Opaque".into()),
        data: Some(secret_data([
            ("uri".to_string(), uri),
            ("host".to_string(), host),
            ("port".to_string(), port.to_string()),
            ("dbname".to_string(), DATABASE.to_string()),
            ("user".to_string(), user.to_string()),
            ("password".to_string(), password.to_string()),
        ])),
        ..Secret::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_passwords_are_long_and_distinct() {
        let a = generate_password().expect("entropy");
        let b = generate_password().expect("entropy");
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }

    #[test]
    fn role_secret_is_immutable_and_labelled() {
        let owner = Owner {
            name: "s".into(),
            namespace: "ns".into(),
            uid: "u".into(),
        };
        let secret = role_secret(&owner, Role::Writer, "pw");
        assert_eq!(secret.immutable, Some(true));
        assert_eq!(secret.metadata.name.as_deref(), Some("s-role-writer"));
        assert_eq!(
            secret
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(CREDENTIAL_LABEL))
                .map(String::as_str),
            Some("role")
        );
    }
}
