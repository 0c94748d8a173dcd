-- Key management: store-wide key material (wrapped), key-rotation progress and
-- the erasure (crypto-shredding) audit trail.

-- Store-wide keys, wrapped by the KEK like the per-user data keys. Today: the
-- blind-index HMAC key, separate from every data key.
CREATE TABLE umstore.key_material (
    name                    text PRIMARY KEY CHECK (name IN ('blind_index')),
    wrapped_key             bytea NOT NULL,
    kek_name                text NOT NULL,
    kek_version             integer NOT NULL CHECK (kek_version >= 1),
    created_at              timestamptz NOT NULL DEFAULT now(),
    rewrapped_at            timestamptz
);

-- One row per rotation of a KEK: the version data keys are rewrapped to, and a
-- cursor (region, user_id) persisted with every batch, so a rotation that
-- crashed resumes where it stopped.
CREATE TABLE umstore.key_rotations (
    id                      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kek_name                text NOT NULL,
    target_version          integer NOT NULL CHECK (target_version >= 1),
    batch_size              integer NOT NULL CHECK (batch_size BETWEEN 1 AND 100000),
    cursor_region           char(2),
    cursor_user_id          uuid,
    rewrapped               bigint NOT NULL DEFAULT 0,
    started_at              timestamptz NOT NULL DEFAULT now(),
    finished_at             timestamptz,
    CHECK ((cursor_region IS NULL) = (cursor_user_id IS NULL))
);
CREATE UNIQUE INDEX key_rotations_one_unfinished_idx ON umstore.key_rotations (kek_name)
    WHERE finished_at IS NULL;

-- Who erased which user, when: no PII.
CREATE TABLE umstore.erasure_audit (
    id                      bigint GENERATED ALWAYS AS IDENTITY,
    region                  char(2) NOT NULL REFERENCES umstore.regions (region),
    user_id                 uuid NOT NULL,
    erased_by               text NOT NULL CHECK (erased_by <> ''),
    reason                  text,
    erased_at               timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (region, id)
);
CREATE INDEX erasure_audit_user_idx ON umstore.erasure_audit (region, user_id);

GRANT SELECT, INSERT, UPDATE ON umstore.key_material, umstore.key_rotations TO umstore_writer;
GRANT SELECT ON umstore.key_material TO
    umstore_ai, umstore_rules, umstore_json_generator, umstore_dashboard;
GRANT SELECT, INSERT ON umstore.erasure_audit TO umstore_writer;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA umstore TO umstore_writer;
GRANT ALL ON umstore.key_material, umstore.key_rotations, umstore.erasure_audit TO umstore_admin;
GRANT ALL ON ALL SEQUENCES IN SCHEMA umstore TO umstore_admin;

ALTER TABLE umstore.erasure_audit ENABLE ROW LEVEL SECURITY;
CREATE POLICY region_scope ON umstore.erasure_audit FOR ALL TO umstore_writer, umstore_admin
    USING (umstore.region_in_scope(region)) WITH CHECK (umstore.region_in_scope(region));
