//! Step 4, bootstrap: once the coordinator answers, make sure the store's database,
//! extensions and roles exist: the purpose group roles (the migrations grant to
//! them), one login user per client role and the replication user, each with the
//! password of its credentials Secret and a member of its group.
//!
//! Everything is idempotent and checked before it is changed: a reconcile of a
//! bootstrapped store reads the catalog and writes nothing. A password is set only
//! when the role's stored SCRAM verifier does not match its Secret (a Secret
//! restored from backup, a role altered by hand); the password itself never
//! reaches the server, only its verifier, so it cannot appear in server logs.
//! Role names are constants; passwords travel as bind parameters into the
//! server's `format('%L')`, never spliced into SQL text here.
//!
//! With `spec.postgres.tls` it connects over TLS, checking the coordinator's
//! certificate against the TLS Secret's `ca.crt` (see [`super::tls`]).
//!
//! Worker registration (tier ≥ 3) belongs to the distribute step.

use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use kube::runtime::events::EventType;
use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use umstore_migrations::roles::{with_advisory_lock, AdvisoryLock, Purpose, DATABASE};

use super::topology::Provisioned;
use super::{tls, Journal, Outcome, Reason, Waiting};
use crate::builders::credentials::{Credentials, Role};
use crate::context::Context;
use crate::db::Connector;
use crate::error::Error;
use crate::meta::PG_PORT;
use crate::validated::Validated;

/// How often to look again while the coordinator is not ready or not reachable.
pub const RECHECK: Duration = Duration::from_secs(15);
/// How long to wait for the coordinator to become ready at most: its pods and its
/// StatefulSet are watched, so a change wakes the store sooner.
pub const NOT_READY_WAIT: Duration = Duration::from_secs(60);
/// The longest wait between attempts to reach a coordinator that does not answer.
pub const UNREACHABLE_MAX: Duration = Duration::from_secs(300);

/// When to try a coordinator that did not answer again: [`RECHECK`] at first, then
/// half the time it has been unreachable (about doubling), at most
/// [`UNREACHABLE_MAX`]; `since` is when `Bootstrapped` turned False for it. A fleet
/// of stores whose databases are down does not poll them every 15 seconds.
pub fn unreachable_backoff(
    since: Option<k8s_openapi::jiff::Timestamp>,
    now: k8s_openapi::jiff::Timestamp,
) -> Duration {
    let elapsed = since
        .and_then(|s| now.duration_since(s).try_into().ok())
        .unwrap_or(Duration::ZERO);
    (elapsed / 2).clamp(RECHECK, UNREACHABLE_MAX)
}

/// Extensions every tier gets (when the image ships them).
const EXTENSIONS: [&str; 1] = ["pg_stat_statements"];

/// What one bootstrap changed, for the condition, the Event and tests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BootstrapReport {
    /// Whether the database was created.
    pub database_created: bool,
    /// Extensions created.
    pub extensions: Vec<String>,
    /// Roles created.
    pub roles_created: Vec<String>,
    /// Roles whose password was reset to their Secret's.
    pub passwords_set: Vec<String>,
    /// Memberships granted (`login → group`).
    pub memberships: Vec<String>,
}

impl BootstrapReport {
    /// Whether anything was changed.
    pub fn changed(&self) -> bool {
        self.database_created
            || !self.extensions.is_empty()
            || !self.roles_created.is_empty()
            || !self.passwords_set.is_empty()
            || !self.memberships.is_empty()
    }
}

/// What the later steps receive from bootstrap: the superuser connection to the
/// store's database, which the migrate (and later the distribute and keys) steps
/// reuse rather than opening their own, and the connector it was made with (the
/// store's TLS), for a step that opens one of its own (the keys step's rewrap).
pub struct Bootstrapped {
    /// Connected as the superuser to the store's database.
    pub admin: Client,
    /// How the store's PostgreSQL is reached, with its TLS.
    pub connector: Connector,
    /// The `Bootstrapped` condition's message.
    pub message: String,
}

impl std::fmt::Debug for Bootstrapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootstrapped")
            .field("message", &self.message)
            .finish_non_exhaustive()
    }
}

/// Runs the step once the topology step has applied the coordinator.
pub async fn run(
    ctx: &Context,
    v: &Validated,
    credentials: &Credentials,
    provisioned: &Provisioned,
    journal: &mut Journal,
) -> Result<Outcome<Bootstrapped>, Error> {
    let coordinator = &provisioned.coordinator;
    if !provisioned.coordinator_ready {
        return Ok(Outcome::Waiting(Waiting::new(
            Reason::CoordinatorNotReady,
            format!("waiting for StatefulSet {coordinator} to have a ready replica"),
            Some(NOT_READY_WAIT),
        )));
    }
    let connector = match tls::store_tls(ctx, v).await? {
        Outcome::Done(tls) => ctx.connector.clone().with_tls(tls),
        Outcome::Waiting(w) => return Ok(Outcome::Waiting(w)),
    };
    let host = v.owner.service_host(coordinator);
    let admin = credentials.password(Role::Admin);
    let port = u16::try_from(PG_PORT).unwrap_or(5432);
    let check = if connector.tls().is_some() {
        "check the coordinator's logs and NetworkPolicy, and that its certificate is signed \
         by the TLS Secret's ca.crt and names this host"
    } else {
        "check the coordinator's logs and NetworkPolicy"
    };
    let unreachable = |e: Error| {
        Outcome::Waiting(Waiting::new(
            Reason::CoordinatorUnreachable,
            format!("{e}; retrying ({check})"),
            Some(RECHECK),
        ))
    };
    let maintenance = match connector
        .connect(&host, port, "postgres", Role::Admin.user(), admin)
        .await
    {
        Ok(c) => c,
        Err(e) => return Ok(unreachable(e)),
    };
    let database_created = ensure_database(&maintenance).await?;
    drop(maintenance);
    let mut client = match connector
        .connect(&host, port, DATABASE, Role::Admin.user(), admin)
        .await
    {
        Ok(c) => c,
        Err(e) => return Ok(unreachable(e)),
    };
    let mut report = bootstrap(&mut client, credentials, v.tier).await?;
    report.database_created = database_created;
    if report.changed() {
        journal.event(EventType::Normal, Reason::Bootstrapped, describe(&report));
    }
    Ok(Outcome::Done(Bootstrapped {
        admin: client,
        connector,
        message: format!(
            "database {DATABASE}, extensions and {} login roles in place",
            Role::CLIENTS.len() + 1
        ),
    }))
}

fn describe(report: &BootstrapReport) -> String {
    let mut parts = Vec::new();
    if report.database_created {
        parts.push(format!("created database {DATABASE}"));
    }
    if !report.extensions.is_empty() {
        parts.push(format!("extensions {}", report.extensions.join(", ")));
    }
    if !report.roles_created.is_empty() {
        parts.push(format!("created roles {}", report.roles_created.join(", ")));
    }
    if !report.passwords_set.is_empty() {
        parts.push(format!(
            "reset the passwords of {} to their Secrets",
            report.passwords_set.join(", ")
        ));
    }
    if !report.memberships.is_empty() {
        parts.push(format!("granted {}", report.memberships.join(", ")));
    }
    parts.join("; ")
}

/// Creates the store's database unless it exists. Runs on the `postgres` database
/// (CREATE DATABASE cannot run in the database it creates, nor in a transaction).
pub async fn ensure_database(client: &Client) -> Result<bool, Error> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&DATABASE])
        .await
        .map_err(Error::db(format!("looking for database {DATABASE}")))?
        .is_some();
    if exists {
        return Ok(false);
    }
    match client
        .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if created_meanwhile(&e) => Ok(false),
        Err(e) => Err(Error::db(format!("creating database {DATABASE}"))(e)),
    }
}

/// Extensions, group roles, login users with their passwords, memberships; in the
/// store's database, as the superuser, under the bootstrap advisory lock (so two
/// operator replicas, one briefly believing it still leads, never race on the
/// catalog). Changes nothing that is already right.
pub async fn bootstrap(
    client: &mut Client,
    credentials: &Credentials,
    tier: i32,
) -> Result<BootstrapReport, Error> {
    with_advisory_lock(
        client,
        AdvisoryLock::Bootstrap,
        |what, e| Error::db(format!("{what} the bootstrap lock"))(e),
        async |client| bootstrap_locked(client, credentials, tier).await,
    )
    .await
}

async fn bootstrap_locked(
    client: &Client,
    credentials: &Credentials,
    tier: i32,
) -> Result<BootstrapReport, Error> {
    let mut report = BootstrapReport::default();

    let mut wanted: Vec<&str> = EXTENSIONS.to_vec();
    if tier >= 3 {
        wanted.push("citus");
    }
    for ext in wanted {
        let row = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = $1), \
                        EXISTS (SELECT 1 FROM pg_extension WHERE extname = $1)",
                &[&ext],
            )
            .await
            .map_err(Error::db(format!("looking for extension {ext}")))?;
        let (available, installed): (bool, bool) = (row.get(0), row.get(1));
        if installed || !available {
            // Not shipped by the image: pg_stat_statements is an observability aid,
            // and Citus is checked by the distribute step, which says what to do.
            continue;
        }
        match client
            .batch_execute(&format!("CREATE EXTENSION IF NOT EXISTS {ext}"))
            .await
        {
            Ok(()) => report.extensions.push(ext.to_string()),
            Err(e) if created_meanwhile(&e) => {}
            Err(e) => return Err(Error::db(format!("creating extension {ext}"))(e)),
        }
    }

    for group in Purpose::ALL.map(Purpose::group) {
        if ensure_role(client, group, RoleKind::Group).await? {
            report.roles_created.push(group.to_string());
        }
    }

    let logins = Role::CLIENTS
        .iter()
        .copied()
        .chain(std::iter::once(Role::Replicator));
    for role in logins {
        let user = role.user();
        let kind = if role == Role::Replicator {
            RoleKind::Replication
        } else {
            RoleKind::Login
        };
        if ensure_role(client, user, kind).await? {
            report.roles_created.push(user.to_string());
        }
        if ensure_password(client, user, credentials.password(role)).await? {
            report.passwords_set.push(user.to_string());
        }
        if let Some(group) = role.group() {
            if ensure_member(client, user, group).await? {
                report.memberships.push(format!("{group} to {user}"));
            }
        }
    }
    Ok(report)
}

#[derive(Clone, Copy)]
enum RoleKind {
    Group,
    Login,
    Replication,
}

/// Creates `name` unless it exists; true when created.
async fn ensure_role(client: &Client, name: &str, kind: RoleKind) -> Result<bool, Error> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
        .await
        .map_err(Error::db(format!("looking for role {name}")))?
        .is_some();
    if exists {
        return Ok(false);
    }
    let attributes = match kind {
        RoleKind::Group => "NOLOGIN",
        RoleKind::Login => "LOGIN",
        RoleKind::Replication => "LOGIN REPLICATION",
    };
    // Roles are cluster-wide: a migration in another database may have made it.
    execute_quoted(
        client,
        &format!("CREATE ROLE %I {attributes}"),
        &[name],
        format!("creating role {name}"),
    )
    .await
}

/// Sets `user`'s password unless its stored verifier already matches; true when set.
async fn ensure_password(client: &Client, user: &str, password: &str) -> Result<bool, Error> {
    let stored: Option<String> = client
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&user],
        )
        .await
        .map_err(Error::db(format!(
            "reading the password verifier of {user}"
        )))?
        .get(0);
    if stored
        .as_deref()
        .is_some_and(|s| scram_matches(s, password))
    {
        return Ok(false);
    }
    let verifier = scram_verifier(password);
    execute_quoted(
        client,
        "ALTER ROLE %I PASSWORD %L",
        &[user, &verifier],
        format!("setting the password of {user}"),
    )
    .await
}

/// Makes `user` a member of `group` unless it is; true when granted.
async fn ensure_member(client: &Client, user: &str, group: &str) -> Result<bool, Error> {
    let member: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_auth_members m \
                 JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles u ON u.oid = m.member \
                 WHERE g.rolname = $1 AND u.rolname = $2)",
            &[&group, &user],
        )
        .await
        .map_err(Error::db(format!(
            "looking up {user}'s membership of {group}"
        )))?
        .get(0);
    if member {
        return Ok(false);
    }
    execute_quoted(
        client,
        "GRANT %I TO %I",
        &[group, user],
        format!("granting {group} to {user}"),
    )
    .await
}

/// Has the server quote `args` into `template` (`format()` with `%I`/`%L`, the
/// arguments bound as parameters) and runs the result. True when it ran, false when
/// a concurrent session had done the same first.
async fn execute_quoted(
    client: &Client,
    template: &str,
    args: &[&str],
    action: String,
) -> Result<bool, Error> {
    let placeholders: Vec<String> = (1..=args.len()).map(|i| format!("${i}::text")).collect();
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = args
        .iter()
        .map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let sql: String = client
        .query_one(
            &format!("SELECT format('{template}', {})", placeholders.join(", ")),
            &params,
        )
        .await
        .map_err(Error::db(format!("quoting the statement for {action}")))?
        .get(0);
    match client.batch_execute(&sql).await {
        Ok(()) => Ok(true),
        Err(e) if created_meanwhile(&e) => Ok(false),
        Err(e) => Err(Error::db(action)(e)),
    }
}

/// Whether a CREATE or GRANT failed only because a concurrent session (another
/// operator replica that briefly believed it led, a migration in another database)
/// did the same first: PostgreSQL reports the duplicate, or for a race inside the
/// catalog a unique violation.
fn created_meanwhile(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    [
        SqlState::DUPLICATE_DATABASE,
        SqlState::DUPLICATE_OBJECT,
        SqlState::UNIQUE_VIOLATION,
    ]
    .iter()
    .any(|c| e.code() == Some(c))
}

/// A fresh SCRAM-SHA-256 verifier of `password` (random salt), as PostgreSQL stores it.
pub fn scram_verifier(password: &str) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], parts: &[&[u8]]) -> Option<[u8; 32]> {
    let mut mac = HmacSha256::new_from_slice(key).ok()?;
    for p in parts {
        mac.update(p);
    }
    Some(mac.finalize().into_bytes().into())
}

/// Whether `stored` (`pg_authid.rolpassword`) is the SCRAM-SHA-256 verifier of
/// `password` (RFC 5802/7677 as PostgreSQL stores it:
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`). Anything else
/// (no password, an MD5 hash) does not match, so the password is set again.
pub fn scram_matches(stored: &str, password: &str) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    let parse = || -> Option<bool> {
        let rest = stored.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored_key, server_key) = keys.split_once(':')?;
        let iterations: u32 = iterations.parse().ok().filter(|n| *n >= 1)?;
        let salt = b64.decode(salt).ok()?;
        // PBKDF2-HMAC-SHA256, one 32-byte block. Our passwords are generated ASCII,
        // which SASLprep leaves unchanged.
        let mut u = hmac(password.as_bytes(), &[&salt, &1u32.to_be_bytes()])?;
        let mut salted = u;
        for _ in 1..iterations {
            u = hmac(password.as_bytes(), &[&u])?;
            salted.iter_mut().zip(u.iter()).for_each(|(s, x)| *s ^= x);
        }
        let client_key = hmac(&salted, &[b"Client Key"])?;
        let server = hmac(&salted, &[b"Server Key"])?;
        let stored_ok = b64.encode(Sha256::digest(client_key)) == stored_key;
        Some(stored_ok && b64.encode(server) == server_key)
    };
    parse().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_coordinator_is_tried_less_and_less_often() {
        use k8s_openapi::jiff::{SignedDuration, Timestamp};
        let now = Timestamp::UNIX_EPOCH + SignedDuration::from_secs(100_000);
        let ago = |s: i64| Some(now - SignedDuration::from_secs(s));
        assert_eq!(unreachable_backoff(None, now), RECHECK);
        assert_eq!(unreachable_backoff(ago(10), now), RECHECK);
        assert_eq!(unreachable_backoff(ago(120), now), Duration::from_secs(60));
        assert_eq!(unreachable_backoff(ago(3600), now), UNREACHABLE_MAX);
    }

    #[test]
    fn scram_verifier_matches_only_its_password() {
        let verifier = scram_verifier("s3cret-Pa55");
        assert!(scram_matches(&verifier, "s3cret-Pa55"));
        assert!(!scram_matches(&verifier, "s3cret-Pa56"));
        assert!(!scram_matches("md5abcdef", "s3cret-Pa55"));
        assert!(!scram_matches("SCRAM-SHA-256$x:y$z", "s3cret-Pa55"));
    }
}
