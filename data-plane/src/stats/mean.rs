//! A mean rounded as PostgreSQL rounds `avg(...)::float8`, so an average
//! computed from merged sums ([`super::merge`], `bulk stats`) is the same
//! float as the one the live GROUP BY returns, not one unit in the last place
//! away from it.
//!
//! PostgreSQL computes `avg` of integers and of `numeric` as
//! `sum::numeric / count`: the quotient rounded (half away from zero) to a
//! scale that gives at least 16 significant digits (`select_div_scale` in
//! `numeric.c`), and `::float8` parses that decimal to the nearest double.
//! Done here with exact integers: the same decimal, parsed by Rust, which also
//! rounds to the nearest double.

/// Significant digits a numeric division keeps at least
/// (`NUMERIC_MIN_SIG_DIGITS`).
const MIN_SIG_DIGITS: i32 = 16;
/// Decimal digits per numeric digit (`DEC_DIGITS`; the base is 10000).
const DEC_DIGITS: i32 = 4;

/// The weight and first digit, in base 10000, of `magnitude / 10^scale`
/// (non-zero), as `numeric.c` normalises a value.
fn weight_and_first_digit(magnitude: u128, scale: u32) -> Option<(i32, u128)> {
    // Align the fraction to whole base-10000 digits.
    let pad = (4 - scale % 4) % 4;
    let mut m = magnitude.checked_mul(10u128.checked_pow(pad)?)?;
    let fraction_digits = i32::try_from((scale + pad) / 4).ok()?;
    let mut top = 0i32;
    while m >= 10_000 {
        m /= 10_000;
        top += 1;
    }
    Some((top - fraction_digits, m))
}

/// `avg(x)::float8` of `n` values whose sum is `total / 10^scale` (`scale`:
/// the values' decimal scale, 0 for integers, 2 for `numeric(3, 2)`); `None`
/// without values.
pub fn pg_avg(total: i64, scale: u32, n: i64) -> Option<f64> {
    if n <= 0 {
        return None;
    }
    exact(total, scale, n).or_else(|| {
        // Past the exact path's range (sums near 10^38): the plain quotient.
        Some(total as f64 / (n as f64 * 10f64.powi(i32::try_from(scale).ok()?)))
    })
}

fn exact(total: i64, scale: u32, n: i64) -> Option<f64> {
    let magnitude = u128::from(total.unsigned_abs());
    let count = u128::from(n.unsigned_abs());
    let (weight1, first1) = if magnitude == 0 {
        (0, 0)
    } else {
        weight_and_first_digit(magnitude, scale)?
    };
    let (weight2, first2) = weight_and_first_digit(count, 0)?;
    let mut qweight = weight1 - weight2;
    if first1 <= first2 {
        qweight -= 1;
    }
    let rscale = (MIN_SIG_DIGITS - qweight * DEC_DIGITS)
        .max(i32::try_from(scale).ok()?)
        .max(0);
    let rscale = u32::try_from(rscale).ok()?;
    // magnitude / 10^scale / count, to rscale decimals, half away from zero.
    let numerator = magnitude.checked_mul(10u128.checked_pow(rscale)?)?;
    let denominator = count.checked_mul(10u128.checked_pow(scale)?)?;
    let (mut q, r) = (numerator / denominator, numerator % denominator);
    if r.checked_mul(2)? >= denominator {
        q += 1;
    }
    let unit = 10u128.checked_pow(rscale)?;
    let sign = if total < 0 { "-" } else { "" };
    let text = format!(
        "{sign}{}.{:0width$}",
        q / unit,
        q % unit,
        width = rscale as usize
    );
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_quotients_and_no_values() {
        assert_eq!(pg_avg(40, 0, 10), Some(4.0));
        assert_eq!(pg_avg(0, 0, 3), Some(0.0));
        assert_eq!(pg_avg(0, 2, 3), Some(0.0));
        assert_eq!(pg_avg(5, 0, 0), None);
        assert_eq!(pg_avg(150, 2, 3), Some(0.5));
        assert_eq!(pg_avg(-9, 0, 2), Some(-4.5));
    }

    #[test]
    fn rounds_to_the_decimal_postgresql_prints_first() {
        // SELECT 2::numeric / 3 → 0.66666666666666666667 (scale 20: the
        // quotient's first digit is below the divisor's).
        assert_eq!(pg_avg(2, 0, 3), "0.66666666666666666667".parse().ok());
        // SELECT 10::numeric / 3 → 3.3333333333333333 (scale 16).
        assert_eq!(pg_avg(10, 0, 3), "3.3333333333333333".parse().ok());
        // 7.30 / 13 → 0.56153846153846153846 (scale 20).
        assert_eq!(pg_avg(730, 2, 13), "0.56153846153846153846".parse().ok());
    }

    #[test]
    fn the_division_scale_follows_the_operands_weights() {
        assert_eq!(weight_and_first_digit(12_345, 0), Some((1, 1)));
        assert_eq!(weight_and_first_digit(9_999, 0), Some((0, 9_999)));
        // 0.40 = 0.4000 in base 10000: weight -1, first digit 4000.
        assert_eq!(weight_and_first_digit(40, 2), Some((-1, 4_000)));
        // 123.45 = 123 . 4500
        assert_eq!(weight_and_first_digit(12_345, 2), Some((0, 123)));
    }
}
