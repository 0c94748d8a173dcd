-- The 36 regions (states and union territories): the shard key and the unit of
-- data residency. A reference table under Citus.
CREATE TABLE umstore.regions (
    region      char(2) PRIMARY KEY CHECK (region ~ '^[A-Z]{2}$'),
    name        text NOT NULL UNIQUE,
    kind        text NOT NULL CHECK (kind IN ('state', 'union_territory'))
);

INSERT INTO umstore.regions (region, name, kind) VALUES
    ('AN', 'Andaman and Nicobar Islands', 'union_territory'),
    ('AP', 'Andhra Pradesh', 'state'),
    ('AR', 'Arunachal Pradesh', 'state'),
    ('AS', 'Assam', 'state'),
    ('BR', 'Bihar', 'state'),
    ('CG', 'Chhattisgarh', 'state'),
    ('CH', 'Chandigarh', 'union_territory'),
    ('DD', 'Dadra and Nagar Haveli and Daman and Diu', 'union_territory'),
    ('DL', 'Delhi', 'union_territory'),
    ('GA', 'Goa', 'state'),
    ('GJ', 'Gujarat', 'state'),
    ('HP', 'Himachal Pradesh', 'state'),
    ('HR', 'Haryana', 'state'),
    ('JH', 'Jharkhand', 'state'),
    ('JK', 'Jammu and Kashmir', 'union_territory'),
    ('KA', 'Karnataka', 'state'),
    ('KL', 'Kerala', 'state'),
    ('LA', 'Ladakh', 'union_territory'),
    ('LD', 'Lakshadweep', 'union_territory'),
    ('MH', 'Maharashtra', 'state'),
    ('ML', 'Meghalaya', 'state'),
    ('MN', 'Manipur', 'state'),
    ('MP', 'Madhya Pradesh', 'state'),
    ('MZ', 'Mizoram', 'state'),
    ('NL', 'Nagaland', 'state'),
    ('OD', 'Odisha', 'state'),
    ('PB', 'Punjab', 'state'),
    ('PY', 'Puducherry', 'union_territory'),
    ('RJ', 'Rajasthan', 'state'),
    ('SK', 'Sikkim', 'state'),
    ('TN', 'Tamil Nadu', 'state'),
    ('TR', 'Tripura', 'state'),
    ('TS', 'Telangana', 'state'),
    ('UK', 'Uttarakhand', 'state'),
    ('UP', 'Uttar Pradesh', 'state'),
    ('WB', 'West Bengal', 'state');

-- The user directory: which region holds a user. Looking a user up by user_id
-- alone reads this one row (primary-key index), then goes to exactly one
-- region's partition. Under Citus it is distributed by user_id.
CREATE TABLE umstore.user_directory (
    user_id     uuid PRIMARY KEY,
    region      char(2) NOT NULL REFERENCES umstore.regions (region),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The region of a user, or NULL for an unknown user. STABLE and not inlinable,
-- so `WHERE region = umstore.user_region($1) AND user_id = $1` is pruned to one
-- partition when the executor starts.
CREATE FUNCTION umstore.user_region(p_user_id uuid) RETURNS char(2)
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT d.region FROM umstore.user_directory d WHERE d.user_id = p_user_id $$;
