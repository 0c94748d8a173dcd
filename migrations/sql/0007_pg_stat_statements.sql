-- Query statistics where the server ships them. Collecting also needs
-- shared_preload_libraries = 'pg_stat_statements' (the operator's rendered
-- postgresql.conf and the embedded mode set it); without the privilege to
-- create the extension the migration notes it and goes on.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_stat_statements') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS pg_stat_statements SCHEMA public;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'pg_stat_statements not created: the migrating role may not create extensions';
        END;
    ELSE
        RAISE NOTICE 'pg_stat_statements is not available on this server';
    END IF;
END
$$;
