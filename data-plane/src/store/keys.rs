//! SQL of the key tables: the users' wrapped data keys (`user_data_keys`), the
//! store-wide wrapped keys (`key_material`) and the progress of each KEK
//! rotation (`key_rotations`). Every value travels as a parameter; the
//! keyring and the rotation in `crypto/` run these statements.

/// A user's wrapped data key: `$1` region, `$2` user. Columns: wrapped key
/// (NULL once destroyed), KEK name, KEK version, destroyed at (text).
pub const SELECT_USER_KEY: &str = "SELECT wrapped_key, kek_name, kek_version, destroyed_at::text
     FROM umstore.user_data_keys WHERE region = $1 AND user_id = $2";

/// Stores a new user's wrapped data key unless one exists: `$1` user, `$2`
/// region, `$3` wrapped key, `$4` KEK name, `$5` KEK version.
pub const INSERT_USER_KEY: &str =
    "INSERT INTO umstore.user_data_keys (user_id, region, wrapped_key, kek_name, kek_version)
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (region, user_id) DO NOTHING";

/// Crypto-shredding: destroys a user's data key unless it is gone already:
/// `$1` region, `$2` user. Updates one row or none.
pub const DESTROY_USER_KEY: &str =
    "UPDATE umstore.user_data_keys SET wrapped_key = NULL, destroyed_at = now()
     WHERE region = $1 AND user_id = $2 AND wrapped_key IS NOT NULL";

/// How many data keys each KEK version wraps, and how many were destroyed,
/// per KEK name and version.
pub const KEY_VERSION_COUNTS: &str =
    "SELECT kek_name, kek_version, count(*) FILTER (WHERE wrapped_key IS NOT NULL),
            count(*) FILTER (WHERE wrapped_key IS NULL)
     FROM umstore.user_data_keys GROUP BY 1, 2 ORDER BY 1, 2";

/// The wrapped blind-index key. Columns: wrapped key, KEK name, KEK version.
pub const SELECT_BLIND_INDEX: &str =
    "SELECT wrapped_key, kek_name, kek_version FROM umstore.key_material WHERE name = 'blind_index'";

/// Stores the wrapped blind-index key unless another process stored one
/// first: `$1` wrapped key, `$2` KEK name, `$3` KEK version.
pub const INSERT_BLIND_INDEX: &str =
    "INSERT INTO umstore.key_material (name, wrapped_key, kek_name, kek_version)
     VALUES ('blind_index', $1, $2, $3) ON CONFLICT (name) DO NOTHING";

/// Whether row-level security lets this session see every region (the same
/// function the policies call), and its `umstore.regions` setting.
pub const SELECT_REGION_SCOPE: &str =
    "SELECT bool_and(umstore.region_in_scope(region)), current_setting('umstore.regions', true)
     FROM umstore.regions";

/// The unfinished rotation of a KEK, if any: `$1` KEK name. Columns: id,
/// target version, cursor region (text), cursor user, keys rewrapped so far.
pub const SELECT_UNFINISHED_ROTATION: &str =
    "SELECT id, target_version, cursor_region::text, cursor_user_id, rewrapped
     FROM umstore.key_rotations WHERE kek_name = $1 AND finished_at IS NULL";

/// Records a rotation before the transit key is rotated: `$1` KEK name, `$2`
/// the version rotating will create, `$3` batch size. Returns the id. At most
/// one rotation per KEK is unfinished (a unique index refuses a second).
pub const INSERT_ROTATION: &str =
    "INSERT INTO umstore.key_rotations (kek_name, target_version, batch_size)
     VALUES ($1, $2, $3) RETURNING id";

/// Moves a rotation's target to the version Vault actually holds (when the key
/// was rotated outside this rotation too): `$1` id, `$2` version.
pub const UPDATE_ROTATION_TARGET: &str =
    "UPDATE umstore.key_rotations SET target_version = $2 WHERE id = $1";

/// The first batch of data keys wrapped under an older version than `$2`, in
/// key order: `$1` KEK name, `$3` batch size. Columns: region, user, wrapped
/// key, KEK name, KEK version.
pub const SELECT_KEYS_TO_REWRAP: &str =
    "SELECT region::text, user_id, wrapped_key, kek_name, kek_version FROM umstore.user_data_keys
     WHERE kek_name = $1 AND kek_version < $2 AND wrapped_key IS NOT NULL
     ORDER BY region, user_id LIMIT $3";

/// The next batch after the cursor (`$3` region, `$4` user), as
/// [`SELECT_KEYS_TO_REWRAP`]; `$5` batch size. A statement of its own: written as
/// one query with `$3 IS NULL OR ...`, the generic plan PostgreSQL switches to
/// after five runs cannot use the cursor as a range of the primary key and scans
/// every key already rewrapped again on each batch (quadratic: a million keys took
/// longer than 19 minutes).
pub const SELECT_KEYS_TO_REWRAP_AFTER: &str =
    "SELECT region::text, user_id, wrapped_key, kek_name, kek_version FROM umstore.user_data_keys
     WHERE kek_name = $1 AND kek_version < $2 AND wrapped_key IS NOT NULL
       AND (region, user_id) > ($3::text::char(2), $4::uuid)
     ORDER BY region, user_id LIMIT $5";

/// Stores a batch of rewrapped keys, compare-and-set on the old wrapped bytes
/// (a key destroyed meanwhile stays destroyed): `$1` regions, `$2` users, `$3`
/// old wrapped keys, `$4` new wrapped keys, `$5` new versions (arrays of equal
/// length). Returns the number of keys stored.
pub const UPDATE_REWRAPPED_KEYS: &str = "UPDATE umstore.user_data_keys k
     SET wrapped_key = u.new_key, kek_version = u.new_version, rewrapped_at = now()
     FROM unnest($1::text[], $2::uuid[], $3::bytea[], $4::bytea[], $5::int[])
          AS u(region, user_id, old_key, new_key, new_version)
     WHERE k.region = u.region::char(2) AND k.user_id = u.user_id AND k.wrapped_key = u.old_key";

/// Saves a rotation's cursor and adds to its count, in the batch's
/// transaction: `$1` id, `$2` cursor region (text), `$3` cursor user, `$4`
/// keys stored by the batch.
pub const SAVE_ROTATION_CURSOR: &str =
    "UPDATE umstore.key_rotations SET cursor_region = $2::text::char(2), cursor_user_id = $3,
         rewrapped = rewrapped + $4 WHERE id = $1";

/// Marks a rotation finished: `$1` id.
pub const FINISH_ROTATION: &str =
    "UPDATE umstore.key_rotations SET finished_at = now() WHERE id = $1";

/// The oldest version of KEK `$1` that a stored data key or store key is still
/// wrapped under; NULL when none is.
pub const SELECT_OLDEST_VERSION_IN_USE: &str = "SELECT least(
         (SELECT min(kek_version) FROM umstore.user_data_keys
          WHERE kek_name = $1 AND wrapped_key IS NOT NULL),
         (SELECT min(kek_version) FROM umstore.key_material WHERE kek_name = $1))";

/// Store-wide keys wrapped under an older version than `$2`: `$1` KEK name.
/// Columns: name, wrapped key, KEK name, KEK version.
pub const SELECT_STORE_KEYS_TO_REWRAP: &str =
    "SELECT name, wrapped_key, kek_name, kek_version FROM umstore.key_material
     WHERE kek_name = $1 AND kek_version < $2";

/// Stores a rewrapped store-wide key, compare-and-set on the old bytes: `$1`
/// name, `$2` new wrapped key, `$3` new version, `$4` old wrapped key.
pub const UPDATE_REWRAPPED_STORE_KEY: &str =
    "UPDATE umstore.key_material SET wrapped_key = $2, kek_version = $3, rewrapped_at = now()
     WHERE name = $1 AND wrapped_key = $4";

/// The latest rotation's progress (target version, keys rewrapped, still running),
/// for the gauges every data plane exports.
pub const SELECT_LATEST_ROTATION: &str = "SELECT target_version, rewrapped, finished_at IS NULL \
     FROM umstore.key_rotations ORDER BY id DESC LIMIT 1";
