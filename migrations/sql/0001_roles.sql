-- Group roles, one per purpose. They cannot log in: the operator creates login
-- users and makes each a member of its purpose's role. Roles are cluster-wide,
-- so creation tolerates a concurrent runner in another database.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY[
        'umstore_writer', 'umstore_ai', 'umstore_rules', 'umstore_json_generator',
        'umstore_dashboard', 'umstore_analytics', 'umstore_admin'
    ] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL; -- created meanwhile by a runner in another database
            END;
        END IF;
    END LOOP;
END
$$;

CREATE SCHEMA IF NOT EXISTS umstore;
REVOKE ALL ON SCHEMA umstore FROM PUBLIC;
GRANT USAGE ON SCHEMA umstore TO umstore_writer, umstore_ai, umstore_rules,
    umstore_json_generator, umstore_dashboard, umstore_analytics, umstore_admin;
