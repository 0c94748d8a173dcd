//! The CPU engine: rayon over the fields, each sealed or opened with
//! `aes-gcm` (AES-256-GCM on `aes::Aes256Enc`; AES-NI and PCLMULQDQ when the CPU has them,
//! detected at run time by the `aes` and `polyval` crates).
//!
//! Fields are cut into chunks of about [`CHUNK_COST`] (bytes plus a fixed
//! cost per field), so a batch of tiny fields is a few thousand rayon tasks,
//! not millions. Within a chunk a key is expanded once per run of
//! consecutive fields under it: once per user when a user's fields are
//! pushed together (add the key, push its fields), plus at most one more
//! where a chunk boundary cuts a run. A table of every key's expanded
//! cipher would cost about 1 KiB per key (100 MiB for 100k users).

use std::ops::Range;

use aes_gcm::aead::consts::U12;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{AesGcm, Key, Nonce, Tag};
use rayon::prelude::*;
use zeroize::Zeroizing;

use super::batch::{FieldNonce, OpenBatch, SealBatch, HEADER_LEN, SEAL_OVERHEAD, TAG_LEN};
use super::output::{FieldStatus, OpenedBatch, SealedBatch};
use super::{BulkEngine, BulkError, EngineInfo, EngineKind};
use crate::crypto::FIELD_FORMAT_V1;

/// AES-256-GCM on the encryption half of the AES key schedule only: GCM
/// never runs AES backwards, and `Aes256Gcm` (on `aes::Aes256`) also expands
/// the decryption round keys, a cost paid per user here. Same output.
type Gcm = AesGcm<aes::Aes256Enc, U12>;

/// Work per rayon task, in field bytes plus [`FIELD_COST`] per field.
const CHUNK_COST: usize = 32 * 1024;
/// Fixed cost of a field beside its bytes (AAD, counter setup, tag), in
/// bytes' worth of work.
const FIELD_COST: usize = 128;

/// Batch AES-256-GCM on the host's cores.
pub struct CpuEngine {
    /// `None`: rayon's global pool (all cores).
    pool: Option<rayon::ThreadPool>,
}

impl CpuEngine {
    /// An engine on rayon's global pool: one thread per core, or
    /// `RAYON_NUM_THREADS`.
    pub fn new() -> Self {
        Self { pool: None }
    }

    /// An engine on its own pool of `threads` threads (1 for a single-core
    /// comparison).
    pub fn with_threads(threads: usize) -> Result<Self, BulkError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("umstore-bulk-{i}"))
            .build()
            .map_err(|e| BulkError::ThreadPool {
                threads,
                detail: e.to_string(),
            })?;
        Ok(Self { pool: Some(pool) })
    }

    fn threads(&self) -> usize {
        match &self.pool {
            Some(pool) => pool.current_num_threads(),
            None => rayon::current_num_threads(),
        }
    }

    fn install<R: Send>(&self, op: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) => pool.install(op),
            None => op(),
        }
    }
}

impl Default for CpuEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl BulkEngine for CpuEngine {
    fn info(&self) -> EngineInfo {
        let (hardware_aes, device) = cpu_features();
        EngineInfo {
            name: "cpu",
            kind: EngineKind::Cpu,
            parallelism: self.threads(),
            hardware_aes,
            device,
        }
    }

    fn seal_batch(
        &self,
        batch: &SealBatch,
        nonces: &[FieldNonce],
    ) -> Result<SealedBatch, BulkError> {
        if nonces.len() != batch.len() {
            return Err(BulkError::NonceCount {
                nonces: nonces.len(),
                fields: batch.len(),
            });
        }
        let out_offsets = batch.sealed_offsets();
        let mut out = vec![0u8; out_offsets.last().copied().unwrap_or(0) as usize];
        let chunks = plan_chunks(batch.data_flat().1);
        let parts = split_by(&mut out, &chunks, &out_offsets)?;
        self.install(|| {
            parts
                .into_par_iter()
                .try_for_each(|(items, dst)| seal_chunk(batch, nonces, items, dst))
        })?;
        Ok(SealedBatch::new(out, out_offsets))
    }

    fn open_batch(&self, batch: &OpenBatch) -> Result<OpenedBatch, BulkError> {
        let pt_offsets = batch.plaintext_offsets();
        let mut plaintext =
            Zeroizing::new(vec![0u8; pt_offsets.last().copied().unwrap_or(0) as usize]);
        let mut status = vec![FieldStatus::Opened; batch.len()];
        let chunks = plan_chunks(batch.data_flat().1);
        let parts = split_by(&mut plaintext, &chunks, &pt_offsets)?;
        let status_parts = split_status(&mut status, &chunks)?;
        self.install(|| {
            parts
                .into_par_iter()
                .zip(status_parts)
                .try_for_each(|((items, dst), st)| open_chunk(batch, items, dst, st))
        })?;
        OpenedBatch::assemble(batch, plaintext, pt_offsets, &status)
    }
}

/// Whether AES and GHASH run on dedicated instructions here, and the CPU in
/// words.
fn cpu_features() -> (bool, String) {
    #[cfg(target_arch = "x86_64")]
    {
        let aes = std::arch::is_x86_feature_detected!("aes");
        let clmul = std::arch::is_x86_feature_detected!("pclmulqdq");
        let what = match (aes, clmul) {
            (true, true) => "x86_64, AES-NI + PCLMULQDQ",
            (true, false) => "x86_64, AES-NI, software GHASH",
            (false, _) => "x86_64, software AES (no AES-NI)",
        };
        (aes && clmul, what.to_owned())
    }
    #[cfg(target_arch = "aarch64")]
    {
        let aes = std::arch::is_aarch64_feature_detected!("aes");
        let what = if aes {
            "aarch64, crypto extensions"
        } else {
            "aarch64, software AES"
        };
        (aes, what.to_owned())
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        (false, format!("{}, software AES", std::env::consts::ARCH))
    }
}

/// Cuts the fields (by their input offsets) into consecutive runs of about
/// [`CHUNK_COST`].
fn plan_chunks(offsets: &[u32]) -> Vec<Range<usize>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut cost = 0;
    for (i, w) in offsets.windows(2).enumerate() {
        cost += (w[1] - w[0]) as usize + FIELD_COST;
        if cost >= CHUNK_COST {
            chunks.push(start..i + 1);
            start = i + 1;
            cost = 0;
        }
    }
    let n = offsets.len().saturating_sub(1);
    if start < n {
        chunks.push(start..n);
    }
    chunks
}

/// A chunk's fields and its slice of the output.
type Part<'a> = (Range<usize>, &'a mut [u8]);

/// Splits `out` (laid out by `offsets`) into one disjoint slice per chunk.
fn split_by<'a>(
    mut out: &'a mut [u8],
    chunks: &[Range<usize>],
    offsets: &[u32],
) -> Result<Vec<Part<'a>>, BulkError> {
    let mut parts = Vec::with_capacity(chunks.len());
    for items in chunks {
        let len = (offsets[items.end] - offsets[items.start]) as usize;
        let (part, rest) = out.split_at_mut_checked(len).ok_or(BulkError::Layout {
            item: items.start,
            detail: "output buffer shorter than its offsets",
        })?;
        parts.push((items.clone(), part));
        out = rest;
    }
    Ok(parts)
}

fn split_status<'a>(
    mut status: &'a mut [FieldStatus],
    chunks: &[Range<usize>],
) -> Result<Vec<&'a mut [FieldStatus]>, BulkError> {
    let mut parts = Vec::with_capacity(chunks.len());
    for items in chunks {
        let (part, rest) = status
            .split_at_mut_checked(items.len())
            .ok_or(BulkError::Layout {
                item: items.start,
                detail: "status buffer shorter than the batch",
            })?;
        parts.push(part);
        status = rest;
    }
    Ok(parts)
}

/// The expanded cipher of the last key used in a chunk.
struct KeyCache {
    current: Option<(u32, Gcm)>,
}

impl KeyCache {
    fn new() -> Self {
        Self { current: None }
    }

    fn get<'a>(&'a mut self, keys: &[[u8; 32]], index: u32) -> &'a Gcm {
        if self.current.as_ref().is_some_and(|(i, _)| *i != index) {
            self.current = None;
        }
        &self
            .current
            .get_or_insert_with(|| {
                let key = Key::<Gcm>::from_slice(&keys[index as usize]);
                (index, Gcm::new(key))
            })
            .1
    }
}

/// Seals fields `items` into `dst`, laid out back to back.
fn seal_chunk(
    batch: &SealBatch,
    nonces: &[FieldNonce],
    items: Range<usize>,
    mut dst: &mut [u8],
) -> Result<(), BulkError> {
    let keys = batch.keys();
    let key_of = batch.key_indices();
    let mut cache = KeyCache::new();
    for i in items {
        let plaintext = batch.data(i);
        let len = plaintext.len();
        let (field, rest) = std::mem::take(&mut dst)
            .split_at_mut_checked(len + SEAL_OVERHEAD)
            .ok_or(BulkError::Layout {
                item: i,
                detail: "sealed output shorter than its offsets",
            })?;
        dst = rest;
        let (header, body) = field.split_at_mut(HEADER_LEN);
        let (ct, tag_out) = body.split_at_mut(len);
        header[0] = FIELD_FORMAT_V1;
        header[1..].copy_from_slice(&nonces[i]);
        ct.copy_from_slice(plaintext);
        let tag = cache
            .get(keys, key_of[i])
            .encrypt_in_place_detached(Nonce::from_slice(&nonces[i]), batch.aad(i), ct)
            .map_err(|_| BulkError::Seal { item: i, len })?;
        tag_out.copy_from_slice(&tag);
    }
    Ok(())
}

/// Opens fields `items` into `dst` (plaintexts back to back), writing each
/// field's status; a field that fails leaves zeros in its range.
fn open_chunk(
    batch: &OpenBatch,
    items: Range<usize>,
    mut dst: &mut [u8],
    status: &mut [FieldStatus],
) -> Result<(), BulkError> {
    let keys = batch.keys();
    let key_of = batch.key_indices();
    let mut cache = KeyCache::new();
    for (i, st) in items.zip(status.iter_mut()) {
        let sealed = batch.data(i);
        let len = sealed.len().saturating_sub(SEAL_OVERHEAD);
        let (out, rest) =
            std::mem::take(&mut dst)
                .split_at_mut_checked(len)
                .ok_or(BulkError::Layout {
                    item: i,
                    detail: "plaintext output shorter than its offsets",
                })?;
        dst = rest;
        if sealed.len() < SEAL_OVERHEAD {
            *st = FieldStatus::Truncated;
            continue;
        }
        if sealed[0] != FIELD_FORMAT_V1 {
            *st = FieldStatus::UnknownFormat;
            continue;
        }
        let nonce = Nonce::from_slice(&sealed[1..HEADER_LEN]);
        let (ct, tag) = sealed[HEADER_LEN..].split_at(len);
        debug_assert_eq!(tag.len(), TAG_LEN);
        out.copy_from_slice(ct);
        let opened = cache.get(keys, key_of[i]).decrypt_in_place_detached(
            nonce,
            batch.aad(i),
            out,
            Tag::from_slice(tag),
        );
        if opened.is_err() {
            // aes-gcm checks the tag before decrypting; clear the copied
            // ciphertext anyway so a failed field reads as nothing.
            out.fill(0);
            *st = FieldStatus::Authentication;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_field_once_in_order() {
        for sizes in [
            vec![],
            vec![0],
            vec![8; 10_000],
            vec![100_000, 0, 3, 70_000],
        ] {
            let mut offsets = vec![0u32];
            for s in &sizes {
                offsets.push(offsets[offsets.len() - 1] + s);
            }
            let chunks = plan_chunks(&offsets);
            let flat: Vec<usize> = chunks.iter().flat_map(|r| r.clone()).collect();
            assert_eq!(flat, (0..sizes.len()).collect::<Vec<_>>());
            assert!(chunks.iter().all(|r| !r.is_empty()));
        }
        // Tiny fields share a task: 10k 8-byte fields make tens of chunks.
        let offsets: Vec<u32> = (0..=10_000u32).map(|i| i * 8).collect();
        let n = plan_chunks(&offsets).len();
        assert!((10..100).contains(&n), "{n} chunks");
    }
}
