-- Every purpose role may read which migrations are applied: the data plane
-- checks the schema version before it seeds, manages keys or serves, and it
-- connects as a purpose's login, not as the owner of this table (which the
-- runner creates before the first migration). Without this, a store migrated
-- by `umstore-data-plane migrate up` refused the writer login with
-- "permission denied for table schema_migrations".
GRANT SELECT ON umstore.schema_migrations TO umstore_writer, umstore_ai, umstore_rules,
    umstore_json_generator, umstore_dashboard, umstore_analytics, umstore_admin;
