//! Grouped counts and sums over columns, on an engine: what `bulk stats`
//! computes from the rows it copies out of a replica (docs/bulk.md,
//! "`bulk stats`").
//!
//! The input is columnar ([`Columns`]): each dimension grouped by is a column
//! of small codes into its own dictionary of values (code 0 is SQL NULL), and
//! each measure a column of optional integers. An [`Aggregator`] turns it into
//! one [`Partial`] per group: the user count and, per measure, how many users
//! have it and its sum. Those are the partials the stats endpoint merges
//! ([`crate::stats::merge`]), so the averages, their rounding and the
//! small-group suppression are the endpoint's, computed in one place.
//!
//! [`CpuAggregator`] splits the rows into chunks over rayon's pool and adds
//! them up per chunk, into a dense table when the dictionaries are small (they
//! are: the dimensions are enums and region codes) and a hash map otherwise.
//! Sums are integers, so the result does not depend on how the rows were
//! split; the groups come back in the order of their codes, and the merge
//! orders them by value. On a GPU, [`super::GpuAggregator`] computes the same
//! partials with CUDA kernels (`bulk/gpu_aggregate.rs`); [`aggregator`]
//! opens it for [`EngineKind::Gpu`].

use std::collections::HashMap;

use rayon::prelude::*;
use thiserror::Error;

use super::EngineKind;
use crate::stats::{Partial, Sum};

/// Rows one task adds up before its table is merged with the others'.
const CHUNK_ROWS: usize = 64 * 1024;

/// Groups from which the dense table (one slot per possible key) gives way to
/// a hash map of the keys present.
const DENSE_GROUPS: usize = 1 << 16;

/// Why an aggregation could not run.
#[derive(Debug, Error)]
pub enum AggregateError {
    /// A dimension has more distinct values than a code holds.
    #[error("dimension {dimension} has more than {limit} distinct values; group by fewer or coarser dimensions")]
    TooManyValues {
        /// The dimension.
        dimension: String,
        /// Codes available.
        limit: usize,
    },
    /// The columns are not all as long as the rows.
    #[error("column {column} has {len} values for {rows} rows")]
    Ragged {
        /// The column.
        column: String,
        /// Its length.
        len: usize,
        /// Rows of the batch.
        rows: usize,
    },
    /// More dimensions than a group key holds.
    #[error("{given} dimensions given; an aggregation groups by at most {limit}")]
    TooManyDimensions {
        /// Dimensions given.
        given: usize,
        /// The most a key holds.
        limit: usize,
    },
    /// The engine cannot aggregate.
    #[error("the {engine} engine has no aggregation: {detail}")]
    Unsupported {
        /// The engine's name.
        engine: &'static str,
        /// What to do instead.
        detail: &'static str,
    },
    /// A dimension's code is past its dictionary (columns built by hand
    /// rather than with [`CodedColumn::push`]).
    #[error("dimension {dimension} has code {code}, past its {values} values")]
    CodeOutOfRange {
        /// The dimension.
        dimension: String,
        /// The code.
        code: u16,
        /// Values in its dictionary.
        values: usize,
    },
    /// The GPU aggregation was asked for and no GPU is usable.
    #[error(
        "grouping on the GPU (--engine gpu) needs a CUDA GPU, its driver and NVRTC, and none \
         is usable: {detail}; use --engine cpu or auto"
    )]
    NoGpu {
        /// Why not (no driver library, no NVRTC, no device, a compile error ...).
        detail: String,
    },
    /// A CUDA call failed while aggregating on the GPU (device memory
    /// exhausted, a kernel fault, the driver gone), or the CUDA bindings
    /// panicked (caught and reported here).
    #[error("the GPU aggregation failed while {step}: {detail}; no groups were returned (retry, or use --engine cpu)")]
    Gpu {
        /// What it was doing.
        step: &'static str,
        /// The driver's error.
        detail: String,
    },
}

/// A dimension's values as codes into its dictionary; code 0 is NULL, code
/// `c > 0` is `values[c - 1]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CodedColumn {
    /// The dimension's name (one of [`crate::store::query::DIMENSIONS`]).
    pub name: String,
    /// One code per row.
    pub codes: Vec<u16>,
    /// The distinct values, in the order first seen.
    pub values: Vec<String>,
}

impl CodedColumn {
    /// An empty column for dimension `name`.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            ..Self::default()
        }
    }

    /// Appends a row's value.
    pub fn push(&mut self, value: Option<&str>) -> Result<(), AggregateError> {
        let code = match value {
            None => 0,
            Some(v) => match self.values.iter().position(|known| known == v) {
                // The dictionaries are a handful of values: a scan beats hashing.
                Some(i) => i + 1,
                None => {
                    if self.values.len() + 1 >= usize::from(u16::MAX) {
                        return Err(AggregateError::TooManyValues {
                            dimension: self.name.clone(),
                            limit: usize::from(u16::MAX) - 1,
                        });
                    }
                    self.values.push(v.to_owned());
                    self.values.len()
                }
            },
        };
        // `code` is below u16::MAX by the check above.
        self.codes.push(code as u16);
        Ok(())
    }

    /// The value of `code` (`None`: NULL).
    pub fn value(&self, code: u16) -> Option<&str> {
        usize::from(code)
            .checked_sub(1)
            .and_then(|i| self.values.get(i))
            .map(String::as_str)
    }
}

/// The rows to aggregate, column by column.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Columns {
    /// The dimensions grouped by, in the order of the answer's `group_by`.
    pub dimensions: Vec<CodedColumn>,
    /// `income_lakh`.
    pub income_lakh: Vec<Option<i16>>,
    /// `household_size`.
    pub household_size: Vec<Option<i16>>,
    /// `overall_risk` in hundredths (it is `numeric(3, 2)`).
    pub overall_risk_centi: Vec<Option<i16>>,
}

impl Columns {
    /// Empty columns for the dimensions `names`, in order.
    pub fn new(names: &[String]) -> Self {
        Self {
            dimensions: names.iter().map(|n| CodedColumn::new(n)).collect(),
            ..Self::default()
        }
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.income_lakh.len()
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values held, over every column (for throughput figures).
    pub fn fields(&self) -> u64 {
        (self.len() * (self.dimensions.len() + 3)) as u64
    }

    /// Bytes of the columns (codes and measures), for throughput figures.
    pub fn bytes(&self) -> u64 {
        let row = self.dimensions.len() * std::mem::size_of::<u16>()
            + 3 * std::mem::size_of::<Option<i16>>();
        (self.len() * row) as u64
    }

    /// At most [`KEY_DIMENSIONS`] dimensions, every column as long as the
    /// rows: what every aggregator checks first.
    pub(crate) fn check(&self) -> Result<(), AggregateError> {
        let rows = self.len();
        if self.dimensions.len() > KEY_DIMENSIONS {
            return Err(AggregateError::TooManyDimensions {
                given: self.dimensions.len(),
                limit: KEY_DIMENSIONS,
            });
        }
        let lens = self
            .dimensions
            .iter()
            .map(|d| (d.name.as_str(), d.codes.len()))
            .chain([
                ("household_size", self.household_size.len()),
                ("overall_risk", self.overall_risk_centi.len()),
            ]);
        for (column, len) in lens {
            if len != rows {
                return Err(AggregateError::Ragged {
                    column: column.to_owned(),
                    len,
                    rows,
                });
            }
        }
        Ok(())
    }
}

/// Dimensions a group key holds (16 bits each in a `u64`).
pub const KEY_DIMENSIONS: usize = 4;

/// Computes the partials of [`Columns`] on an engine.
pub trait Aggregator: Send + Sync {
    /// The engine's name: `cpu` (the metric label).
    fn name(&self) -> &'static str;

    /// One partial per group present in `columns` (however small: the
    /// suppression is the merge's), keys in the columns' order. The order of
    /// the groups is the engine's; [`crate::stats::merge`] orders them.
    fn aggregate(&self, columns: &Columns) -> Result<Vec<Partial>, AggregateError>;
}

/// The aggregator of an engine kind: the CPU's, or for a GPU the CUDA
/// kernels' ([`super::GpuAggregator`], opened here: device 0, the kernels
/// compiled with NVRTC). Without a usable GPU that is
/// [`AggregateError::NoGpu`], saying why; it never panics.
pub fn aggregator(kind: EngineKind) -> Result<Box<dyn Aggregator>, AggregateError> {
    match kind {
        EngineKind::Cpu => Ok(Box::new(CpuAggregator)),
        EngineKind::Gpu => match super::GpuAggregator::open() {
            Ok(gpu) => Ok(Box::new(gpu)),
            Err(e) => Err(AggregateError::NoGpu {
                detail: e.to_string(),
            }),
        },
    }
}

/// One group's running totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Acc {
    users: i64,
    income: Sum,
    household: Sum,
    risk: Sum,
}

impl Acc {
    fn add_row(&mut self, income: Option<i16>, household: Option<i16>, risk: Option<i16>) {
        self.users += 1;
        add_value(&mut self.income, income);
        add_value(&mut self.household, household);
        add_value(&mut self.risk, risk);
    }

    fn add(&mut self, other: &Acc) {
        self.users += other.users;
        add_sum(&mut self.income, other.income);
        add_sum(&mut self.household, other.household);
        add_sum(&mut self.risk, other.risk);
    }
}

fn add_value(sum: &mut Sum, value: Option<i16>) {
    if let Some(v) = value {
        sum.n += 1;
        sum.total += i64::from(v);
    }
}

fn add_sum(sum: &mut Sum, other: Sum) {
    sum.n += other.n;
    sum.total += other.total;
}

/// Group-by on the CPU cores (rayon's global pool).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuAggregator;

impl CpuAggregator {
    /// The dense table's size: every combination of codes (NULL included),
    /// or `None` when that is past [`DENSE_GROUPS`].
    fn dense_size(columns: &Columns) -> Option<usize> {
        columns.dimensions.iter().try_fold(1usize, |size, d| {
            size.checked_mul(d.values.len() + 1)
                .filter(|s| *s <= DENSE_GROUPS)
        })
    }

    /// The dense slot of row `i`: its codes in mixed radix.
    fn slot(columns: &Columns, i: usize) -> usize {
        columns.dimensions.iter().fold(0usize, |slot, d| {
            slot * (d.values.len() + 1) + usize::from(d.codes[i])
        })
    }

    /// The codes of dense slot `slot`.
    fn codes_of_slot(columns: &Columns, mut slot: usize) -> Vec<u16> {
        let mut codes = vec![0u16; columns.dimensions.len()];
        for (j, d) in columns.dimensions.iter().enumerate().rev() {
            let radix = d.values.len() + 1;
            // Below radix, which fits u16 (the dictionaries' limit).
            codes[j] = (slot % radix) as u16;
            slot /= radix;
        }
        codes
    }

    fn key(columns: &Columns, i: usize) -> u64 {
        columns
            .dimensions
            .iter()
            .enumerate()
            .fold(0u64, |k, (j, d)| k | (u64::from(d.codes[i]) << (16 * j)))
    }

    fn codes_of_key(columns: &Columns, key: u64) -> Vec<u16> {
        (0..columns.dimensions.len())
            .map(|j| ((key >> (16 * j)) & 0xffff) as u16)
            .collect()
    }

    fn chunks(rows: usize) -> impl IndexedParallelIterator<Item = std::ops::Range<usize>> {
        (0..rows.div_ceil(CHUNK_ROWS))
            .into_par_iter()
            .map(move |c| c * CHUNK_ROWS..((c + 1) * CHUNK_ROWS).min(rows))
    }

    fn dense(columns: &Columns, size: usize) -> Vec<(Vec<u16>, Acc)> {
        let table = Self::chunks(columns.len())
            .map(|range| {
                let mut table = vec![Acc::default(); size];
                for i in range {
                    table[Self::slot(columns, i)].add_row(
                        columns.income_lakh[i],
                        columns.household_size[i],
                        columns.overall_risk_centi[i],
                    );
                }
                table
            })
            .reduce(
                || vec![Acc::default(); size],
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(&b) {
                        x.add(y);
                    }
                    a
                },
            );
        table
            .into_iter()
            .enumerate()
            .filter(|(_, acc)| acc.users > 0)
            .map(|(slot, acc)| (Self::codes_of_slot(columns, slot), acc))
            .collect()
    }

    fn hashed(columns: &Columns) -> Vec<(Vec<u16>, Acc)> {
        let table = Self::chunks(columns.len())
            .map(|range| {
                let mut table: HashMap<u64, Acc> = HashMap::new();
                for i in range {
                    table.entry(Self::key(columns, i)).or_default().add_row(
                        columns.income_lakh[i],
                        columns.household_size[i],
                        columns.overall_risk_centi[i],
                    );
                }
                table
            })
            .reduce(HashMap::new, |mut a, b| {
                for (k, v) in b {
                    a.entry(k).or_default().add(&v);
                }
                a
            });
        let mut groups: Vec<(u64, Acc)> = table.into_iter().collect();
        groups.sort_by_key(|(k, _)| *k);
        groups
            .into_iter()
            .map(|(k, acc)| (Self::codes_of_key(columns, k), acc))
            .collect()
    }
}

impl Aggregator for CpuAggregator {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn aggregate(&self, columns: &Columns) -> Result<Vec<Partial>, AggregateError> {
        columns.check()?;
        let groups = match Self::dense_size(columns) {
            Some(size) => Self::dense(columns, size),
            None => Self::hashed(columns),
        };
        Ok(groups
            .into_iter()
            .map(|(codes, acc)| Partial {
                key: codes
                    .iter()
                    .zip(&columns.dimensions)
                    .map(|(c, d)| d.value(*c).map(str::to_owned))
                    .collect(),
                users: acc.users,
                income_lakh: acc.income,
                household_size: acc.household,
                overall_risk_centi: acc.risk,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Region, gender, income, risk.
    type Row<'a> = (Option<&'a str>, Option<&'a str>, Option<i16>, Option<i16>);

    fn columns(rows: &[Row<'_>]) -> Columns {
        let mut c = Columns::new(&["region".to_owned(), "gender".to_owned()]);
        for (region, gender, income, risk) in rows {
            c.dimensions[0].push(*region).expect("push");
            c.dimensions[1].push(*gender).expect("push");
            c.income_lakh.push(*income);
            c.household_size.push(Some(4));
            c.overall_risk_centi.push(*risk);
        }
        c
    }

    fn by_key(partials: Vec<Partial>) -> std::collections::BTreeMap<Vec<Option<String>>, Partial> {
        partials.into_iter().map(|p| (p.key.clone(), p)).collect()
    }

    #[test]
    fn counts_and_sums_per_group_with_nulls_as_their_own_value() {
        let c = columns(&[
            (Some("KA"), Some("female"), Some(2), Some(40)),
            (Some("KA"), Some("female"), None, Some(60)),
            (Some("KA"), None, Some(5), None),
            (None, Some("male"), Some(1), None),
        ]);
        let groups = by_key(CpuAggregator.aggregate(&c).expect("aggregate"));
        assert_eq!(groups.len(), 3);
        let ka_f = &groups[&vec![Some("KA".to_owned()), Some("female".to_owned())]];
        assert_eq!(ka_f.users, 2);
        assert_eq!(ka_f.income_lakh, Sum { n: 1, total: 2 });
        assert_eq!(ka_f.household_size, Sum { n: 2, total: 8 });
        assert_eq!(ka_f.overall_risk_centi, Sum { n: 2, total: 100 });
        assert_eq!(groups[&vec![Some("KA".to_owned()), None]].users, 1);
        assert_eq!(groups[&vec![None, Some("male".to_owned())]].users, 1);
    }

    #[test]
    fn the_dense_and_hashed_tables_and_any_split_agree() {
        // Enough rows for several chunks, a few groups.
        let regions = ["KA", "TN", "UP"];
        let genders = [Some("female"), Some("male"), None];
        let rows: Vec<_> = (0..200_000usize)
            .map(|i| {
                (
                    Some(regions[i % 3]),
                    genders[(i / 3) % 3],
                    (i % 7 != 0).then_some((i % 50) as i16),
                    (i % 5 == 0).then_some((i % 101) as i16),
                )
            })
            .collect();
        let c = columns(&rows);
        let size = CpuAggregator::dense_size(&c).expect("small dictionaries");
        let mut dense = CpuAggregator::dense(&c, size);
        let mut hashed = CpuAggregator::hashed(&c);
        dense.sort_by(|a, b| a.0.cmp(&b.0));
        hashed.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(dense, hashed);
        assert_eq!(dense.iter().map(|(_, a)| a.users).sum::<i64>(), 200_000);
        // One thread: the same.
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("pool");
        let single = one.install(|| CpuAggregator.aggregate(&c).expect("aggregate"));
        assert_eq!(
            by_key(single),
            by_key(CpuAggregator.aggregate(&c).expect("aggregate"))
        );
    }

    #[test]
    fn no_dimensions_is_one_group_and_no_rows_no_groups() {
        let mut c = Columns::new(&[]);
        assert!(CpuAggregator.aggregate(&c).expect("empty").is_empty());
        c.income_lakh = vec![Some(1), Some(3)];
        c.household_size = vec![None, None];
        c.overall_risk_centi = vec![None, None];
        let groups = CpuAggregator.aggregate(&c).expect("total");
        assert_eq!(groups.len(), 1);
        assert!(groups[0].key.is_empty());
        assert_eq!(groups[0].income_lakh, Sum { n: 2, total: 4 });
    }

    #[test]
    fn ragged_columns_are_an_error() {
        let mut c = columns(&[(Some("KA"), None, None, None)]);
        c.household_size.clear();
        let err = CpuAggregator.aggregate(&c).expect_err("ragged");
        assert!(err.to_string().contains("household_size"), "{err}");
        assert_eq!(aggregator(EngineKind::Cpu).expect("cpu").name(), "cpu");
    }

    #[test]
    fn the_gpu_aggregator_opens_or_says_why_not_without_panicking() {
        // SAFETY: loads the library only, as GpuAggregator::open does.
        let driver_here = unsafe { cudarc::driver::sys::is_culib_present() };
        let opened = std::panic::catch_unwind(|| aggregator(EngineKind::Gpu))
            .expect("aggregator(Gpu) must not panic");
        match opened {
            Ok(gpu) => assert_eq!(gpu.name(), "gpu"),
            Err(err) => {
                assert!(matches!(err, AggregateError::NoGpu { .. }), "{err:?}");
                let why = err.to_string();
                assert!(why.contains("--engine cpu or auto"), "{why}");
                if !driver_here {
                    assert!(why.contains("libcuda"), "names what is missing: {why}");
                }
            }
        }
    }
}
