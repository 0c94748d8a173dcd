//! Bulk engine benchmark: batch AES-256-GCM seal and open of many small
//! fields under many users' keys, the CPU engine on all cores and on one
//! thread, beside a single-core `aes-gcm` loop over the same fields with the
//! same nonces (whose output is checked byte for byte against the engine's).
//!
//! Where a CUDA GPU is present, the GPU engine too (its output checked against
//! the CPU engine's), with and without the host↔device copies, naming the card;
//! without one it says it skipped the GPU rows and why.
//!
//! `cargo bench -p umstore-data-plane --bench bulk_engine [-- --fields N --users U --runs R]`
//! (defaults: 1,000,000 fields of 8–64 bytes over 100,000 users, 3 runs).

use std::time::Instant;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use umstore_data_plane::bulk::{
    random_nonces, BulkEngine, CpuEngine, FieldNonce, GpuEngine, GpuTimings, OpenBatch, SealBatch,
    SealedBatch,
};
use umstore_data_plane::crypto::{DataKey, FieldAad, PII_COLUMNS};
use uuid::Uuid;

const REGIONS: [&str; 4] = ["KA", "TN", "MH", "UP"];

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// The fields as plain data, in user order: what a caller holds before
/// building a batch.
struct Data {
    key_bytes: Vec<[u8; 32]>,
    keys: Vec<DataKey>,
    /// (user, aad, plaintext)
    fields: Vec<(usize, FieldAad<'static>, Vec<u8>)>,
    nonces: Vec<FieldNonce>,
    plaintext_bytes: usize,
}

fn data(fields: usize, users: usize) -> Option<Data> {
    let mut rng = fastrand::Rng::with_seed(2026);
    let key_bytes: Vec<[u8; 32]> = (0..users)
        .map(|_| std::array::from_fn(|_| rng.u8(..)))
        .collect();
    let keys: Vec<DataKey> = key_bytes.iter().map(|k| DataKey::from_bytes(*k)).collect();
    let user_ids: Vec<Uuid> = (0..users).map(|_| Uuid::from_u128(rng.u128(..))).collect();
    let mut out = Vec::with_capacity(fields);
    let mut plaintext_bytes = 0;
    for i in 0..fields {
        // Fields spread evenly over users, each user's together.
        let user = i * users / fields;
        let len = rng.usize(8..=64);
        plaintext_bytes += len;
        let aad = FieldAad {
            user_id: user_ids[user],
            region: REGIONS[user % REGIONS.len()],
            column: PII_COLUMNS[i % PII_COLUMNS.len()],
        };
        out.push((user, aad, (0..len).map(|_| rng.u8(..)).collect()));
    }
    let nonces = random_nonces(fields).ok()?;
    Some(Data {
        key_bytes,
        keys,
        fields: out,
        nonces,
        plaintext_bytes,
    })
}

fn aad_bytes(aad: &FieldAad<'_>, out: &mut Vec<u8>) {
    out.clear();
    out.push(1);
    out.extend_from_slice(aad.user_id.as_bytes());
    out.extend_from_slice(aad.region.as_bytes());
    out.push(0);
    out.extend_from_slice(aad.column.as_bytes());
}

/// The baseline: one core, `aes-gcm`'s `encrypt` per field, a user's cipher
/// built once for their run of fields, output in the sealed format end to end.
fn baseline_seal(d: &Data) -> Vec<u8> {
    let mut out = Vec::with_capacity(d.plaintext_bytes + d.fields.len() * 29);
    let mut aad = Vec::with_capacity(64);
    let mut current: Option<(usize, Aes256Gcm)> = None;
    for ((user, field_aad, pt), nonce) in d.fields.iter().zip(&d.nonces) {
        if current.as_ref().map(|c| c.0) != Some(*user) {
            let key = Key::<Aes256Gcm>::from_slice(&d.key_bytes[*user]);
            current = Some((*user, Aes256Gcm::new(key)));
        }
        let Some((_, cipher)) = &current else { break };
        aad_bytes(field_aad, &mut aad);
        let Ok(ct) = cipher.encrypt(Nonce::from_slice(nonce), Payload { msg: pt, aad: &aad })
        else {
            break;
        };
        out.push(1);
        out.extend_from_slice(nonce);
        out.extend_from_slice(&ct);
    }
    out
}

/// The baseline's open: one core, `decrypt` per field, plaintexts end to end.
fn baseline_open(d: &Data, sealed: &SealedBatch) -> Vec<u8> {
    let mut out = Vec::with_capacity(d.plaintext_bytes);
    let mut aad = Vec::with_capacity(64);
    let mut current: Option<(usize, Aes256Gcm)> = None;
    for ((user, field_aad, _), field) in d.fields.iter().zip(sealed.iter()) {
        if current.as_ref().map(|c| c.0) != Some(*user) {
            let key = Key::<Aes256Gcm>::from_slice(&d.key_bytes[*user]);
            current = Some((*user, Aes256Gcm::new(key)));
        }
        let Some((_, cipher)) = &current else { break };
        aad_bytes(field_aad, &mut aad);
        let Ok(pt) = cipher.decrypt(
            Nonce::from_slice(&field[1..13]),
            Payload {
                msg: &field[13..],
                aad: &aad,
            },
        ) else {
            break;
        };
        out.extend_from_slice(&pt);
    }
    out
}

fn seal_batch(d: &Data) -> Option<SealBatch> {
    let mut batch = SealBatch::with_capacity(d.keys.len(), d.fields.len(), d.plaintext_bytes);
    let mut index = Vec::with_capacity(d.keys.len());
    for k in &d.keys {
        index.push(batch.add_key(k).ok()?);
    }
    for (user, aad, pt) in &d.fields {
        batch.push(index[*user], aad, pt).ok()?;
    }
    Some(batch)
}

fn open_batch(d: &Data, sealed: &SealedBatch) -> Option<OpenBatch> {
    let mut batch = OpenBatch::new();
    let mut index = Vec::with_capacity(d.keys.len());
    for k in &d.keys {
        index.push(batch.add_key(k).ok()?);
    }
    for ((user, aad, _), field) in d.fields.iter().zip(sealed.iter()) {
        batch.push(index[*user], aad, field).ok()?;
    }
    Some(batch)
}

/// CPU seconds this process has used (all threads, user and system).
fn process_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Seconds of each run of one path, and the CPU seconds it used over all.
struct Timing {
    runs: Vec<f64>,
    cpu: f64,
}

/// Runs the paths in turn, `runs` rounds (baseline, one thread, all cores,
/// baseline, ...), so load from elsewhere falls on all of them alike.
fn time_rounds(runs: usize, ops: &mut [&mut dyn FnMut()]) -> Vec<Timing> {
    let mut out: Vec<Timing> = (0..ops.len())
        .map(|_| Timing {
            runs: Vec::with_capacity(runs),
            cpu: 0.0,
        })
        .collect();
    for _ in 0..runs {
        for (op, timing) in ops.iter_mut().zip(out.iter_mut()) {
            let cpu = process_cpu_secs();
            let t = Instant::now();
            op();
            timing.runs.push(t.elapsed().as_secs_f64());
            timing.cpu += process_cpu_secs() - cpu;
        }
    }
    out
}

fn median(runs: &[f64]) -> f64 {
    let mut v = runs.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn best(runs: &[f64]) -> f64 {
    runs.iter().copied().fold(f64::INFINITY, f64::min)
}

fn print_table(title: &str, names: &[String], timings: &[Timing], fields: usize, bytes: usize) {
    println!("### {title}");
    println!(
        "| path | median s | best s | runs (s) | fields/s (median) | GB/s (median, plaintext) | median vs baseline | CPU s per s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let base = timings.first().map(|t| median(&t.runs)).unwrap_or(1.0);
    for (name, t) in names.iter().zip(timings) {
        let m = median(&t.runs);
        let all: Vec<String> = t.runs.iter().map(|s| format!("{s:.3}")).collect();
        println!(
            "| {name} | {m:.3} | {:.3} | {} | {:.2} M | {:.3} | {:.2}× | {:.2} |",
            best(&t.runs),
            all.join(", "),
            fields as f64 / m / 1e6,
            bytes as f64 / m / 1e9,
            base / m,
            t.cpu / t.runs.iter().sum::<f64>()
        );
    }
    println!();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let fields = arg(&args, "--fields", 1_000_000);
    let users = arg(&args, "--users", 100_000).clamp(1, fields.max(1));
    let runs = arg(&args, "--runs", 3).max(1);

    let t = Instant::now();
    let Some(d) = data(fields, users) else {
        println!("cannot draw nonces from the OS RNG");
        return;
    };
    let Some(sbatch) = seal_batch(&d) else {
        println!("cannot build the seal batch");
        return;
    };
    let all_cores = CpuEngine::new();
    let Ok(one_thread) = CpuEngine::with_threads(1) else {
        println!("cannot start a one-thread pool");
        return;
    };
    let info = all_cores.info();
    println!(
        "## Bulk engine: {fields} fields of 8–64 bytes ({:.1} MB of plaintext) over {users} users, {runs} runs",
        d.plaintext_bytes as f64 / 1e6
    );
    println!(
        "engine: {info}; data generated in {:.1} s\n",
        t.elapsed().as_secs_f64()
    );

    // Seal.
    let reference = baseline_seal(&d);
    let Ok(sealed) = all_cores.seal_batch(&sbatch, &d.nonces) else {
        println!("seal_batch failed");
        return;
    };
    let identical = sealed.as_bytes() == reference.as_slice();
    let names = [
        "single-core `aes-gcm` loop (baseline)".to_owned(),
        "CpuEngine, 1 thread".to_owned(),
        format!("CpuEngine, all cores ({} threads)", info.parallelism),
    ];
    let secs = time_rounds(
        runs,
        &mut [
            &mut || {
                std::hint::black_box(baseline_seal(&d));
            },
            &mut || {
                std::hint::black_box(one_thread.seal_batch(&sbatch, &d.nonces).ok());
            },
            &mut || {
                std::hint::black_box(all_cores.seal_batch(&sbatch, &d.nonces).ok());
            },
        ],
    );
    print_table("Seal", &names, &secs, fields, d.plaintext_bytes);
    let build = time_rounds(
        runs,
        &mut [&mut || {
            std::hint::black_box(seal_batch(&d));
        }],
    );
    let build = build.first().map(|t| median(&t.runs)).unwrap_or(f64::NAN);
    println!(
        "engine output byte-identical to the baseline's: {identical}; building the SealBatch (copying the fields in): {build:.3} s\n"
    );

    // Open.
    let Some(obatch) = open_batch(&d, &sealed) else {
        println!("cannot build the open batch");
        return;
    };
    let reference = baseline_open(&d, &sealed);
    let Ok(opened) = all_cores.open_batch(&obatch) else {
        println!("open_batch failed");
        return;
    };
    let all_ok = opened.all_opened()
        && opened
            .iter()
            .flatten()
            .flatten()
            .copied()
            .eq(reference.iter().copied());
    let secs = time_rounds(
        runs,
        &mut [
            &mut || {
                std::hint::black_box(baseline_open(&d, &sealed));
            },
            &mut || {
                std::hint::black_box(one_thread.open_batch(&obatch).ok());
            },
            &mut || {
                std::hint::black_box(all_cores.open_batch(&obatch).ok());
            },
        ],
    );
    print_table("Open", &names, &secs, fields, d.plaintext_bytes);
    println!("every field opened to the baseline's plaintext: {all_ok}");

    gpu_rows(&d, &sbatch, &sealed, &obatch, &opened, runs);
}

/// Seconds of each run of each GPU path: the whole call (with the copies),
/// and the parts `GpuTimings` splits it into.
#[derive(Default)]
struct GpuRuns {
    call: Vec<f64>,
    upload: Vec<f64>,
    kernels: Vec<f64>,
    download: Vec<f64>,
}

impl GpuRuns {
    fn push(&mut self, call: f64, t: GpuTimings) {
        self.call.push(call);
        self.upload.push(t.upload.as_secs_f64());
        self.kernels.push(t.kernels.as_secs_f64());
        self.download.push(t.download.as_secs_f64());
    }
}

fn print_gpu_table(title: &str, r: &GpuRuns, cpu_median: f64, fields: usize, bytes: usize) {
    println!("### {title}");
    println!("| path | median s | best s | fields/s (median) | GB/s (median, plaintext) | median vs CpuEngine all cores |");
    println!("|---|---|---|---|---|---|");
    for (name, runs) in [
        (
            "GpuEngine, with host↔device copies (the whole call)",
            &r.call,
        ),
        ("GpuEngine, kernels alone", &r.kernels),
        ("  of which: host→device copy", &r.upload),
        ("  of which: device→host copy", &r.download),
    ] {
        let m = median(runs);
        println!(
            "| {name} | {m:.4} | {:.4} | {:.2} M | {:.3} | {:.2}× |",
            best(runs),
            fields as f64 / m / 1e6,
            bytes as f64 / m / 1e9,
            cpu_median / m
        );
    }
    println!();
}

/// The GPU engine's rows beside the CPU engine's, where a GPU is present.
fn gpu_rows(
    d: &Data,
    sbatch: &SealBatch,
    cpu_sealed: &SealedBatch,
    obatch: &OpenBatch,
    cpu_opened: &umstore_data_plane::bulk::OpenedBatch,
    runs: usize,
) {
    let gpu = match GpuEngine::open() {
        Ok(gpu) => gpu,
        Err(e) => {
            println!("\nGPU rows skipped: no GPU engine ({e})");
            return;
        }
    };
    let info = gpu.info();
    println!("\n## GPU engine on {} ({runs} runs)\n", info.device);
    let cpu = CpuEngine::new();
    // The first call also warms the context and the module up.
    let sealed = match gpu.seal_batch_timed(sbatch, &d.nonces) {
        Ok((sealed, _)) => sealed,
        Err(e) => {
            println!("GPU seal failed: {e}");
            return;
        }
    };
    let identical = &sealed == cpu_sealed;
    let mut seal = GpuRuns::default();
    let mut open = GpuRuns::default();
    let mut cpu_seal = Vec::new();
    let mut cpu_open = Vec::new();
    let mut opened_same = true;
    for _ in 0..runs {
        let t = Instant::now();
        let Ok((out, timings)) = gpu.seal_batch_timed(sbatch, &d.nonces) else {
            println!("GPU seal failed");
            return;
        };
        seal.push(t.elapsed().as_secs_f64(), timings);
        std::hint::black_box(out);
        let t = Instant::now();
        let Ok((out, timings)) = gpu.open_batch_timed(obatch) else {
            println!("GPU open failed");
            return;
        };
        open.push(t.elapsed().as_secs_f64(), timings);
        opened_same &= out.all_opened() && out.iter().eq(cpu_opened.iter());
        let t = Instant::now();
        std::hint::black_box(cpu.seal_batch(sbatch, &d.nonces).ok());
        cpu_seal.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        std::hint::black_box(cpu.open_batch(obatch).ok());
        cpu_open.push(t.elapsed().as_secs_f64());
    }
    let fields = d.fields.len();
    print_gpu_table(
        "GPU seal",
        &seal,
        median(&cpu_seal),
        fields,
        d.plaintext_bytes,
    );
    print_gpu_table(
        "GPU open",
        &open,
        median(&cpu_open),
        fields,
        d.plaintext_bytes,
    );
    println!(
        "GPU output byte-identical to CpuEngine's: {identical}; every field opened on the GPU to \
         CpuEngine's plaintext: {opened_same}"
    );
}
