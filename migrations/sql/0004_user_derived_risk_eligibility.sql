-- Per-user tables are LIST-partitioned by region like user_metadata, and each
-- partition's foreign key points at the same region's user_metadata partition:
-- a region's rows live together (residency, moving or detaching a region), and
-- the foreign-key check reads one plain table instead of routing through the
-- partitioned parent (about ten times cheaper per row on bulk loads). Like
-- user_metadata they need no key to umstore.regions: the partition bounds
-- admit exactly the 36 regions.

-- Attributes derived from user_metadata on every metadata write.
CREATE TABLE umstore.user_derived_attributes (
    user_id                 uuid NOT NULL,
    region                  char(2) NOT NULL,
    age_group               text NOT NULL CHECK (age_group IN ('child', 'youth', 'adult', 'senior')),
    income_bracket          text NOT NULL CHECK (income_bracket IN ('BPL', 'LIG', 'MIG', 'HIG')),
    life_stage              text NOT NULL CHECK (life_stage IN (
                                'childhood', 'student', 'early_career', 'family_building',
                                'established', 'pre_retirement', 'retired')),
    employment_category     text NOT NULL CHECK (employment_category IN (
                                'formal', 'informal', 'agricultural', 'not_in_labour_force', 'unemployed')),
    bpl_status              boolean NOT NULL,
    tax_bracket             text NOT NULL CHECK (tax_bracket IN ('nil', '5', '10', '15', '20', '25', '30')),
    is_senior_citizen       boolean NOT NULL,
    is_farmer               boolean NOT NULL,
    per_capita_income_lakh  numeric(8, 2) CHECK (per_capita_income_lakh >= 0),
    computed_at             timestamptz NOT NULL DEFAULT now(),
    source_version          bigint NOT NULL,
    PRIMARY KEY (region, user_id)
) PARTITION BY LIST (region);
CREATE INDEX user_derived_life_stage_idx ON umstore.user_derived_attributes (region, life_stage);
CREATE INDEX user_derived_income_bracket_idx ON umstore.user_derived_attributes (region, income_bracket);

-- Risk scores from the AI core, each in 0.00 .. 1.00.
CREATE TABLE umstore.user_risk_scores (
    user_id                 uuid NOT NULL,
    region                  char(2) NOT NULL,
    financial_risk          numeric(3, 2) NOT NULL CHECK (financial_risk BETWEEN 0 AND 1),
    deadline_risk           numeric(3, 2) NOT NULL CHECK (deadline_risk BETWEEN 0 AND 1),
    benefit_loss_risk       numeric(3, 2) NOT NULL CHECK (benefit_loss_risk BETWEEN 0 AND 1),
    overall_risk            numeric(3, 2) NOT NULL CHECK (overall_risk BETWEEN 0 AND 1),
    model_version           text NOT NULL CHECK (model_version <> ''),
    computed_at             timestamptz NOT NULL,
    PRIMARY KEY (region, user_id)
) PARTITION BY LIST (region);
CREATE INDEX user_risk_overall_idx ON umstore.user_risk_scores (region, overall_risk DESC);

-- Scheme eligibility computed by the rules engine, valid until expires_at.
CREATE TABLE umstore.user_eligibility_cache (
    user_id                 uuid NOT NULL,
    region                  char(2) NOT NULL,
    scheme_id               text NOT NULL CHECK (scheme_id ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$'),
    eligible                boolean NOT NULL,
    score                   numeric(3, 2) CHECK (score BETWEEN 0 AND 1),
    reasons                 jsonb NOT NULL DEFAULT '[]'::jsonb CHECK (jsonb_typeof(reasons) = 'array'),
    rules_version           text,
    computed_at             timestamptz NOT NULL,
    expires_at              timestamptz NOT NULL,
    CHECK (expires_at > computed_at),
    PRIMARY KEY (region, user_id, scheme_id)
) PARTITION BY LIST (region);
CREATE INDEX user_eligibility_scheme_idx ON umstore.user_eligibility_cache (region, scheme_id, eligible);
CREATE INDEX user_eligibility_expires_idx ON umstore.user_eligibility_cache (expires_at);

-- One partition per region for each, referencing that region's user_metadata
-- partition (ON DELETE CASCADE: an administrator's delete of a user removes
-- what was derived from them).
DO $$
DECLARE
    r text;
    t text;
BEGIN
    FOR r IN SELECT region FROM umstore.regions ORDER BY region LOOP
        FOREACH t IN ARRAY ARRAY['user_derived_attributes', 'user_risk_scores', 'user_eligibility_cache'] LOOP
            EXECUTE format(
                'CREATE TABLE umstore.%I PARTITION OF umstore.%I FOR VALUES IN (%L)',
                t || '_' || lower(r), t, r);
            EXECUTE format(
                'ALTER TABLE umstore.%I ADD FOREIGN KEY (region, user_id) '
                'REFERENCES umstore.%I (region, user_id) ON DELETE CASCADE',
                t || '_' || lower(r), 'user_metadata_' || lower(r));
        END LOOP;
    END LOOP;
END
$$;

-- Append-only change history: enough to rebuild a user's state at any time.
-- Values of PII columns are recorded as their ciphertext, so destroying a
-- user's data key makes their history unreadable too.
CREATE TABLE umstore.user_metadata_history (
    id                      bigint GENERATED ALWAYS AS IDENTITY,
    user_id                 uuid NOT NULL,
    region                  char(2) NOT NULL REFERENCES umstore.regions (region),
    change_type             text NOT NULL CHECK (change_type IN ('created', 'updated', 'erased')),
    changed_fields          text[] NOT NULL,
    old_values              jsonb NOT NULL DEFAULT '{}'::jsonb,
    new_values              jsonb NOT NULL DEFAULT '{}'::jsonb,
    changed_by              text NOT NULL,
    event_id                uuid,
    version                 bigint NOT NULL,
    changed_at              timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (region, id)
);
CREATE INDEX user_history_user_time_idx ON umstore.user_metadata_history (region, user_id, changed_at);

-- The history is written constantly and never updated: vacuum and analyze it
-- early (insert-driven autovacuum keeps the visibility map fresh for
-- index-only scans).
ALTER TABLE umstore.user_metadata_history SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_insert_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.005,
    autovacuum_vacuum_cost_limit = 2000
);

CREATE FUNCTION umstore.reject_history_change() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'user_metadata_history is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'record a new history row instead of changing an old one';
END
$$;
CREATE TRIGGER user_metadata_history_append_only
    BEFORE UPDATE OR DELETE ON umstore.user_metadata_history
    FOR EACH ROW EXECUTE FUNCTION umstore.reject_history_change();
