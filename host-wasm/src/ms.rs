//! Milliseconds across the JavaScript boundary.
//!
//! JavaScript numbers are `f64`: every integer up to 2^53 − 1 (`Number.MAX_SAFE_INTEGER`) is
//! exact, which covers Unix milliseconds for the next 285 000 years. Anything else (negative,
//! fractional, NaN, infinite, or too large to be exact) is refused rather than rounded, so a
//! time never changes silently on its way into the core.

/// `Number.MAX_SAFE_INTEGER`: the largest integer such that it and every smaller one are exact
/// in an `f64`.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Converts a JavaScript number of milliseconds to `u64`, refusing anything that is not a
/// whole number in `0..=MAX_SAFE_INTEGER`. `what` names the value in the error message.
pub fn ms_from_js(what: &str, value: f64) -> Result<u64, String> {
    // `-0.0` is accepted as 0: it compares equal to 0 and JavaScript code produces it freely.
    // 2^53 - 1 is exact in an f64, and so is every whole number below it: the casts are exact.
    if (0.0..=MAX_SAFE_INTEGER as f64).contains(&value) && value.fract() == 0.0 {
        Ok(value as u64)
    } else {
        Err(format!(
            "{what} must be a whole number of milliseconds in 0..=2^53-1 (Number.MAX_SAFE_INTEGER), got {value}"
        ))
    }
}

/// Converts milliseconds to a JavaScript number, exactly when `ms <= MAX_SAFE_INTEGER` and
/// otherwise as `MAX_SAFE_INTEGER`: a deadline that far away (285 000 years) means "never",
/// and saturating keeps the result an exact integer instead of a rounded one.
pub fn ms_to_js(ms: u64) -> f64 {
    ms.min(MAX_SAFE_INTEGER) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_numbers_in_range_convert_exactly() {
        assert_eq!(ms_from_js("t", 0.0), Ok(0));
        assert_eq!(ms_from_js("t", -0.0), Ok(0));
        assert_eq!(ms_from_js("t", 1_700_000_000_123.0), Ok(1_700_000_000_123));
        assert_eq!(ms_from_js("t", 9_007_199_254_740_991.0), Ok(MAX_SAFE_INTEGER));
    }

    #[test]
    fn everything_else_is_refused_with_the_value_named() {
        for bad in [-1.0, 0.5, 1e20, 9_007_199_254_740_992.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let err = ms_from_js("nowMs", bad).unwrap_err();
            assert!(err.starts_with("nowMs must be a whole number"), "{err}");
        }
        assert!(ms_from_js("nowMs", -1.0).unwrap_err().ends_with("got -1"));
    }

    #[test]
    fn large_deadlines_saturate() {
        assert_eq!(ms_to_js(0), 0.0);
        assert_eq!(ms_to_js(1_700_000_000_123), 1_700_000_000_123.0);
        assert_eq!(ms_to_js(u64::MAX), 9_007_199_254_740_991.0);
        for ms in [0, 1, 1_700_000_000_123, MAX_SAFE_INTEGER] {
            assert_eq!(ms_from_js("t", ms_to_js(ms)), Ok(ms));
        }
    }
}
