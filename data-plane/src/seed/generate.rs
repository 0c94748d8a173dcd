//! Deterministic synthetic users: the same seed gives the same users (ids and
//! attributes; data keys are always fresh). Regions are weighted by
//! population, other attributes follow rough Indian distributions (census
//! age pyramid, ~65% rural, log-normal incomes, household size ~4.5).

use chrono::{Datelike, Duration, NaiveDate};
use umstore_migrations::regions::REGIONS;

use crate::model::Profile;

const FIRST_NAMES: [&str; 24] = [
    "Aarav", "Vivaan", "Aditya", "Arjun", "Sai", "Reyansh", "Mohammed", "Ishaan", "Rohan", "Kabir",
    "Harpreet", "Suresh", "Ananya", "Diya", "Aadhya", "Saanvi", "Fatima", "Lakshmi", "Priya",
    "Kavya", "Meera", "Gurpreet", "Nandini", "Sunita",
];
const LAST_NAMES: [&str; 20] = [
    "Sharma", "Verma", "Patel", "Reddy", "Nair", "Iyer", "Singh", "Kumar", "Das", "Bose", "Khan",
    "Yadav", "Gowda", "Pillai", "Mehta", "Joshi", "Banerjee", "Rao", "Naidu", "Sheikh",
];
const OCCUPATIONS: [(&str, &str); 12] = [
    ("farmer", "agriculture"),
    ("farm labourer", "daily_wage"),
    ("construction worker", "daily_wage"),
    ("shopkeeper", "self_employed"),
    ("driver", "self_employed"),
    ("weaver", "self_employed"),
    ("teacher", "salaried"),
    ("clerk", "salaried"),
    ("nurse", "salaried"),
    ("software engineer", "salaried"),
    ("factory worker", "salaried"),
    ("domestic worker", "daily_wage"),
];

/// Produces synthetic users from a seed.
pub struct Generator {
    rng: fastrand::Rng,
    cumulative: Vec<(u32, usize)>,
    total: u32,
    today: NaiveDate,
}

impl Generator {
    /// A generator for `seed`, with ages computed as of `today`.
    pub fn new(seed: u64, today: NaiveDate) -> Self {
        let mut total = 0;
        let cumulative = REGIONS
            .iter()
            .enumerate()
            .map(|(i, r)| {
                total += r.population_k;
                (total, i)
            })
            .collect();
        Self {
            rng: fastrand::Rng::with_seed(seed),
            cumulative,
            total,
            today,
        }
    }

    fn region(&mut self) -> (usize, &'static str) {
        let x = self.rng.u32(0..self.total);
        let i = self.cumulative.partition_point(|(c, _)| *c <= x);
        let idx = self.cumulative.get(i).map_or(0, |(_, idx)| *idx);
        (idx, REGIONS[idx].code)
    }

    fn pick<T: Copy>(&mut self, weighted: &[(T, u32)]) -> T {
        let total: u32 = weighted.iter().map(|(_, w)| w).sum();
        let mut x = self.rng.u32(0..total.max(1));
        for (v, w) in weighted {
            if x < *w {
                return *v;
            }
            x -= w;
        }
        weighted[0].0
    }

    fn normal(&mut self) -> f64 {
        // Box-Muller
        let u1 = self.rng.f64().max(f64::MIN_POSITIVE);
        let u2 = self.rng.f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    fn age(&mut self) -> i64 {
        let band = self.pick(&[
            ((0, 14), 25),
            ((15, 24), 18),
            ((25, 54), 41),
            ((55, 64), 9),
            ((65, 95), 7),
        ]);
        i64::from(self.rng.u32(band.0..=band.1))
    }

    /// The next synthetic user.
    pub fn next_profile(&mut self) -> Profile {
        let mut id = [0u8; 16];
        self.rng.fill(&mut id);
        let user_id = uuid::Builder::from_random_bytes(id).into_uuid();
        let (region_index, region) = self.region();
        let age = self.age();
        let date_of_birth = self.today - Duration::days(age * 365 + self.rng.i64(0..365));
        let gender = self.pick(&[
            ("female", 4850),
            ("male", 5120),
            ("transgender", 20),
            ("undisclosed", 10),
        ]);
        let area_type = self.pick(&[("rural", 65), ("urban", 35)]);
        let social_category = self.pick(&[("general", 30), ("obc", 42), ("sc", 17), ("st", 9)]);
        let (occupation, employment_type) = match age {
            ..=5 => ("none", "student"),
            6..=17 => ("student", "student"),
            18..=22 if self.rng.u8(0..2) == 0 => ("student", "student"),
            60.. if self.rng.u8(0..3) > 0 => ("retired", "retired"),
            _ => match self.rng.u8(0..10) {
                0 => ("unemployed", "unemployed"),
                1 if gender == "female" => ("homemaker", "homemaker"),
                _ => {
                    let mut o = OCCUPATIONS[self.rng.usize(0..OCCUPATIONS.len())];
                    if area_type == "rural" && self.rng.u8(0..2) == 0 {
                        o = OCCUPATIONS[self.rng.usize(0..2)];
                    }
                    o
                }
            },
        };
        let earns = !matches!(employment_type, "student" | "unemployed" | "homemaker");
        let median: f64 = match employment_type {
            "salaried" => 420_000.0,
            "retired" => 150_000.0,
            _ => 160_000.0,
        };
        let annual_income = if earns {
            (median * (0.8 * self.normal()).exp()) as i64 / 100 * 100
        } else {
            0
        };
        let household_size = (4.5 + 1.8 * self.normal()).round().clamp(1.0, 15.0) as i16;
        let children = if age >= 22 && household_size > 2 {
            self.rng.i16(0..(household_size - 1).min(5))
        } else {
            0
        };
        let senior_members = self
            .rng
            .i16(0..=(household_size - children - 1).clamp(0, 2));
        let dependents = (children + senior_members).min(household_size - 1).max(0);
        let married = age >= 21 && self.rng.u8(0..10) < 7;
        let marital_status = if !married {
            "single"
        } else {
            self.pick(&[
                ("married", 90),
                ("widowed", 7),
                ("divorced", 2),
                ("separated", 1),
            ])
        };
        let land_holding_centiacres = if employment_type == "agriculture" {
            self.rng.i64(20..600)
        } else if area_type == "rural" && self.rng.u8(0..5) == 0 {
            self.rng.i64(10..200)
        } else {
            0
        };
        let per_capita = annual_income / i64::from(household_size.max(1));
        let ration_card = if per_capita < 15_000 && self.rng.u8(0..4) == 0 {
            "aay"
        } else if per_capita < 40_000 {
            self.pick(&[("bpl", 70), ("apl", 20), ("none", 10)])
        } else {
            self.pick(&[("apl", 60), ("none", 40)])
        };
        let district_no = self.rng.u8(1..=30);
        // First pincode digit by postal zone; the rest random.
        let zone = 1 + (region_index % 9) as u32;
        Profile {
            user_id,
            region,
            full_name: format!(
                "{} {}",
                FIRST_NAMES[self.rng.usize(0..FIRST_NAMES.len())],
                LAST_NAMES[self.rng.usize(0..LAST_NAMES.len())]
            ),
            date_of_birth,
            gender,
            marital_status,
            district: format!("{region} District {district_no:02}"),
            pincode: format!("{zone}{:05}", self.rng.u32(0..100_000)),
            area_type,
            social_category,
            disability: self.rng.u16(0..1000) < 22,
            phone: format!(
                "{}{:09}",
                self.rng.u8(6..=9),
                self.rng.u32(0..1_000_000_000)
            ),
            identity_token: format!("idt_{:016x}", self.rng.u64(..)),
            annual_income,
            occupation,
            employment_type,
            land_holding_centiacres,
            has_bank_account: self.rng.u8(0..100) < 80 || age >= 18 && earns,
            ration_card,
            household_size,
            dependents,
            children,
            senior_members,
            head_of_household: age >= 25 && self.rng.u8(0..3) == 0,
        }
    }

    /// The reference year.
    pub fn year(&self) -> i32 {
        self.today.year()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 11, 25).unwrap_or_default()
    }

    #[test]
    fn same_seed_same_users_other_seed_other_users() {
        let a: Vec<_> = (0..100)
            .map({
                let mut g = Generator::new(7, today());
                move |_| g.next_profile()
            })
            .collect();
        let mut g = Generator::new(7, today());
        assert!(a.iter().all(|p| {
            let q = g.next_profile();
            q.user_id == p.user_id && q.pincode == p.pincode
        }));
        let mut other = Generator::new(8, today());
        assert!(a[0].user_id != other.next_profile().user_id);
    }

    #[test]
    fn regions_follow_population_and_all_appear() {
        let mut g = Generator::new(1, today());
        let mut counts = std::collections::HashMap::new();
        for _ in 0..200_000 {
            *counts.entry(g.next_profile().region).or_insert(0u32) += 1;
        }
        assert_eq!(counts.len(), 36, "every region gets users");
        // UP (~16.5% of India) far outnumbers Sikkim (~0.05%).
        let up = counts["UP"] as f64 / 200_000.0;
        assert!((0.14..0.19).contains(&up), "UP share {up}");
        assert!(counts["SK"] < counts["GA"] && counts["GA"] < counts["KA"]);
    }

    #[test]
    fn attributes_stay_within_schema_constraints() {
        let mut g = Generator::new(3, today());
        for _ in 0..20_000 {
            let p = g.next_profile();
            assert!((1..=15).contains(&p.household_size));
            assert!(p.dependents < p.household_size && p.dependents >= 0);
            assert!(p.annual_income >= 0 && p.land_holding_centiacres >= 0);
            assert_eq!(p.pincode.len(), 6);
            assert_eq!(p.phone.len(), 10);
            assert!(p.date_of_birth <= today());
        }
    }
}
