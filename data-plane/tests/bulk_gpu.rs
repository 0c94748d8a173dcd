//! The GPU engine, checked two ways.
//!
//! On every machine: the kernel source itself (`kernels/aes_gcm.cu`) is
//! compiled as C with the system C compiler together with
//! `tests/gpu_host/harness.c`, which runs each kernel as a loop over its
//! thread indices; NIST vectors, random batches and tampered fields go
//! through it and must come out byte for byte as `CpuEngine`'s. A missing
//! C compiler skips, and fails under `UMSTORE_REQUIRE_COMPONENTS`.
//!
//! Where a CUDA GPU is present: the same on the real `GpuEngine` (compiled
//! with NVRTC), both ways against `CpuEngine`, plus a batch of a million
//! fields. Without a GPU those tests skip with the reason `GpuEngine::open`
//! gives (the GPU is an exempt component: CI has none). The NIST vectors on
//! the device are in `src/bulk/gpu.rs`'s unit tests (they need raw AAD).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use umstore_data_plane::bulk::{
    select, BulkEngine, BulkError, CpuEngine, EngineChoice, FailureReason, FieldNonce, GpuEngine,
    OpenBatch, OpenedBatch, SealBatch, SEAL_OVERHEAD,
};
use umstore_data_plane::crypto::{DataKey, FieldAad, PII_COLUMNS};
use umstore_e2e::skip::{skip_or_fail, Component};
use uuid::Uuid;

include!("../src/bulk/nist_gcm_vectors.rs");

const REGIONS: [&str; 5] = ["KA", "TN", "MH", "DL", "JK"];

// ---------------------------------------------------------------- cases

/// What a field is bound to.
#[derive(Clone)]
enum Aad {
    /// A user's field, as `DataKey::seal` binds it.
    Field {
        user_id: Uuid,
        region: &'static str,
        column: &'static str,
    },
    /// Raw associated data (NIST vectors; the host harness only).
    Raw(Vec<u8>),
}

#[derive(Clone)]
struct Field {
    key: usize,
    aad: Aad,
    /// Plaintext (to seal) or sealed field (to open).
    bytes: Vec<u8>,
}

impl Field {
    fn field_aad(&self) -> FieldAad<'static> {
        match &self.aad {
            Aad::Field {
                user_id,
                region,
                column,
            } => FieldAad {
                user_id: *user_id,
                region,
                column,
            },
            Aad::Raw(_) => panic!("raw AAD goes through the host harness only"),
        }
    }

    /// The AAD bytes: `format ‖ user_id ‖ region ‖ 0 ‖ column` (docs/bulk.md).
    fn aad_bytes(&self) -> Vec<u8> {
        match &self.aad {
            Aad::Field {
                user_id,
                region,
                column,
            } => {
                let mut out = vec![1u8];
                out.extend_from_slice(user_id.as_bytes());
                out.extend_from_slice(region.as_bytes());
                out.push(0);
                out.extend_from_slice(column.as_bytes());
                out
            }
            Aad::Raw(aad) => aad.clone(),
        }
    }
}

/// A batch as plain data: keys, then fields naming them.
#[derive(Clone)]
struct Case {
    keys: Vec<[u8; 32]>,
    fields: Vec<Field>,
}

impl Case {
    fn seal_batch(&self) -> SealBatch {
        let bytes = self.fields.iter().map(|f| f.bytes.len()).sum();
        let mut batch = SealBatch::with_capacity(self.keys.len(), self.fields.len(), bytes);
        let index: Vec<_> = self
            .keys
            .iter()
            .map(|k| batch.add_key(&DataKey::from_bytes(*k)).expect("key"))
            .collect();
        for f in &self.fields {
            batch
                .push(index[f.key], &f.field_aad(), &f.bytes)
                .expect("push");
        }
        batch
    }

    fn open_batch(&self) -> OpenBatch {
        let bytes = self.fields.iter().map(|f| f.bytes.len()).sum();
        let mut batch = OpenBatch::with_capacity(self.keys.len(), self.fields.len(), bytes);
        let index: Vec<_> = self
            .keys
            .iter()
            .map(|k| batch.add_key(&DataKey::from_bytes(*k)).expect("key"))
            .collect();
        for f in &self.fields {
            batch
                .push(index[f.key], &f.field_aad(), &f.bytes)
                .expect("push");
        }
        batch
    }

    /// The same fields with `sealed` as their bytes (to open them).
    fn with_bytes(&self, sealed: impl IntoIterator<Item = Vec<u8>>) -> Case {
        let fields = self
            .fields
            .iter()
            .zip(sealed)
            .map(|(f, bytes)| Field {
                key: f.key,
                aad: f.aad.clone(),
                bytes,
            })
            .collect();
        Case {
            keys: self.keys.clone(),
            fields,
        }
    }
}

/// `users` users with 1..=`per_user` fields each: empty, one-byte,
/// around-a-block, multi-block and random lengths; user ids, regions and
/// columns at random. `interleave` shuffles the fields so consecutive
/// fields switch keys.
fn random_case(
    seed: u64,
    users: usize,
    per_user: usize,
    interleave: bool,
) -> (Case, Vec<FieldNonce>) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let keys: Vec<[u8; 32]> = (0..users)
        .map(|_| std::array::from_fn(|_| rng.u8(..)))
        .collect();
    let mut fields = Vec::new();
    for key in 0..users {
        let user_id = Uuid::from_u128(rng.u128(..));
        let region = REGIONS[rng.usize(..REGIONS.len())];
        for _ in 0..rng.usize(1..=per_user) {
            let len = match rng.u8(..12) {
                0 => 0,
                1 => 1,
                2 => [15, 16, 17, 31, 32, 33][rng.usize(..6)],
                3 => rng.usize(200..=1500),
                _ => rng.usize(1..=200),
            };
            fields.push(Field {
                key,
                aad: Aad::Field {
                    user_id,
                    region,
                    column: PII_COLUMNS[rng.usize(..PII_COLUMNS.len())],
                },
                bytes: (0..len).map(|_| rng.u8(..)).collect(),
            });
        }
    }
    if interleave {
        rng.shuffle(&mut fields);
    }
    let nonces = (0..fields.len())
        .map(|_| std::array::from_fn(|_| rng.u8(..)))
        .collect();
    (Case { keys, fields }, nonces)
}

/// The NIST vectors as a case (raw AAD, a key each) and their nonces.
fn nist_case() -> (Case, Vec<FieldNonce>) {
    let keys = NIST
        .iter()
        .map(|v| unhex(v.key).try_into().expect("32-byte key"))
        .collect();
    let fields = NIST
        .iter()
        .enumerate()
        .map(|(key, v)| Field {
            key,
            aad: Aad::Raw(unhex(v.aad)),
            bytes: unhex(v.pt),
        })
        .collect();
    let nonces = NIST
        .iter()
        .map(|v| unhex(v.iv).try_into().expect("96-bit IV"))
        .collect();
    (Case { keys, fields }, nonces)
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("test vector hex")
}

/// Damages some of `sealed`'s fields in every way a field can fail to open;
/// returns the damaged case and the reason each damaged field must fail
/// with (by index).
fn tamper(sealed: &Case) -> (Case, Vec<(usize, FailureReason)>) {
    let mut case = sealed.clone();
    let mut expected = Vec::new();
    let n = case.fields.len();
    let keys = case.keys.len();
    for i in (0..n).step_by(5) {
        let f = &mut case.fields[i];
        let len = f.bytes.len();
        let reason = match (i / 5) % 8 {
            0 => {
                f.bytes[len - 1] ^= 0x01; // tag altered
                FailureReason::Authentication
            }
            1 if len > SEAL_OVERHEAD => {
                f.bytes[13] ^= 0x80; // ciphertext altered
                FailureReason::Authentication
            }
            2 => {
                let cut = [0, 1, 13, 28][i % 4];
                f.bytes.truncate(cut);
                FailureReason::Truncated { len: cut }
            }
            3 => {
                f.bytes[0] = 2; // a format this build does not read
                FailureReason::UnknownFormat(2)
            }
            4 if keys > 1 => {
                f.key = (f.key + 1) % keys; // another user's key
                FailureReason::Authentication
            }
            5 => {
                if let Aad::Field { column, .. } = &mut f.aad {
                    *column = if *column == PII_COLUMNS[0] {
                        PII_COLUMNS[1]
                    } else {
                        PII_COLUMNS[0]
                    };
                }
                FailureReason::Authentication
            }
            6 => {
                f.bytes[1] ^= 0x10; // nonce altered
                FailureReason::Authentication
            }
            _ => continue,
        };
        expected.push((i, reason));
    }
    (case, expected)
}

// ------------------------------------------------- the kernels, host-compiled

/// The host harness, built once per test run: `None` (after skipping, or
/// failing under UMSTORE_REQUIRE_COMPONENTS) when there is no C compiler.
fn harness() -> Option<&'static Path> {
    static HARNESS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match HARNESS.get_or_init(build_harness) {
        Ok(path) => Some(path),
        Err(reason) => {
            skip_or_fail(Component::CCompiler, reason);
            None
        }
    }
}

fn build_harness() -> Result<PathBuf, String> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cc = std::env::var("CC")
        .ok()
        .filter(|cc| !cc.trim().is_empty())
        .unwrap_or_else(|| "cc".to_owned());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let built = dir.join(format!("gpu_host_harness.{}", std::process::id()));
    let output = Command::new(&cc)
        .args(["-std=c99", "-O2", "-Wall", "-Wextra"])
        .arg("-I")
        .arg(manifest.join("kernels"))
        .arg("-o")
        .arg(&built)
        .arg(manifest.join("tests/gpu_host/harness.c"))
        .output();
    let output = match output {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "no C compiler: `{cc}` ($CC or cc) is not on PATH ({e}); it compiles \
                 kernels/aes_gcm.cu as C to check the GPU kernels on the CPU"
            ))
        }
        Err(e) => panic!("running `{cc}`: {e}"),
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "`{cc}` could not compile kernels/aes_gcm.cu with tests/gpu_host/harness.c:\n{stderr}"
    );
    if !stderr.trim().is_empty() {
        eprintln!("`{cc}` warned while compiling the host harness:\n{stderr}");
    }
    // One name for every run; the rename replaces an older build atomically.
    let path = dir.join("gpu_host_harness");
    std::fs::rename(&built, &path).expect("move the host harness into place");
    Ok(path)
}

fn put_u32(out: &mut Vec<u8>, v: usize) {
    out.extend_from_slice(&u32::try_from(v).expect("fits u32").to_le_bytes());
}

/// Lays `parts` end to end after their `n + 1` offsets.
fn put_flat(out: &mut Vec<u8>, parts: &[Vec<u8>]) {
    let mut at = 0;
    put_u32(out, 0);
    for p in parts {
        at += p.len();
        put_u32(out, at);
    }
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// The harness's input (see tests/gpu_host/harness.c).
fn harness_input(op: usize, case: &Case, nonces: Option<&[FieldNonce]>) -> Vec<u8> {
    let mut out = Vec::new();
    put_u32(&mut out, op);
    put_u32(&mut out, case.keys.len());
    for k in &case.keys {
        out.extend_from_slice(k);
    }
    put_u32(&mut out, case.fields.len());
    for f in &case.fields {
        put_u32(&mut out, f.key);
    }
    let aad: Vec<Vec<u8>> = case.fields.iter().map(Field::aad_bytes).collect();
    put_flat(&mut out, &aad);
    let bytes: Vec<Vec<u8>> = case.fields.iter().map(|f| f.bytes.clone()).collect();
    put_flat(&mut out, &bytes);
    if let Some(nonces) = nonces {
        for n in nonces {
            out.extend_from_slice(n);
        }
    }
    out
}

fn run_harness(input: Vec<u8>) -> Option<Vec<u8>> {
    let path = harness()?;
    let mut child = Command::new(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the host harness");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().expect("host harness output");
    writer
        .join()
        .expect("writer")
        .expect("write the harness input");
    assert!(
        output.status.success(),
        "host harness failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(output.stdout)
}

/// Seals `case` with the host-compiled kernels: each sealed field.
fn host_seal(case: &Case, nonces: &[FieldNonce]) -> Option<Vec<Vec<u8>>> {
    let out = run_harness(harness_input(1, case, Some(nonces)))?;
    let mut at = 0;
    let fields = case
        .fields
        .iter()
        .map(|f| {
            let len = f.bytes.len() + SEAL_OVERHEAD;
            at += len;
            out[at - len..at].to_vec()
        })
        .collect();
    assert_eq!(at, out.len(), "sealed output length");
    Some(fields)
}

/// Opens `case` with the host-compiled kernels: each field's status byte and
/// output range (zeros for a field that did not open).
fn host_open(case: &Case) -> Option<Vec<(u8, Vec<u8>)>> {
    let out = run_harness(harness_input(2, case, None))?;
    let n = case.fields.len();
    let (status, plaintext) = out.split_at(n);
    let mut at = 0;
    let fields = case
        .fields
        .iter()
        .zip(status)
        .map(|(f, s)| {
            let len = f.bytes.len().saturating_sub(SEAL_OVERHEAD);
            at += len;
            (*s, plaintext[at - len..at].to_vec())
        })
        .collect();
    assert_eq!(at, plaintext.len(), "opened output length");
    Some(fields)
}

fn cpu_seal(case: &Case, nonces: &[FieldNonce]) -> Vec<Vec<u8>> {
    CpuEngine::new()
        .seal_batch(&case.seal_batch(), nonces)
        .expect("cpu seal")
        .iter()
        .map(<[u8]>::to_vec)
        .collect()
}

/// The status byte the kernels write for a CPU engine outcome.
fn status_byte(opened: &OpenedBatch, i: usize) -> u8 {
    match opened.get(i).expect("in range") {
        Ok(_) => 0,
        Err(f) => match f.reason {
            FailureReason::Truncated { .. } => 1,
            FailureReason::UnknownFormat(_) => 2,
            FailureReason::Authentication => 3,
        },
    }
}

#[test]
fn host_kernels_seal_and_open_the_nist_vectors() {
    let (case, nonces) = nist_case();
    let Some(sealed) = host_seal(&case, &nonces) else {
        return;
    };
    for (i, (v, out)) in NIST.iter().zip(&sealed).enumerate() {
        assert_eq!(out[0], 1, "vector {i}");
        assert_eq!(hex::encode(&out[1..13]), v.iv, "vector {i}");
        assert_eq!(
            hex::encode(&out[13..]),
            format!("{}{}", v.ct, v.tag),
            "vector {i}"
        );
    }
    // Open them back, one with its tag altered.
    let mut to_open = case.with_bytes(sealed);
    to_open.fields[5].bytes[20] ^= 1;
    let opened = host_open(&to_open).expect("harness built above");
    for (i, (v, (status, pt))) in NIST.iter().zip(&opened).enumerate() {
        if i == 5 {
            assert_eq!(*status, 3, "vector {i} was altered");
            assert!(pt.iter().all(|b| *b == 0), "a failed field reads as zeros");
        } else {
            assert_eq!(*status, 0, "vector {i}");
            assert_eq!(hex::encode(pt), v.pt, "vector {i}");
        }
    }
}

#[test]
fn host_kernels_seal_byte_identical_to_the_cpu_engine() {
    for (seed, users, per_user, interleave) in
        [(1, 300, 12, false), (2, 200, 8, true), (3, 1, 40, false)]
    {
        let (case, nonces) = random_case(seed, users, per_user, interleave);
        assert!(case.fields.iter().any(|f| f.bytes.is_empty()));
        let Some(host) = host_seal(&case, &nonces) else {
            return;
        };
        let cpu = cpu_seal(&case, &nonces);
        assert_eq!(host.len(), cpu.len());
        for (i, (h, c)) in host.iter().zip(&cpu).enumerate() {
            assert_eq!(h, c, "seed {seed}, field {i}");
        }
    }
}

#[test]
fn host_kernels_open_and_fail_fields_exactly_like_the_cpu_engine() {
    let (case, nonces) = random_case(4, 150, 10, true);
    let sealed = case.with_bytes(cpu_seal(&case, &nonces));
    let (tampered, expected) = tamper(&sealed);
    let Some(host) = host_open(&tampered) else {
        return;
    };
    let cpu = CpuEngine::new()
        .open_batch(&tampered.open_batch())
        .expect("cpu open");
    let reasons: Vec<_> = cpu.failures().iter().map(|f| (f.item, f.reason)).collect();
    assert_eq!(reasons, expected, "the CPU engine fails what was damaged");
    for (i, (status, pt)) in host.iter().enumerate() {
        assert_eq!(*status, status_byte(&cpu, i), "field {i}");
        match cpu.get(i).expect("in range") {
            Ok(plain) => {
                assert_eq!(pt.as_slice(), plain, "field {i}");
                assert_eq!(plain, case.fields[i].bytes.as_slice(), "field {i}");
            }
            Err(_) => assert!(pt.iter().all(|b| *b == 0), "field {i} reads as zeros"),
        }
    }
}

#[test]
fn host_kernels_take_empty_batches_and_batches_of_empty_fields() {
    let empty = Case {
        keys: vec![[7; 32]],
        fields: Vec::new(),
    };
    let Some(sealed) = host_seal(&empty, &[]) else {
        return;
    };
    assert!(sealed.is_empty());
    assert!(host_open(&empty).expect("harness").is_empty());
    // Every field empty: no CTR block at all, only tags.
    let (mut case, nonces) = random_case(5, 20, 3, false);
    for f in &mut case.fields {
        f.bytes.clear();
    }
    let host = host_seal(&case, &nonces).expect("harness");
    assert_eq!(host, cpu_seal(&case, &nonces));
    let opened = host_open(&case.with_bytes(host)).expect("harness");
    assert!(opened.iter().all(|(s, pt)| *s == 0 && pt.is_empty()));
}

// ------------------------------------------------------------- the real GPU

/// The GPU engine, opened once; `None` after skipping with the reason.
fn gpu() -> Option<&'static GpuEngine> {
    static GPU: OnceLock<Result<GpuEngine, String>> = OnceLock::new();
    match GPU.get_or_init(|| GpuEngine::open().map_err(|e| e.to_string())) {
        Ok(engine) => Some(engine),
        Err(reason) => {
            skip_or_fail(Component::Gpu, format!("no GPU engine: {reason}"));
            None
        }
    }
}

#[test]
fn opening_the_gpu_engine_never_panics_and_says_why_it_cannot() {
    let opened = std::panic::catch_unwind(GpuEngine::open).expect("GpuEngine::open panicked");
    match opened {
        Ok(engine) => {
            let info = engine.info();
            assert_eq!(info.name, "gpu");
            assert!(!info.device.is_empty());
            let chosen = select(EngineChoice::Gpu, 10).expect("a GPU is present");
            assert_eq!(chosen.engine.name(), "gpu");
        }
        Err(e) => {
            let why = e.to_string();
            assert!(why.len() > 20, "{why}");
            match select(EngineChoice::Gpu, 10) {
                Err(BulkError::NoGpu { detail }) => assert_eq!(detail, why),
                other => panic!("--engine gpu without a GPU: {other:?}"),
            }
            let auto = select(EngineChoice::Auto, 10_000_000).expect("auto falls back");
            assert_eq!(auto.engine.name(), "cpu");
            assert!(auto.reason.contains(&why), "{}", auto.reason);
        }
    }
}

#[test]
fn gpu_engine_seals_byte_identical_to_the_cpu_engine_and_each_opens_the_other() {
    let Some(gpu) = gpu() else {
        return;
    };
    for (seed, users, per_user, interleave) in [(11, 400, 12, false), (12, 300, 8, true)] {
        let (case, nonces) = random_case(seed, users, per_user, interleave);
        let batch = case.seal_batch();
        let on_gpu = gpu.seal_batch(&batch, &nonces).expect("gpu seal");
        let on_cpu = CpuEngine::new()
            .seal_batch(&batch, &nonces)
            .expect("cpu seal");
        assert_eq!(on_gpu.offsets(), on_cpu.offsets());
        for (i, (g, c)) in on_gpu.iter().zip(on_cpu.iter()).enumerate() {
            assert_eq!(g, c, "seed {seed}, field {i}");
        }
        // The CPU opens the GPU's fields and the GPU the CPU's.
        let from_gpu = case.with_bytes(on_gpu.iter().map(<[u8]>::to_vec));
        let from_cpu = case.with_bytes(on_cpu.iter().map(<[u8]>::to_vec));
        let by_cpu = CpuEngine::new()
            .open_batch(&from_gpu.open_batch())
            .expect("cpu open");
        let by_gpu = gpu.open_batch(&from_cpu.open_batch()).expect("gpu open");
        assert!(by_cpu.all_opened() && by_gpu.all_opened());
        for (i, f) in case.fields.iter().enumerate() {
            assert_eq!(by_cpu.get(i).and_then(Result::ok), Some(f.bytes.as_slice()));
            assert_eq!(by_gpu.get(i).and_then(Result::ok), Some(f.bytes.as_slice()));
        }
    }
}

#[test]
fn gpu_engine_fails_fields_exactly_like_the_cpu_engine() {
    let Some(gpu) = gpu() else {
        return;
    };
    let (case, nonces) = random_case(13, 150, 10, true);
    let sealed = case.with_bytes(cpu_seal(&case, &nonces));
    let (tampered, expected) = tamper(&sealed);
    let batch = tampered.open_batch();
    let on_gpu = gpu.open_batch(&batch).expect("gpu open");
    let on_cpu = CpuEngine::new().open_batch(&batch).expect("cpu open");
    let reasons: Vec<_> = on_gpu
        .failures()
        .iter()
        .map(|f| (f.item, f.reason))
        .collect();
    assert_eq!(reasons, expected);
    assert_eq!(on_gpu.failures(), on_cpu.failures());
    for i in 0..batch.len() {
        assert_eq!(on_gpu.get(i), on_cpu.get(i), "field {i}");
    }
}

#[test]
fn gpu_engine_takes_empty_batches() {
    let Some(gpu) = gpu() else {
        return;
    };
    assert!(gpu
        .seal_batch(&SealBatch::new(), &[])
        .expect("seal")
        .is_empty());
    assert!(gpu.open_batch(&OpenBatch::new()).expect("open").is_empty());
    let (mut case, nonces) = random_case(14, 20, 3, false);
    for f in &mut case.fields {
        f.bytes.clear();
    }
    let sealed = gpu.seal_batch(&case.seal_batch(), &nonces).expect("seal");
    assert_eq!(
        sealed.iter().map(<[u8]>::to_vec).collect::<Vec<_>>(),
        cpu_seal(&case, &nonces)
    );
}

#[test]
fn gpu_engine_seals_and_opens_a_million_fields_like_the_cpu_engine() {
    let Some(gpu) = gpu() else {
        return;
    };
    let mut rng = fastrand::Rng::with_seed(15);
    let users = 100_000;
    let keys: Vec<[u8; 32]> = (0..users)
        .map(|_| std::array::from_fn(|_| rng.u8(..)))
        .collect();
    let user_ids: Vec<Uuid> = (0..users).map(|_| Uuid::from_u128(rng.u128(..))).collect();
    let fields = (0..1_000_000)
        .map(|i| {
            let key = i * users / 1_000_000;
            Field {
                key,
                aad: Aad::Field {
                    user_id: user_ids[key],
                    region: REGIONS[key % REGIONS.len()],
                    column: PII_COLUMNS[i % PII_COLUMNS.len()],
                },
                bytes: (0..rng.usize(8..=64)).map(|_| rng.u8(..)).collect(),
            }
        })
        .collect();
    let case = Case { keys, fields };
    let nonces: Vec<FieldNonce> = (0..case.fields.len())
        .map(|_| std::array::from_fn(|_| rng.u8(..)))
        .collect();
    let batch = case.seal_batch();
    let on_gpu = gpu.seal_batch(&batch, &nonces).expect("gpu seal");
    let on_cpu = CpuEngine::new()
        .seal_batch(&batch, &nonces)
        .expect("cpu seal");
    assert!(on_gpu == on_cpu, "a million fields sealed the same on both");
    let opened = gpu
        .open_batch(
            &case
                .with_bytes(on_gpu.iter().map(<[u8]>::to_vec))
                .open_batch(),
        )
        .expect("gpu open");
    assert!(opened.all_opened(), "{:?}", opened.failures().first());
    for (i, f) in case.fields.iter().enumerate() {
        assert_eq!(
            opened.get(i).and_then(Result::ok),
            Some(f.bytes.as_slice()),
            "field {i}"
        );
    }
}
