//! What engines return: sealed fields end to end, and opened fields with a
//! failure per field that did not open.

use zeroize::Zeroizing;

use super::batch::{FieldLabel, OpenBatch, SEAL_OVERHEAD};
use super::BulkError;
use crate::crypto::{CryptoError, SealedField, FIELD_FORMAT_V1};

/// The output of `seal_batch`: sealed fields end to end, in batch order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedBatch {
    bytes: Vec<u8>,
    offsets: Vec<u32>,
}

impl SealedBatch {
    pub(crate) fn new(bytes: Vec<u8>, offsets: Vec<u32>) -> Self {
        Self { bytes, offsets }
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sealed field `i`, as stored in its `*_enc` column.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let start = *self.offsets.get(i)? as usize;
        let end = *self.offsets.get(i + 1)? as usize;
        self.bytes.get(start..end)
    }

    /// The sealed fields in batch order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.offsets
            .windows(2)
            .map(|w| &self.bytes[w[0] as usize..w[1] as usize])
    }

    /// All sealed fields end to end (see [`Self::offsets`]).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// `len + 1` offsets into [`Self::as_bytes`], from 0.
    pub fn offsets(&self) -> &[u32] {
        &self.offsets
    }

    /// One [`SealedField`] per field.
    pub fn to_fields(&self) -> Vec<SealedField> {
        self.iter().map(|f| SealedField(f.to_vec())).collect()
    }
}

/// Why one field of an open batch did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// Shorter than the header and tag.
    Truncated {
        /// Its length.
        len: usize,
    },
    /// A format byte this build does not read.
    UnknownFormat(u8),
    /// The tag did not verify: altered, another user's, region's or
    /// column's, or sealed under another key.
    Authentication,
}

/// One field of an open batch that did not open; the others did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("field {item} (user {}, column {}): {reason}", .label.user_id, .label.column)]
pub struct FieldFailure {
    /// Index of the field in the batch.
    pub item: usize,
    /// Whose field it is.
    pub label: FieldLabel,
    /// Why it did not open.
    pub reason: FailureReason,
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Truncated { len } => write!(
                f,
                "truncated ({len} bytes, at least {SEAL_OVERHEAD} expected)"
            ),
            Self::UnknownFormat(v) => write!(
                f,
                "unknown format version {v}; this build reads version {FIELD_FORMAT_V1}"
            ),
            Self::Authentication => f.write_str(
                "does not authenticate: altered, another user's, region's or column's, \
                 or sealed under another key",
            ),
        }
    }
}

impl From<FieldFailure> for CryptoError {
    /// The error `DataKey::open` returns for the same field.
    fn from(f: FieldFailure) -> Self {
        match f.reason {
            FailureReason::Truncated { len } => CryptoError::Truncated {
                len,
                min: SEAL_OVERHEAD,
            },
            FailureReason::UnknownFormat(v) => CryptoError::UnknownFormat(v),
            FailureReason::Authentication => CryptoError::Authentication {
                user_id: f.label.user_id,
                column: f.label.column,
            },
        }
    }
}

/// Per-field outcome as an engine writes it (one byte per field, so a GPU
/// kernel can write it too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub(crate) enum FieldStatus {
    #[default]
    Opened = 0,
    Truncated = 1,
    UnknownFormat = 2,
    Authentication = 3,
}

/// The output of `open_batch`: each field's plaintext, or why it did not
/// open. Plaintexts are zeroized when it is dropped.
#[derive(Debug)]
pub struct OpenedBatch {
    plaintext: Zeroizing<Vec<u8>>,
    offsets: Vec<u32>,
    /// Sorted by item.
    failures: Vec<FieldFailure>,
}

impl OpenedBatch {
    /// Assembles an engine's output: `plaintext` laid out by
    /// `batch.plaintext_offsets()`, a failed field's range zeroed, and one
    /// status per field.
    pub(crate) fn assemble(
        batch: &OpenBatch,
        plaintext: Zeroizing<Vec<u8>>,
        offsets: Vec<u32>,
        status: &[FieldStatus],
    ) -> Result<Self, BulkError> {
        if status.len() != batch.len() || offsets.len() != batch.len() + 1 {
            return Err(BulkError::Layout {
                item: status.len().min(batch.len()),
                detail: "one status and one offset per field",
            });
        }
        let failures = status
            .iter()
            .enumerate()
            .filter(|(_, s)| **s != FieldStatus::Opened)
            .map(|(item, s)| {
                let sealed = batch.data(item);
                let reason = match s {
                    FieldStatus::Truncated => FailureReason::Truncated { len: sealed.len() },
                    FieldStatus::UnknownFormat => {
                        FailureReason::UnknownFormat(sealed.first().copied().unwrap_or(0))
                    }
                    FieldStatus::Authentication | FieldStatus::Opened => {
                        FailureReason::Authentication
                    }
                };
                FieldFailure {
                    item,
                    label: batch.labels()[item],
                    reason,
                }
            })
            .collect();
        Ok(Self {
            plaintext,
            offsets,
            failures,
        })
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Field `i`: its plaintext, or why it did not open; `None` past the end.
    pub fn get(&self, i: usize) -> Option<Result<&[u8], &FieldFailure>> {
        if i >= self.len() {
            return None;
        }
        if let Ok(at) = self.failures.binary_search_by_key(&i, |f| f.item) {
            return self.failures.get(at).map(Err);
        }
        self.plaintext
            .get(self.offsets[i] as usize..self.offsets[i + 1] as usize)
            .map(Ok)
    }

    /// Every field in batch order.
    pub fn iter(&self) -> impl Iterator<Item = Result<&[u8], &FieldFailure>> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }

    /// The fields that did not open, by index.
    pub fn failures(&self) -> &[FieldFailure] {
        &self.failures
    }

    /// Whether every field opened.
    pub fn all_opened(&self) -> bool {
        self.failures.is_empty()
    }
}
