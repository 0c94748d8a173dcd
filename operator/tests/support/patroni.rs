//! The operator's Patroni configuration for the tier-2 example, as the Patroni tests
//! and the failover benchmark run it: each member's `patroni.yml` is
//! [`patroni::config`], its `postgresql.conf` and `pg_hba.conf` the rendered ones,
//! TLS off (the clients connect without it). Included by path.

#![allow(dead_code)]

use std::path::Path;

use serde_json::Value;
use umstore_crds::{SynchronousMode, UserMetadataStore};
use umstore_e2e::{MemberSpec, TestDir};
use umstore_operator::builders::postgres::PgRole;
use umstore_operator::builders::{patroni, pgconfig};
use umstore_operator::validated::{validate, Validated};

/// The tier-2 example (coordinator, `ai` and `analytics` pools), TLS off.
pub fn tier2(synchronous: SynchronousMode) -> Validated {
    example(2, |store| store.spec.postgres.synchronous = synchronous)
}

/// The tier-3 example (a Citus coordinator and worker groups), TLS off.
pub fn tier3() -> Validated {
    example(3, |_| {})
}

/// `examples/tier<tier>.yaml` as the operator validates it, TLS off, after `adjust`.
fn example(tier: u8, adjust: impl FnOnce(&mut UserMetadataStore)) -> Validated {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/tier{tier}.yaml"));
    let text = std::fs::read_to_string(&path).expect("the example reads");
    let mut store: UserMetadataStore = serde_yaml_ng::from_str(&text).expect("example parses");
    store.metadata.uid = Some(format!("00000000-0000-0000-0000-0000000000a{tier}"));
    store.metadata.generation = Some(1);
    store.spec.postgres.tls = None;
    adjust(&mut store);
    validate(&store).unwrap_or_else(|e| panic!("the tier-{tier} example is invalid: {e}"))
}

/// The rendered `postgresql.conf` and `pg_hba.conf`, written where the members read
/// them (in a pod: the ConfigMap's mount).
pub struct RenderedConf {
    dir: TestDir,
}

impl RenderedConf {
    pub fn write(v: &Validated) -> Self {
        let dir = TestDir::new("patroni-conf").expect("conf dir");
        for (name, text) in [
            ("postgresql.conf", pgconfig::postgresql_conf(v)),
            ("pg_hba.conf", pgconfig::pg_hba_conf(v)),
        ] {
            std::fs::write(dir.path().join(name), text).expect("write the rendered conf");
        }
        umstore_e2e::localpg::chown_to_postgres_if_root(dir.path()).expect("chown conf dir");
        Self { dir }
    }

    /// The operator's `patroni.yml` for `role`, pointing at these files.
    pub fn config(&self, v: &Validated, role: &PgRole<'_>) -> Value {
        let mut config = patroni::config(v, role);
        let conf = |name: &str| Value::String(self.dir.path().join(name).display().to_string());
        config["postgresql"]["custom_conf"] = conf("postgresql.conf");
        config["postgresql"]["parameters"]["hba_file"] = conf("pg_hba.conf");
        config
    }
}

/// Members named like the StatefulSet's pods of `role` (`<statefulset>-<ordinal>`).
pub fn members(
    v: &Validated,
    conf: &RenderedConf,
    role: &PgRole<'_>,
    ordinals: std::ops::Range<usize>,
) -> Vec<MemberSpec> {
    ordinals
        .map(|i| MemberSpec::new(format!("{}-{i}", role.name(v)), conf.config(v, role)))
        .collect()
}

/// The database pods' Role as the operator renders it, as JSON rules.
pub fn operator_rules() -> Value {
    serde_json::to_value(patroni::pod_rules()).expect("rules serialize")
}
