//! Backups as a store runs them, with real pgBackRest and PostgreSQL 15 on
//! loopback: the operator's rendered `pgbackrest.conf` of the database pods (a
//! `pgbackrest server` with the TLS material the operator generates, and the
//! `archive_command` PostgreSQL runs), the backup Job's configuration and script,
//! and the restore script Patroni runs for `spec.bootstrap.recovery`. A seeded
//! store is archived and backed up, written to, restored to a time between the
//! writes into a fresh data directory, and read back with the store's keys.

#[path = "support/backup_rig.rs"]
mod backup_rig;

use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use umstore_data_plane::crypto::{FieldAad, UserKey};
use umstore_data_plane::seed::{self, Generator};
use umstore_operator::builders::backup;

use backup_rig::{files_under, keyring, pairs, start_restored, users, Rig, PASSPHRASE};

async fn has_user(client: &tokio_postgres::Client, user: uuid::Uuid) -> bool {
    client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM umstore.user_directory WHERE user_id = $1)",
            &[&user],
        )
        .await
        .expect("exists")
        .get(0)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restores_to_a_point_in_time_with_pii_readable_and_nothing_plain_in_the_repository(
) {
    let Some(rig) = Rig::start().await else {
        return;
    };
    let mut admin = rig.admin().await;
    umstore_migrations::Runner::default()
        .up(&mut admin)
        .await
        .expect("migrate");
    let keys_dir = rig.dir.path().join("keys");
    let keys = keyring(&admin, &keys_dir).await;
    seed::seed(&mut admin, 2_000, 1, &keys).await.expect("seed");

    let report = rig.run_backup_job("full");
    assert_eq!(report["backups"], 1, "{report}");
    assert_eq!(report["last"]["type"], "full", "{report}");
    assert!(
        report["last"]["size"].as_i64().unwrap_or(0) > 1_000_000,
        "{report}"
    );

    // pgBackRest keeps a backup's stop time in whole seconds and restores to a time
    // only from a backup that stopped in an earlier second: keep the target out of
    // the backup's second, as a user restoring to "just after the backup" would.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // Written after the backup and before the target: replayed from the archive.
    seed::seed(&mut admin, 500, 2, &keys)
        .await
        .expect("seed before the target");
    rig.archive_now().await;
    let target: String = admin
        .query_one(
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            &[],
        )
        .await
        .expect("now")
        .get(0);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // Written after the target: not restored.
    seed::seed(&mut admin, 300, 3, &keys)
        .await
        .expect("seed after the target");
    rig.archive_now().await;
    assert_eq!(users(&admin).await, 2_800);

    let today = chrono::Utc::now().date_naive();
    let first = |s: u64| Generator::new(s, today).next_profile();

    // Nothing readable in the repository: no PII, no SQL, no names.
    let profile = first(1);
    let needles: Vec<(&str, Vec<u8>)> = vec![
        ("a full name", profile.full_name.clone().into_bytes()),
        (
            "a pincode",
            format!("\0{}", profile.pincode).into_bytes()[1..].to_vec(),
        ),
        ("the schema", b"user_metadata".to_vec()),
        ("SQL", b"CREATE TABLE".to_vec()),
        ("the database name", rig.db.clone().into_bytes()),
        ("a district", profile.district.clone().into_bytes()),
    ];
    let files = files_under(&rig.repo);
    assert!(files.len() > 10, "the repository holds the backup and WAL");
    for file in &files {
        let bytes = std::fs::read(file).expect("read");
        for (what, needle) in &needles {
            assert!(
                !contains(&bytes, needle),
                "{what} readable in {}",
                file.display()
            );
        }
    }

    // Without the passphrase, nothing restores.
    let wrong = rig.dir.path().join("wrong");
    let out = rig.restore(&wrong, Some(&target), "not-the-passphrase");
    assert!(
        !out.status.success(),
        "a restore with a wrong passphrase failed"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unable to load info file"),
        "pgBackRest cannot read the repository: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !wrong.join("PG_VERSION").exists(),
        "no data directory came out of it"
    );

    // To the target time: the rows before it, none after.
    let restored_dir = rig.dir.path().join("restored");
    let out = rig.restore(&restored_dir, Some(&target), PASSPHRASE);
    assert!(
        out.status.success(),
        "restore failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = start_restored(&restored_dir).await;
    let client = umstore_e2e::connect(&restored.conninfo(&rig.db))
        .await
        .expect("connect to the restored database");
    assert_eq!(
        users(&client).await,
        2_500,
        "the users written before the target"
    );
    assert!(
        has_user(&client, first(2).user_id).await,
        "written before the target"
    );
    assert!(
        !has_user(&client, first(3).user_id).await,
        "written after the target"
    );

    // PII opens with the store's keys.
    let keys = keyring(&client, &keys_dir).await;
    for s in [1, 2] {
        let p = first(s);
        let row = client
            .query_one(
                "SELECT full_name_enc FROM umstore.user_metadata WHERE user_id = $1",
                &[&p.user_id],
            )
            .await
            .expect("restored row");
        let UserKey::Active(key) = keys
            .user_key(&client, p.user_id, p.region)
            .await
            .expect("key")
        else {
            panic!("the restored user's key is active");
        };
        let name = key
            .open(
                &FieldAad {
                    user_id: p.user_id,
                    region: p.region,
                    column: "full_name_enc",
                },
                row.get::<_, &[u8]>(0),
            )
            .expect("the name opens");
        assert_eq!(name, p.full_name.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_killed_midway_leaves_the_previous_backup_restorable() {
    let Some(rig) = Rig::start().await else {
        return;
    };
    let mut admin = rig.admin().await;
    umstore_migrations::Runner::default()
        .up(&mut admin)
        .await
        .expect("migrate");
    let keys = keyring(&admin, &rig.dir.path().join("keys")).await;
    seed::seed(&mut admin, 1_000, 4, &keys).await.expect("seed");
    let first = rig.run_backup_job("full");
    let first_label = first["last"]["label"].as_str().expect("label").to_string();

    // Enough data that the next backup takes a while.
    admin
        .batch_execute(
            "CREATE TABLE public.ballast AS
             SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS pad
             FROM generate_series(1, 1500000) g",
        )
        .await
        .expect("ballast");
    rig.archive_now().await;

    let backups = rig.repo.join("backup").join("coordinator");
    let before: Vec<_> = std::fs::read_dir(&backups)
        .expect("backups")
        .map(|e| e.expect("entry").file_name())
        .collect();
    let script = backup::job_script("full", &["coordinator".into()], "/dev/null");
    let mut job = rig
        .job_command(&script)
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the second backup");
    // Kill it once its backup directory has appeared (copying has begun).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now: Vec<_> = std::fs::read_dir(&backups)
            .expect("backups")
            .map(|e| e.expect("entry").file_name())
            .filter(|n| !before.contains(n) && n.to_string_lossy().ends_with('F'))
            .collect();
        if !now.is_empty() {
            let dir = backups.join(&now[0]);
            if files_under(&dir).len() > 5 {
                break;
            }
        }
        assert!(
            job.try_wait().expect("wait").is_none(),
            "the second backup ended before it could be killed"
        );
        assert!(
            Instant::now() < deadline,
            "the second backup never started copying"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The whole Job: the shell and its pgbackrest processes (the pod's end).
    let group = i32::try_from(job.id()).expect("pid");
    // SAFETY: kill(2) with a negative pid signals that process group, the Job's.
    let killed = unsafe { libc::kill(-group, libc::SIGKILL) };
    assert_eq!(killed, 0, "kill the backup's process group");
    let status = job.wait().expect("wait");
    assert!(!status.success(), "the backup was killed");

    // The repository still lists the first backup, and it restores.
    let info = rig
        .tool
        .run(
            &pairs(&rig.job_env),
            &["--stanza=coordinator", "--output=json", "info"],
        )
        .expect("info");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("info JSON");
    let labels: Vec<&str> = info[0]["backup"]
        .as_array()
        .expect("backups")
        .iter()
        .filter_map(|b| b["label"].as_str())
        .collect();
    assert_eq!(
        labels,
        vec![first_label.as_str()],
        "only the complete backup is listed"
    );
    seed::seed(&mut admin, 200, 5, &keys)
        .await
        .expect("more writes");
    rig.archive_now().await;
    let dir = rig.dir.path().join("restored");
    let out = rig.restore(&dir, None, PASSPHRASE);
    assert!(
        out.status.success(),
        "restore failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = start_restored(&dir).await;
    let client = umstore_e2e::connect(&restored.conninfo(&rig.db))
        .await
        .expect("connect");
    assert_eq!(
        users(&client).await,
        1_200,
        "everything archived is restored"
    );

    // And the next backup succeeds (no lock or half backup left in the way).
    let next = rig.run_backup_job("full");
    assert_eq!(next["backups"], 2, "{next}");
}
