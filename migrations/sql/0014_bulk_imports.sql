-- Bulk imports (`umstore-data-plane bulk import <file>`, docs/bulk.md): one row
-- per file imported into this cluster, named by the SHA-256 of the file's bytes
-- (and the cluster, for a store with several). Each batch of users commits in
-- the same transaction as the file offset it reached, so an import stopped at
-- any point resumes after the last committed batch: no user twice, none missed.
-- The run importing a file holds it by `runner` and renews `heartbeat_at`
-- every few seconds (no session state: imports run through PgBouncer's
-- transaction pooling); another run may take over only once the heartbeat is
-- older than its --takeover-after.
-- No region column: under Citus it stays a local table on the coordinator.

CREATE TABLE IF NOT EXISTS umstore.bulk_imports (
    import_id    text PRIMARY KEY,
    file_name    text NOT NULL,
    file_bytes   bigint NOT NULL CHECK (file_bytes >= 0),
    format       text NOT NULL CHECK (format IN ('jsonl', 'csv')),
    -- Bytes of the file consumed by committed batches, and the line reached.
    offset_done  bigint NOT NULL DEFAULT 0 CHECK (offset_done >= 0),
    lines_done   bigint NOT NULL DEFAULT 0 CHECK (lines_done >= 0),
    imported     bigint NOT NULL DEFAULT 0 CHECK (imported >= 0),
    rejected     bigint NOT NULL DEFAULT 0 CHECK (rejected >= 0),
    engine       text,
    attempts     integer NOT NULL DEFAULT 1,
    runner       uuid,
    heartbeat_at timestamptz,
    started_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);

GRANT SELECT, INSERT, UPDATE ON umstore.bulk_imports TO umstore_writer;
GRANT SELECT ON umstore.bulk_imports TO umstore_dashboard, umstore_analytics;
GRANT ALL ON umstore.bulk_imports TO umstore_admin;
