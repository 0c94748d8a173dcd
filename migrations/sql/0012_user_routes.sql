-- The global routing index of a store with several clusters (tier 4;
-- docs/data-model.md, "Several clusters: where a user is found").
--
-- umstore.user_routes maps a user to their REGION, never to a cluster: which
-- cluster holds a region comes from the data plane's cluster layout
-- (UMSTORE_CLUSTERS), so moving a region between clusters rewrites no route.
-- The table exists in every cluster (one schema everywhere) and is used only in
-- the home cluster (the layout's first). The writer upserts a route before the
-- cluster transaction of an event that may create a user; the reading
-- purposes look routes up, and the data plane backfills a missing one (a user
-- written before the store had clusters) once it has found the user.
--
-- On a distributed store the distribute step spreads it by user_id, next to
-- user_directory (the migrations crate, its distribute functions).

CREATE TABLE IF NOT EXISTS umstore.user_routes (
    user_id     uuid PRIMARY KEY,
    region      char(2) NOT NULL REFERENCES umstore.regions (region),
    created_at  timestamptz NOT NULL DEFAULT now()
);

GRANT SELECT ON umstore.user_routes TO
    umstore_writer, umstore_ai, umstore_rules, umstore_json_generator,
    umstore_dashboard, umstore_analytics, umstore_admin;
GRANT INSERT, UPDATE ON umstore.user_routes TO umstore_writer;
-- A reader that found a user by asking every cluster writes the route back
-- (the self-healing backfill): insert only, never update.
GRANT INSERT ON umstore.user_routes TO
    umstore_ai, umstore_rules, umstore_json_generator, umstore_dashboard, umstore_admin;
GRANT ALL ON umstore.user_routes TO umstore_admin;

-- The same region scope as every other per-user table (0006).
ALTER TABLE umstore.user_routes ENABLE ROW LEVEL SECURITY;
CREATE POLICY region_scope ON umstore.user_routes FOR ALL TO umstore_writer, umstore_ai,
    umstore_rules, umstore_json_generator, umstore_dashboard, umstore_analytics, umstore_admin
    USING (umstore.region_in_scope(region)) WITH CHECK (umstore.region_in_scope(region));
