//! The backup step (with `spec.backup`, after keys): the repository volume, the
//! first full backup, and `status.backup` with the `BackupReady` condition.
//!
//! What it reports comes from two places: each backup Job's pod ends by writing a
//! summary of `pgbackrest info` to its termination message (the newest backup,
//! the oldest one's end, the count: [`builders::backup::job_script`]), and the
//! primary's `pg_stat_archiver` says how far WAL is archived. Nothing here talks
//! to the repository itself: the operator never holds the passphrase in memory.
//!
//! `BackupReady` is true once a backup has completed and WAL archiving is not
//! failing. A failing archive or a failed backup newer than the last good one
//! also makes the store `Degraded`: a store whose backups fail should page.

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::EventType;
use kube::ResourceExt;
use serde::Deserialize;
use umstore_crds::{BackupRecord, BackupStatus, ReclaimPolicy};

use super::{Journal, Reason};
use crate::apply;
use crate::builders::backup as build;
use crate::builders::Object;
use crate::context::Context;
use crate::error::Error;
use crate::meta::COMPONENT_LABEL;
use crate::validated::Validated;

/// What the step found.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// `status.backup`.
    pub status: BackupStatus,
    /// Whether `BackupReady` is true.
    pub ready: bool,
    /// Its reason.
    pub reason: Reason,
    /// Its message.
    pub message: String,
    /// Whether the trouble (if any) makes the store `Degraded`.
    pub degraded: bool,
}

/// The summary a backup Job's pod leaves in its termination message.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobSummary {
    /// Backups in the repository.
    pub backups: i32,
    /// The oldest backup's end (Unix seconds).
    pub oldest_stop: Option<i64>,
    /// The newest backup.
    pub last: Option<JobBackup>,
    /// The Citus restore point the Job made after its backups (tier 3 and up).
    #[serde(default)]
    pub restore_point: Option<String>,
}

/// The newest backup in a [`JobSummary`].
#[derive(Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobBackup {
    /// pgBackRest's label.
    pub label: String,
    /// `full`, `diff` or `incr`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Start (Unix seconds).
    pub start: i64,
    /// End (Unix seconds).
    pub stop: i64,
    /// Database size, bytes.
    pub size: Option<i64>,
    /// Size in the repository, bytes.
    pub repo_size: Option<i64>,
}

/// `pg_stat_archiver` of the primary.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Archiver {
    /// The last segment archived and when (RFC 3339).
    pub last_archived: Option<(String, String)>,
    /// The last segment that failed and when (RFC 3339).
    pub last_failed: Option<(String, String)>,
}

/// How a backup Job's pod ended.
#[derive(Clone, Debug, PartialEq)]
pub enum JobEnd {
    /// It succeeded and left its summary.
    Succeeded(String),
    /// It failed, with what it left (its log's tail).
    Failed(String),
}

fn rfc3339(secs: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// The backup Job pods among the store's pods that have ended, newest first:
/// their end time and how they ended.
pub fn ended_jobs(pods: &[Pod]) -> Vec<(String, JobEnd)> {
    let mut out: Vec<(String, JobEnd)> = pods
        .iter()
        .filter(|p| p.labels().get(COMPONENT_LABEL).map(String::as_str) == Some(build::COMPONENT))
        .filter_map(|p| {
            let state = p
                .status
                .as_ref()?
                .container_statuses
                .as_ref()?
                .iter()
                .find(|c| c.name == "backup")?
                .state
                .as_ref()?
                .terminated
                .as_ref()?;
            let at = state
                .finished_at
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default();
            let message = state.message.clone().unwrap_or_default();
            let end = if state.exit_code == 0 {
                JobEnd::Succeeded(message)
            } else {
                JobEnd::Failed(message)
            };
            Some((at, end))
        })
        .collect();
    out.sort_by(|a, b| b.0.cmp(&a.0));
    out
}

/// `status.backup` and `BackupReady` from the ended Jobs (newest first), the
/// archiver and the previous status.
pub fn assess(
    jobs: &[(String, JobEnd)],
    archiver: &Archiver,
    old: Option<&BackupStatus>,
) -> Report {
    let mut status = old.cloned().unwrap_or_default();
    let newest_success = jobs.iter().find_map(|(_, end)| match end {
        JobEnd::Succeeded(m) => serde_json::from_str::<JobSummary>(m.trim()).ok(),
        JobEnd::Failed(_) => None,
    });
    if let Some(summary) = newest_success {
        status.backups = Some(summary.backups);
        status.earliest_recoverable_time = summary.oldest_stop.map(rfc3339);
        if summary.restore_point.is_some() {
            status.restore_point = summary.restore_point;
        }
        if let Some(b) = summary.last {
            status.last_backup = Some(BackupRecord {
                label: b.label,
                type_: b.type_,
                started_at: rfc3339(b.start),
                completed_at: rfc3339(b.stop),
                size_bytes: b.size,
                repository_size_bytes: b.repo_size,
            });
        }
    }
    status.latest_recoverable_time = archiver.last_archived.as_ref().map(|(_, t)| t.clone());
    // Failing when the last failure is newer than the last success.
    status.archive_failing = match (&archiver.last_failed, &archiver.last_archived) {
        (Some((wal, failed)), Some((_, ok))) if failed > ok => Some(wal.clone()),
        (Some((wal, _)), None) => Some(wal.clone()),
        _ => None,
    };
    // A failed Job newer than every successful one.
    let failed_last = match jobs.first() {
        Some((at, JobEnd::Failed(message))) => Some((at.clone(), message.clone())),
        _ => None,
    };

    let (ready, reason, message, degraded) = if let Some(wal) = &status.archive_failing {
        (
            false,
            Reason::ArchiveFailing,
            format!(
                "archiving WAL segment {wal} into the backup repository fails: see the \
                 coordinator's postgres container log (pgbackrest archive-push), the \
                 repository's credentials and space; WAL piles up on the primary until it works"
            ),
            true,
        )
    } else if let Some((at, log)) = failed_last {
        let tail: String = log.lines().rev().take(3).collect::<Vec<_>>().join(" / ");
        (
            false,
            Reason::BackupFailed,
            format!(
                "the backup that ended at {at} failed: {}; see `kubectl logs` of the newest \
                 {COMPONENT_LABEL}=backup pod",
                if tail.is_empty() {
                    "no output"
                } else {
                    tail.as_str()
                }
            ),
            true,
        )
    } else if let Some(last) = &status.last_backup {
        (
            true,
            Reason::BackupCompleted,
            format!(
                "last backup {} ({}) completed at {}; recoverable from {} to {}",
                last.label,
                last.type_,
                last.completed_at,
                status.earliest_recoverable_time.as_deref().unwrap_or("?"),
                status
                    .latest_recoverable_time
                    .as_deref()
                    .unwrap_or("the last archived WAL"),
            ),
            false,
        )
    } else {
        (
            false,
            Reason::BackupPending,
            "the first full backup is running (Job <store>-backup-first)".to_string(),
            false,
        )
    };
    Report {
        status,
        ready,
        reason,
        message,
        degraded,
    }
}

/// Reads `pg_stat_archiver` on the primary.
pub async fn archiver(admin: &tokio_postgres::Client) -> Result<Archiver, Error> {
    let row = admin
        .query_one(
            "SELECT last_archived_wal, \
                    to_char(last_archived_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
                    last_failed_wal, \
                    to_char(last_failed_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
             FROM pg_stat_archiver",
            &[],
        )
        .await
        .map_err(|source| Error::Database {
            action: "reading pg_stat_archiver".into(),
            source,
        })?;
    let pair = |a: Option<String>, b: Option<String>| a.zip(b);
    Ok(Archiver {
        last_archived: pair(row.get(0), row.get(1)),
        last_failed: pair(row.get(2), row.get(3)),
    })
}

/// Runs the step.
pub async fn run(
    ctx: &Context,
    v: &Validated,
    jobs: &[(String, JobEnd)],
    admin: &tokio_postgres::Client,
    old: Option<&BackupStatus>,
    journal: &mut Journal,
) -> Result<Option<Report>, Error> {
    if v.spec.backup.is_none() {
        return Ok(None);
    }
    let ns = &v.owner.namespace;
    if let Some(mut claim) = build::repo_claim(v) {
        if v.spec.reclaim_policy == ReclaimPolicy::Retain {
            // The backups outlive the store: no owner, no garbage collection.
            claim.metadata.owner_references = None;
        }
        if apply::create_if_absent(&ctx.client, ns, &Object::PersistentVolumeClaim(claim)).await? {
            journal.created.push(format!(
                "PersistentVolumeClaim/{}",
                build::repo_claim_name(&v.owner.name)
            ));
        }
    }
    let report = assess(jobs, &archiver(admin).await?, old);
    if report.status.last_backup.is_none() && jobs.is_empty() {
        let job = build::first_backup_job(v);
        let name = job.name_any();
        if apply::create_if_absent(&ctx.client, ns, &Object::Job(job)).await? {
            journal.created.push(format!("Job/{name}"));
            journal.event(
                EventType::Normal,
                Reason::BackupPending,
                format!("started the first full backup (Job {name})"),
            );
        }
    }
    Ok(Some(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn success(at: &str, label: &str) -> (String, JobEnd) {
        (
            at.into(),
            JobEnd::Succeeded(format!(
                r#"{{"backups": 3, "oldestStop": 1796086800, "last": {{"label": "{label}", "type": "diff",
                "start": 1796173200, "stop": 1796173260, "size": 123456, "repoSize": 2345}}}}"#
            )),
        )
    }

    fn archived(at: &str) -> Archiver {
        Archiver {
            last_archived: Some(("000000010000000000000009".into(), at.into())),
            last_failed: None,
        }
    }

    #[test]
    fn a_completed_backup_and_a_working_archive_are_ready() {
        let r = assess(
            &[success(
                "2026-12-02T01:01:00Z",
                "20261202-010000F_20261202-010000D",
            )],
            &archived("2026-12-02T09:00:00Z"),
            None,
        );
        assert!(r.ready, "{r:?}");
        assert_eq!(r.reason, Reason::BackupCompleted);
        let last = r.status.last_backup.as_ref().expect("last");
        assert_eq!(last.type_, "diff");
        assert_eq!(last.completed_at, "2026-12-02T01:01:00Z");
        assert_eq!(last.size_bytes, Some(123_456));
        assert_eq!(r.status.backups, Some(3));
        assert_eq!(
            r.status.earliest_recoverable_time.as_deref(),
            Some("2026-12-01T01:00:00Z")
        );
        assert_eq!(
            r.status.latest_recoverable_time.as_deref(),
            Some("2026-12-02T09:00:00Z")
        );
        assert!(
            r.message.contains("recoverable from 2026-12-01T01:00:00Z"),
            "{}",
            r.message
        );
    }

    #[test]
    fn before_the_first_backup_it_is_pending_not_degraded() {
        let r = assess(&[], &Archiver::default(), None);
        assert!(!r.ready);
        assert!(!r.degraded);
        assert_eq!(r.reason, Reason::BackupPending);
    }

    #[test]
    fn a_failed_backup_after_the_last_good_one_degrades_and_keeps_the_record() {
        let old = assess(
            &[success("2026-12-01T01:01:00Z", "A")],
            &archived("2026-12-01T02:00:00Z"),
            None,
        )
        .status;
        let r = assess(
            &[
                (
                    "2026-12-02T01:00:30Z".into(),
                    JobEnd::Failed("line\nERROR: [056]: unable to find primary cluster".into()),
                ),
                success("2026-12-01T01:01:00Z", "A"),
            ],
            &archived("2026-12-02T02:00:00Z"),
            Some(&old),
        );
        assert!(!r.ready && r.degraded);
        assert_eq!(r.reason, Reason::BackupFailed);
        assert!(
            r.message.contains("unable to find primary cluster"),
            "{}",
            r.message
        );
        assert_eq!(
            r.status.last_backup.as_ref().map(|b| b.label.as_str()),
            Some("A")
        );
        // Pods gone (history limit): the record stays.
        let r = assess(&[], &archived("2026-12-02T03:00:00Z"), Some(&r.status));
        assert_eq!(
            r.status.last_backup.as_ref().map(|b| b.label.as_str()),
            Some("A")
        );
    }

    #[test]
    fn a_failing_archive_degrades_until_a_segment_is_archived_again() {
        let failing = Archiver {
            last_archived: Some(("0001".into(), "2026-12-02T01:00:00Z".into())),
            last_failed: Some(("0002".into(), "2026-12-02T01:05:00Z".into())),
        };
        let r = assess(&[success("2026-12-02T00:30:00Z", "A")], &failing, None);
        assert_eq!(r.reason, Reason::ArchiveFailing);
        assert!(r.degraded);
        assert_eq!(r.status.archive_failing.as_deref(), Some("0002"));
        let recovered = Archiver {
            last_archived: Some(("0003".into(), "2026-12-02T01:06:00Z".into())),
            ..failing
        };
        let r = assess(&[success("2026-12-02T00:30:00Z", "A")], &recovered, None);
        assert!(r.ready, "{r:?}");
        assert_eq!(r.status.archive_failing, None);
    }
}
