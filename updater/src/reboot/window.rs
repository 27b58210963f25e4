//! Reboot windows: when a machine may reboot for an update.
//!
//! Owns: parsing a window (`days`, `start`, `length`, `timezone`, from cloud-config's list or the compact
//! string `"Mon-Fri 04:00 1h30m +02:00"`), and the pure questions "is `t` inside a window?", "when does the
//! next window open?" and "when does the current one close?" over several windows. Time is Unix seconds in,
//! Unix seconds out; nothing here reads a clock.
//! Does not: decide to reboot (see the parent module).
//!
//! Time zones: `UTC` (also `Z`, `GMT`, `Etc/UTC`, or none) and fixed offsets (`+02:00`, `-0530`, `UTC+2`).
//! IANA names such as `Europe/Berlin` are refused with an explanation: Keel ships no time zone database, and
//! a fixed offset never shifts a window by an hour without anyone noticing.

use serde::{Deserialize, Serialize};

/// A window as written in cloud-config (`reboot_windows: [{days, start, length, timezone}]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSpec {
    /// `Mon,Tue`, `Mon-Fri`, `Sat`, `*` or empty for every day.
    #[serde(default)]
    pub days: String,
    /// `HH:MM` (24 h) in `timezone`.
    pub start: String,
    /// `1h`, `30m`, `1h30m`; at most 7 days.
    pub length: String,
    /// `UTC` or a fixed offset; default UTC.
    #[serde(default, alias = "time_zone", alias = "tz")]
    pub timezone: String,
}

/// A window that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("reboot window {0:?}: day {1:?} is not one of Mon Tue Wed Thu Fri Sat Sun (ranges like Mon-Fri and lists like Sat,Sun work)")]
    Day(String, String),
    #[error("reboot window {0:?}: start {1:?} is not HH:MM (00:00-23:59)")]
    Start(String, String),
    #[error("reboot window {0:?}: length {1:?} is not a duration like 1h, 30m or 1h30m between 1m and 168h")]
    Length(String, String),
    #[error("reboot window {0:?}: time zone {1:?} is not supported; use UTC or a fixed offset like +02:00 (IANA names need a time zone database Keel does not ship)")]
    TimeZone(String, String),
    #[error("reboot window {0:?}: expected \"[days] HH:MM LENGTH [TIMEZONE]\", e.g. \"Mon-Fri 04:00 1h UTC\"")]
    Syntax(String),
}

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const DAY: i64 = 86_400;
const MAX_LENGTH: i64 = 7 * DAY;

/// One parsed window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Bit `d` set: the window opens on weekday `d` (0 = Monday).
    days: u8,
    /// Opening time, seconds after local midnight.
    start: i64,
    /// Seconds it stays open.
    length: i64,
    /// Local time minus UTC, seconds.
    offset: i64,
}

fn day_index(name: &str) -> Option<u8> {
    let n = name.trim().to_ascii_lowercase();
    let n = n.get(..3)?;
    DAY_NAMES.iter().position(|d| *d == n).map(|i| i as u8)
}

fn parse_days(whole: &str, s: &str) -> Result<u8, WindowError> {
    let s = s.trim();
    if s.is_empty() || s == "*" || s.eq_ignore_ascii_case("daily") {
        return Ok(0x7f);
    }
    let mut mask = 0u8;
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || WindowError::Day(whole.to_string(), part.to_string());
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day_index(a).ok_or_else(bad)?, day_index(b).ok_or_else(bad)?);
                let mut d = a;
                loop {
                    mask |= 1 << d;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => mask |= 1 << day_index(part).ok_or_else(bad)?,
        }
    }
    Ok(mask)
}

fn parse_start(whole: &str, s: &str) -> Result<i64, WindowError> {
    let bad = || WindowError::Start(whole.to_string(), s.to_string());
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let h: i64 = h.parse().map_err(|_| bad())?;
    let m: i64 = m.parse().map_err(|_| bad())?;
    if !(0..24).contains(&h) || !(0..60).contains(&m) {
        return Err(bad());
    }
    Ok(h * 3600 + m * 60)
}

/// A period (updateserver's `--period`): plain seconds, or `d`/`h`/`m`/`s` parts as reboot windows' lengths are written (`1d`, `1h30m`).
pub fn parse_period(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(secs);
    }
    let (days, rest) = match t.split_once('d') {
        Some((d, rest)) => (d.parse::<i64>().map_err(|_| bad_period(s))?, rest),
        None => (0, t),
    };
    let rest = if rest.is_empty() { Some(0) } else { parse_length(rest) };
    rest.and_then(|r| days.checked_mul(86_400)?.checked_add(r))
        .and_then(|total| u64::try_from(total).ok())
        .filter(|&total| total > 0)
        .ok_or_else(|| bad_period(s))
}

fn bad_period(s: &str) -> String {
    format!("{s:?} is not a period; write e.g. 1h, 30m, 1d, 1h30m or seconds like 3600")
}

/// Parses `1h30m`, `90m`, `2h`, `45s` (units h, m, s; at least one).
pub fn parse_length(s: &str) -> Option<i64> {
    let mut total = 0i64;
    let mut num = String::new();
    let mut any = false;
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: i64 = num.parse().ok()?;
        num.clear();
        total = total.checked_add(n.checked_mul(match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        })?)?;
        any = true;
    }
    (num.is_empty() && any).then_some(total)
}

/// Parses a time zone into its offset from UTC in seconds.
pub fn parse_offset(s: &str) -> Option<i64> {
    let t = s.trim();
    if t.is_empty()
        || ["utc", "z", "gmt", "etc/utc", "etc/gmt", "uct", "zulu"]
            .contains(&t.to_ascii_lowercase().as_str())
    {
        return Some(0);
    }
    let t = t
        .strip_prefix("UTC")
        .or_else(|| t.strip_prefix("GMT"))
        .unwrap_or(t);
    let (sign, rest) = match t.as_bytes().first()? {
        b'+' => (1, &t[1..]),
        b'-' => (-1, &t[1..]),
        _ => return None,
    };
    let (h, m) = match rest.split_once(':') {
        Some((h, m)) => (h, m),
        None if rest.len() == 4 => rest.split_at(2),
        None => (rest, "0"),
    };
    if h.is_empty()
        || h.len() > 2
        || m.len() > 2
        || !h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    if h > 14 || m >= 60 {
        return None;
    }
    Some(sign * (h * 3600 + m * 60))
}

impl Window {
    /// Parses a cloud-config window.
    pub fn from_spec(spec: &WindowSpec) -> Result<Window, WindowError> {
        let whole = format!(
            "{} {} {} {}",
            spec.days, spec.start, spec.length, spec.timezone
        )
        .trim()
        .to_string();
        let days = parse_days(&whole, &spec.days)?;
        let start = parse_start(&whole, &spec.start)?;
        let length = parse_length(&spec.length)
            .filter(|l| (60..=MAX_LENGTH).contains(l))
            .ok_or_else(|| WindowError::Length(whole.clone(), spec.length.clone()))?;
        let offset = parse_offset(&spec.timezone)
            .ok_or_else(|| WindowError::TimeZone(whole.clone(), spec.timezone.clone()))?;
        Ok(Window {
            days,
            start,
            length,
            offset,
        })
    }

    /// Parses the compact form `"[days] HH:MM LENGTH [TIMEZONE]"` (locksmith's `Thu 23:00` plus a length).
    pub fn parse(s: &str) -> Result<Window, WindowError> {
        let words: Vec<&str> = s.split_whitespace().collect();
        let at = words
            .iter()
            .position(|w| w.contains(':') && w.bytes().next().is_some_and(|b| b.is_ascii_digit()))
            .ok_or_else(|| WindowError::Syntax(s.to_string()))?;
        if at > 1 || words.len() < at + 2 || words.len() > at + 3 {
            return Err(WindowError::Syntax(s.to_string()));
        }
        Window::from_spec(&WindowSpec {
            days: if at == 1 {
                words[0].to_string()
            } else {
                String::new()
            },
            start: words[at].to_string(),
            length: words[at + 1].to_string(),
            timezone: words.get(at + 2).map(|w| w.to_string()).unwrap_or_default(),
        })
    }

    /// Openings (UTC seconds) of the occurrences whose local start day is within `from_day..=to_day`
    /// (days since the epoch, local).
    fn openings(&self, from_day: i64, to_day: i64) -> impl Iterator<Item = i64> + '_ {
        (from_day..=to_day)
            .filter(|d| self.days & (1 << weekday(*d)) != 0)
            .map(|d| d * DAY + self.start - self.offset)
    }

    fn local_day(&self, t: i64) -> i64 {
        (t + self.offset).div_euclid(DAY)
    }

    /// The occurrence containing `t`, as (open, close) UTC seconds.
    pub fn current(&self, t: i64) -> Option<(i64, i64)> {
        let today = self.local_day(t);
        let back = self.length / DAY + 1;
        self.openings(today - back, today)
            .map(|o| (o, o + self.length))
            .filter(|(o, c)| *o <= t && t < *c)
            .last()
    }

    /// The first opening at or after `t`.
    pub fn next_open(&self, t: i64) -> Option<i64> {
        let today = self.local_day(t);
        self.openings(today - 1, today + 8).find(|o| *o >= t)
    }
}

/// Day of week of a day number since the epoch: 0 = Monday (1970-01-01 was a Thursday).
fn weekday(day: i64) -> u32 {
    (day + 3).rem_euclid(7) as u32
}

/// `2024-01-01 04:00 UTC (Mon)` for a Unix time.
pub fn format_utc(t: i64) -> String {
    let (days, secs) = (t.div_euclid(DAY), t.rem_euclid(DAY));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let name = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"][weekday(days) as usize];
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC ({name})",
        secs / 3600,
        secs % 3600 / 60
    )
}

/// Every window of a machine. No windows: always open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Windows(pub Vec<Window>);

impl Windows {
    /// True when `t` is inside some window (always, when there are none).
    pub fn is_open(&self, t: i64) -> bool {
        self.0.is_empty() || self.0.iter().any(|w| w.current(t).is_some())
    }

    /// When the windows next open: `t` itself if one is open now; None only when there are no windows.
    pub fn next_open(&self, t: i64) -> Option<i64> {
        if self.0.is_empty() {
            return None;
        }
        if self.is_open(t) {
            return Some(t);
        }
        self.0.iter().filter_map(|w| w.next_open(t)).min()
    }

    /// When the open windows containing `t` all close (overlapping and back-to-back windows merge).
    pub fn closes_at(&self, t: i64) -> Option<i64> {
        if self.0.is_empty() {
            return None;
        }
        let mut end = self
            .0
            .iter()
            .filter_map(|w| w.current(t))
            .map(|(_, c)| c)
            .max()?;
        // Follow windows that open before the current one closes.
        for _ in 0..64 {
            match self
                .0
                .iter()
                .filter_map(|w| w.current(end))
                .map(|(_, c)| c)
                .max()
            {
                Some(c) if c > end => end = c,
                _ => break,
            }
        }
        Some(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_read_as_the_help_writes_them() {
        assert_eq!(parse_period("3600"), Ok(3600));
        assert_eq!(parse_period("1h"), Ok(3600));
        assert_eq!(parse_period("1h30m"), Ok(5400));
        assert_eq!(parse_period("1d"), Ok(86_400));
        assert_eq!(parse_period("2d12h"), Ok(216_000));
        assert!(parse_period("1w").is_err());
        assert!(parse_period("soon").is_err());
    }

    /// 2024-01-01 00:00:00 UTC, a Monday.
    const MON: i64 = 1_704_067_200;
    const H: i64 = 3600;

    fn w(s: &str) -> Window {
        Window::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(
            format_utc(MON + 4 * H + 30 * 60),
            "2024-01-01 04:30 UTC (Mon)"
        );
        assert_eq!(format_utc(0), "1970-01-01 00:00 UTC (Thu)");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00 UTC (Tue)");
    }

    #[test]
    fn monday_epoch_is_a_monday() {
        assert_eq!(weekday(MON / DAY), 0);
        assert_eq!(weekday(0), 3, "1970-01-01 was a Thursday");
    }

    #[test]
    fn simple_window_contains_its_hour_only() {
        let win = w("Mon 04:00 1h");
        assert!(win.current(MON + 4 * H - 1).is_none());
        assert_eq!(win.current(MON + 4 * H), Some((MON + 4 * H, MON + 5 * H)));
        assert!(win.current(MON + 5 * H - 1).is_some());
        assert!(win.current(MON + 5 * H).is_none(), "the close is exclusive");
        assert!(win.current(MON + DAY + 4 * H).is_none(), "not on Tuesday");
        assert_eq!(win.next_open(MON + 5 * H), Some(MON + 7 * DAY + 4 * H));
    }

    #[test]
    fn window_crossing_midnight_belongs_to_its_start_day() {
        let win = w("Sun 23:00 2h");
        let sun = MON + 6 * DAY;
        assert!(win.current(sun + 23 * H + 30 * 60).is_some());
        assert!(
            win.current(sun + DAY + 30 * 60).is_some(),
            "00:30 Monday is inside Sunday's window"
        );
        assert!(win.current(sun + DAY + H).is_none());
        assert!(
            win.current(MON + 30 * 60).is_some(),
            "the week before wraps the same way"
        );
        assert!(
            win.current(MON + DAY + 30 * 60).is_none(),
            "Monday's 23:00 has no window"
        );
    }

    #[test]
    fn fixed_offsets_shift_the_window() {
        // 04:00 at +02:00 is 02:00 UTC.
        let win = w("Mon 04:00 1h +02:00");
        assert!(win.current(MON + 2 * H).is_some());
        assert!(win.current(MON + 4 * H).is_none());
        // 01:00 Monday at -05:00 is 06:00 UTC Monday; 23:30 Sunday local is 04:30 UTC Monday.
        let win = w("Sun 23:30 1h -0500");
        assert!(win.current(MON + 4 * H + 45 * 60).is_some());
        let win = w("Mon 01:00 1h UTC-5");
        assert!(win.current(MON + 6 * H + 10 * 60).is_some());
        assert_eq!(parse_offset("+05:30"), Some(5 * H + 30 * 60));
        assert_eq!(parse_offset("Etc/UTC"), Some(0));
        assert_eq!(parse_offset("Europe/Berlin"), None);
        assert!(matches!(
            Window::parse("Mon 04:00 1h Europe/Berlin"),
            Err(WindowError::TimeZone(..))
        ));
    }

    #[test]
    fn days_lists_ranges_and_every_day() {
        let weekdays = w("Mon-Fri 03:00 1h");
        for d in 0..5 {
            assert!(weekdays.current(MON + d * DAY + 3 * H).is_some(), "day {d}");
        }
        assert!(weekdays.current(MON + 5 * DAY + 3 * H).is_none());
        let weekend = w("Fri-Mon 03:00 1h");
        assert!(
            weekend.current(MON + 6 * DAY + 3 * H).is_some(),
            "wrap-around range includes Sunday"
        );
        assert!(weekend.current(MON + DAY + 3 * H).is_none());
        let daily = w("12:00 30m");
        for d in 0..7 {
            assert!(daily.current(MON + d * DAY + 12 * H + 60).is_some());
        }
        assert!(matches!(
            Window::parse("Funday 03:00 1h"),
            Err(WindowError::Day(..))
        ));
        assert!(matches!(
            Window::parse("Mon 25:00 1h"),
            Err(WindowError::Start(..))
        ));
        assert!(matches!(
            Window::parse("Mon 03:00 0m"),
            Err(WindowError::Length(..))
        ));
        assert!(matches!(
            Window::parse("Mon 03:00 200h"),
            Err(WindowError::Length(..))
        ));
        assert!(matches!(
            Window::parse("Mon 03:00"),
            Err(WindowError::Syntax(..))
        ));
    }

    #[test]
    fn several_windows_open_close_and_merge() {
        let ws = Windows(vec![
            w("Tue 02:00 1h"),
            w("Sat 10:00 2h"),
            w("Sat 11:30 1h"),
        ]);
        assert!(!ws.is_open(MON));
        assert_eq!(ws.next_open(MON), Some(MON + DAY + 2 * H));
        assert_eq!(
            ws.next_open(MON + DAY + 2 * H + 5),
            Some(MON + DAY + 2 * H + 5),
            "open now"
        );
        assert_eq!(ws.closes_at(MON + DAY + 2 * H + 5), Some(MON + DAY + 3 * H));
        assert_eq!(
            ws.next_open(MON + DAY + 3 * H),
            Some(MON + 5 * DAY + 10 * H)
        );
        // Overlapping Saturday windows merge into 10:00-12:30.
        assert_eq!(
            ws.closes_at(MON + 5 * DAY + 10 * H),
            Some(MON + 5 * DAY + 12 * H + 30 * 60)
        );
        assert!(Windows::default().is_open(MON));
        assert_eq!(Windows::default().next_open(MON), None);
    }

    #[test]
    fn long_windows_span_days() {
        let win = w("Sat 00:00 48h");
        let sat = MON + 5 * DAY;
        assert!(win.current(sat + 47 * H).is_some(), "Sunday 23:00");
        assert!(win.current(sat + 48 * H).is_none(), "Monday 00:00");
        assert_eq!(parse_length("1h30m"), Some(90 * 60));
        assert_eq!(parse_length("90"), None, "a unit is required");
        assert_eq!(parse_length("1x"), None);
    }

    #[test]
    fn spec_form_matches_compact_form() {
        let spec: WindowSpec = serde_json::from_str(
            r#"{"days":"Mon,Tue","start":"04:00","length":"1h","timezone":"UTC"}"#,
        )
        .expect("spec");
        assert_eq!(Window::from_spec(&spec), Ok(w("Mon,Tue 04:00 1h UTC")));
    }
}
