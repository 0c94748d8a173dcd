-- Current metadata per user, LIST-partitioned by region, one partition per
-- region and no default partition: a row for an unknown region is refused with
-- an error naming it. Columns ending in `_enc` hold AES-256-GCM ciphertext bound
-- to (user, region, column); plaintext PII is never stored.
CREATE TABLE umstore.user_metadata (
    user_id                 uuid NOT NULL,
    region                  char(2) NOT NULL,
    -- primary attributes
    full_name_enc           bytea,
    date_of_birth_enc       bytea,
    birth_year              smallint CHECK (birth_year BETWEEN 1900 AND 2100),
    gender                  text CHECK (gender IN ('female', 'male', 'transgender', 'undisclosed')),
    marital_status          text CHECK (marital_status IN ('single', 'married', 'widowed', 'divorced', 'separated')),
    district_enc            bytea,
    pincode_enc             bytea,
    area_type               text CHECK (area_type IN ('rural', 'urban')),
    social_category         text CHECK (social_category IN ('general', 'obc', 'sc', 'st')),
    disability              boolean NOT NULL DEFAULT false,
    phone_enc               bytea,
    identity_token_enc      bytea,
    -- keyed HMAC of the identity token, for equality lookups without decrypting
    identity_token_bidx     bytea,
    -- economic attributes
    annual_income_enc       bytea,
    -- annual income rounded down to whole lakhs (100,000 INR): coarse, indexable
    income_lakh             smallint CHECK (income_lakh >= 0),
    occupation              text,
    employment_type         text CHECK (employment_type IN (
                                'salaried', 'self_employed', 'agriculture', 'daily_wage',
                                'unemployed', 'student', 'retired', 'homemaker')),
    land_holding_acres      numeric(8, 2) CHECK (land_holding_acres >= 0),
    has_bank_account        boolean,
    ration_card             text CHECK (ration_card IN ('none', 'apl', 'bpl', 'aay')),
    -- family attributes
    household_size          smallint CHECK (household_size BETWEEN 1 AND 50),
    dependents              smallint CHECK (dependents BETWEEN 0 AND 50),
    children                smallint CHECK (children BETWEEN 0 AND 30),
    senior_members          smallint CHECK (senior_members BETWEEN 0 AND 30),
    head_of_household       boolean,
    -- bookkeeping
    version                 bigint NOT NULL DEFAULT 1 CHECK (version >= 1),
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    erased_at               timestamptz,
    -- No foreign key to umstore.regions: the partition bounds admit exactly
    -- the 36 regions (and Citus cannot validate such a key on partitions).
    PRIMARY KEY (region, user_id)
) PARTITION BY LIST (region);

DO $$
DECLARE
    r text;
BEGIN
    FOR r IN SELECT region FROM umstore.regions ORDER BY region LOOP
        EXECUTE format(
            'CREATE TABLE umstore.%I PARTITION OF umstore.user_metadata FOR VALUES IN (%L)',
            'user_metadata_' || lower(r), r);
    END LOOP;
END
$$;

CREATE INDEX user_metadata_region_birth_year_idx ON umstore.user_metadata (region, birth_year);
CREATE INDEX user_metadata_income_idx ON umstore.user_metadata (income_lakh);
CREATE INDEX user_metadata_identity_bidx_idx ON umstore.user_metadata (identity_token_bidx)
    WHERE identity_token_bidx IS NOT NULL;
-- Deliberately no index on updated_at or version: every metadata write
-- changes them, and an index on either would make every update non-HOT.
