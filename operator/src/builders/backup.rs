//! Backups with pgBackRest (`spec.backup`, docs/backup.md).
//!
//! Every database pod runs `pgbackrest server` beside PostgreSQL (the `pgbackrest`
//! container): a TLS endpoint through which a backup Job reaches the data
//! directory, admitting only clients whose certificate the store's backup CA
//! signed for [`CLIENT_CN`]. PostgreSQL archives each WAL segment with
//! `pgbackrest archive-push` (its `archive_command`), straight into the repository
//! (an S3 bucket, or a ReadWriteMany volume every database pod mounts). The
//! scheduled backups are CronJobs whose pods run `pgbackrest backup` against the
//! primary of each group (its read-write Service), one stanza per group:
//! `coordinator` (with its replica pools: one Patroni cluster) and
//! `worker-<group>` from tier 3.
//!
//! The repository is encrypted with `aes-256-cbc` under a passphrase the operator
//! generates once into `<store>-backup-encryption` ([`passphrase_secret_name`]):
//! not the Vault transit key, not a data key. Secrets reach pgBackRest only
//! through environment variables it reads itself (`PGBACKREST_REPO1_CIPHER_PASS`,
//! `PGBACKREST_REPO1_S3_KEY`, `PGBACKREST_REPO1_S3_KEY_SECRET`), never through the
//! rendered files or a command line.
//!
//! The files rendered here are the ones the backup tests run real pgBackRest
//! with: [`Layout`] carries the paths and ports, [`Layout::pod`] those of the pods.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, Job, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EmptyDirVolumeSource, EnvVar, KeyToPath, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    PodTemplateSpec, ResourceRequirements, Secret, SecretVolumeSource, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use umstore_crds::{BackupRepository, BackupRetention, BackupSpec, UriStyle};
use umstore_migrations::roles::SUPERUSER;

use super::patroni::PGDATA;
use super::postgres::{env as pg_env, secret_env, PgRole};
use crate::meta::{hash_of, Owner, CONFIG_HASH, INSTANCE_LABEL, PG_PORT};
use crate::validated::Validated;

/// The port of `pgbackrest server` in the database pods.
pub const SERVER_PORT: i32 = 8432;
/// Where the pgBackRest ConfigMap is mounted.
pub const CONFIG_DIR: &str = "/etc/pgbackrest/conf";
/// Where the backup TLS Secret is mounted.
pub const TLS_DIR: &str = "/etc/pgbackrest/tls";
/// Where a volume repository is mounted.
pub const REPO_DIR: &str = "/pgbackrest/repo";
/// PostgreSQL's socket directory, shared with the `pgbackrest` container.
pub const SOCKET_DIR: &str = "/var/run/postgresql";
/// The common name a backup client's certificate carries.
pub const CLIENT_CN: &str = "umstore-backup";
/// The passphrase Secret's key.
pub const PASSPHRASE_KEY: &str = "passphrase";
/// The component label of backup Jobs and their pods.
pub const COMPONENT: &str = "backup";
/// The label naming the backup type of a Job (`full`, `diff`).
pub const TYPE_LABEL: &str = "umstore.io/backup-type";
/// `pgbackrest.conf` of the database pods, in the ConfigMap.
pub const SERVER_CONF: &str = "pgbackrest.conf";
/// `pgbackrest.conf` of the backup Jobs, in the ConfigMap.
pub const JOB_CONF: &str = "job.conf";
/// The restore's `pgbackrest.conf` (the source's repository), in the ConfigMap.
pub const RESTORE_CONF: &str = "restore.conf";

/// pgBackRest's environment variables.
pub mod env {
    /// The configuration file.
    pub const CONFIG: &str = "PGBACKREST_CONFIG";
    /// The stanza (`archive-push` in `archive_command`).
    pub const STANZA: &str = "PGBACKREST_STANZA";
    /// The repository passphrase.
    pub const CIPHER_PASS: &str = "PGBACKREST_REPO1_CIPHER_PASS";
    /// S3 access key id.
    pub const S3_KEY: &str = "PGBACKREST_REPO1_S3_KEY";
    /// S3 secret access key.
    pub const S3_KEY_SECRET: &str = "PGBACKREST_REPO1_S3_KEY_SECRET";
    /// The source store's passphrase, during a restore.
    pub const RESTORE_CIPHER_PASS: &str = "UMSTORE_RESTORE_CIPHER_PASS";
}

/// PostgreSQL's `archive_command`: pgBackRest reads its configuration, stanza and
/// passphrase from the environment the pod gives PostgreSQL.
pub const ARCHIVE_COMMAND: &str = "pgbackrest archive-push \"%p\"";

/// The Secret with the repository passphrase.
pub fn passphrase_secret_name(owner: &Owner) -> String {
    owner.child("backup-encryption")
}

/// The Secret with the backup CA, the servers' and the client's certificates.
pub fn tls_secret_name(owner: &Owner) -> String {
    owner.child("backup-tls")
}

/// The ConfigMap with the pgBackRest configuration files.
pub fn config_map_name(owner: &Owner) -> String {
    owner.child("pgbackrest")
}

/// The volume repository's PersistentVolumeClaim.
pub fn repo_claim_name(store: &str) -> String {
    format!("{store}-backup-repo")
}

/// The stanza of a workload's group: the coordinator's cluster (with its replica
/// pools) or a worker group.
pub fn stanza(role: &PgRole<'_>) -> String {
    match role {
        PgRole::Coordinator | PgRole::Replica { .. } => "coordinator".into(),
        PgRole::Worker { group, .. } => format!("worker-{group}"),
    }
}

/// The repository path of a store's backups inside an S3 bucket (unless the spec
/// names one), or inside the volume.
pub fn repo_path(repo: &BackupRepository, namespace: &str, store: &str) -> String {
    match &repo.s3 {
        Some(s3) => s3
            .path
            .clone()
            .unwrap_or_else(|| format!("/umstore/{namespace}/{store}")),
        None => format!("{REPO_DIR}/{store}"),
    }
}

/// Where the files and servers are: the pods' paths, or a test's.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    /// PostgreSQL's data directory.
    pub pgdata: String,
    /// PostgreSQL's socket directory.
    pub socket_dir: String,
    /// PostgreSQL's port.
    pub pg_port: i32,
    /// The superuser pgBackRest connects as (over the socket).
    pub pg_user: String,
    /// The directory with `ca.crt`, `tls.crt`, `tls.key`, `client.crt`, `client.key`.
    pub tls_dir: String,
    /// The address `pgbackrest server` listens on (`*`: every interface).
    pub server_address: String,
    /// The port of `pgbackrest server`.
    pub server_port: i32,
    /// pgBackRest's lock, log and spool directory.
    pub work_dir: String,
    /// Where the rendered files are.
    pub config_dir: String,
}

impl Layout {
    /// The database pods' and backup Jobs' layout.
    pub fn pod() -> Self {
        Self {
            pgdata: PGDATA.into(),
            socket_dir: SOCKET_DIR.into(),
            pg_port: PG_PORT,
            pg_user: SUPERUSER.into(),
            tls_dir: TLS_DIR.into(),
            server_address: "*".into(),
            server_port: SERVER_PORT,
            work_dir: "/tmp/pgbackrest".into(),
            config_dir: CONFIG_DIR.into(),
        }
    }
}

/// The `[global]` repository options (no secrets: those come from the environment).
pub fn repo_options(
    repo: &BackupRepository,
    path: &str,
    retention: Option<&BackupRetention>,
) -> Vec<String> {
    let mut lines = Vec::new();
    match &repo.s3 {
        Some(s3) => {
            lines.push("repo1-type=s3".to_string());
            lines.push(format!("repo1-s3-bucket={}", s3.bucket));
            // pgBackRest takes the port apart (`repo1-storage-port`).
            match s3.endpoint.rsplit_once(':') {
                Some((host, port))
                    if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) =>
                {
                    lines.push(format!("repo1-s3-endpoint={host}"));
                    lines.push(format!("repo1-storage-port={port}"));
                }
                _ => lines.push(format!("repo1-s3-endpoint={}", s3.endpoint)),
            }
            lines.push(format!("repo1-s3-region={}", s3.region));
            lines.push(format!(
                "repo1-s3-uri-style={}",
                match s3.uri_style {
                    UriStyle::Host => "host",
                    UriStyle::Path => "path",
                }
            ));
            if !s3.verify_tls {
                lines.push("repo1-storage-verify-tls=n".to_string());
            }
        }
        None => lines.push("repo1-type=posix".to_string()),
    }
    lines.push(format!("repo1-path={path}"));
    lines.push("repo1-cipher-type=aes-256-cbc".to_string());
    if let Some(r) = retention {
        lines.push("repo1-retention-full-type=count".to_string());
        lines.push(format!("repo1-retention-full={}", r.full));
        if let Some(d) = r.differential {
            lines.push(format!("repo1-retention-diff={d}"));
        }
    }
    lines
}

fn common_options(layout: &Layout) -> Vec<String> {
    vec![
        "compress-type=zst".to_string(),
        "log-level-console=info".to_string(),
        "log-level-stderr=warn".to_string(),
        "log-level-file=off".to_string(),
        format!("lock-path={}/lock", layout.work_dir),
        format!("spool-path={}/spool", layout.work_dir),
    ]
}

fn pg_local(layout: &Layout) -> Vec<String> {
    vec![
        format!("pg1-path={}", layout.pgdata),
        format!("pg1-port={}", layout.pg_port),
        format!("pg1-socket-path={}", layout.socket_dir),
        format!("pg1-user={}", layout.pg_user),
    ]
}

fn render(global: Vec<String>, stanzas: Vec<(String, Vec<String>)>) -> String {
    let mut out =
        String::from("# Rendered by umstore-operator; edits are overwritten.\n[global]\n");
    for line in global {
        out.push_str(&line);
        out.push('\n');
    }
    for (name, lines) in stanzas {
        out.push_str(&format!("\n[{name}]\n"));
        for line in lines {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

/// `pgbackrest.conf` of a database pod: the TLS server a backup Job connects to,
/// and the repository `archive-push` writes WAL into. `stanzas` are every group's
/// (a pod picks its own through `PGBACKREST_STANZA`).
pub fn server_conf(repo: &BackupRepository, path: &str, stanzas: &[String], l: &Layout) -> String {
    let mut global = repo_options(repo, path, None);
    global.extend(common_options(l));
    global.extend([
        "archive-async=n".to_string(),
        format!("tls-server-address={}", l.server_address),
        format!("tls-server-port={}", l.server_port),
        format!("tls-server-ca-file={}/ca.crt", l.tls_dir),
        format!("tls-server-cert-file={}/tls.crt", l.tls_dir),
        format!("tls-server-key-file={}/tls.key", l.tls_dir),
        format!("tls-server-auth={CLIENT_CN}=*"),
    ]);
    render(
        global,
        stanzas.iter().map(|s| (s.clone(), pg_local(l))).collect(),
    )
}

/// `pgbackrest.conf` of a backup Job: the repository with its retention, and each
/// stanza's primary reached through its `pgbackrest server` (`host`).
pub fn job_conf(
    repo: &BackupRepository,
    path: &str,
    retention: &BackupRetention,
    stanzas: &[(String, String)],
    l: &Layout,
) -> String {
    let mut global = repo_options(repo, path, Some(retention));
    global.extend(common_options(l));
    global.extend([
        "start-fast=y".to_string(),
        "process-max=2".to_string(),
        "archive-timeout=120".to_string(),
    ]);
    render(
        global,
        stanzas
            .iter()
            .map(|(stanza, host)| {
                let mut lines = vec![
                    format!("pg1-host={host}"),
                    "pg1-host-type=tls".to_string(),
                    format!("pg1-host-port={}", l.server_port),
                    format!("pg1-host-ca-file={}/ca.crt", l.tls_dir),
                    format!("pg1-host-cert-file={}/client.crt", l.tls_dir),
                    format!("pg1-host-key-file={}/client.key", l.tls_dir),
                ];
                lines.extend(pg_local(l));
                (stanza.clone(), lines)
            })
            .collect(),
    )
}

/// `pgbackrest.conf` of a restore: the source's repository, read locally.
pub fn restore_conf(repo: &BackupRepository, path: &str, l: &Layout) -> String {
    let mut global = repo_options(repo, path, None);
    global.extend(common_options(l));
    global.push("process-max=2".to_string());
    render(global, vec![("coordinator".to_string(), pg_local(l))])
}

/// The restore script in the ConfigMap.
pub const RESTORE_SCRIPT: &str = "restore.sh";
/// The WAL-fetching script the restored server's `restore_command` runs.
pub const ARCHIVE_GET_SCRIPT: &str = "archive-get.sh";

/// `restore.sh`, what Patroni runs instead of `initdb` (`bootstrap.method`): the
/// source's newest backup before `target` into the empty data directory, with
/// recovery set to replay the source's WAL up to `target` (to the end of its
/// archive when unset) and promote. The source's passphrase comes from its Secret
/// through [`env::RESTORE_CIPHER_PASS`]; the store's own passphrase (for archiving
/// once promoted) is left alone.
pub fn restore_script(l: &Layout, target: Option<&str>) -> String {
    let dir = &l.config_dir;
    let target = match target {
        Some(t) => format!(
            "--type=time --target=\"{}\" --target-action=promote",
            pgbackrest_time(t)
        ),
        None => "--type=default".to_string(),
    };
    format!(
        "#!/bin/sh
# Rendered by umstore-operator: restores the source store's backup (Patroni's
# bootstrap method), then PostgreSQL replays its WAL through {ARCHIVE_GET_SCRIPT}.
set -eu
# Patroni passes --scope=... and --datadir=...; the data directory is restored there.
datadir={pgdata}
for arg in \"$@\"; do
  case \"$arg\" in --datadir=*) datadir=\"${{arg#--datadir=}}\" ;; esac
done
mkdir -p \"$datadir\"
chmod 0700 \"$datadir\"
export {pass}=\"${restore_pass}\"
exec pgbackrest --config={dir}/{RESTORE_CONF} --stanza=coordinator --log-level-console=info \\
  --pg1-path=\"$datadir\" {target} \\
  --recovery-option=restore_command='/bin/sh {dir}/{ARCHIVE_GET_SCRIPT} %f \"%p\"' restore
",
        pgdata = l.pgdata,
        pass = env::CIPHER_PASS,
        restore_pass = env::RESTORE_CIPHER_PASS,
    )
}

/// An RFC 3339 time (what the CRD admits) as pgBackRest's `--target` wants it:
/// `YYYY-MM-DD HH:MM:SS.mmm+00`, in UTC (it takes no `T` and no `Z`). What does
/// not parse is passed on without quotes or backslashes, for pgBackRest to refuse.
pub fn pgbackrest_time(rfc3339: &str) -> String {
    match rfc3339.parse::<k8s_openapi::jiff::Timestamp>() {
        Ok(t) => t.strftime("%Y-%m-%d %H:%M:%S%.3f+00").to_string(),
        Err(_) => rfc3339.replace(['"', '\\', '$', '`'], ""),
    }
}

/// `archive-get.sh <segment> <path>`: one WAL segment from the source's repository.
pub fn archive_get_script(l: &Layout) -> String {
    format!(
        "#!/bin/sh
set -eu
export {pass}=\"${restore_pass}\"
# PostgreSQL runs restore_command in its data directory, wherever that is.
exec pgbackrest --config={dir}/{RESTORE_CONF} --stanza=coordinator --pg1-path=\"$PWD\" \\
  archive-get \"$1\" \"$2\"
",
        dir = l.config_dir,
        pass = env::CIPHER_PASS,
        restore_pass = env::RESTORE_CIPHER_PASS,
    )
}

/// Environment of the postgres container for `archive_command` (and a restore).
pub fn postgres_env(v: &Validated, role: &PgRole<'_>) -> Vec<EnvVar> {
    let Some(backup) = &v.spec.backup else {
        return restore_env(v);
    };
    let mut vars = server_env(v, backup, role);
    vars.extend(restore_env(v));
    vars
}

/// What pgBackRest reads from the environment in a database pod: its
/// configuration, the pod's stanza, the passphrase and the S3 keys.
fn server_env(v: &Validated, backup: &BackupSpec, role: &PgRole<'_>) -> Vec<EnvVar> {
    let mut vars = vec![
        pg_env(env::CONFIG, format!("{CONFIG_DIR}/{SERVER_CONF}")),
        pg_env(env::STANZA, stanza(role)),
        secret_env(
            env::CIPHER_PASS,
            passphrase_secret_name(&v.owner),
            PASSPHRASE_KEY,
        ),
    ];
    vars.extend(s3_env(&backup.repository));
    vars
}

fn restore_env(v: &Validated) -> Vec<EnvVar> {
    let Some(r) = v.spec.bootstrap.as_ref().and_then(|b| b.recovery.as_ref()) else {
        return Vec::new();
    };
    vec![secret_env(
        env::RESTORE_CIPHER_PASS,
        format!("{}-backup-encryption", r.source),
        PASSPHRASE_KEY,
    )]
}

fn s3_env(repo: &BackupRepository) -> Vec<EnvVar> {
    match &repo.s3 {
        Some(s3) => vec![
            secret_env(env::S3_KEY, s3.credentials_secret.clone(), "accessKeyId"),
            secret_env(
                env::S3_KEY_SECRET,
                s3.credentials_secret.clone(),
                "secretAccessKey",
            ),
        ],
        None => Vec::new(),
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    }
}

/// The repository the store restores from, when it does.
pub fn recovery_repository(v: &Validated) -> Option<(&BackupRepository, &str)> {
    let r = v.spec.bootstrap.as_ref()?.recovery.as_ref()?;
    let repo = r
        .repository
        .as_ref()
        .or(v.spec.backup.as_ref().map(|b| &b.repository))?;
    Some((repo, r.source.as_str()))
}

/// Volumes the database pods need for pgBackRest: its configuration, its TLS
/// material, the shared socket directory and a volume repository.
pub fn pod_volumes(v: &Validated) -> Vec<Volume> {
    let owner = &v.owner;
    let mut volumes = Vec::new();
    let restoring = recovery_repository(v);
    if v.spec.backup.is_none() && restoring.is_none() {
        return volumes;
    }
    volumes.push(Volume {
        name: "pgbackrest-config".into(),
        config_map: Some(k8s_openapi::api::core::v1::ConfigMapVolumeSource {
            name: config_map_name(owner),
            ..Default::default()
        }),
        ..Volume::default()
    });
    if v.spec.backup.is_some() {
        volumes.push(tls_volume(owner, &["ca.crt", "tls.crt", "tls.key"]));
        volumes.push(Volume {
            name: "pgbackrest-run".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        });
    }
    let mut claims: Vec<String> = Vec::new();
    if let Some(b) = &v.spec.backup {
        if b.repository.volume.is_some() {
            claims.push(repo_claim_name(&owner.name));
        }
    }
    if let Some((repo, source)) = restoring {
        if repo.volume.is_some() && !claims.contains(&repo_claim_name(source)) {
            claims.push(repo_claim_name(source));
        }
    }
    for (i, claim) in claims.into_iter().enumerate() {
        volumes.push(Volume {
            name: format!("pgbackrest-repo-{i}"),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim,
                read_only: Some(false),
            }),
            ..Volume::default()
        });
    }
    volumes
}

fn tls_volume(owner: &Owner, keys: &[&str]) -> Volume {
    Volume {
        name: "pgbackrest-tls".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(tls_secret_name(owner)),
            default_mode: Some(0o640),
            items: Some(
                keys.iter()
                    .map(|k| KeyToPath {
                        key: (*k).into(),
                        path: (*k).into(),
                        ..KeyToPath::default()
                    })
                    .collect(),
            ),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// Mounts of the postgres container: configuration, socket directory, repository.
pub fn postgres_mounts(v: &Validated) -> Vec<VolumeMount> {
    let mut mounts = Vec::new();
    if v.spec.backup.is_none() && recovery_repository(v).is_none() {
        return mounts;
    }
    mounts.push(mount("pgbackrest-config", CONFIG_DIR, true));
    if v.spec.backup.is_some() {
        mounts.push(mount("pgbackrest-run", SOCKET_DIR, false));
    }
    mounts.extend(repo_mounts(v));
    mounts
}

fn repo_mounts(v: &Validated) -> Vec<VolumeMount> {
    pod_volumes(v)
        .iter()
        .filter(|vol| vol.persistent_volume_claim.is_some())
        .map(|vol| {
            let claim = vol
                .persistent_volume_claim
                .as_ref()
                .map(|c| c.claim_name.as_str())
                .unwrap_or_default();
            // Every store's volume keeps its backups under its own name.
            let store = claim.trim_end_matches("-backup-repo");
            mount(&vol.name, &format!("{REPO_DIR}/{store}"), false)
        })
        .collect()
}

/// The `pgbackrest` container of a database pod: `pgbackrest server`.
pub fn server_container(v: &Validated, role: &PgRole<'_>) -> Option<Container> {
    let backup = v.spec.backup.as_ref()?;
    let mut mounts = vec![
        VolumeMount {
            name: "data".into(),
            mount_path: "/var/lib/postgresql/data".into(),
            ..VolumeMount::default()
        },
        mount("pgbackrest-config", CONFIG_DIR, true),
        mount("pgbackrest-tls", TLS_DIR, true),
        mount("pgbackrest-run", SOCKET_DIR, false),
    ];
    mounts.extend(repo_mounts(v));
    let vars = server_env(v, backup, role);
    Some(Container {
        name: "pgbackrest".into(),
        image: Some(v.spec.postgres.image.clone()),
        command: Some(vec!["pgbackrest".into(), "server".into()]),
        env: Some(vars),
        ports: Some(vec![k8s_openapi::api::core::v1::ContainerPort {
            name: Some("pgbackrest".into()),
            container_port: SERVER_PORT,
            ..Default::default()
        }]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("10m".into())),
                ("memory".to_string(), Quantity("32Mi".into())),
            ])),
            ..ResourceRequirements::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    })
}

/// The stanzas of the store and the host of each one's primary (its read-write
/// Service).
pub fn stanzas(v: &Validated) -> Vec<(String, String)> {
    let mut out = vec![(
        stanza(&PgRole::Coordinator),
        v.owner.service_host(&PgRole::Coordinator.name(v)),
    )];
    for g in &v.spec.worker_groups {
        if !v.citus() {
            break;
        }
        let role = PgRole::Worker {
            group: &g.name,
            replicas: g.replicas,
        };
        out.push((stanza(&role), v.owner.service_host(&role.name(v))));
    }
    out
}

/// The ConfigMap `<store>-pgbackrest`: the pods', the Jobs' and a restore's
/// configuration.
pub fn config_map(v: &Validated) -> Option<ConfigMap> {
    let owner = &v.owner;
    let layout = Layout::pod();
    let mut data = BTreeMap::new();
    if let Some(b) = &v.spec.backup {
        let path = repo_path(&b.repository, &owner.namespace, &owner.name);
        let stanzas = stanzas(v);
        let names: Vec<String> = stanzas.iter().map(|(s, _)| s.clone()).collect();
        data.insert(
            SERVER_CONF.to_string(),
            server_conf(&b.repository, &path, &names, &layout),
        );
        data.insert(
            JOB_CONF.to_string(),
            job_conf(&b.repository, &path, &b.retention, &stanzas, &layout),
        );
    }
    if let Some((repo, source)) = recovery_repository(v) {
        let path = repo_path(repo, &owner.namespace, source);
        let target = v
            .spec
            .bootstrap
            .as_ref()
            .and_then(|b| b.recovery.as_ref())
            .and_then(|r| r.target_time.as_deref());
        data.insert(RESTORE_CONF.to_string(), restore_conf(repo, &path, &layout));
        data.insert(RESTORE_SCRIPT.to_string(), restore_script(&layout, target));
        data.insert(ARCHIVE_GET_SCRIPT.to_string(), archive_get_script(&layout));
    }
    if data.is_empty() {
        return None;
    }
    Some(ConfigMap {
        metadata: owner.object_meta(&config_map_name(owner), owner.component_labels(COMPONENT)),
        data: Some(data),
        ..ConfigMap::default()
    })
}

/// Hash of what the database pods read from the ConfigMap at start.
pub fn config_hash(v: &Validated) -> String {
    hash_of(&config_map(v).and_then(|c| c.data))
}

/// The volume repository's claim (ReadWriteMany), when the spec asks for one.
pub fn repo_claim(v: &Validated) -> Option<PersistentVolumeClaim> {
    let storage = v.spec.backup.as_ref()?.repository.volume.as_ref()?;
    let owner = &v.owner;
    Some(PersistentVolumeClaim {
        metadata: owner.object_meta(
            &repo_claim_name(&owner.name),
            owner.component_labels(COMPONENT),
        ),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteMany".into()]),
            storage_class_name: storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(storage.size.clone()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    })
}

/// The shell script of a backup Job: for each stanza, create it if new (an
/// idempotent check), back it up, then report the coordinator's backups as one
/// JSON line in the termination message the operator reads
/// ([`crate::steps::backup`]).
pub fn job_script(kind: &str, stanzas: &[String], report: &str) -> String {
    script(kind, stanzas, report, false)
}

/// [`job_script`] from tier 3: the backups, then a Citus restore point
/// ([`RESTORE_POINT_SCRIPT`]) named in the report.
pub fn citus_job_script(kind: &str, stanzas: &[String], report: &str) -> String {
    script(kind, stanzas, report, true)
}

fn script(kind: &str, stanzas: &[String], report: &str, restore_point: bool) -> String {
    let mut script = String::from("set -eu\n");
    for s in stanzas {
        script.push_str(&format!(
            "pgbackrest --stanza={s} stanza-create\npgbackrest --stanza={s} --type={kind} backup\n"
        ));
    }
    if restore_point {
        script.push_str(RESTORE_POINT_SCRIPT);
    }
    script.push_str(&format!(
        "pgbackrest --stanza=coordinator --output=json info | {SUMMARY} > {report}\n"
    ));
    script
}

/// From tier 3, after every group's backup: one Citus restore point across the
/// coordinator and the workers (`citus_create_restore_point`, which blocks
/// distributed commits for its instant), so each group can be restored to the same
/// consistent point. Only where the extension is installed; the name is made
/// here, never taken from input. `PG*` variables (the coordinator's read-write
/// Service, the superuser) say where.
pub const RESTORE_POINT_SCRIPT: &str = "\
if [ \"$(psql -qAtX -c \"SELECT count(*) FROM pg_extension WHERE extname = 'citus'\")\" = 1 ]; then
  UMSTORE_RESTORE_POINT=\"umstore-$(date -u +%Y%m%dT%H%M%SZ)\"
  psql -qAtX -v ON_ERROR_STOP=1 -c \"SELECT citus_create_restore_point('$UMSTORE_RESTORE_POINT')\" >/dev/null
  export UMSTORE_RESTORE_POINT
fi
";

/// Reduces `pgbackrest info --output=json` to what status shows (kept under the
/// 4 KiB a termination message holds): the newest backup, the oldest backup's end,
/// and the count. Python is in the image (Patroni runs on it).
const SUMMARY: &str = "python3 -c 'import json,os,sys\n\
i=json.load(sys.stdin)[0]\n\
b=i.get(\"backup\") or []\n\
n=b[-1] if b else None\n\
print(json.dumps({\"backups\":len(b),\"restorePoint\":os.environ.get(\"UMSTORE_RESTORE_POINT\"),\"oldestStop\":b[0][\"timestamp\"][\"stop\"] if b else None,\
\"last\":None if n is None else {\"label\":n[\"label\"],\"type\":n[\"type\"],\"start\":n[\"timestamp\"][\"start\"],\
\"stop\":n[\"timestamp\"][\"stop\"],\"size\":n[\"info\"][\"size\"],\"repoSize\":n[\"info\"][\"repository\"][\"delta\"]}}))'";

/// A backup Job's pod template.
fn job_pod(v: &Validated, kind: &str) -> PodTemplateSpec {
    let owner = &v.owner;
    let stanzas: Vec<String> = stanzas(v).into_iter().map(|(s, _)| s).collect();
    let mut labels = owner.component_labels(COMPONENT);
    labels.insert(TYPE_LABEL.into(), kind.into());
    let mut volumes = vec![
        Volume {
            name: "pgbackrest-config".into(),
            config_map: Some(k8s_openapi::api::core::v1::ConfigMapVolumeSource {
                name: config_map_name(owner),
                ..Default::default()
            }),
            ..Volume::default()
        },
        tls_volume(owner, &["ca.crt", "client.crt", "client.key"]),
    ];
    let mut mounts = vec![
        mount("pgbackrest-config", CONFIG_DIR, true),
        mount("pgbackrest-tls", TLS_DIR, true),
    ];
    let mut vars = vec![
        pg_env(env::CONFIG, format!("{CONFIG_DIR}/{JOB_CONF}")),
        secret_env(
            env::CIPHER_PASS,
            passphrase_secret_name(owner),
            PASSPHRASE_KEY,
        ),
    ];
    if v.citus() {
        // The restore point is made on the coordinator's primary, as the superuser.
        let sslmode = if v.spec.postgres.tls.is_some() {
            "require"
        } else {
            "prefer"
        };
        vars.extend([
            pg_env("PGHOST", owner.service_host(&PgRole::Coordinator.name(v))),
            pg_env("PGPORT", PG_PORT.to_string()),
            pg_env("PGUSER", SUPERUSER),
            pg_env("PGDATABASE", umstore_migrations::roles::DATABASE),
            pg_env("PGSSLMODE", sslmode),
            secret_env(
                "PGPASSWORD",
                super::credentials::Role::Admin.secret_name(owner),
                "password",
            ),
        ]);
    }
    if let Some(b) = &v.spec.backup {
        vars.extend(s3_env(&b.repository));
        if b.repository.volume.is_some() {
            volumes.push(Volume {
                name: "pgbackrest-repo-0".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: repo_claim_name(&owner.name),
                    read_only: Some(false),
                }),
                ..Volume::default()
            });
            mounts.push(mount(
                "pgbackrest-repo-0",
                &format!("{REPO_DIR}/{}", owner.name),
                false,
            ));
        }
    }
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(CONFIG_HASH.to_string(), config_hash(v))])),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            security_context: Some(PodSecurityContext {
                run_as_user: Some(999),
                run_as_group: Some(999),
                fs_group: Some(999),
                run_as_non_root: Some(true),
                ..PodSecurityContext::default()
            }),
            automount_service_account_token: Some(false),
            containers: vec![Container {
                name: "backup".into(),
                image: Some(v.spec.postgres.image.clone()),
                command: Some(vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    if v.citus() {
                        citus_job_script(kind, &stanzas, "/dev/termination-log")
                    } else {
                        job_script(kind, &stanzas, "/dev/termination-log")
                    },
                ]),
                env: Some(vars),
                volume_mounts: Some(mounts),
                termination_message_policy: Some("File".into()),
                ..Container::default()
            }],
            volumes: Some(volumes),
            ..PodSpec::default()
        }),
    }
}

fn job_spec(v: &Validated, kind: &str) -> JobSpec {
    JobSpec {
        // A failed backup is retried by the next schedule; two tries cover a
        // primary that moved during the first.
        backoff_limit: Some(1),
        template: job_pod(v, kind),
        ..JobSpec::default()
    }
}

/// The CronJob of scheduled `kind` backups (`full`, `diff`).
pub fn cron_job(v: &Validated, kind: &str, schedule: &str) -> Option<CronJob> {
    let b: &BackupSpec = v.spec.backup.as_ref()?;
    let owner = &v.owner;
    let mut labels = owner.component_labels(COMPONENT);
    labels.insert(TYPE_LABEL.into(), kind.into());
    Some(CronJob {
        metadata: owner.object_meta(&owner.child(&format!("backup-{kind}")), labels.clone()),
        spec: CronJobSpec {
            schedule: schedule.to_string(),
            time_zone: b.schedule.time_zone.clone(),
            suspend: Some(b.suspend),
            concurrency_policy: Some("Forbid".into()),
            starting_deadline_seconds: Some(3600),
            successful_jobs_history_limit: Some(3),
            failed_jobs_history_limit: Some(3),
            job_template: JobTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(job_spec(v, kind)),
            },
        },
        ..CronJob::default()
    })
}

/// The CronJobs of the spec's schedules.
pub fn cron_jobs(v: &Validated) -> Vec<CronJob> {
    let Some(b) = &v.spec.backup else {
        return Vec::new();
    };
    let mut jobs: Vec<CronJob> = cron_job(v, "full", &b.schedule.full).into_iter().collect();
    if let Some(diff) = &b.schedule.differential {
        jobs.extend(cron_job(v, "diff", diff));
    }
    jobs
}

/// The first full backup, run once the coordinator is bootstrapped (so the
/// recoverable window starts at once, not at the first schedule).
pub fn first_backup_job(v: &Validated) -> Job {
    let owner = &v.owner;
    let mut labels = owner.component_labels(COMPONENT);
    labels.insert(TYPE_LABEL.into(), "full".into());
    Job {
        metadata: owner.object_meta(&owner.child("backup-first"), labels),
        spec: Some(job_spec(v, "full")),
        ..Job::default()
    }
}

/// The passphrase Secret (generated once; never rotated: the backups made under it
/// need it).
pub fn passphrase_secret(owner: &Owner, passphrase: &str) -> Secret {
    let mut labels = owner.component_labels(COMPONENT);
    labels.insert(crate::meta::CREDENTIAL_LABEL.into(), "backup".into());
    Secret {
        metadata: owner.object_meta(&passphrase_secret_name(owner), labels),
        immutable: Some(true),
        data: Some(BTreeMap::from([(
            PASSPHRASE_KEY.to_string(),
            ByteString(passphrase.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

/// The pod label selecting a store's backup Job pods.
pub fn job_pod_selector(owner: &Owner) -> String {
    format!(
        "{INSTANCE_LABEL}={},{}={COMPONENT}",
        owner.name,
        crate::meta::COMPONENT_LABEL
    )
}

/// The backup TLS material (PEM): a CA, the `pgbackrest server` certificate of
/// every database pod, and the backup Jobs' client certificate.
#[derive(Clone, Debug, PartialEq)]
pub struct BackupTls {
    /// The CA certificate (`ca.crt`).
    pub ca: String,
    /// The servers' certificate (`tls.crt`).
    pub server_cert: String,
    /// Its key (`tls.key`).
    pub server_key: String,
    /// The client certificate (`client.crt`, common name [`CLIENT_CN`]).
    pub client_cert: String,
    /// Its key (`client.key`).
    pub client_key: String,
}

/// Makes the store's backup TLS material: ECDSA P-256, valid for ten years (the
/// CA signs nothing else and never leaves the Secret; delete the Secret to get a
/// new one, and the database pods are rolled onto it). The server certificate
/// names every Service of the namespace (`*.<namespace>.svc`) and `localhost`.
pub fn generate_tls(namespace: &str) -> Result<BackupTls, rcgen::Error> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let validity = |p: &mut CertificateParams| {
        let now = std::time::SystemTime::now();
        p.not_before = now.into();
        p.not_after = (now + std::time::Duration::from_secs(10 * 365 * 24 * 3600)).into();
    };
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(
        DnType::CommonName,
        format!("umstore backup CA ({namespace})"),
    );
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca_params);
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate()?;
    let mut server_params = CertificateParams::new(vec![
        format!("*.{namespace}.svc"),
        format!("*.{namespace}.svc.cluster.local"),
        "localhost".to_string(),
    ])?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "umstore pgbackrest server");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut server_params);
    let server = server_params.signed_by(&server_key, &issuer)?;

    let client_key = KeyPair::generate()?;
    let mut client_params = CertificateParams::new(Vec::<String>::new())?;
    client_params
        .distinguished_name
        .push(DnType::CommonName, CLIENT_CN);
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut client_params);
    let client = client_params.signed_by(&client_key, &issuer)?;

    Ok(BackupTls {
        ca: ca.pem(),
        server_cert: server.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
    })
}

impl BackupTls {
    /// The Secret keys and their contents.
    pub fn files(&self) -> [(&'static str, &str); 5] {
        [
            ("ca.crt", &self.ca),
            ("tls.crt", &self.server_cert),
            ("tls.key", &self.server_key),
            ("client.crt", &self.client_cert),
            ("client.key", &self.client_key),
        ]
    }

    /// Reads the material back from its Secret's data; the missing key when incomplete.
    pub fn from_data(data: &BTreeMap<String, ByteString>) -> Result<Self, &'static str> {
        let get = |k: &'static str| {
            data.get(k)
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
                .filter(|s| !s.is_empty())
                .ok_or(k)
        };
        Ok(Self {
            ca: get("ca.crt")?,
            server_cert: get("tls.crt")?,
            server_key: get("tls.key")?,
            client_cert: get("client.crt")?,
            client_key: get("client.key")?,
        })
    }
}

/// The backup TLS Secret.
pub fn tls_secret(owner: &Owner, tls: &BackupTls) -> Secret {
    let mut labels = owner.component_labels(COMPONENT);
    labels.insert(crate::meta::CREDENTIAL_LABEL.into(), "backup-tls".into());
    Secret {
        metadata: owner.object_meta(&tls_secret_name(owner), labels),
        data: Some(
            tls.files()
                .into_iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Secret::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use umstore_crds::S3Repository;

    fn s3(endpoint: &str) -> BackupRepository {
        BackupRepository {
            s3: Some(S3Repository {
                bucket: "backups".into(),
                endpoint: endpoint.into(),
                region: "ap-south-1".into(),
                path: None,
                uri_style: UriStyle::Path,
                credentials_secret: "s3".into(),
                verify_tls: false,
            }),
            volume: None,
        }
    }

    #[test]
    fn an_s3_endpoint_with_a_port_is_taken_apart_for_pgbackrest() {
        let lines = repo_options(&s3("minio.backup.svc:9000"), "/umstore/ns/s", None);
        assert!(
            lines.contains(&"repo1-s3-endpoint=minio.backup.svc".to_string()),
            "{lines:?}"
        );
        assert!(
            lines.contains(&"repo1-storage-port=9000".to_string()),
            "{lines:?}"
        );
        assert!(lines.contains(&"repo1-s3-uri-style=path".to_string()));
        assert!(lines.contains(&"repo1-storage-verify-tls=n".to_string()));
        let lines = repo_options(&s3("s3.ap-south-1.amazonaws.com"), "/p", None);
        assert!(lines.contains(&"repo1-s3-endpoint=s3.ap-south-1.amazonaws.com".to_string()));
        assert!(!lines.iter().any(|l| l.starts_with("repo1-storage-port")));
    }

    #[test]
    fn a_target_time_is_written_the_way_pgbackrest_reads_it() {
        assert_eq!(
            pgbackrest_time("2026-12-01T15:00:00.123456+05:30"),
            "2026-12-01 09:30:00.123+00"
        );
        assert_eq!(
            pgbackrest_time("2026-12-01T09:30:00Z"),
            "2026-12-01 09:30:00.000+00"
        );
    }
}
