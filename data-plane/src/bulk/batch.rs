//! The flat batches every engine reads (what they return: `output.rs`).
//!
//! A batch is a key table plus, per field, the index of its key, its label
//! (user and column, for failure reports), its associated data and its bytes.
//! AAD and bytes are each one contiguous buffer with `u32` offsets (`n + 1`
//! of them, from 0), the shape a GPU engine copies to the device in one
//! transfer per buffer. Offsets are `u32`, so a batch holds at most
//! [`MAX_BATCH_BYTES`] of data including the sealed overhead; bulk callers
//! send batches of about a million fields, far below it.

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::OsRng;
use uuid::Uuid;
use zeroize::Zeroize;

use super::BulkError;
use crate::crypto::{DataKey, FieldAad};

/// A field's 96-bit AES-GCM nonce.
pub type FieldNonce = [u8; NONCE_LEN];

pub(crate) const NONCE_LEN: usize = 12;
pub(crate) const TAG_LEN: usize = 16;
pub(crate) const HEADER_LEN: usize = 1 + NONCE_LEN;
/// Bytes a sealed field adds to its plaintext: format byte, nonce and tag.
pub const SEAL_OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Most bytes of data (plaintext plus [`SEAL_OVERHEAD`] per field, or sealed
/// fields), and separately of AAD, one batch holds: offsets are `u32`.
pub const MAX_BATCH_BYTES: u64 = u32::MAX as u64;

/// Draws `count` nonces from the OS RNG in one call, for production seals.
pub fn random_nonces(count: usize) -> Result<Vec<FieldNonce>, BulkError> {
    let mut nonces = vec![[0u8; NONCE_LEN]; count];
    OsRng
        .try_fill_bytes(nonces.as_flattened_mut())
        .map_err(|e| BulkError::Rng {
            count,
            detail: e.to_string(),
        })?;
    Ok(nonces)
}

/// A key's place in its batch's key table, from [`SealBatch::add_key`] or
/// [`OpenBatch::add_key`]; valid only in that batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyIndex(u32);

/// Whose field it is, for failure reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldLabel {
    /// Owner.
    pub user_id: Uuid,
    /// Column, e.g. `pincode_enc`; empty for raw-AAD fields (test vectors).
    pub column: &'static str,
}

/// What seal and open batches share: keys, and per field a key index, a
/// label, AAD and bytes.
struct Fields {
    keys: Vec<[u8; 32]>,
    key_of: Vec<u32>,
    labels: Vec<FieldLabel>,
    aad: Vec<u8>,
    aad_offsets: Vec<u32>,
    data: Vec<u8>,
    data_offsets: Vec<u32>,
}

impl Drop for Fields {
    fn drop(&mut self) {
        self.keys.zeroize();
        self.data.zeroize();
    }
}

impl Fields {
    fn new() -> Self {
        Self {
            keys: Vec::new(),
            key_of: Vec::new(),
            labels: Vec::new(),
            aad: Vec::new(),
            aad_offsets: vec![0],
            data: Vec::new(),
            data_offsets: vec![0],
        }
    }

    fn add_key(&mut self, key: &DataKey) -> Result<KeyIndex, BulkError> {
        let index = u32::try_from(self.keys.len()).map_err(|_| BulkError::BatchTooLarge {
            what: "the number of keys",
            limit: u64::from(u32::MAX),
        })?;
        self.keys.push(*key.expose());
        Ok(KeyIndex(index))
    }

    /// Appends one field; `overhead` is what sealing adds to it (0 when the
    /// bytes are already sealed), counted against the offset limit so the
    /// output's offsets fit too.
    fn push(
        &mut self,
        key: KeyIndex,
        label: FieldLabel,
        aad: impl FnOnce(&mut Vec<u8>),
        bytes: &[u8],
        overhead: usize,
    ) -> Result<(), BulkError> {
        if key.0 as usize >= self.keys.len() {
            return Err(BulkError::UnknownKey {
                index: key.0,
                keys: self.keys.len(),
            });
        }
        let fields_after = self.labels.len() as u64 + 1;
        let data_after = (self.data.len() + bytes.len()) as u64;
        if data_after + fields_after * overhead as u64 > MAX_BATCH_BYTES {
            return Err(BulkError::BatchTooLarge {
                what: "the batch's field bytes",
                limit: MAX_BATCH_BYTES,
            });
        }
        let aad_start = self.aad.len();
        aad(&mut self.aad);
        let Ok(aad_end) = u32::try_from(self.aad.len()) else {
            self.aad.truncate(aad_start);
            return Err(BulkError::BatchTooLarge {
                what: "the batch's associated data",
                limit: MAX_BATCH_BYTES,
            });
        };
        self.data.extend_from_slice(bytes);
        self.aad_offsets.push(aad_end);
        // Checked above: data_after <= u32::MAX.
        self.data_offsets.push(data_after as u32);
        self.key_of.push(key.0);
        self.labels.push(label);
        Ok(())
    }

    fn len(&self) -> usize {
        self.labels.len()
    }
}

fn range(offsets: &[u32], i: usize) -> std::ops::Range<usize> {
    offsets[i] as usize..offsets[i + 1] as usize
}

macro_rules! batch_common {
    ($batch:ident) => {
        impl $batch {
            /// An empty batch.
            pub fn new() -> Self {
                Self(Fields::new())
            }

            /// An empty batch with room for `keys` keys, `fields` fields and
            /// `data_bytes` bytes of field data. Sized right, its buffers
            /// never grow, so no copy of a key or plaintext is left behind
            /// in a freed allocation (only the final buffers are zeroized).
            pub fn with_capacity(keys: usize, fields: usize, data_bytes: usize) -> Self {
                let mut f = Fields::new();
                f.keys.reserve_exact(keys);
                f.key_of.reserve_exact(fields);
                f.labels.reserve_exact(fields);
                f.aad_offsets.reserve_exact(fields);
                f.data_offsets.reserve_exact(fields);
                f.data.reserve_exact(data_bytes);
                Self(f)
            }

            /// Adds a user's data key to the batch's table (once per user,
            /// then push that user's fields with the index it returns). The
            /// key bytes are zeroized when the batch is dropped (see
            /// [`Self::with_capacity`]).
            pub fn add_key(&mut self, key: &DataKey) -> Result<KeyIndex, BulkError> {
                self.0.add_key(key)
            }

            /// Number of fields.
            pub fn len(&self) -> usize {
                self.0.len()
            }

            /// Whether the batch has no fields.
            pub fn is_empty(&self) -> bool {
                self.0.len() == 0
            }

            /// Number of keys in the table.
            pub fn key_count(&self) -> usize {
                self.0.keys.len()
            }

            /// Owner and column of field `i`.
            pub fn label(&self, i: usize) -> Option<FieldLabel> {
                self.0.labels.get(i).copied()
            }

            /// Total bytes of the fields' data (plaintexts or sealed fields).
            pub fn data_len(&self) -> usize {
                self.0.data.len()
            }

            /// The key table, indexed by [`KeyIndex`].
            pub(crate) fn keys(&self) -> &[[u8; 32]] {
                &self.0.keys
            }

            /// Key index of each field.
            pub(crate) fn key_indices(&self) -> &[u32] {
                &self.0.key_of
            }

            /// All fields' bytes end to end, and its `len + 1` offsets.
            pub(crate) fn data_flat(&self) -> (&[u8], &[u32]) {
                (&self.0.data, &self.0.data_offsets)
            }

            /// Field `i`'s AAD.
            pub(crate) fn aad(&self, i: usize) -> &[u8] {
                &self.0.aad[range(&self.0.aad_offsets, i)]
            }

            /// Field `i`'s bytes.
            pub(crate) fn data(&self, i: usize) -> &[u8] {
                &self.0.data[range(&self.0.data_offsets, i)]
            }
        }

        impl Default for $batch {
            fn default() -> Self {
                Self::new()
            }
        }

        impl std::fmt::Debug for $batch {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($batch))
                    .field("fields", &self.len())
                    .field("keys", &self.key_count())
                    .field("data_len", &self.data_len())
                    .finish_non_exhaustive()
            }
        }
    };
}

/// Plaintext fields to seal, each under its user's key and bound to its
/// (user, region, column). The plaintexts are zeroized when it is dropped.
pub struct SealBatch(Fields);

batch_common!(SealBatch);

impl SealBatch {
    /// Adds a field to seal under `key` (from [`Self::add_key`]), bound to
    /// `aad` exactly as `DataKey::seal` binds it.
    pub fn push(
        &mut self,
        key: KeyIndex,
        aad: &FieldAad<'_>,
        plaintext: &[u8],
    ) -> Result<(), BulkError> {
        let label = FieldLabel {
            user_id: aad.user_id,
            column: aad.column,
        };
        self.0.push(
            key,
            label,
            |out| aad.append_to(out),
            plaintext,
            SEAL_OVERHEAD,
        )
    }

    /// Adds a field with raw associated data (test vectors); its label is
    /// the nil user and an empty column.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn push_raw(
        &mut self,
        key: KeyIndex,
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<(), BulkError> {
        let label = FieldLabel {
            user_id: Uuid::nil(),
            column: "",
        };
        self.0.push(
            key,
            label,
            |out| out.extend_from_slice(aad),
            plaintext,
            SEAL_OVERHEAD,
        )
    }

    /// Offsets of the sealed output (`len + 1`, from 0): each field grows by
    /// [`SEAL_OVERHEAD`].
    pub(crate) fn sealed_offsets(&self) -> Vec<u32> {
        self.0
            .data_offsets
            .iter()
            .enumerate()
            // push() keeps data + overhead per field within u32.
            .map(|(i, &o)| o + (i * SEAL_OVERHEAD) as u32)
            .collect()
    }
}

/// Sealed fields to open, each with the key and (user, region, column) it
/// should open under.
pub struct OpenBatch(Fields);

batch_common!(OpenBatch);

impl OpenBatch {
    /// Adds a sealed field to open under `key`, checked against `aad`.
    pub fn push(
        &mut self,
        key: KeyIndex,
        aad: &FieldAad<'_>,
        sealed: &[u8],
    ) -> Result<(), BulkError> {
        let label = FieldLabel {
            user_id: aad.user_id,
            column: aad.column,
        };
        self.0.push(key, label, |out| aad.append_to(out), sealed, 0)
    }

    /// Adds a sealed field with raw associated data (test vectors).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn push_raw(
        &mut self,
        key: KeyIndex,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<(), BulkError> {
        let label = FieldLabel {
            user_id: Uuid::nil(),
            column: "",
        };
        self.0
            .push(key, label, |out| out.extend_from_slice(aad), sealed, 0)
    }

    /// Label of each field.
    pub(crate) fn labels(&self) -> &[FieldLabel] {
        &self.0.labels
    }

    /// Offsets of the opened plaintexts (`len + 1`, from 0): a field opens
    /// to its length less [`SEAL_OVERHEAD`], a truncated one to nothing.
    pub(crate) fn plaintext_offsets(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.len() + 1);
        let mut at = 0u32;
        out.push(at);
        for w in self.0.data_offsets.windows(2) {
            at += (w[1] - w[0]).saturating_sub(SEAL_OVERHEAD as u32);
            out.push(at);
        }
        out
    }
}
