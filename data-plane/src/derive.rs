//! Derived attributes: recomputed from a user's metadata on every metadata
//! write (and by `seed`). Pure functions of the profile and the date.
//!
//! Thresholds (documented in docs/data-model.md):
//! - age group: child < 18, youth 18–29, adult 30–59, senior ≥ 60;
//! - BPL: a BPL or Antyodaya (AAY) ration card, or per-capita income below
//!   ₹27,000 a year;
//! - income bracket: BPL, else LIG < ₹6 lakh, MIG < ₹18 lakh, HIG above;
//! - tax bracket: the marginal slab of India's new regime (FY 2025-26), `nil`
//!   up to ₹12 lakh where the rebate applies.

use chrono::NaiveDate;

use crate::model::{age_on, Profile};

/// The derived attributes of one user.
#[derive(Debug, Clone, PartialEq)]
pub struct Derived {
    /// `child`, `youth`, `adult` or `senior`.
    pub age_group: &'static str,
    /// `BPL`, `LIG`, `MIG` or `HIG`.
    pub income_bracket: &'static str,
    /// Life stage (see the schema's check).
    pub life_stage: &'static str,
    /// `formal`, `informal`, `agricultural`, `not_in_labour_force` or `unemployed`.
    pub employment_category: &'static str,
    /// Below the poverty line.
    pub bpl_status: bool,
    /// Marginal income-tax slab.
    pub tax_bracket: &'static str,
    /// Aged 60 or more.
    pub is_senior_citizen: bool,
    /// Works in agriculture or holds farm land.
    pub is_farmer: bool,
    /// Annual income per household member, in lakhs, two decimals.
    pub per_capita_income_lakh: f64,
}

/// What the derived attributes are computed from: the fields of a profile they
/// read (an event's merged state provides them as well as a seeded profile).
#[derive(Clone, Copy)]
pub struct Inputs<'a> {
    /// Date of birth.
    pub date_of_birth: NaiveDate,
    /// People in the household.
    pub household_size: i16,
    /// Annual income in INR.
    pub annual_income: i64,
    /// Ration card (the schema's values).
    pub ration_card: &'a str,
    /// Children in the household.
    pub children: i16,
    /// Employment type (the schema's values).
    pub employment_type: &'a str,
    /// Land holding in hundredths of an acre.
    pub land_holding_centiacres: i64,
}

impl<'a> From<&'a Profile> for Inputs<'a> {
    fn from(p: &'a Profile) -> Self {
        Inputs {
            date_of_birth: p.date_of_birth,
            household_size: p.household_size,
            annual_income: p.annual_income,
            ration_card: p.ration_card,
            children: p.children,
            employment_type: p.employment_type,
            land_holding_centiacres: p.land_holding_centiacres,
        }
    }
}

/// Computes the derived attributes of `p` as of `today`.
pub fn derive(p: &Profile, today: NaiveDate) -> Derived {
    derive_from(&Inputs::from(p), today)
}

/// Computes the derived attributes from `p`'s inputs as of `today`.
pub fn derive_from(p: &Inputs<'_>, today: NaiveDate) -> Derived {
    let age = age_on(p.date_of_birth, today);
    let household = i64::from(p.household_size.max(1));
    let per_capita = p.annual_income.max(0) / household;
    let bpl_status = matches!(p.ration_card, "bpl" | "aay") || per_capita < 27_000;
    let income = p.annual_income.max(0);
    Derived {
        age_group: match age {
            ..=17 => "child",
            18..=29 => "youth",
            30..=59 => "adult",
            _ => "senior",
        },
        income_bracket: if bpl_status {
            "BPL"
        } else if income < 600_000 {
            "LIG"
        } else if income < 1_800_000 {
            "MIG"
        } else {
            "HIG"
        },
        life_stage: life_stage(age, p),
        employment_category: match p.employment_type {
            "salaried" => "formal",
            "self_employed" | "daily_wage" => "informal",
            "agriculture" => "agricultural",
            "unemployed" => "unemployed",
            _ => "not_in_labour_force",
        },
        bpl_status,
        tax_bracket: match income {
            ..=1_200_000 => "nil",
            1_200_001..=1_600_000 => "15",
            1_600_001..=2_000_000 => "20",
            2_000_001..=2_400_000 => "25",
            _ => "30",
        },
        is_senior_citizen: age >= 60,
        is_farmer: p.employment_type == "agriculture" || p.land_holding_centiacres > 0,
        per_capita_income_lakh: (per_capita as f64 / 1_000.0).round() / 100.0,
    }
}

fn life_stage(age: i32, p: &Inputs<'_>) -> &'static str {
    match age {
        ..=14 => "childhood",
        _ if p.employment_type == "student" && age <= 30 => "student",
        _ if p.employment_type == "retired" || age >= 65 => "retired",
        15..=29 => "early_career",
        30..=44 if p.children > 0 => "family_building",
        30..=54 => "established",
        _ => "pre_retirement",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn profile(
        born: (i32, u32, u32),
        income: i64,
        household: i16,
        employment: &'static str,
    ) -> Profile {
        Profile {
            user_id: Uuid::nil(),
            region: "KA",
            full_name: String::new(),
            date_of_birth: NaiveDate::from_ymd_opt(born.0, born.1, born.2).unwrap_or_default(),
            gender: "female",
            marital_status: "married",
            district: String::new(),
            pincode: String::new(),
            area_type: "rural",
            social_category: "general",
            disability: false,
            phone: String::new(),
            identity_token: String::new(),
            annual_income: income,
            occupation: "teacher",
            employment_type: employment,
            land_holding_centiacres: 0,
            has_bank_account: true,
            ration_card: "apl",
            household_size: household,
            dependents: 0,
            children: 0,
            senior_members: 0,
            head_of_household: true,
        }
    }

    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 11, 25).unwrap_or_default()
    }

    #[test]
    fn age_group_boundaries_follow_birthdays() {
        let turned_18_today = profile((2008, 11, 25), 0, 1, "student");
        let turns_18_tomorrow = profile((2008, 11, 26), 0, 1, "student");
        assert_eq!(derive(&turned_18_today, today()).age_group, "youth");
        assert_eq!(derive(&turns_18_tomorrow, today()).age_group, "child");
        let d = derive(&profile((1966, 1, 1), 300_000, 2, "retired"), today());
        assert_eq!(
            (d.age_group, d.is_senior_citizen, d.life_stage),
            ("senior", true, "retired")
        );
    }

    #[test]
    fn income_brackets_and_bpl() {
        let bracket = |income, household| {
            derive(
                &profile((1990, 1, 1), income, household, "salaried"),
                today(),
            )
        };
        assert_eq!(
            bracket(100_000, 5).income_bracket,
            "BPL",
            "₹20k per head is below the line"
        );
        assert!(bracket(100_000, 5).bpl_status);
        assert_eq!(bracket(500_000, 2).income_bracket, "LIG");
        assert_eq!(bracket(1_000_000, 2).income_bracket, "MIG");
        assert_eq!(bracket(2_500_000, 2).income_bracket, "HIG");
        let mut bpl_card = profile((1990, 1, 1), 900_000, 1, "salaried");
        bpl_card.ration_card = "aay";
        assert_eq!(derive(&bpl_card, today()).income_bracket, "BPL");
    }

    #[test]
    fn tax_bracket_is_nil_up_to_the_rebate_then_marginal_slab() {
        let tax =
            |income| derive(&profile((1990, 1, 1), income, 1, "salaried"), today()).tax_bracket;
        assert_eq!(tax(1_200_000), "nil");
        assert_eq!(tax(1_200_001), "15");
        assert_eq!(tax(1_800_000), "20");
        assert_eq!(tax(2_200_000), "25");
        assert_eq!(tax(5_000_000), "30");
    }

    #[test]
    fn employment_categories_and_farmers() {
        let d = derive(&profile((1980, 1, 1), 200_000, 4, "agriculture"), today());
        assert_eq!((d.employment_category, d.is_farmer), ("agricultural", true));
        let d = derive(&profile((1980, 1, 1), 200_000, 4, "daily_wage"), today());
        assert_eq!((d.employment_category, d.is_farmer), ("informal", false));
        assert_eq!(
            derive(&profile((1980, 1, 1), 0, 4, "homemaker"), today()).employment_category,
            "not_in_labour_force"
        );
    }
}
