//! Database roles, their generated passwords, and the Secrets that hold them:
//! per-role Secrets (created once, immutable) and per-purpose connection Secrets
//! for clients (uri and primary-uri, host, port, dbname, user, password).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;

use super::api_tokens::ApiTokens;
use crate::meta::{Owner, CREDENTIAL_LABEL, DATABASE, PGBOUNCER_PORT, PG_PORT};
use crate::validated::Validated;
use umstore_crds::ReplicaPurpose;
use umstore_migrations::roles::{Purpose, ADMIN_LOGIN, REPLICATOR, SUPERUSER};

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
    /// `umstore_admin_login`, a member of `umstore_admin` and no superuser: the
    /// identity of the API's admin purpose.
    AdminLogin,
}

impl Role {
    /// Every role, in a fixed order.
    pub const ALL: [Role; 9] = [
        Role::Admin,
        Role::Replicator,
        Role::Writer,
        Role::Ai,
        Role::Rules,
        Role::JsonGenerator,
        Role::Dashboard,
        Role::Analytics,
        Role::AdminLogin,
    ];

    /// Client-facing roles: each has a login user in its purpose's group and a
    /// connection Secret.
    pub const CLIENTS: [Role; 7] = [
        Role::Writer,
        Role::Ai,
        Role::Rules,
        Role::JsonGenerator,
        Role::Dashboard,
        Role::Analytics,
        Role::AdminLogin,
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
            Role::AdminLogin => Some(Purpose::Admin),
        }
    }

    /// Kebab-case name used in the role Secret's name (`admin` is the superuser's,
    /// `admin-login` the administrator login's).
    pub fn slug(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Replicator => "replicator",
            Role::AdminLogin => "admin-login",
            _ => self.purpose_slug(),
        }
    }

    /// The slug of the role's purpose (`writer`, `ai`, …, `admin` for
    /// [`Role::AdminLogin`]): the name of its connection Secret, its entry in
    /// `status.endpoints.secrets` and the data plane's variables. The superuser and
    /// the replicator, which have no purpose, give their own slug.
    pub fn purpose_slug(self) -> &'static str {
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
        match self {
            Role::Admin => SUPERUSER,
            Role::Replicator => REPLICATOR,
            Role::AdminLogin => ADMIN_LOGIN,
            _ => self.purpose().and_then(Purpose::login).unwrap_or(SUPERUSER),
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
            Role::Admin | Role::Replicator | Role::Writer | Role::AdminLogin => None,
        }
    }

    /// Name of this role's password Secret.
    pub fn secret_name(self, owner: &Owner) -> String {
        owner.child(&format!("role-{}", self.slug()))
    }

    /// Name of a client role's connection Secret, `<store>-conn-<purpose>`.
    pub fn connection_secret_name(self, owner: &Owner) -> String {
        owner.child(&format!("conn-{}", self.purpose_slug()))
    }
}

/// What the credentials step read or generated: the password of every role and
/// the API's bearer tokens.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Credentials {
    /// Password by role.
    pub passwords: BTreeMap<Role, String>,
    /// The data plane's bearer token of each purpose.
    pub api_tokens: ApiTokens,
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

    /// Fixed passwords and tokens, for golden files and tests.
    pub fn fixed_for_tests() -> Self {
        Self {
            passwords: Role::ALL
                .iter()
                .map(|r| (*r, format!("{}-password", r.slug())))
                .collect(),
            api_tokens: ApiTokens::fixed_for_tests(),
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

/// The replica pool that serves `role`'s reads in this store, if the role reads
/// from one and the tier has it.
pub fn pool_of(v: &Validated, role: Role) -> Option<ReplicaPurpose> {
    role.read_pool()
        .filter(|pool| v.endpoint_tier >= 2 && v.pool_purposes().contains(pool))
}

/// Where a client role connects: (host, port). Its replica pool where it reads
/// from one, else the read-write endpoint.
pub fn endpoint_for(v: &Validated, role: Role) -> (String, i32) {
    let owner = &v.owner;
    match pool_of(v, role) {
        Some(pool) => (
            owner.service_host(&owner.child(&format!("replica-{}", pool.as_str()))),
            PG_PORT,
        ),
        None => read_write_endpoint(v),
    }
}

/// The read-write endpoint: PgBouncer from tier 2, the primary below (and while a
/// promotion into tier 2 waits for the pooler: [`Validated::endpoint_tier`]).
pub fn read_write_endpoint(v: &Validated) -> (String, i32) {
    let owner = &v.owner;
    if v.endpoint_tier >= 2 {
        (
            owner.service_host(&owner.child("pgbouncer")),
            PGBOUNCER_PORT,
        )
    } else {
        (owner.service_host(&owner.child("coordinator")), PG_PORT)
    }
}

/// The connection Secret key holding the URI of the role's endpoint (its replica
/// pool where it has one).
pub const URI_KEY: &str = "uri";
/// The connection Secret key holding the URI of the read-write endpoint, whatever
/// the role's pool: what a client that must see its own writes connects to.
pub const PRIMARY_URI_KEY: &str = "primary-uri";

/// Where clients mount the TLS Secret's `ca.crt` (the data plane does): the
/// connection URIs of a store with TLS name this file as `sslrootcert`.
pub const CLIENT_CA_DIR: &str = "/etc/umstore/postgres-tls";

/// A client role's connection Secret: `uri`, `host`, `port` of its endpoint
/// (its replica pool where it has one), `primary-uri` of the read-write
/// endpoint, `dbname`, `user`, `password`. With TLS the URIs ask for
/// `sslmode=verify-full` against `ca.crt` mounted in [`CLIENT_CA_DIR`] (what
/// libpq and the data plane understand); without, `sslmode=prefer`.
pub fn connection_secret(v: &Validated, role: Role, creds: &Credentials) -> Secret {
    let owner = &v.owner;
    let (host, port) = endpoint_for(v, role);
    let (primary_host, primary_port) = read_write_endpoint(v);
    let user = role.user();
    let password = creds.password(role);
    let ssl = if v.spec.postgres.tls.is_some() {
        format!("sslmode=verify-full&sslrootcert={CLIENT_CA_DIR}/ca.crt")
    } else {
        "sslmode=prefer".to_string()
    };
    let uri_of = |host: &str, port: i32| {
        format!("postgresql://{user}:{password}@{host}:{port}/{DATABASE}?{ssl}")
    };
    let uri = uri_of(&host, port);
    let primary_uri = uri_of(&primary_host, primary_port);
    Secret {
        metadata: owner.object_meta(
            &role.connection_secret_name(owner),
            owner.component_labels("credentials"),
        ),
        type_: Some("Opaque".into()),
        data: Some(secret_data([
            (URI_KEY.to_string(), uri),
            (PRIMARY_URI_KEY.to_string(), primary_uri),
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
    fn client_roles_log_in_as_their_purposes_login_and_admin_login_is_not_the_superuser() {
        for role in Role::CLIENTS {
            let purpose = role.purpose().expect("a client role has a purpose");
            assert_eq!(role.group(), Some(purpose.group()), "{role:?}");
            assert_eq!(
                role.user(),
                format!("{}_login", purpose.group()),
                "{role:?}"
            );
            assert_ne!(role.user(), SUPERUSER, "{role:?}");
        }
        assert_eq!(Role::AdminLogin.user(), "umstore_admin_login");
        assert_eq!(Role::AdminLogin.group(), Some("umstore_admin"));
        assert_eq!(Role::Admin.user(), SUPERUSER);
        let mut names: Vec<&str> = Role::ALL.iter().map(|r| r.slug()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Role::ALL.len(), "one role Secret each");
        let owner = Owner {
            name: "s".into(),
            namespace: "ns".into(),
            uid: "u".into(),
        };
        assert_eq!(Role::AdminLogin.secret_name(&owner), "s-role-admin-login");
        assert_eq!(
            Role::AdminLogin.connection_secret_name(&owner),
            "s-conn-admin"
        );
        assert_eq!(Role::Admin.secret_name(&owner), "s-role-admin");
    }

    fn validated(spec: serde_json::Value) -> Validated {
        let store: umstore_crds::UserMetadataStore = serde_json::from_value(serde_json::json!({
            "apiVersion": "umstore.io/v1alpha1", "kind": "UserMetadataStore",
            "metadata": {"name": "s", "namespace": "ns", "uid": "u1", "generation": 1},
            "spec": spec,
        }))
        .expect("store");
        crate::validated::validate(&store).expect("valid")
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

    #[test]
    fn primary_uri_is_the_read_write_endpoint_and_uri_the_pool_where_there_is_one() {
        let creds = Credentials::fixed_for_tests();
        let tier2 = validated(serde_json::json!({
            "tier": 2,
            "replicaPools": [{"purpose": "ai", "replicas": 1}],
        }));
        let ai = data(&connection_secret(&tier2, Role::Ai, &creds));
        assert_eq!(
            ai["uri"],
            "postgresql://umstore_ai_login:ai-password@s-replica-ai.ns.svc:5432/umstore?sslmode=prefer"
        );
        assert_eq!(
            ai["primary-uri"],
            "postgresql://umstore_ai_login:ai-password@s-pgbouncer.ns.svc:6432/umstore?sslmode=prefer"
        );
        assert_eq!(ai["host"], "s-replica-ai.ns.svc");
        // No analytics pool in this store: the dashboard reads through PgBouncer.
        let dashboard = data(&connection_secret(&tier2, Role::Dashboard, &creds));
        assert_eq!(dashboard["uri"], dashboard["primary-uri"]);
        let admin = data(&connection_secret(&tier2, Role::AdminLogin, &creds));
        assert_eq!(admin["user"], "umstore_admin_login");
        assert_eq!(
            admin["primary-uri"],
            "postgresql://umstore_admin_login:admin-login-password@s-pgbouncer.ns.svc:6432/umstore?sslmode=prefer"
        );
        // Tier 1: the primary itself.
        let tier1 = validated(serde_json::json!({}));
        let writer = data(&connection_secret(&tier1, Role::Writer, &creds));
        assert_eq!(
            writer["primary-uri"],
            "postgresql://umstore_writer_login:writer-password@s-coordinator.ns.svc:5432/umstore?sslmode=prefer"
        );
        assert_eq!(writer["uri"], writer["primary-uri"]);
    }

    #[test]
    fn with_tls_the_uris_verify_the_server_against_the_mounted_ca() {
        let creds = Credentials::fixed_for_tests();
        let tls = validated(serde_json::json!({
            "tier": 1,
            "postgres": {"tls": {"secretName": "s-tls"}},
        }));
        let writer = data(&connection_secret(&tls, Role::Writer, &creds));
        assert_eq!(
            writer["uri"],
            "postgresql://umstore_writer_login:writer-password@s-coordinator.ns.svc:5432/umstore\
             ?sslmode=verify-full&sslrootcert=/etc/umstore/postgres-tls/ca.crt"
        );
        assert_eq!(writer["primary-uri"], writer["uri"]);
    }

    #[test]
    fn during_a_promotion_to_tier_2_clients_stay_on_the_primary_until_the_pooler_is_ready() {
        let creds = Credentials::fixed_for_tests();
        let mut promoting = validated(serde_json::json!({
            "tier": 2,
            "replicaPools": [{"purpose": "ai", "replicas": 1}],
        }));
        // The pipeline lowers the endpoints' tier while PgBouncer and the pools wait.
        promoting.endpoint_tier = 1;
        for role in [Role::Writer, Role::Ai] {
            let d = data(&connection_secret(&promoting, role, &creds));
            assert!(
                d["uri"].contains("@s-coordinator.ns.svc:5432/"),
                "{role:?}: {}",
                d["uri"]
            );
            assert!(d["primary-uri"].contains("@s-coordinator.ns.svc:5432/"));
        }
        promoting.endpoint_tier = 2;
        let writer = data(&connection_secret(&promoting, Role::Writer, &creds));
        assert!(
            writer["uri"].contains("@s-pgbouncer.ns.svc:"),
            "{}",
            writer["uri"]
        );
        let ai = data(&connection_secret(&promoting, Role::Ai, &creds));
        assert!(
            ai["uri"].contains("@s-replica-ai.ns.svc:5432/"),
            "{}",
            ai["uri"]
        );
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
