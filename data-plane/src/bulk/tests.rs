//! Known-answer tests of the engines' raw GCM path (NIST CAVP vectors) and
//! of their batch handling; equivalence with `DataKey` is in
//! `tests/bulk_engine.rs`.

use super::*;
use crate::crypto::DataKey;

include!("nist_gcm_vectors.rs");

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("test vector hex")
}

fn nist_key(v: &Vector) -> DataKey {
    let bytes: [u8; 32] = unhex(v.key).try_into().expect("32-byte key");
    DataKey::from_bytes(bytes)
}

fn nist_nonce(v: &Vector) -> FieldNonce {
    unhex(v.iv).try_into().expect("96-bit IV")
}

/// The NIST vectors as one seal batch, each under its own key.
fn nist_seal_batch() -> (SealBatch, Vec<FieldNonce>) {
    let mut batch = SealBatch::new();
    let mut nonces = Vec::new();
    for v in NIST {
        let key = batch.add_key(&nist_key(v)).expect("key");
        batch
            .push_raw(key, &unhex(v.aad), &unhex(v.pt))
            .expect("push");
        nonces.push(nist_nonce(v));
    }
    (batch, nonces)
}

fn engines() -> Vec<CpuEngine> {
    vec![
        CpuEngine::new(),
        CpuEngine::with_threads(1).expect("one-thread pool"),
    ]
}

#[test]
fn seal_batch_matches_nist_gcm_vectors() {
    let (batch, nonces) = nist_seal_batch();
    for engine in engines() {
        let sealed = engine.seal_batch(&batch, &nonces).expect("seal");
        assert_eq!(sealed.len(), NIST.len());
        for (i, v) in NIST.iter().enumerate() {
            let field = sealed.get(i).expect("field");
            assert_eq!(field[0], crate::crypto::FIELD_FORMAT_V1, "vector {i}");
            assert_eq!(&field[1..13], unhex(v.iv).as_slice(), "vector {i}");
            let body = hex::encode(&field[13..]);
            assert_eq!(body, format!("{}{}", v.ct, v.tag), "vector {i}");
        }
    }
}

#[test]
fn open_batch_opens_nist_gcm_vectors_and_fails_only_the_altered_one() {
    let mut batch = OpenBatch::new();
    for (i, v) in NIST.iter().enumerate() {
        let key = batch.add_key(&nist_key(v)).expect("key");
        let mut sealed = vec![crate::crypto::FIELD_FORMAT_V1];
        sealed.extend(unhex(v.iv));
        sealed.extend(unhex(v.ct));
        let mut tag = unhex(v.tag);
        if i == 5 {
            tag[15] ^= 1;
        }
        sealed.extend(tag);
        batch.push_raw(key, &unhex(v.aad), &sealed).expect("push");
    }
    for engine in engines() {
        let opened = engine.open_batch(&batch).expect("open");
        assert_eq!(opened.len(), NIST.len());
        for (i, v) in NIST.iter().enumerate() {
            match opened.get(i) {
                Some(Ok(pt)) => {
                    assert_ne!(i, 5);
                    assert_eq!(hex::encode(pt), v.pt, "vector {i}");
                }
                Some(Err(failure)) => {
                    assert_eq!(i, 5);
                    assert_eq!(failure.item, 5);
                    assert_eq!(failure.reason, FailureReason::Authentication);
                }
                None => panic!("vector {i} missing"),
            }
        }
        assert_eq!(opened.failures().len(), 1);
    }
}

#[test]
fn nonce_count_must_match_the_batch() {
    let (batch, nonces) = nist_seal_batch();
    let err = CpuEngine::new()
        .seal_batch(&batch, &nonces[1..])
        .expect_err("one nonce short");
    assert!(matches!(
        err,
        BulkError::NonceCount {
            nonces: 7,
            fields: 8
        }
    ));
}

#[test]
fn a_key_index_from_another_batch_is_refused() {
    let mut one = SealBatch::new();
    let mut other = SealBatch::new();
    other.add_key(&DataKey::generate()).expect("key");
    let foreign = other.add_key(&DataKey::generate()).expect("key");
    one.add_key(&DataKey::generate()).expect("key");
    let err = one.push_raw(foreign, b"", b"x").expect_err("unknown key");
    assert!(matches!(err, BulkError::UnknownKey { index: 1, keys: 1 }));
    assert_eq!(one.len(), 0);
}

#[test]
fn random_nonces_are_drawn_fresh() {
    let nonces = random_nonces(1000).expect("rng");
    assert_eq!(nonces.len(), 1000);
    let distinct: std::collections::HashSet<_> = nonces.iter().collect();
    assert_eq!(distinct.len(), 1000);
    assert!(random_nonces(0).expect("rng").is_empty());
}

#[test]
fn cpu_engine_reports_its_name_and_threads() {
    let engine = CpuEngine::with_threads(3).expect("pool");
    let info = engine.info();
    assert_eq!(engine.name(), "cpu");
    assert_eq!(info.kind, EngineKind::Cpu);
    assert_eq!(info.parallelism, 3);
    assert!(info.to_string().starts_with("cpu engine on "), "{info}");
}
