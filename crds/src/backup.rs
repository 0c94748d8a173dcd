//! `spec.backup` and `spec.bootstrap`: pgBackRest backups with WAL archiving, and
//! a store created from them (point-in-time recovery).

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use crate::rules;
use crate::spec::StorageSpec;

/// Encrypted backups with pgBackRest: continuous WAL archiving from every database
/// group's primary and scheduled full and differential backups, into one
/// repository, encrypted (`aes-256-cbc`) with a passphrase the operator generates
/// into the Secret `<store>-backup-encryption`. Without that passphrase the
/// backups are unreadable: escrow the Secret (docs/backup.md).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// Where the backups and the archived WAL are kept.
    pub repository: BackupRepository,
    /// How many backups to keep.
    #[serde(default)]
    pub retention: BackupRetention,
    /// When backups run (CronJob schedules, in the cluster's time zone unless
    /// `timeZone` is set).
    #[serde(default)]
    pub schedule: BackupSchedule,
    /// Stop scheduling backups (WAL archiving continues).
    #[serde(default)]
    pub suspend: bool,
}

/// The pgBackRest repository: exactly one of `s3` and `volume`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = rules::one_repository())]
pub struct BackupRepository {
    /// An S3-compatible bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Repository>,
    /// A PersistentVolumeClaim `<store>-backup-repo` the operator creates. Every
    /// database pod mounts it to archive WAL and the backup Jobs write it, so its
    /// StorageClass must offer `ReadWriteMany` (NFS, CephFS, EFS, Filestore...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<StorageSpec>,
}

/// An S3-compatible bucket (AWS S3, MinIO, Ceph RGW, GCS's interoperability API).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct S3Repository {
    /// Bucket name.
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    /// Endpoint host, optionally with a port (`s3.eu-central-1.amazonaws.com`,
    /// `minio.backup.svc:9000`); always HTTPS.
    #[schemars(length(min = 1, max = 253))]
    pub endpoint: String,
    /// Region of the bucket.
    #[serde(default = "default_s3_region")]
    pub region: String,
    /// Path inside the bucket; defaults to `/umstore/<namespace>/<store>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `host` (virtual-hosted, `bucket.endpoint`) or `path` (`endpoint/bucket`, what
    /// MinIO usually needs).
    #[serde(default)]
    pub uri_style: UriStyle,
    /// A Secret in the store's namespace with the keys `accessKeyId` and
    /// `secretAccessKey`.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = rules::object_name("s3.credentialsSecret"))]
    pub credentials_secret: String,
    /// Verify the endpoint's TLS certificate (turn off only for a test MinIO).
    #[serde(default = "default_true")]
    pub verify_tls: bool,
}

fn default_s3_region() -> String {
    "us-east-1".into()
}

fn default_true() -> bool {
    true
}

/// S3 request style.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum UriStyle {
    /// `https://bucket.endpoint/...`.
    #[default]
    Host,
    /// `https://endpoint/bucket/...`.
    Path,
}

/// How many backups to keep. Expiring a full backup expires the differential
/// backups and the WAL that depend on it, so the recoverable window starts at the
/// oldest full backup kept.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupRetention {
    /// Full backups kept (1 to 100).
    #[serde(default = "default_full_retention")]
    #[x_kube(validation = rules::backups_kept())]
    pub full: i32,
    /// Differential backups kept (1 to 100); all of those of the full backups kept when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::backups_kept())]
    pub differential: Option<i32>,
}

fn default_full_retention() -> i32 {
    2
}

impl Default for BackupRetention {
    fn default() -> Self {
        Self {
            full: default_full_retention(),
            differential: None,
        }
    }
}

/// Backup schedules.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupSchedule {
    /// Full backups (default Sundays at 01:00).
    #[serde(default = "default_full_schedule")]
    #[schemars(length(max = 128))]
    #[x_kube(validation = rules::cron_schedule())]
    pub full: String,
    /// Differential backups (default Monday to Saturday at 01:00); none when empty.
    #[serde(
        default = "default_differential_schedule",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(max = 128))]
    #[x_kube(validation = rules::cron_schedule())]
    pub differential: Option<String>,
    /// IANA time zone of the schedules (`Asia/Kolkata`); the controller manager's when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub time_zone: Option<String>,
}

fn default_full_schedule() -> String {
    "0 1 * * 0".into()
}

fn default_differential_schedule() -> Option<String> {
    Some("0 1 * * 1-6".into())
}

impl Default for BackupSchedule {
    fn default() -> Self {
        Self {
            full: default_full_schedule(),
            differential: default_differential_schedule(),
            time_zone: None,
        }
    }
}

/// How the store's databases are created.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapSpec {
    /// Create the coordinator from another store's backups instead of an empty
    /// database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<RecoverySpec>,
}

/// Point-in-time recovery from a store's backups.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RecoverySpec {
    /// The store whose backups to restore (in this namespace). It need not exist any
    /// more: its Secret `<source>-backup-encryption` (the passphrase) must, and the
    /// repository holds its backups under its name.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = rules::object_name("recovery.source"))]
    pub source: String,
    /// The repository with the source's backups; defaults to this store's
    /// `spec.backup.repository`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<BackupRepository>,
    /// Replay WAL up to this time (RFC 3339); to the end of the archived WAL when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = rules::rfc3339_time())]
    pub target_time: Option<String>,
}
