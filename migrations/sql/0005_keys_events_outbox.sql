-- Per-user data keys (AES-256), stored only wrapped by a key-encryption key
-- (a Vault transit key, or the local key file in local runs). Crypto-shredding
-- sets wrapped_key to NULL and destroyed_at.
CREATE TABLE umstore.user_data_keys (
    user_id                 uuid NOT NULL,
    region                  char(2) NOT NULL REFERENCES umstore.regions (region),
    wrapped_key             bytea,
    kek_name                text NOT NULL,
    kek_version             integer NOT NULL CHECK (kek_version >= 1),
    created_at              timestamptz NOT NULL DEFAULT now(),
    rewrapped_at            timestamptz,
    destroyed_at            timestamptz,
    CHECK ((wrapped_key IS NULL) = (destroyed_at IS NOT NULL)),
    PRIMARY KEY (region, user_id)
);
CREATE INDEX user_data_keys_kek_version_idx ON umstore.user_data_keys (kek_name, kek_version)
    WHERE wrapped_key IS NOT NULL;

-- Ids of applied events: a redelivered event finds its id here and changes nothing.
CREATE TABLE umstore.processed_events (
    event_id                uuid NOT NULL,
    region                  char(2) NOT NULL REFERENCES umstore.regions (region),
    event_type              text NOT NULL,
    user_id                 uuid NOT NULL,
    processed_at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (region, event_id)
);
CREATE INDEX processed_events_processed_at_idx ON umstore.processed_events (processed_at);

-- Transactional outbox: events queued in the same transaction as the change
-- and published by the relay with msg_id as the JetStream de-duplication id.
CREATE TABLE umstore.outbox (
    id                      bigint GENERATED ALWAYS AS IDENTITY,
    region                  char(2) NOT NULL REFERENCES umstore.regions (region),
    user_id                 uuid,
    subject                 text NOT NULL,
    msg_id                  text NOT NULL,
    payload                 jsonb NOT NULL,
    created_at              timestamptz NOT NULL DEFAULT now(),
    published_at            timestamptz,
    PRIMARY KEY (region, id),
    UNIQUE (region, msg_id)
);
CREATE INDEX outbox_unpublished_idx ON umstore.outbox (created_at) WHERE published_at IS NULL;
