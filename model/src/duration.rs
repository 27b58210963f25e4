//! systemd time spans (`100ms`, `1min 30s`, `1h30m`, `2.5s`, `5`, `infinity`). Pure.
//!
//! A span is one or more `number[.fraction][unit]` components, optionally separated by whitespace; their sum
//! is the result. A component without a unit is in seconds (as in systemd). Units: `us`/`usec`, `ms`/`msec`,
//! `s`/`sec`/`second(s)`, `m`/`min`/`minute(s)`, `h`/`hr`/`hour(s)`, `d`/`day(s)`, `w`/`week(s)`.

use std::time::Duration;

const NS_PER_US: u128 = 1_000;
const NS_PER_MS: u128 = 1_000_000;
const NS_PER_S: u128 = 1_000_000_000;

/// Parse a time span; a bare number is seconds. `Ok(None)` means `infinity`.
///
/// Errors name the problem and the input, e.g. `unknown time unit 'x' in '5x'`.
pub fn parse_timespan(s: &str) -> Result<Option<Duration>, String> {
    let text = s.trim();
    if text == "infinity" {
        return Ok(None);
    }
    if text.is_empty() {
        return Err("empty time span".to_string());
    }
    let mut rest = text;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let (nanos, tail) = parse_component(rest, text)?;
        total = total
            .checked_add(nanos)
            .ok_or_else(|| format!("time span '{text}' is too large"))?;
        rest = tail.trim_start();
    }
    nanos_to_duration(total, text).map(Some)
}

/// Parse one `number[.fraction] [unit]` component at the start of `s`; returns its nanoseconds and the rest.
fn parse_component<'a>(s: &'a str, whole: &str) -> Result<(u128, &'a str), String> {
    let num_len = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, after) = s.split_at(num_len);
    if number.is_empty() {
        return Err(format!("expected a number at '{s}' in time span '{whole}'"));
    }
    let after = after.trim_start();
    let unit_len = after
        .find(|c: char| !c.is_ascii_alphabetic())
        .unwrap_or(after.len());
    let (unit, tail) = after.split_at(unit_len);
    let per_unit = unit_nanos(unit)
        .ok_or_else(|| format!("unknown time unit '{unit}' in time span '{whole}'"))?;
    let nanos = scale(number, per_unit)
        .ok_or_else(|| format!("invalid number '{number}' in time span '{whole}'"))?;
    Ok((nanos, tail))
}

/// Nanoseconds per unit; the empty unit is seconds.
fn unit_nanos(unit: &str) -> Option<u128> {
    let ns = match unit {
        "us" | "usec" => NS_PER_US,
        "ms" | "msec" => NS_PER_MS,
        "" | "s" | "sec" | "second" | "seconds" => NS_PER_S,
        "m" | "min" | "minute" | "minutes" => 60 * NS_PER_S,
        "h" | "hr" | "hour" | "hours" => 3_600 * NS_PER_S,
        "d" | "day" | "days" => 86_400 * NS_PER_S,
        "w" | "week" | "weeks" => 7 * 86_400 * NS_PER_S,
        _ => return None,
    };
    Some(ns)
}

/// `number` (digits, optionally `.digits`) times `per_unit` nanoseconds; `None` when malformed or too large.
fn scale(number: &str, per_unit: u128) -> Option<u128> {
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if frac_part.contains('.') || (int_part.is_empty() && frac_part.is_empty()) {
        return None;
    }
    let int: u128 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().ok()?
    };
    let mut nanos = int.checked_mul(per_unit)?;
    // Fractions beyond nanosecond precision are dropped; 18 digits keep the arithmetic in range.
    let frac_digits = &frac_part[..frac_part.len().min(18)];
    if !frac_digits.is_empty() {
        let frac: u128 = frac_digits.parse().ok()?;
        let denom = 10u128.checked_pow(u32::try_from(frac_digits.len()).ok()?)?;
        nanos = nanos.checked_add(frac.checked_mul(per_unit)? / denom)?;
    }
    Some(nanos)
}

fn nanos_to_duration(total: u128, whole: &str) -> Result<Duration, String> {
    let secs =
        u64::try_from(total / NS_PER_S).map_err(|_| format!("time span '{whole}' is too large"))?;
    // The remainder is below 1e9 and always fits.
    let sub = u32::try_from(total % NS_PER_S).unwrap_or(0);
    Ok(Duration::new(secs, sub))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Duration {
        match parse_timespan(s) {
            Ok(Some(d)) => d,
            other => panic!("{s:?} -> {other:?}"),
        }
    }

    #[test]
    fn bare_number_is_seconds() {
        assert_eq!(ok("5"), Duration::from_secs(5));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("  90 "), Duration::from_secs(90));
    }

    #[test]
    fn every_unit_spelling() {
        let cases = [
            ("7us", Duration::from_micros(7)),
            ("7usec", Duration::from_micros(7)),
            ("100ms", Duration::from_millis(100)),
            ("100msec", Duration::from_millis(100)),
            ("3s", Duration::from_secs(3)),
            ("3sec", Duration::from_secs(3)),
            ("1second", Duration::from_secs(1)),
            ("3seconds", Duration::from_secs(3)),
            ("2m", Duration::from_secs(120)),
            ("2min", Duration::from_secs(120)),
            ("1minute", Duration::from_secs(60)),
            ("2minutes", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("1hr", Duration::from_secs(3600)),
            ("1hour", Duration::from_secs(3600)),
            ("2hours", Duration::from_secs(7200)),
            ("1d", Duration::from_secs(86_400)),
            ("1day", Duration::from_secs(86_400)),
            ("2days", Duration::from_secs(172_800)),
            ("1w", Duration::from_secs(604_800)),
            ("1week", Duration::from_secs(604_800)),
            ("2weeks", Duration::from_secs(1_209_600)),
        ];
        for (input, want) in cases {
            assert_eq!(ok(input), want, "{input}");
        }
    }

    #[test]
    fn combinations_with_and_without_spaces() {
        assert_eq!(ok("1min 30s"), Duration::from_secs(90));
        assert_eq!(ok("1h30m"), Duration::from_secs(5400));
        assert_eq!(ok("1h 30m 15s 500ms"), Duration::from_millis(5_415_500));
        assert_eq!(ok("5 s"), Duration::from_secs(5));
        assert_eq!(ok("1min 5"), Duration::from_secs(65));
    }

    #[test]
    fn fractions() {
        assert_eq!(ok("2.5s"), Duration::from_millis(2500));
        assert_eq!(ok("0.5"), Duration::from_millis(500));
        assert_eq!(ok(".25min"), Duration::from_secs(15));
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
    }

    #[test]
    fn infinity_is_none() {
        assert_eq!(parse_timespan("infinity"), Ok(None));
        assert_eq!(parse_timespan(" infinity "), Ok(None));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let err = |s: &str| parse_timespan(s).expect_err(s);
        assert!(err("").contains("empty"));
        assert!(err("5x").contains("unknown time unit 'x'"));
        assert!(err("abc").contains("expected a number"));
        assert!(err("1.2.3s").contains("invalid number '1.2.3'"));
        assert!(err("-5s").contains("expected a number"));
        assert!(err("5s junk").contains("expected a number at 'junk'"));
        assert!(err("99999999999999999999999w").contains("too large"));
    }
}
