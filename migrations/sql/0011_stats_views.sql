-- Materialized aggregates for GET /api/v1/user-metadata/stats (docs/api.md,
-- "Stats"; docs/data-model.md, "Stats views").
--
-- umstore.stats_groups_mv holds one row per (region and every stats
-- dimension) with mergeable partials: the user count and, per averaged
-- measure, how many users have it and its SUM (never an average), so rows can
-- be summed into any coarser grouping, and partials from several clusters
-- summed before the average is computed. Small groups are kept here on
-- purpose: suppression applies to merged totals, in the data plane. Nothing
-- here is PII (the columns are the non-PII ones analytics reads anyway).
--
-- Citus: a materialized view over distributed tables is a local table on the
-- coordinator (relkind 'm', which the distribute step never lists), and
-- stats_refreshes has no region column, so it stays a local table too.

CREATE MATERIALIZED VIEW IF NOT EXISTS umstore.stats_groups_mv AS
    SELECT m.region,
           m.gender,
           m.area_type,
           m.social_category,
           d.age_group,
           d.income_bracket,
           d.life_stage,
           d.employment_category,
           d.bpl_status,
           count(*)::int8                                  AS users,
           count(m.income_lakh)::int8                      AS income_n,
           coalesce(sum(m.income_lakh), 0)::int8           AS income_sum,
           count(m.household_size)::int8                   AS household_n,
           coalesce(sum(m.household_size), 0)::int8        AS household_sum,
           count(r.overall_risk)::int8                     AS risk_n,
           -- numeric(3,2) in hundredths: an exact integer sum.
           coalesce(sum(r.overall_risk * 100), 0)::int8    AS risk_centi_sum
    FROM umstore.user_metadata m
    LEFT JOIN umstore.user_derived_attributes d
      ON d.region = m.region AND d.user_id = m.user_id
    LEFT JOIN umstore.user_risk_scores r
      ON r.region = m.region AND r.user_id = m.user_id
    WHERE m.erased_at IS NULL
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9
    WITH NO DATA;

-- REFRESH ... CONCURRENTLY needs a unique index over plain columns; NULL is a
-- group value like any other (users without derived attributes yet).
CREATE UNIQUE INDEX IF NOT EXISTS stats_groups_mv_key ON umstore.stats_groups_mv (
    region, gender, area_type, social_category, age_group, income_bracket, life_stage,
    employment_category, bpl_status
) NULLS NOT DISTINCT;

-- What readers see: the partials of the regions their session may see (the
-- same region scope as the tables' row-level security, which a materialized
-- view does not have). The scope is evaluated for the 36 regions once per
-- query (a hashed subplan), not for every row of the view.
CREATE OR REPLACE VIEW umstore.stats_groups WITH (security_barrier) AS
    SELECT * FROM umstore.stats_groups_mv
    WHERE region IN (SELECT r.region FROM umstore.regions r WHERE umstore.region_in_scope(r.region));

-- One row per view: when its data was last read from the tables (the start of
-- the refresh, so the age is an upper bound), how long it took, its rows.
CREATE TABLE IF NOT EXISTS umstore.stats_refreshes (
    view_name    text PRIMARY KEY,
    refreshed_at timestamptz NOT NULL,
    duration_ms  bigint NOT NULL,
    groups       bigint NOT NULL,
    refreshed_by text NOT NULL
);

-- Refreshes every stats view and records it. REFRESH needs the view's owner,
-- so this runs as its owner (the migrating role) for whoever may execute it:
-- the writer (the data plane's scheduler, the CronJob) and administrators
-- (after a bulk load). One refresh at a time per store, under a transaction
-- advisory lock (it works through PgBouncer's transaction pooling): with
-- `wait` the caller waits for a running refresh and then refreshes (after a
-- bulk load, a refresh that began before the load committed does not show
-- it); without, it returns refreshed = false at once (a scheduler on another
-- pod is at it).
CREATE OR REPLACE FUNCTION umstore.refresh_stats_views(wait boolean DEFAULT true)
    RETURNS TABLE (view_name text, refreshed boolean, groups bigint, duration_ms bigint,
                   refreshed_at timestamptz)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    started timestamptz;
    took bigint;
    n bigint;
BEGIN
    -- 0x756d7374617473: 'umstats'
    IF wait THEN
        PERFORM pg_advisory_xact_lock(33052914916357235);
    ELSIF NOT pg_try_advisory_xact_lock(33052914916357235) THEN
        RETURN QUERY SELECT 'stats_groups'::text, false, NULL::bigint, NULL::bigint,
                            NULL::timestamptz;
        RETURN;
    END IF;
    -- Taken before the REFRESH reads the tables: its snapshot is newer.
    started := clock_timestamp();
    IF (SELECT c.relispopulated FROM pg_class c WHERE c.oid = 'umstore.stats_groups_mv'::regclass) THEN
        REFRESH MATERIALIZED VIEW CONCURRENTLY umstore.stats_groups_mv;
    ELSE
        -- The first fill cannot be concurrent (nothing to diff against).
        REFRESH MATERIALIZED VIEW umstore.stats_groups_mv;
    END IF;
    SELECT count(*) INTO n FROM umstore.stats_groups_mv;
    took := (extract(epoch FROM clock_timestamp() - started) * 1000)::bigint;
    INSERT INTO umstore.stats_refreshes (view_name, refreshed_at, duration_ms, groups, refreshed_by)
        VALUES ('stats_groups', started, took, n, session_user)
        ON CONFLICT (view_name) DO UPDATE
        SET refreshed_at = EXCLUDED.refreshed_at, duration_ms = EXCLUDED.duration_ms,
            groups = EXCLUDED.groups, refreshed_by = EXCLUDED.refreshed_by;
    RETURN QUERY SELECT 'stats_groups'::text, true, n, took, started;
END
$$;

REVOKE ALL ON FUNCTION umstore.refresh_stats_views(boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION umstore.refresh_stats_views(boolean) TO umstore_writer, umstore_admin;

-- The stats readers (analytics, dashboard, admin) read the scoped view; only
-- administrators read the materialized view itself. Every purpose may read
-- the refresh log (the data plane's /metrics reads it as its own login).
GRANT SELECT ON umstore.stats_groups TO umstore_analytics, umstore_dashboard, umstore_admin;
GRANT SELECT ON umstore.stats_groups_mv TO umstore_admin;
GRANT SELECT ON umstore.stats_refreshes TO umstore_writer, umstore_ai, umstore_rules,
    umstore_json_generator, umstore_dashboard, umstore_analytics, umstore_admin;
