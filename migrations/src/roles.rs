//! The database's names, defined once: the application database, the purpose group
//! roles the migrations grant to, the login users that join them, and the advisory
//! lock helper every schema-changing session takes. The operator's credentials and
//! bootstrap steps, the data plane and the test harness import these; migration
//! 0001 spells the same group names in SQL and a test checks that they agree.

use tokio_postgres::Client;

/// The application database every store uses.
pub const DATABASE: &str = "umstore";

/// The schema that holds every umstore table.
pub const SCHEMA: &str = "umstore";

/// A client purpose: each has a NOLOGIN group role holding its grants and a login
/// user that is a member of it (the identity a service connects as).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Purpose {
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
    /// Administration (every table). Its login user is [`ADMIN_LOGIN`], not
    /// [`Purpose::login`]: people administer the store as the superuser, and a
    /// local data plane reads for this purpose as the database's owner.
    Admin,
}

impl Purpose {
    /// Every purpose with a group role, in a fixed order.
    pub const ALL: [Purpose; 7] = [
        Purpose::Writer,
        Purpose::Ai,
        Purpose::Rules,
        Purpose::JsonGenerator,
        Purpose::Dashboard,
        Purpose::Analytics,
        Purpose::Admin,
    ];

    /// The purposes services log in as (each gets a login user and a connection
    /// Secret).
    pub const CLIENTS: [Purpose; 6] = [
        Purpose::Writer,
        Purpose::Ai,
        Purpose::Rules,
        Purpose::JsonGenerator,
        Purpose::Dashboard,
        Purpose::Analytics,
    ];

    /// The NOLOGIN group role the migrations grant to.
    pub const fn group(self) -> &'static str {
        match self {
            Purpose::Writer => "umstore_writer",
            Purpose::Ai => "umstore_ai",
            Purpose::Rules => "umstore_rules",
            Purpose::JsonGenerator => "umstore_json_generator",
            Purpose::Dashboard => "umstore_dashboard",
            Purpose::Analytics => "umstore_analytics",
            Purpose::Admin => "umstore_admin",
        }
    }

    /// The login user of a client purpose, a member of [`Purpose::group`].
    pub const fn login(self) -> Option<&'static str> {
        match self {
            Purpose::Writer => Some("umstore_writer_login"),
            Purpose::Ai => Some("umstore_ai_login"),
            Purpose::Rules => Some("umstore_rules_login"),
            Purpose::JsonGenerator => Some("umstore_json_generator_login"),
            Purpose::Dashboard => Some("umstore_dashboard_login"),
            Purpose::Analytics => Some("umstore_analytics_login"),
            Purpose::Admin => None,
        }
    }

    /// Kebab-case name used in object names and on the command line.
    pub const fn slug(self) -> &'static str {
        match self {
            Purpose::Writer => "writer",
            Purpose::Ai => "ai",
            Purpose::Rules => "rules",
            Purpose::JsonGenerator => "json-generator",
            Purpose::Dashboard => "dashboard",
            Purpose::Analytics => "analytics",
            Purpose::Admin => "admin",
        }
    }
}

/// The administrator's login user, a member of `umstore_admin`: in a cluster the
/// operator's bootstrap step makes it and the data plane's admin API purpose reads
/// as it (never as the superuser).
pub const ADMIN_LOGIN: &str = "umstore_admin_login";

/// The streaming-replication login.
pub const REPLICATOR: &str = "replicator";

/// The superuser the operator bootstraps and migrates as.
pub const SUPERUSER: &str = "postgres";

/// Named session advisory locks, so two sessions never run the same
/// schema-changing work at once. The keys spell their purpose in ASCII.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdvisoryLock {
    /// Held while applying migrations ("umstmigr").
    Migrate,
    /// Held while the operator bootstraps roles and extensions ("umstboot").
    Bootstrap,
}

impl AdvisoryLock {
    /// The `pg_advisory_lock` key.
    pub const fn key(self) -> i64 {
        match self {
            AdvisoryLock::Migrate => 0x756d_7374_6d69_6772,
            AdvisoryLock::Bootstrap => 0x756d_7374_626f_6f74,
        }
    }
}

/// Runs `work` holding the session advisory lock `lock` on `client`, and releases
/// it whatever `work` returned. `lock_error` wraps a failure to take or release the
/// lock; it is told which (`"taking"` or `"releasing"`).
pub async fn with_advisory_lock<T, E>(
    client: &mut Client,
    lock: AdvisoryLock,
    lock_error: impl Fn(&'static str, tokio_postgres::Error) -> E,
    work: impl AsyncFnOnce(&mut Client) -> Result<T, E>,
) -> Result<T, E> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&lock.key()])
        .await
        .map_err(|e| lock_error("taking", e))?;
    let result = work(client).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&lock.key()])
        .await
        .map_err(|e| lock_error("releasing", e));
    let value = result?;
    unlocked?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_client_has_a_login_in_its_group_namespace() {
        for p in Purpose::CLIENTS {
            let login = p.login().unwrap_or_default();
            assert_eq!(login, format!("{}_login", p.group()), "{p:?}");
        }
        assert_eq!(Purpose::Admin.login(), None);
        assert_eq!(ADMIN_LOGIN, format!("{}_login", Purpose::Admin.group()));
    }

    /// The role names between the first `ARRAY[` and its `]` in migration 0001.
    fn groups_created_by_migration_0001() -> Vec<String> {
        let sql = crate::embedded()
            .into_iter()
            .find(|m| m.version == 1)
            .map(|m| m.sql)
            .unwrap_or_default();
        let list = sql
            .split_once("ARRAY[")
            .and_then(|(_, rest)| rest.split_once(']'))
            .map(|(list, _)| list)
            .unwrap_or_default();
        list.split(',')
            .map(|name| name.trim().trim_matches('\'').to_owned())
            .filter(|name| !name.is_empty())
            .collect()
    }

    #[test]
    fn migration_0001_creates_exactly_the_purpose_groups() {
        let mut expected: Vec<&str> = Purpose::ALL.iter().map(|p| p.group()).collect();
        expected.sort_unstable();
        let mut created = groups_created_by_migration_0001();
        created.sort_unstable();
        assert_eq!(created, expected);
    }

    #[test]
    fn lock_keys_differ() {
        assert_ne!(AdvisoryLock::Migrate.key(), AdvisoryLock::Bootstrap.key());
    }
}
