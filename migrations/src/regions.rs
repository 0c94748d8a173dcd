//! The 36 Indian states and union territories: the shard key and the unit of
//! data residency.

/// Whether a region is a state or a union territory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    /// One of the 28 states.
    State,
    /// One of the 8 union territories.
    UnionTerritory,
}

/// One region: its two-letter code (the shard key), its name and its population
/// (2011 census, thousands), used to weight synthetic data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Two-letter code, upper case, as stored in every table's `region` column.
    pub code: &'static str,
    /// English name.
    pub name: &'static str,
    /// State or union territory.
    pub kind: RegionKind,
    /// Population in thousands (2011 census).
    pub population_k: u32,
}

const fn state(code: &'static str, name: &'static str, population_k: u32) -> Region {
    Region {
        code,
        name,
        kind: RegionKind::State,
        population_k,
    }
}

const fn ut(code: &'static str, name: &'static str, population_k: u32) -> Region {
    Region {
        code,
        name,
        kind: RegionKind::UnionTerritory,
        population_k,
    }
}

/// All 36 regions, sorted by code. The order is part of the schema: migration
/// `0002` creates one `user_metadata` partition per entry.
pub const REGIONS: [Region; 36] = [
    ut("AN", "Andaman and Nicobar Islands", 381),
    state("AP", "Andhra Pradesh", 49_387),
    state("AR", "Arunachal Pradesh", 1_384),
    state("AS", "Assam", 31_206),
    state("BR", "Bihar", 104_099),
    state("CG", "Chhattisgarh", 25_545),
    ut("CH", "Chandigarh", 1_055),
    ut("DD", "Dadra and Nagar Haveli and Daman and Diu", 586),
    ut("DL", "Delhi", 16_788),
    state("GA", "Goa", 1_459),
    state("GJ", "Gujarat", 60_440),
    state("HP", "Himachal Pradesh", 6_865),
    state("HR", "Haryana", 25_351),
    state("JH", "Jharkhand", 32_988),
    ut("JK", "Jammu and Kashmir", 12_267),
    state("KA", "Karnataka", 61_095),
    state("KL", "Kerala", 33_406),
    ut("LA", "Ladakh", 274),
    ut("LD", "Lakshadweep", 64),
    state("MH", "Maharashtra", 112_374),
    state("ML", "Meghalaya", 2_967),
    state("MN", "Manipur", 2_856),
    state("MP", "Madhya Pradesh", 72_627),
    state("MZ", "Mizoram", 1_097),
    state("NL", "Nagaland", 1_979),
    state("OD", "Odisha", 41_974),
    state("PB", "Punjab", 27_743),
    ut("PY", "Puducherry", 1_248),
    state("RJ", "Rajasthan", 68_548),
    state("SK", "Sikkim", 611),
    state("TN", "Tamil Nadu", 72_147),
    state("TR", "Tripura", 3_674),
    state("TS", "Telangana", 35_004),
    state("UK", "Uttarakhand", 10_086),
    state("UP", "Uttar Pradesh", 199_812),
    state("WB", "West Bengal", 91_276),
];

/// Looks a region up by its code (exact, upper case).
pub fn region(code: &str) -> Option<&'static Region> {
    REGIONS.iter().find(|r| r.code == code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thirty_six_sorted_unique_codes_28_states_8_uts() {
        assert_eq!(REGIONS.len(), 36);
        for pair in REGIONS.windows(2) {
            assert!(
                pair[0].code < pair[1].code,
                "{} before {}",
                pair[0].code,
                pair[1].code
            );
        }
        let states = REGIONS
            .iter()
            .filter(|r| r.kind == RegionKind::State)
            .count();
        assert_eq!(states, 28);
        assert!(REGIONS
            .iter()
            .all(|r| r.code.len() == 2 && r.code.chars().all(|c| c.is_ascii_uppercase())));
    }

    #[test]
    fn lookup_by_code() {
        assert_eq!(region("UP").map(|r| r.name), Some("Uttar Pradesh"));
        assert!(region("XX").is_none());
        assert!(region("up").is_none());
    }
}
