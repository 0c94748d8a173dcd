//! The write check of a store with several clusters (migration 0013): every
//! write transaction calls `umstore.region_write(region, user)` first, which
//! takes the region's lock shared and refuses the write while the region is
//! fenced for a move (`UMF01`) or not served by this cluster (`UMM01`: it
//! moved away, or is being copied in). docs/data-model.md, "Several clusters".

/// The check, right after the user's advisory lock: `$1` region, `$2` user.
pub const REGION_WRITE: &str = "SELECT umstore.region_write($1::text::bpchar, $2)";

/// [`REGION_WRITE`] for many users in one statement (a bulk import's
/// batch): `$1` their regions, `$2` their ids, pairwise.
pub const REGION_WRITE_MANY: &str = "SELECT umstore.region_write(r::bpchar, u) \
     FROM unnest($1::text[], $2::uuid[]) AS t(r, u)";

/// Whether a write transaction runs the region check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionCheck {
    /// One cluster: no region ever moves; no extra statement.
    Off,
    /// Several clusters: [`REGION_WRITE`] first.
    On,
}

/// Why the region check refused a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `UMF01`: the region is fenced for a moment while it moves; the same
    /// cluster takes the write once the fence is down (or the region's new
    /// cluster does, after the switch).
    Fenced,
    /// `UMM01`: this cluster does not serve the region (it moved away, or is
    /// being copied in): read the placement again and write there.
    Moved,
}

impl Refusal {
    /// The refusal `error` is, if it is one.
    pub fn of(error: &tokio_postgres::Error) -> Option<Self> {
        match error.code()?.code() {
            "UMF01" => Some(Self::Fenced),
            "UMM01" => Some(Self::Moved),
            _ => None,
        }
    }

    /// `fenced` or `moved` (the metric's label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fenced => "fenced",
            Self::Moved => "moved",
        }
    }
}
