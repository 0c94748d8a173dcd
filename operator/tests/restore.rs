//! `spec.bootstrap.recovery` as the pods run it: real Patroni, with the operator's
//! `patroni.yml` for a restored store (`bootstrap.method: pgbackrest`), runs the
//! rendered `restore.sh` instead of `initdb`, PostgreSQL replays the source's WAL
//! through `archive-get.sh` and is promoted, and Patroni leads the restored
//! database. The source is a harness PostgreSQL archived and backed up with the
//! operator's rendered files (tests/support/backup_rig.rs).

#[path = "support/backup_rig.rs"]
mod backup_rig;
#[path = "support/patroni.rs"]
mod fixture;

use std::path::PathBuf;
use std::time::Duration;

use backup_rig::{users, volume_repository, write, Rig, PASSPHRASE};
use umstore_crds::{BootstrapSpec, RecoverySpec};
use umstore_data_plane::seed;
use umstore_e2e::localpg::chown_to_postgres_if_root;
use umstore_e2e::{shared, MemberSpec, PatroniCluster};
use umstore_operator::builders::backup::{self, env, Layout};
use umstore_operator::builders::postgres::PgRole;
use umstore_operator::validated::validate;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroni_bootstraps_a_restored_store_from_the_sources_backup_and_wal() {
    let Some(kube) = shared().kube_api_or_skip() else {
        return;
    };
    let Some(rig) = Rig::start().await else {
        return;
    };
    // The source as a store's coordinator has it: migrated, seeded, and with the
    // superuser and replication roles Patroni created there.
    let mut admin = rig.admin().await;
    admin
        .batch_execute(
            "CREATE ROLE postgres SUPERUSER LOGIN; CREATE ROLE replicator REPLICATION LOGIN",
        )
        .await
        .expect("Patroni's roles");
    umstore_migrations::Runner::default()
        .up(&mut admin)
        .await
        .expect("migrate");
    let keys = backup_rig::keyring(&admin, &rig.dir.path().join("keys")).await;
    seed::seed(&mut admin, 1_000, 21, &keys)
        .await
        .expect("seed");
    rig.run_backup_job("full");
    // After the backup: only in the archived WAL.
    seed::seed(&mut admin, 250, 22, &keys)
        .await
        .expect("seed after the backup");
    rig.archive_now().await;

    // The restored store: the tier-1 example restoring from the source's backups.
    let mut store: umstore_crds::UserMetadataStore = serde_yaml_ng::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tier1.yaml"),
        )
        .expect("example"),
    )
    .expect("example parses");
    store.metadata.uid = Some("00000000-0000-0000-0000-00000000b001".into());
    store.spec.postgres.tls = None;
    store.spec.backup = Some(umstore_crds::BackupSpec {
        repository: volume_repository(),
        retention: Default::default(),
        schedule: Default::default(),
        suspend: false,
    });
    store.spec.bootstrap = Some(BootstrapSpec {
        recovery: Some(RecoverySpec {
            source: "source".into(),
            repository: None,
            target_time: None,
        }),
    });
    let v = validate(&store).expect("valid");

    // Its rendered restore files, where the test's pod would mount them.
    let conf_dir = rig.dir.path().join("restore-conf");
    std::fs::create_dir_all(&conf_dir).expect("mkdir");
    chown_to_postgres_if_root(&conf_dir).expect("chown");
    let layout = Layout {
        config_dir: conf_dir.display().to_string(),
        ..rig.layout.clone()
    };
    write(
        &conf_dir.join(backup::RESTORE_CONF),
        &backup::restore_conf(
            &volume_repository(),
            &rig.repo.display().to_string(),
            &layout,
        ),
    );
    write(
        &conf_dir.join(backup::RESTORE_SCRIPT),
        &backup::restore_script(&layout, None),
    );
    write(
        &conf_dir.join(backup::ARCHIVE_GET_SCRIPT),
        &backup::archive_get_script(&layout),
    );

    // The operator's patroni.yml for it, its bootstrap command pointed at them.
    let conf = fixture::RenderedConf::write(&v);
    let mut config = conf.config(&v, &PgRole::Coordinator);
    assert_eq!(config["bootstrap"]["method"], "pgbackrest");
    let command = config["bootstrap"]["pgbackrest"]["command"]
        .as_str()
        .expect("command")
        .replace(backup::CONFIG_DIR, &layout.config_dir);
    config["bootstrap"]["pgbackrest"]["command"] = command.into();
    let member = MemberSpec::new(format!("{}-0", PgRole::Coordinator.name(&v)), config)
        .with_env(env::RESTORE_CIPHER_PASS, PASSPHRASE);
    let Some(cluster) =
        PatroniCluster::start_or_skip(kube, vec![member.clone()], &fixture::operator_rules())
    else {
        return;
    };
    let leader = cluster
        .wait_for_leader(Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("the restored member never led: {e}"));
    assert_eq!(leader, member.name);
    let client = umstore_e2e::connect(&cluster.member_conninfo(&leader, &rig.db))
        .await
        .expect("connect to the restored database");
    let in_recovery: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .expect("recovery?")
        .get(0);
    assert!(!in_recovery, "promoted");
    assert_eq!(
        users(&client).await,
        1_250,
        "the backup's users and those replayed from the archived WAL"
    );
    // A writable primary.
    client
        .batch_execute("CREATE TABLE public.after_restore (id int)")
        .await
        .expect("the restored primary takes writes");
}
