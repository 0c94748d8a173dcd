//! SQL of crypto-shredding besides the key itself (see
//! [`super::keys::DESTROY_USER_KEY`]): finding the user's region, marking the
//! user erased, the `erased` history row, the audit row and the `USER_ERASED`
//! event. Every value
//! travels as a parameter.

/// The region of a user: `$1` user. Column: region (text).
pub const SELECT_USER_REGION: &str =
    "SELECT region::text FROM umstore.user_directory WHERE user_id = $1";

/// Marks a user erased (their PII can no longer be decrypted): `$1` region,
/// `$2` user. Returns the new version (int8) and the time (timestamptz).
pub const MARK_USER_ERASED: &str = "UPDATE umstore.user_metadata
     SET erased_at = now(), updated_at = now(), version = version + 1
     WHERE region = $1 AND user_id = $2
     RETURNING version, erased_at";

/// Queues the `USER_ERASED` event (docs/events.md) in the erasure's
/// transaction, so every data-plane process drops the user from its read
/// cache: `$1` region, `$2` user, `$3` subject, `$4` message id, `$5` payload.
pub const QUEUE_USER_ERASED: &str =
    "INSERT INTO umstore.outbox (region, user_id, subject, msg_id, payload)
     VALUES ($1, $2, $3, $4, $5)";

/// Appends the `erased` history row (no values): `$1` region, `$2` user, `$3`
/// who asked.
pub const INSERT_ERASED_HISTORY: &str = "INSERT INTO umstore.user_metadata_history
         (user_id, region, change_type, changed_fields, changed_by, version)
     SELECT user_id, region, 'erased', '{}', $3, version
     FROM umstore.user_metadata WHERE region = $1 AND user_id = $2";

/// The audit row of an erasure (who, when, why; no PII): `$1` region, `$2`
/// user, `$3` who asked, `$4` why (may be NULL).
pub const INSERT_ERASURE_AUDIT: &str =
    "INSERT INTO umstore.erasure_audit (region, user_id, erased_by, reason) VALUES ($1, $2, $3, $4)";
