-- Moving a region between the clusters of a store (tier 4; docs/data-model.md,
-- "Moving a region between clusters").
--
-- In every cluster:
--   umstore.region_state     one row per region: may writes of the region land
--                            here now? 'open' (yes), 'copying' (yes, and each
--                            written user is logged for the catch-up),
--                            'fenced' (no: retry soon), 'incoming' (no: the
--                            region is being copied in and is not served here
--                            yet), 'moved' (no: it lives in cluster `peer`).
--   umstore.region_move_log  the users written while their region was copied
--                            out: what the catch-up copies again.
--   umstore.region_write()   what every write transaction of a store with
--                            several clusters calls first: a shared advisory
--                            lock on the region (the mover takes it exclusively
--                            to change the state, so a state change waits for
--                            the writes in flight and no write slips past it),
--                            then the state, then the log row when copying.
-- In the home cluster only (the tables exist everywhere, one schema):
--   umstore.region_placement which cluster holds each region; the data plane
--                            reads it (it overrides the layout it was started
--                            with) and the switch of a move is one UPDATE here.
--   umstore.region_moves     the journal of moves: phase, counts, fence length;
--                            a mover that crashed resumes from it.
--
-- Citus: the distribute step keeps all four as local tables on the coordinator
-- (the distribute step's list of local tables), where writes arrive; so none has
-- a foreign key to the regions reference table, only the same CHECK.

CREATE TABLE IF NOT EXISTS umstore.region_state (
    region      char(2) PRIMARY KEY CHECK (region ~ '^[A-Z]{2}$'),
    state       text NOT NULL DEFAULT 'open'
                CHECK (state IN ('open', 'copying', 'fenced', 'incoming', 'moved')),
    -- The other cluster of the move: where the region goes (copying, fenced,
    -- moved) or where it comes from (incoming).
    peer        text,
    changed_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO umstore.region_state (region)
    SELECT region FROM umstore.regions ON CONFLICT DO NOTHING;

CREATE TABLE IF NOT EXISTS umstore.region_move_log (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    region      char(2) NOT NULL,
    user_id     uuid NOT NULL,
    logged_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS region_move_log_region_idx ON umstore.region_move_log (region, seq);

CREATE TABLE IF NOT EXISTS umstore.region_placement (
    region      char(2) PRIMARY KEY CHECK (region ~ '^[A-Z]{2}$'),
    cluster     text NOT NULL CHECK (cluster ~ '^[a-z0-9-]{1,63}$'),
    -- Raised by every switch: a reader can tell a newer placement.
    epoch       bigint NOT NULL DEFAULT 1,
    placed_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS umstore.region_moves (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    region              char(2) NOT NULL CHECK (region ~ '^[A-Z]{2}$'),
    from_cluster        text NOT NULL,
    to_cluster          text NOT NULL,
    phase               text NOT NULL
                        CHECK (phase IN ('copying', 'catching_up', 'fenced', 'switched', 'done')),
    started_at          timestamptz NOT NULL DEFAULT now(),
    phase_at            timestamptz NOT NULL DEFAULT now(),
    fence_started_at    timestamptz,
    fence_ms            double precision,
    finished_at         timestamptz,
    rows_copied         bigint NOT NULL DEFAULT 0,
    users_caught_up     bigint NOT NULL DEFAULT 0,
    catch_up_rounds     integer NOT NULL DEFAULT 0,
    attempts            integer NOT NULL DEFAULT 1,
    CHECK (from_cluster <> to_cluster)
);
-- One unfinished move per region.
CREATE UNIQUE INDEX IF NOT EXISTS region_moves_unfinished_idx ON umstore.region_moves (region)
    WHERE finished_at IS NULL;

-- A catch-up copies a few users' rows of every moved table again: each needs
-- an index leading with (region, user_id), which processed_events (keyed by
-- event id) lacked.
CREATE INDEX IF NOT EXISTS processed_events_user_idx ON umstore.processed_events (region, user_id);

-- The lock key of a region: a class of its own (0x756d7276, 'umrv') and the
-- region's two letters.
CREATE OR REPLACE FUNCTION umstore.region_lock_key(p_region char(2)) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT ascii(substr(p_region, 1, 1)) * 256 + ascii(substr(p_region, 2, 1)) $$;

-- Called first by each write transaction of a store with several clusters.
-- VOLATILE plpgsql: the state is read with a snapshot taken after the lock is
-- held, so a state the mover committed while this waited is seen.
CREATE OR REPLACE FUNCTION umstore.region_write(p_region char(2), p_user_id uuid)
    RETURNS void LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    s text;
    p text;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(1970106998, umstore.region_lock_key(p_region));
    SELECT state, peer INTO s, p FROM umstore.region_state WHERE region = p_region;
    IF s IS NULL OR s = 'open' THEN
        RETURN;
    ELSIF s = 'copying' THEN
        INSERT INTO umstore.region_move_log (region, user_id) VALUES (p_region, p_user_id);
        RETURN;
    ELSIF s = 'fenced' THEN
        RAISE EXCEPTION 'region % is fenced for a moment while it moves to cluster %', p_region, p
            USING ERRCODE = 'UMF01',
                  HINT = 'retry shortly: the fence lasts while the last changes are copied';
    ELSIF s = 'moved' THEN
        RAISE EXCEPTION 'region % is no longer in this cluster: it moved to cluster %', p_region, p
            USING ERRCODE = 'UMM01',
                  HINT = 'read umstore.region_placement in the home cluster and write there';
    ELSE
        RAISE EXCEPTION 'region % is being copied into this cluster from cluster % and is not served here yet',
            p_region, p
            USING ERRCODE = 'UMM01',
                  HINT = 'read umstore.region_placement in the home cluster and write there';
    END IF;
END
$$;

-- The history stays append-only, except for the rows of a region a mover
-- deletes: those of a region that left this cluster, or of users a catch-up
-- copies in again. The mover names the region in umstore.moving_region (SET
-- LOCAL, which Citus passes on to the workers where the shards' triggers run);
-- only an administrator has DELETE on the table at all.
CREATE OR REPLACE FUNCTION umstore.reject_history_change() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE'
       AND coalesce(current_setting('umstore.moving_region', true), '') = OLD.region THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'user_metadata_history is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'record a new history row instead of changing an old one';
END
$$;

GRANT SELECT ON umstore.region_state, umstore.region_placement TO
    umstore_writer, umstore_ai, umstore_rules, umstore_json_generator,
    umstore_dashboard, umstore_analytics, umstore_admin;
GRANT INSERT ON umstore.region_move_log TO umstore_writer;
GRANT EXECUTE ON FUNCTION umstore.region_write(char, uuid), umstore.region_lock_key(char)
    TO umstore_writer, umstore_admin;
GRANT SELECT ON umstore.region_moves TO umstore_admin, umstore_analytics, umstore_dashboard;
GRANT ALL ON umstore.region_state, umstore.region_move_log, umstore.region_placement,
    umstore.region_moves TO umstore_admin;
-- The mover, as the administrator login, raises the moved tables' identity
-- sequences past the copied ids (erasure_audit's came after 0006's grant).
GRANT ALL ON ALL SEQUENCES IN SCHEMA umstore TO umstore_admin;
