//! `keys rotate|forget-user|status`: data-key rotation and crypto-shredding.

use std::path::Path;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use tokio_postgres::Client;
use umstore_data_plane::clusters::Layout;
use umstore_data_plane::crypto::rotation::{rotate_and_rewrap, RotationOptions};
use umstore_data_plane::crypto::Keyring;
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
/// `forget-user` erases the user in the cluster whose directory lists them.
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
            if let Some(layout) = layout {
                client = user_cluster(database, layout, user_id).await?;
            }
            let report = keyring
                .forget_user(
                    &mut client,
                    user_id,
                    &actor,
                    reason.as_deref(),
                    &events_subject_prefix,
                )
                .await?;
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

/// A writer connection to the cluster whose directory lists `user_id` (the
/// home cluster when none does: erasing an unknown user then says so).
async fn user_cluster(database: &Database, layout: &Layout, user_id: uuid::Uuid) -> Result<Client> {
    let writers = layout.writers(database);
    for (cluster, writer) in layout.clusters().iter().zip(&writers) {
        let client = writer
            .connect()
            .await
            .with_context(|| format!("cluster {}", cluster.name))?;
        let listed = client
            .query_opt(
                "SELECT 1 FROM umstore.user_directory WHERE user_id = $1",
                &[&user_id],
            )
            .await
            .with_context(|| format!("looking user {user_id} up in cluster {}", cluster.name))?
            .is_some();
        if listed {
            eprintln!("user {user_id} is in cluster {}", cluster.name);
            return Ok(client);
        }
    }
    Ok(writers[0].connect().await?)
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
