//! Wall-clock helpers for TTLs: Unix nanoseconds and Go-style RFC 3339 (nanosecond, trailing zeros trimmed).
//!
//! Owns: conversion of expiration instants to the exact text etcd prints (`2026-11-21T22:47:30.56106271Z`).
//! Does not: decide when keys expire (see `store`), read clocks anywhere but [`now_nanos`].

use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch, from the system clock (0 if the clock is before 1970).
pub fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Remaining TTL in whole seconds, rounded up like etcd (`ceil((expire - now) / 1s)`).
pub fn ttl_secs(expire: i64, now: i64) -> i64 {
    let d = expire.saturating_sub(now);
    let s = d / 1_000_000_000;
    if d % 1_000_000_000 > 0 {
        s + 1
    } else {
        s
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Format Unix nanoseconds like Go's `time.RFC3339Nano` in UTC.
pub fn rfc3339_nanos(nanos: i64) -> String {
    let secs = nanos.div_euclid(1_000_000_000);
    let frac = nanos.rem_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, mo, d) = civil_from_days(days);
    let mut out = format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    );
    if frac > 0 {
        let f = format!("{frac:09}");
        out.push('.');
        out.push_str(f.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_go() {
        // 2026-11-21T22:48:02.84033758Z
        let t = 1_795_301_282_840_337_580_i64;
        assert_eq!(rfc3339_nanos(t), "2026-11-21T22:48:02.84033758Z");
        assert_eq!(rfc3339_nanos(0), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn ttl_rounds_up() {
        assert_eq!(ttl_secs(3_000_000_000, 0), 3);
        assert_eq!(ttl_secs(3_000_000_001, 0), 4);
        assert_eq!(ttl_secs(0, 1), 0);
    }
}
