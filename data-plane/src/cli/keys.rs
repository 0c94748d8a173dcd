//! `keys rotate|forget-user|status`: data-key rotation and crypto-shredding.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use tokio_postgres::Client;
use umstore_data_plane::backoff::Backoff;
use umstore_data_plane::clusters::fence::RegionCheck;
use umstore_data_plane::clusters::placement::Placement;
use umstore_data_plane::clusters::Layout;
use umstore_data_plane::crypto::rotation::{rotate_and_rewrap, RotationOptions};
use umstore_data_plane::crypto::{ForgetReport, Keyring, KeyringError};
use umstore_data_plane::db::Database;
use umstore_data_plane::store::keys::KEY_VERSION_COUNTS;
use umstore_migrations::Runner;

use super::{open_keyring, KeyArgs};

/// What `keys` does.
#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Rotate the transit key, rewrap every data key in batches (resumable),
    /// then retire the old key versions. Reads and writes go on meanwhile.
    Rotate {
        /// Keys per Vault call and per transaction.
        #[arg(long, default_value_t = 500)]
        batch_size: usize,
    },
    /// Destroy a user's data key: their PII, history included, becomes unreadable.
    ForgetUser {
        /// The user.
        user_id: uuid::Uuid,
        /// Who asks (recorded in the audit row).
        #[arg(long)]
        actor: String,
        /// Why (recorded in the audit row; no PII).
        #[arg(long)]
        reason: Option<String>,
        /// Subject prefix of the `USER_ERASED` event queued with the erasure
        /// (`<prefix>.out.USER_ERASED`): the one `serve` publishes under.
        #[arg(
            long,
            env = "UMSTORE_EVENTS_SUBJECT_PREFIX",
            default_value = "umstore.events"
        )]
        events_subject_prefix: String,
    },
    /// The key's versions and how many data keys each wraps.
    Status,
}

/// Runs `keys <action>` once the schema is current and the keyring is open.
///
/// With several clusters the keyring opens on the home cluster (the operator
/// keeps `key_material` and `key_rotations` identical in every cluster), and
/// `forget-user` erases the user in the cluster that holds their region now
/// (the region placement), through the region's write check: while the region
/// is fenced for a move the erasure waits, and when it finds the region moved
/// it reads the placement again and erases there.
pub async fn run(
    action: KeysAction,
    database: &Database,
    layout: Option<&Layout>,
    data_dir: &Path,
    key_args: &KeyArgs,
) -> Result<()> {
    if let (Some(_), KeysAction::Rotate { .. }) = (layout, &action) {
        bail!(
            "keys rotate does not yet rewrap the data keys of every cluster of a store with \
             several (--clusters): rotating from one cluster would retire key versions the \
             others still use. Run it without --clusters only on a store of one cluster"
        );
    }
    let mut client = database.connect().await?;
    Runner::default()
        .verify(&client)
        .await
        .context("the schema must be current: run `migrate up`")?;
    let keyring = open_keyring(key_args.provider_config(data_dir)?, &client).await?;
    match action {
        KeysAction::Rotate { batch_size } => rotate(&mut client, &keyring, batch_size).await,
        KeysAction::ForgetUser {
            user_id,
            actor,
            reason,
            events_subject_prefix,
        } => {
            let report = match layout {
                None => {
                    keyring
                        .forget_user(
                            &mut client,
                            user_id,
                            &actor,
                            reason.as_deref(),
                            &events_subject_prefix,
                        )
                        .await?
                }
                Some(layout) => {
                    let erasure = Erasure {
                        user_id,
                        actor: &actor,
                        reason: reason.as_deref(),
                        subject_prefix: &events_subject_prefix,
                    };
                    forget_in_clusters(database, layout, &keyring, &erasure).await?
                }
            };
            if report.destroyed_now {
                println!(
                    "user {user_id} ({}) erased: data key destroyed, PII unreadable",
                    report.region
                );
            } else {
                println!(
                    "user {user_id} ({}) was already erased; nothing changed",
                    report.region
                );
            }
            Ok(())
        }
        KeysAction::Status => status(&client, &keyring).await,
    }
}

/// What `forget-user` was asked.
struct Erasure<'a> {
    user_id: uuid::Uuid,
    actor: &'a str,
    reason: Option<&'a str>,
    subject_prefix: &'a str,
}

/// How long `forget-user` waits for a region moving between clusters.
const MOVE_PATIENCE: Duration = Duration::from_secs(60);

/// Erases the user in the cluster holding their region now, retrying while
/// the region's write check refuses (its fence is up, or it just moved).
async fn forget_in_clusters(
    database: &Database,
    layout: &Layout,
    keyring: &Keyring,
    erasure: &Erasure<'_>,
) -> Result<ForgetReport> {
    let user_id = erasure.user_id;
    let writers = layout.writers(database);
    let home = writers[0]
        .connect()
        .await
        .with_context(|| format!("home cluster {}", layout.clusters()[0].name))?;
    let placement = Placement::new(Arc::new(layout.clone()));
    let region = user_region(layout, &writers, &home, user_id).await?;
    let deadline = tokio::time::Instant::now() + MOVE_PATIENCE;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    loop {
        placement
            .load(&home)
            .await
            .context("reading the region placement")?;
        // Unknown user: the home cluster says so.
        let index = region
            .as_deref()
            .and_then(|r| placement.cluster_of(r))
            .unwrap_or(0);
        let cluster = &layout.clusters()[index].name;
        let mut client = writers[index]
            .connect()
            .await
            .with_context(|| format!("cluster {cluster}"))?;
        eprintln!("user {user_id} is in cluster {cluster}");
        match keyring
            .forget_user_checked(
                &mut client,
                user_id,
                erasure.actor,
                erasure.reason,
                erasure.subject_prefix,
                RegionCheck::On,
            )
            .await
        {
            Err(KeyringError::RegionMoving { refusal, source })
                if tokio::time::Instant::now() + backoff.peek() < deadline =>
            {
                let delay = backoff.next_delay();
                eprintln!(
                    "the user's region is moving between clusters ({}: {}); trying again in \
                     {} ms",
                    refusal.as_str(),
                    umstore_data_plane::db::with_causes(&source),
                    delay.as_millis()
                );
                tokio::time::sleep(delay).await;
            }
            other => return other.with_context(|| format!("erasing user {user_id} in {cluster}")),
        }
    }
}

/// The user's region: their route in home, else the first cluster directory
/// that lists them (a user written before the store had clusters); `None`: no
/// such user.
async fn user_region(
    layout: &Layout,
    writers: &[Database],
    home: &Client,
    user_id: uuid::Uuid,
) -> Result<Option<String>> {
    let routed = home
        .query_opt(
            "SELECT region::text FROM umstore.user_routes WHERE user_id = $1",
            &[&user_id],
        )
        .await
        .with_context(|| format!("reading user {user_id}'s route in the home cluster"))?;
    if let Some(row) = routed {
        return Ok(Some(row.get(0)));
    }
    for (cluster, writer) in layout.clusters().iter().zip(writers) {
        let client = writer
            .connect()
            .await
            .with_context(|| format!("cluster {}", cluster.name))?;
        let listed = client
            .query_opt(
                "SELECT region::text FROM umstore.user_directory WHERE user_id = $1",
                &[&user_id],
            )
            .await
            .with_context(|| format!("looking user {user_id} up in cluster {}", cluster.name))?;
        if let Some(row) = listed {
            return Ok(Some(row.get(0)));
        }
    }
    Ok(None)
}

async fn rotate(client: &mut Client, keyring: &Keyring, batch_size: usize) -> Result<()> {
    let opts = RotationOptions { batch_size };
    let started = std::time::Instant::now();
    let report = rotate_and_rewrap(client, keyring.provider(), opts, |_| {}).await?;
    println!(
        "rotation {} done: every data key wrapped under version {} ({} rewrapped by this run{}) in {:.1} s; older versions retired",
        report.rotation_id,
        report.version,
        report.rewrapped_now,
        if report.resumed { ", resumed" } else { "" },
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn status(client: &Client, keyring: &Keyring) -> Result<()> {
    let versions = keyring.provider().versions().await?;
    println!(
        "key {}: latest version {}, min decryption version {}",
        keyring.provider().kek_name(),
        versions.latest,
        versions.min_decryption
    );
    let rows = client.query(KEY_VERSION_COUNTS, &[]).await?;
    for r in rows {
        println!(
            "  {} v{}: {} data keys, {} destroyed",
            r.get::<_, String>(0),
            r.get::<_, i32>(1),
            r.get::<_, i64>(2),
            r.get::<_, i64>(3)
        );
    }
    Ok(())
}
