//! The bulk engine against `DataKey`: the same bytes given the same nonces,
//! each opens the other's fields, and a field that does not open fails alone.
//! (NIST known answers: `src/bulk/tests.rs`.)

use umstore_data_plane::bulk::{
    BulkEngine, CpuEngine, FailureReason, FieldNonce, OpenBatch, SealBatch, SEAL_OVERHEAD,
};
use umstore_data_plane::crypto::{CryptoError, DataKey, FieldAad, SealedField, PII_COLUMNS};
use uuid::Uuid;

const REGIONS: [&str; 5] = ["KA", "TN", "MH", "DL", "JK"];

/// One field of a random batch, with `DataKey::seal`'s output for it.
struct Field {
    user: usize,
    aad: FieldAad<'static>,
    plaintext: Vec<u8>,
    reference: SealedField,
}

struct Corpus {
    keys: Vec<DataKey>,
    fields: Vec<Field>,
}

/// `users` users with 1..=20 fields each (lengths 0..=200, empty and odd
/// lengths included), every field sealed once by `DataKey::seal`.
fn corpus(seed: u64, users: usize) -> Corpus {
    let mut rng = fastrand::Rng::with_seed(seed);
    let keys: Vec<DataKey> = (0..users).map(|_| DataKey::generate()).collect();
    let mut fields = Vec::new();
    for (user, key) in keys.iter().enumerate() {
        let user_id = Uuid::from_u128(rng.u128(..));
        let region = REGIONS[rng.usize(..REGIONS.len())];
        for _ in 0..rng.usize(1..=20) {
            let len = match rng.u8(..10) {
                0 => 0,
                1 => 1,
                2 => 15 + 2 * rng.usize(..2), // 15 or 17: around a block
                _ => rng.usize(1..=200),
            };
            let plaintext: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            let aad = FieldAad {
                user_id,
                region,
                column: PII_COLUMNS[rng.usize(..PII_COLUMNS.len())],
            };
            let reference = key.seal(&aad, &plaintext);
            fields.push(Field {
                user,
                aad,
                plaintext,
                reference,
            });
        }
    }
    Corpus { keys, fields }
}

/// The nonce `DataKey::seal` drew for a field.
fn nonce_of(sealed: &SealedField) -> FieldNonce {
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&sealed.0[1..13]);
    nonce
}

/// A seal batch of `order`'s fields, each user's key added once.
fn seal_batch(corpus: &Corpus, order: &[usize]) -> (SealBatch, Vec<FieldNonce>) {
    let bytes = corpus.fields.iter().map(|f| f.plaintext.len()).sum();
    let mut batch = SealBatch::with_capacity(corpus.keys.len(), order.len(), bytes);
    let index: Vec<_> = corpus
        .keys
        .iter()
        .map(|k| batch.add_key(k).expect("key"))
        .collect();
    let mut nonces = Vec::new();
    for &i in order {
        let f = &corpus.fields[i];
        batch
            .push(index[f.user], &f.aad, &f.plaintext)
            .expect("push");
        nonces.push(nonce_of(&f.reference));
    }
    (batch, nonces)
}

fn in_order(corpus: &Corpus) -> Vec<usize> {
    (0..corpus.fields.len()).collect()
}

#[test]
fn engine_seals_byte_identical_to_data_key_given_the_same_nonces() {
    let corpus = corpus(12, 400);
    assert!(corpus.fields.len() > 3000, "{}", corpus.fields.len());
    assert!(corpus.fields.iter().any(|f| f.plaintext.is_empty()));
    let (batch, nonces) = seal_batch(&corpus, &in_order(&corpus));
    let sealed = CpuEngine::new().seal_batch(&batch, &nonces).expect("seal");
    assert_eq!(sealed.len(), corpus.fields.len());
    for (i, (f, out)) in corpus.fields.iter().zip(sealed.iter()).enumerate() {
        assert_eq!(out, f.reference.0.as_slice(), "field {i}");
        assert_eq!(out.len(), f.plaintext.len() + SEAL_OVERHEAD);
    }
    // And each opens with DataKey::open.
    for (f, out) in corpus.fields.iter().zip(sealed.iter()) {
        let opened = corpus.keys[f.user]
            .open(&f.aad, out)
            .expect("DataKey opens it");
        assert_eq!(opened, f.plaintext);
    }
}

#[test]
fn field_order_and_thread_count_do_not_change_the_bytes() {
    let corpus = corpus(34, 300);
    let mut shuffled = in_order(&corpus);
    fastrand::Rng::with_seed(5).shuffle(&mut shuffled);
    // Users' fields interleaved: the engine switches keys field by field.
    let (batch, nonces) = seal_batch(&corpus, &shuffled);
    let all_cores = CpuEngine::new().seal_batch(&batch, &nonces).expect("seal");
    let one = CpuEngine::with_threads(1).expect("pool");
    assert_eq!(one.seal_batch(&batch, &nonces).expect("seal"), all_cores);
    for (&i, out) in shuffled.iter().zip(all_cores.iter()) {
        assert_eq!(out, corpus.fields[i].reference.0.as_slice(), "field {i}");
    }
}

#[test]
fn fields_sealed_by_data_key_open_in_the_engine() {
    let corpus = corpus(56, 300);
    let mut batch = OpenBatch::new();
    let index: Vec<_> = corpus
        .keys
        .iter()
        .map(|k| batch.add_key(k).expect("key"))
        .collect();
    for f in &corpus.fields {
        batch
            .push(index[f.user], &f.aad, &f.reference.0)
            .expect("push");
    }
    for engine in [CpuEngine::new(), CpuEngine::with_threads(1).expect("pool")] {
        let opened = engine.open_batch(&batch).expect("open");
        assert!(opened.all_opened(), "{:?}", opened.failures().first());
        assert_eq!(opened.len(), corpus.fields.len());
        for (i, (f, pt)) in corpus.fields.iter().zip(opened.iter()).enumerate() {
            assert_eq!(pt.ok(), Some(f.plaintext.as_slice()), "field {i}");
        }
    }
}

#[test]
fn a_bad_field_fails_alone_with_its_index_user_and_column() {
    let corpus = corpus(78, 20);
    let n = corpus.fields.len();
    assert!(n > 50);
    let mut batch = OpenBatch::new();
    let index: Vec<_> = corpus
        .keys
        .iter()
        .map(|k| batch.add_key(k).expect("key"))
        .collect();
    let other_column = |c: &'static str| {
        if c == PII_COLUMNS[0] {
            PII_COLUMNS[1]
        } else {
            PII_COLUMNS[0]
        }
    };
    let stranger = Uuid::new_v4();
    let mut expected = Vec::new();
    for (i, f) in corpus.fields.iter().enumerate() {
        let mut sealed = f.reference.0.clone();
        let mut aad = f.aad;
        let mut key = index[f.user];
        let reason = match i {
            7 => {
                let last = sealed.len() - 1;
                sealed[last] ^= 0x80; // tag altered
                Some(FailureReason::Authentication)
            }
            13 => {
                aad.user_id = stranger; // moved to another user
                Some(FailureReason::Authentication)
            }
            21 => {
                aad.column = other_column(aad.column); // moved to another column
                Some(FailureReason::Authentication)
            }
            30 => {
                aad.region = if aad.region == "KA" { "TN" } else { "KA" };
                Some(FailureReason::Authentication)
            }
            33 => {
                key = index[(f.user + 1) % corpus.keys.len()]; // another user's key
                Some(FailureReason::Authentication)
            }
            40 => {
                sealed.truncate(10);
                Some(FailureReason::Truncated { len: 10 })
            }
            44 => {
                sealed[0] = 9;
                Some(FailureReason::UnknownFormat(9))
            }
            _ => None,
        };
        if let Some(reason) = reason {
            expected.push((i, aad.user_id, aad.column, reason));
        }
        batch.push(key, &aad, &sealed).expect("push");
    }
    let opened = CpuEngine::new().open_batch(&batch).expect("open");
    let failures: Vec<_> = opened
        .failures()
        .iter()
        .map(|f| (f.item, f.label.user_id, f.label.column, f.reason))
        .collect();
    assert_eq!(failures, expected);
    for (i, f) in corpus.fields.iter().enumerate() {
        match opened.get(i).expect("in range") {
            Ok(pt) => assert_eq!(pt, f.plaintext.as_slice(), "field {i}"),
            Err(failure) => assert_eq!(failure.item, i),
        }
    }
    assert!(opened.get(n).is_none());
    // A failure reads as DataKey::open's error for the same field.
    let failure = opened.failures()[1];
    let as_crypto = CryptoError::from(failure).to_string();
    assert!(
        as_crypto.contains(&stranger.to_string()),
        "{as_crypto} names the user it was checked against"
    );
    assert!(
        failure.to_string().starts_with("field 13 (user "),
        "{failure}"
    );
}

#[test]
fn empty_batches_seal_and_open_to_nothing() {
    let engine = CpuEngine::new();
    let sealed = engine.seal_batch(&SealBatch::new(), &[]).expect("seal");
    assert!(sealed.is_empty());
    assert!(sealed.as_bytes().is_empty());
    let opened = engine.open_batch(&OpenBatch::new()).expect("open");
    assert!(opened.is_empty() && opened.all_opened());
    // Keys but no fields.
    let mut batch = SealBatch::new();
    batch.add_key(&DataKey::generate()).expect("key");
    assert!(engine.seal_batch(&batch, &[]).expect("seal").is_empty());
}

#[test]
fn random_nonces_seal_fields_that_data_key_opens() {
    let corpus = corpus(90, 50);
    let (batch, _) = seal_batch(&corpus, &in_order(&corpus));
    let nonces = umstore_data_plane::bulk::random_nonces(batch.len()).expect("rng");
    let sealed = CpuEngine::new().seal_batch(&batch, &nonces).expect("seal");
    for (f, out) in corpus.fields.iter().zip(sealed.iter()) {
        assert_ne!(out, f.reference.0.as_slice());
        let opened = corpus.keys[f.user].open(&f.aad, out).expect("opens");
        assert_eq!(opened, f.plaintext);
    }
}
