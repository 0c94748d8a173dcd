-- Least-privilege grants per purpose, and row-level security scoping every
-- session to the regions it may see.
--
-- PII columns of user_metadata (ciphertext and blind index alike):
--   full_name_enc, date_of_birth_enc, district_enc, pincode_enc, phone_enc,
--   identity_token_enc, identity_token_bidx, annual_income_enc.
-- The analytics role is granted every other column and nothing else of PII:
-- no data keys, no history values.

GRANT SELECT ON umstore.regions, umstore.user_directory TO
    umstore_writer, umstore_ai, umstore_rules, umstore_json_generator,
    umstore_dashboard, umstore_analytics, umstore_admin;

-- writer: the data plane's ingest path
GRANT INSERT, UPDATE ON umstore.user_directory TO umstore_writer;
GRANT SELECT, INSERT, UPDATE ON umstore.user_metadata, umstore.user_data_keys TO umstore_writer;
GRANT SELECT, INSERT, UPDATE, DELETE ON umstore.user_derived_attributes, umstore.user_risk_scores,
    umstore.user_eligibility_cache, umstore.processed_events, umstore.outbox TO umstore_writer;
GRANT SELECT, INSERT ON umstore.user_metadata_history TO umstore_writer;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA umstore TO umstore_writer;

-- readers that may decrypt PII: they read the wrapped data keys too
GRANT SELECT ON umstore.user_metadata, umstore.user_derived_attributes, umstore.user_risk_scores,
    umstore.user_eligibility_cache, umstore.user_metadata_history, umstore.user_data_keys
    TO umstore_ai, umstore_rules, umstore_json_generator, umstore_dashboard;

-- analytics: no PII columns, no keys, no history values
GRANT SELECT (
    user_id, region, birth_year, gender, marital_status, area_type, social_category, disability,
    income_lakh, occupation, employment_type, land_holding_acres, has_bank_account, ration_card,
    household_size, dependents, children, senior_members, head_of_household,
    version, created_at, updated_at, erased_at
) ON umstore.user_metadata TO umstore_analytics;
GRANT SELECT ON umstore.user_derived_attributes, umstore.user_risk_scores,
    umstore.user_eligibility_cache TO umstore_analytics;
GRANT SELECT (id, user_id, region, change_type, changed_fields, version, changed_at)
    ON umstore.user_metadata_history TO umstore_analytics;

-- admin: everything in the schema (operators, support tooling)
GRANT ALL ON ALL TABLES IN SCHEMA umstore TO umstore_admin;
GRANT ALL ON ALL SEQUENCES IN SCHEMA umstore TO umstore_admin;

-- Region scope: a session that sets `umstore.regions` (comma-separated codes,
-- e.g. SET umstore.regions = 'KA,TN') sees and writes only those regions;
-- unset, empty or '*' means every region.
CREATE FUNCTION umstore.region_in_scope(r char(2)) RETURNS boolean
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$
        SELECT coalesce(nullif(current_setting('umstore.regions', true), ''), '*') = '*'
            OR r = ANY (string_to_array(replace(current_setting('umstore.regions', true), ' ', ''), ','))
    $$;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY[
        'user_directory', 'user_metadata', 'user_derived_attributes', 'user_risk_scores',
        'user_eligibility_cache', 'user_metadata_history', 'user_data_keys',
        'processed_events', 'outbox'
    ] LOOP
        EXECUTE format('ALTER TABLE umstore.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY region_scope ON umstore.%I FOR ALL TO umstore_writer, umstore_ai, '
            'umstore_rules, umstore_json_generator, umstore_dashboard, umstore_analytics, umstore_admin '
            'USING (umstore.region_in_scope(region)) WITH CHECK (umstore.region_in_scope(region))', t);
    END LOOP;
END
$$;
