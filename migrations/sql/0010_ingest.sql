-- The write path (data-plane/src/ingest): what applying an event needs.

-- When the source says the user's current values were set: an event that
-- occurred earlier is stale and never overwrites them.
ALTER TABLE umstore.user_metadata ADD COLUMN last_event_at timestamptz;

-- What became of each processed event, so a redelivery of a stale event is
-- reported as the duplicate it is, and an audit can tell the two apart.
ALTER TABLE umstore.processed_events
    ADD COLUMN outcome text NOT NULL DEFAULT 'applied' CHECK (outcome IN ('applied', 'stale'));

-- The outbox relay sleeps on LISTEN umstore_outbox; a commit that queued rows
-- wakes it (one notification per statement, delivered at commit).
CREATE FUNCTION umstore.notify_outbox() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('umstore_outbox', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_notify AFTER INSERT ON umstore.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION umstore.notify_outbox();
