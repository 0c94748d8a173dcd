//! The GPU aggregation (`bulk stats --engine gpu`), checked two ways.
//!
//! On every machine: the kernel source itself (`kernels/aggregate.cu`) is
//! compiled as C with the system C compiler together with
//! `tests/gpu_host/aggregate_harness.c`, which runs both kernels block by
//! block and thread by thread over a grid; the columns go in laid out by
//! `KernelInput::prepare` (what `GpuAggregator` copies to the device) and the
//! table comes back through `KernelInput::partials` (what it reads back), and
//! the partials must be `CpuAggregator`'s, group for group. A missing C
//! compiler skips, and fails under `UMSTORE_REQUIRE_COMPONENTS`.
//!
//! Where a CUDA GPU is present: the same columns through `GpuAggregator`
//! itself. Without a GPU those tests skip with the reason
//! `GpuAggregator::open` gives (the GPU is an exempt component: CI has none).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use umstore_data_plane::bulk::aggregate::{
    aggregator, AggregateError, Aggregator, CodedColumn, Columns, CpuAggregator,
};
use umstore_data_plane::bulk::gpu_aggregate::{
    KernelInput, KernelKind, Prepared, GPU_DENSE_GROUPS, GROUP_WORDS, SHARED_GROUPS,
};
use umstore_data_plane::bulk::{EngineKind, GpuAggregator};
use umstore_data_plane::stats::{Partial, Sum};
use umstore_e2e::skip::{skip_or_fail, Component};

const DIMENSIONS: [&str; 4] = ["region", "gender", "income_bracket", "life_stage"];

// ---------------------------------------------------------------- columns

/// `rows` random rows grouped by `dictionaries.len()` dimensions, dimension
/// `d` drawing from `dictionaries[d]` values and NULL; measures missing about
/// one row in four, over the whole of i16 (negative, 0, the extremes).
fn random_columns(seed: u64, rows: usize, dictionaries: &[usize]) -> Columns {
    let mut rng = fastrand::Rng::with_seed(seed);
    let names: Vec<String> = DIMENSIONS[..dictionaries.len()]
        .iter()
        .map(|d| (*d).to_owned())
        .collect();
    let mut columns = Columns::new(&names);
    let values: Vec<Vec<String>> = dictionaries
        .iter()
        .map(|n| (0..*n).map(|i| format!("v{i}")).collect())
        .collect();
    let measure = |rng: &mut fastrand::Rng| match rng.u8(..8) {
        0 | 1 => None,
        2 => Some([i16::MIN, i16::MAX, 0, -1][rng.usize(..4)]),
        3 => Some(rng.i16(..)),
        _ => Some(rng.i16(-200..=200)),
    };
    for _ in 0..rows {
        for (column, dictionary) in columns.dimensions.iter_mut().zip(&values) {
            // NULL about one time in (values + 1), at least one in 8.
            let value = match rng.usize(..=dictionary.len()) {
                0 => None,
                _ if rng.u8(..8) == 0 => None,
                i => Some(dictionary[i - 1].as_str()),
            };
            column.push(value).expect("push");
        }
        columns.income_lakh.push(measure(&mut rng));
        columns.household_size.push(measure(&mut rng));
        columns.overall_risk_centi.push(measure(&mut rng));
    }
    columns
}

fn sorted(mut partials: Vec<Partial>) -> Vec<Partial> {
    partials.sort_by(|a, b| a.key.cmp(&b.key));
    partials
}

fn on_cpu(columns: &Columns) -> Vec<Partial> {
    sorted(CpuAggregator.aggregate(columns).expect("cpu aggregate"))
}

fn kernel_input(columns: &Columns) -> KernelInput {
    match KernelInput::prepare(columns).expect("prepare") {
        Prepared::Kernel(input) => input,
        Prepared::OnCpu { reason } => panic!("left to the CPU: {reason}"),
    }
}

/// The grids each input runs on in the harness: the one `GpuAggregator`
/// launches on an H100-sized (132 SMs) and a one-SM device, and odd ones
/// (threads that get no row, blocks of one thread, one thread in all).
fn grids(input: &KernelInput) -> Vec<(u32, u32)> {
    let mut grids: Vec<(u32, u32)> = [132, 1]
        .into_iter()
        .map(|sms| {
            let launch = input.launch(sms);
            (launch.blocks, launch.threads)
        })
        .collect();
    grids.extend([(3, 7), (5, 1), (1, 1)]);
    grids
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

/// Compiles `aggregate.cu` with the harness (as tests/bulk_gpu.rs builds
/// its harness for aes_gcm.cu; a copy of that helper, for this harness).
fn build_harness() -> Result<PathBuf, String> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cc = std::env::var("CC")
        .ok()
        .filter(|cc| !cc.trim().is_empty())
        .unwrap_or_else(|| "cc".to_owned());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let built = dir.join(format!("gpu_aggregate_harness.{}", std::process::id()));
    let output = Command::new(&cc)
        .args(["-std=c99", "-O2", "-Wall", "-Wextra"])
        .arg("-I")
        .arg(manifest.join("kernels"))
        .arg("-o")
        .arg(&built)
        .arg(manifest.join("tests/gpu_host/aggregate_harness.c"))
        .output();
    let output = match output {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "no C compiler: `{cc}` ($CC or cc) is not on PATH ({e}); it compiles \
                 kernels/aggregate.cu as C to check the GPU aggregation on the CPU"
            ))
        }
        Err(e) => panic!("running `{cc}`: {e}"),
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "`{cc}` could not compile kernels/aggregate.cu with \
         tests/gpu_host/aggregate_harness.c:\n{stderr}"
    );
    assert!(
        stderr.trim().is_empty(),
        "`{cc}` warned while compiling the aggregate harness:\n{stderr}"
    );
    // One name for every run; the rename replaces an older build atomically.
    let path = dir.join("gpu_aggregate_harness");
    std::fs::rename(&built, &path).expect("move the aggregate harness into place");
    Ok(path)
}

/// The harness's input (see tests/gpu_host/aggregate_harness.c).
fn harness_input(input: &KernelInput, kernel: KernelKind, blocks: u32, threads: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let kernel = match kernel {
        KernelKind::Shared => 1u32,
        KernelKind::Global => 2,
    };
    let n_dims = u32::try_from(input.strides.len()).expect("dimensions");
    for v in [kernel, blocks, threads, input.rows, n_dims, input.groups] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for s in &input.strides {
        out.extend_from_slice(&s.to_le_bytes());
    }
    for c in &input.codes {
        out.extend_from_slice(&c.to_le_bytes());
    }
    for v in &input.values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&input.present);
    out
}

/// The table the kernel computes for `input` on a grid of `blocks` ×
/// `threads`, from the host-compiled kernels.
fn host_table(
    input: &KernelInput,
    kernel: KernelKind,
    blocks: u32,
    threads: u32,
) -> Option<Vec<u64>> {
    let path = harness()?;
    let mut child = Command::new(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the aggregate harness");
    let mut stdin = child.stdin.take().expect("stdin");
    let bytes = harness_input(input, kernel, blocks, threads);
    let writer = std::thread::spawn(move || stdin.write_all(&bytes));
    let output = child.wait_with_output().expect("aggregate harness output");
    writer
        .join()
        .expect("writer")
        .expect("write the harness input");
    assert!(
        output.status.success(),
        "aggregate harness failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.stdout.len(), input.out_words() * 8, "table length");
    Some(
        output
            .stdout
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
            .collect(),
    )
}

/// Runs `columns` through the host-compiled kernels on every grid of
/// [`grids`] and with both kernels (the shared one only where the device
/// would run it), and checks each answer is the CPU's. `false` when the
/// harness could not be built (skipped).
fn check_host(what: &str, columns: &Columns) -> bool {
    let expected = on_cpu(columns);
    let input = kernel_input(columns);
    let mut kernels = vec![KernelKind::Global];
    if input.groups as usize <= SHARED_GROUPS {
        kernels.push(KernelKind::Shared);
    }
    for kernel in kernels {
        for (blocks, threads) in grids(&input) {
            let Some(table) = host_table(&input, kernel, blocks, threads) else {
                return false;
            };
            let partials = sorted(input.partials(columns, &table).expect("partials"));
            assert!(
                partials == expected,
                "{what}: {kernel:?} kernel on {blocks} × {threads}: {} groups vs the CPU's {}; \
                 first difference: {:?}",
                partials.len(),
                expected.len(),
                partials
                    .iter()
                    .zip(&expected)
                    .find(|(g, c)| g != c)
                    .map(|(g, c)| (g.clone(), c.clone()))
            );
        }
    }
    true
}

#[test]
fn host_kernels_group_like_the_cpu_over_0_to_4_dimensions() {
    let cases: [(&str, &[usize]); 7] = [
        ("no dimension", &[]),
        ("one dimension", &[36]),
        ("one dimension of one value", &[1]),
        ("two dimensions", &[36, 4]),
        ("three dimensions", &[4, 7, 2]),
        ("four dimensions", &[36, 4, 4, 7]),
        ("four dimensions past the shared table", &[36, 4, 4, 40]),
    ];
    for (seed, (what, dictionaries)) in cases.iter().enumerate() {
        let columns = random_columns(seed as u64 + 1, 5_000, dictionaries);
        if !check_host(what, &columns) {
            return;
        }
    }
}

#[test]
fn host_kernels_take_one_row_and_no_rows() {
    for dictionaries in [&[][..], &[3, 2][..]] {
        let one = random_columns(20, 1, dictionaries);
        if !check_host("one row", &one) {
            return;
        }
        let none = random_columns(21, 0, dictionaries);
        assert!(on_cpu(&none).is_empty());
        check_host("no rows", &none);
    }
}

/// Region, income, household size, risk.
type Row = (Option<&'static str>, Option<i16>, Option<i16>, Option<i16>);

#[test]
fn host_kernels_sum_negative_values_and_skip_missing_ones() {
    // Known answers, not only the CPU's: a group whose sum is negative, one
    // whose values are all missing, NULL as a group of its own.
    let mut columns = Columns::new(&["region".to_owned()]);
    let rows: [Row; 5] = [
        (Some("KA"), Some(-32768), None, Some(-1)),
        (Some("KA"), Some(-5), None, None),
        (Some("TN"), None, None, None),
        (None, Some(32767), Some(3), Some(0)),
        (None, Some(32767), Some(-3), None),
    ];
    for (region, income, household, risk) in rows {
        columns.dimensions[0].push(region).expect("push");
        columns.income_lakh.push(income);
        columns.household_size.push(household);
        columns.overall_risk_centi.push(risk);
    }
    let sum = |n, total| Sum { n, total };
    let expected = vec![
        Partial {
            key: vec![None],
            users: 2,
            income_lakh: sum(2, 65534),
            household_size: sum(2, 0),
            overall_risk_centi: sum(1, 0),
        },
        Partial {
            key: vec![Some("KA".to_owned())],
            users: 2,
            income_lakh: sum(2, -32773),
            household_size: sum(0, 0),
            overall_risk_centi: sum(1, -1),
        },
        Partial {
            key: vec![Some("TN".to_owned())],
            users: 1,
            income_lakh: sum(0, 0),
            household_size: sum(0, 0),
            overall_risk_centi: sum(0, 0),
        },
    ];
    assert_eq!(on_cpu(&columns), expected, "the CPU's answer");
    check_host("negative and missing values", &columns);
}

#[test]
fn host_kernels_group_a_few_hundred_thousand_rows_like_the_cpu() {
    let columns = random_columns(30, 300_000, &[36, 4, 3]);
    check_host("300,000 rows", &columns);
}

#[test]
fn host_kernels_add_a_single_huge_group_like_the_cpu() {
    // Every row in one group: every thread of every block adds into the same
    // accumulators.
    let mut columns = random_columns(40, 400_000, &[1]);
    for code in &mut columns.dimensions[0].codes {
        *code = 1;
    }
    let expected = on_cpu(&columns);
    assert_eq!(expected.len(), 1);
    assert_eq!(expected[0].users, 400_000);
    check_host("one group of 400,000 rows", &columns);
    let total = random_columns(41, 400_000, &[]);
    check_host("no dimension, 400,000 rows", &total);
}

#[test]
fn key_spaces_past_the_dense_table_are_grouped_on_the_cpu() {
    // 4 dimensions of 20 values: 21^4 = 194,481 combinations.
    let columns = random_columns(50, 2_000, &[20, 20, 20, 20]);
    match KernelInput::prepare(&columns).expect("prepare") {
        Prepared::OnCpu { reason } => {
            assert!(reason.contains(&GPU_DENSE_GROUPS.to_string()), "{reason}")
        }
        Prepared::Kernel(input) => panic!("{} groups went to the kernels", input.groups),
    }
    // Three such dimensions (21^3 = 9,261) are the kernels'.
    let columns = random_columns(51, 2_000, &[20, 20, 20]);
    assert_eq!(kernel_input(&columns).groups, 9_261);
    assert_eq!(kernel_input(&columns).out_words(), 9_261 * GROUP_WORDS);
}

#[test]
fn bad_columns_are_refused_before_the_device() {
    let mut columns = random_columns(60, 10, &[3]);
    columns.overall_risk_centi.pop();
    assert!(matches!(
        KernelInput::prepare(&columns),
        Err(AggregateError::Ragged { .. })
    ));
    let mut columns = random_columns(61, 10, &[3]);
    columns.dimensions[0].codes[4] = 9;
    assert!(matches!(
        KernelInput::prepare(&columns),
        Err(AggregateError::CodeOutOfRange { code: 9, .. })
    ));
    let mut columns = random_columns(62, 10, &[2, 2, 2, 2]);
    columns.dimensions.push(CodedColumn::new("bpl_status"));
    assert!(matches!(
        KernelInput::prepare(&columns),
        Err(AggregateError::TooManyDimensions { given: 5, .. })
    ));
}

// ------------------------------------------------------------- the real GPU

/// The GPU aggregator, opened once; `None` after skipping with the reason.
fn gpu() -> Option<&'static GpuAggregator> {
    static GPU: OnceLock<Result<GpuAggregator, String>> = OnceLock::new();
    match GPU.get_or_init(|| GpuAggregator::open().map_err(|e| e.to_string())) {
        Ok(aggregator) => Some(aggregator),
        Err(reason) => {
            skip_or_fail(Component::Gpu, format!("no GPU aggregator: {reason}"));
            None
        }
    }
}

#[test]
fn asking_for_the_gpu_aggregator_never_panics_and_says_why_it_cannot() {
    let opened =
        std::panic::catch_unwind(|| aggregator(EngineKind::Gpu)).expect("aggregator(Gpu) panicked");
    match opened {
        Ok(gpu) => assert_eq!(gpu.name(), "gpu"),
        Err(e) => {
            let why = e.to_string();
            assert!(matches!(e, AggregateError::NoGpu { .. }), "{why}");
            assert!(why.contains("use --engine cpu or auto"), "{why}");
            let direct = GpuAggregator::open().expect_err("no GPU here either");
            assert!(why.contains(&direct.to_string()), "{why}");
        }
    }
}

#[test]
fn gpu_aggregator_groups_like_the_cpu() {
    let Some(gpu) = gpu() else {
        return;
    };
    assert_eq!(gpu.name(), "gpu");
    let cases: [(usize, &[usize]); 9] = [
        (0, &[]),
        (1, &[]),
        (1, &[3, 2]),
        (50_000, &[]),
        (50_000, &[36]),
        (50_000, &[36, 4]),
        (50_000, &[4, 7, 2]),
        (50_000, &[36, 4, 4, 7]),
        (300_000, &[36, 4, 4, 40]),
    ];
    for (seed, (rows, dictionaries)) in cases.iter().enumerate() {
        let columns = random_columns(100 + seed as u64, *rows, dictionaries);
        let on_gpu = sorted(gpu.aggregate(&columns).expect("gpu aggregate"));
        assert!(
            on_gpu == on_cpu(&columns),
            "{rows} rows over {dictionaries:?}: the GPU's groups differ from the CPU's"
        );
    }
}

#[test]
fn gpu_aggregator_adds_millions_of_rows_and_one_huge_group_like_the_cpu() {
    let Some(gpu) = gpu() else {
        return;
    };
    let columns = random_columns(200, 5_000_000, &[36, 4, 7]);
    let on_gpu = sorted(gpu.aggregate(&columns).expect("gpu aggregate"));
    assert!(on_gpu == on_cpu(&columns), "5M rows: the GPU's groups");
    let one = random_columns(201, 3_000_000, &[]);
    let on_gpu = gpu.aggregate(&one).expect("gpu aggregate");
    assert_eq!(on_gpu, on_cpu(&one), "3M rows in one group");
}

#[test]
fn gpu_aggregator_leaves_big_key_spaces_to_the_cpu_with_the_same_answer() {
    let Some(gpu) = gpu() else {
        return;
    };
    let columns = random_columns(300, 20_000, &[20, 20, 20, 20]);
    let on_gpu = sorted(gpu.aggregate(&columns).expect("aggregate"));
    assert!(on_gpu == on_cpu(&columns), "the CPU's answer");
}
