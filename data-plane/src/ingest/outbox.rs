//! The outbox relay: publishes the events queued by committed transactions to
//! the outbound stream, marks them published, and prunes old published rows.
//!
//! Rows are taken in id order under `FOR UPDATE SKIP LOCKED`, so several relays
//! (one per data-plane pod) never publish the same row at once. Each message
//! carries `Nats-Msg-Id` = the row's `msg_id`: a relay that crashes after
//! publishing and before marking republishes on restart, and the stream's
//! de-duplication window (10 minutes) stores it once. The relay sleeps on
//! `LISTEN umstore_outbox` (migration 0010 notifies on every insert) and polls
//! every few seconds as well, in case a notification is missed.

use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::Context;
use futures_util::future::poll_fn;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Connection, NoTls};
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::db::Database;

/// Rows published per transaction.
pub const BATCH: i64 = 200;
/// How long a published row is kept before it is pruned.
pub const KEEP_PUBLISHED: Duration = Duration::from_secs(24 * 3600);
/// The polling fallback.
pub const POLL: Duration = Duration::from_secs(5);

const TAKE: &str = "SELECT region::text, id, subject, msg_id, payload::text
     FROM umstore.outbox WHERE published_at IS NULL
     ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED";
// `region` is char(2): comparing it with the array's text would cast the column
// and scan every row the outbox keeps; casting the parameter uses the primary key.
const MARK: &str = "UPDATE umstore.outbox o SET published_at = now()
     FROM unnest($1::text[], $2::int8[]) AS p (region, id)
     WHERE o.region = p.region::bpchar AND o.id = p.id";
const PRUNE: &str = "DELETE FROM umstore.outbox
     WHERE published_at IS NOT NULL AND published_at < now() - make_interval(secs => $1)";

/// Runs the relay until the task is dropped, reconnecting to the database after
/// any failure.
pub async fn relay(database: Database, js: Context) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        match run(&database, &js, &mut backoff).await {
            Ok(()) => {}
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "outbox relay");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Why a relay round stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The database failed.
    #[error("outbox: {0}")]
    Database(#[from] tokio_postgres::Error),
    /// The stream refused or did not answer.
    #[error("publishing {msg_id}: {detail}")]
    Publish {
        /// The row's message id.
        msg_id: String,
        /// What NATS said.
        detail: String,
    },
}

async fn run(database: &Database, js: &Context, backoff: &mut Backoff) -> Result<(), RelayError> {
    let (wake_tx, mut wake) = mpsc::channel::<()>(1);
    let (mut client, driver) = match database.tls() {
        Some(tls) => {
            let (client, connection) = database.pg_config().connect(tls.clone()).await?;
            (client, tokio::spawn(wake_on_notify(connection, wake_tx)))
        }
        None => {
            let (client, connection) = database.pg_config().connect(NoTls).await?;
            (client, tokio::spawn(wake_on_notify(connection, wake_tx)))
        }
    };
    client.batch_execute("LISTEN umstore_outbox").await?;
    info!("outbox relay running");
    let mut pruned_at = Instant::now();
    let result = loop {
        let published = match publish_batch(&mut client, js).await {
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        backoff.reset();
        if pruned_at.elapsed() > Duration::from_secs(300) {
            let secs = KEEP_PUBLISHED.as_secs_f64();
            match client.execute(PRUNE, &[&secs]).await {
                Ok(n) if n > 0 => debug!(rows = n, "published outbox rows pruned"),
                Ok(_) => {}
                Err(e) => break Err(e.into()),
            }
            pruned_at = Instant::now();
        }
        if published < BATCH as usize {
            if client.is_closed() {
                break Ok(());
            }
            let _ = tokio::time::timeout(POLL, wake.recv()).await;
        }
    };
    driver.abort();
    result
}

/// Drives the connection and turns notifications into wake-ups.
async fn wake_on_notify<S, T>(mut connection: Connection<S, T>, wake_tx: mpsc::Sender<()>)
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(message) = poll_fn(|cx| connection.poll_message(cx)).await {
        match message {
            Ok(AsyncMessage::Notification(_)) => {
                let _ = wake_tx.try_send(());
            }
            Ok(_) => {}
            Err(e) => {
                debug!(error = %e, "outbox relay connection closed");
                break;
            }
        }
    }
}

/// Publishes up to [`BATCH`] rows in one transaction; returns how many.
async fn publish_batch(
    client: &mut tokio_postgres::Client,
    js: &Context,
) -> Result<usize, RelayError> {
    let tx = client.transaction().await?;
    let rows = tx.query(TAKE, &[&BATCH]).await?;
    if rows.is_empty() {
        tx.commit().await?;
        return Ok(0);
    }
    // Publish them all, then wait for every acknowledgement.
    let mut acks = Vec::with_capacity(rows.len());
    for row in &rows {
        let subject: String = row.get(2);
        let msg_id: String = row.get(3);
        let payload: String = row.get(4);
        let publish = PublishMessage::build()
            .payload(payload.into_bytes().into())
            .message_id(msg_id.as_str());
        let ack = js
            .send_publish(subject, publish)
            .await
            .map_err(|e| RelayError::Publish {
                msg_id: msg_id.clone(),
                detail: e.to_string(),
            })?;
        acks.push((msg_id, ack));
    }
    for (msg_id, ack) in acks {
        ack.await.map_err(|e| RelayError::Publish {
            msg_id,
            detail: e.to_string(),
        })?;
    }
    let regions: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let ids: Vec<i64> = rows.iter().map(|r| r.get(1)).collect();
    tx.execute(MARK, &[&regions, &ids]).await?;
    tx.commit().await?;
    Ok(rows.len())
}
