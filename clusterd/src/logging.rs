//! Log output of the `clusterd` binary: lines on stderr at a chosen level, with repeats held back.
//!
//! Owns: [`init`] (installs the subscriber), [`RepeatLimit`] (at most N lines per window from one place in the
//! code, at INFO and above) and the summary line that says how many were held back. Why: openraft logs an ERROR
//! for every linearizable-read leadership check that cannot reach a member, so with one member down a read load
//! wrote ≈ 3,600 identical lines a second. Does not: decide what is logged (callers do), or hold back DEBUG and
//! TRACE lines, which an operator asks for on purpose.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::callsite::Identifier;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// Target of the summary lines (never held back themselves).
pub const TARGET: &str = "clusterd::log";

/// At most `lines` per `window` from one call site; `lines == 0` turns the limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Lines let through per window and call site.
    pub lines: u32,
    /// Window length.
    pub window: Duration,
}

impl Default for Limit {
    fn default() -> Self {
        Limit { lines: 5, window: Duration::from_secs(10) }
    }
}

impl std::str::FromStr for Limit {
    type Err = String;

    /// `LINES/SECONDSs`, e.g. `5/10s`; `0` (or `off`) turns the limit off.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "0" || s == "off" {
            return Ok(Limit { lines: 0, window: Duration::from_secs(1) });
        }
        let bad = || format!("{s:?} is not LINES/SECONDS like 5/10s (or 0 for no limit)");
        let (lines, secs) = s.split_once('/').ok_or_else(bad)?;
        let lines: u32 = lines.trim().parse().map_err(|_| bad())?;
        let secs: u64 = secs.trim().trim_end_matches('s').parse().map_err(|_| bad())?;
        if secs == 0 {
            return Err(format!("{s:?}: the window must be at least 1 second"));
        }
        Ok(Limit { lines, window: Duration::from_secs(secs) })
    }
}

/// One call site's window: when it opened, lines let through in it, lines held back since the last summary,
/// and the first held-back line's text.
struct Slot {
    opened: Instant,
    passed: u32,
    held: u64,
    level: Level,
    target: &'static str,
    sample: String,
}

/// Held-back lines of one call site, as reported by [`RepeatLimit::take_held`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// How many lines were held back.
    pub count: u64,
    /// Their level.
    pub level: Level,
    /// Their target (module path).
    pub target: &'static str,
    /// The first held-back line's message.
    pub sample: String,
}

/// The per-call-site line budget; a [`Layer`] that disables events over budget for every other layer.
#[derive(Clone)]
pub struct RepeatLimit {
    limit: Limit,
    slots: Arc<Mutex<HashMap<Identifier, Slot>>>,
}

impl RepeatLimit {
    /// A budget of `limit`.
    pub fn new(limit: Limit) -> Self {
        RepeatLimit { limit, slots: Arc::default() }
    }

    /// Count one line from `meta`'s call site at `now`; whether it may print. `sample` gives its text, asked
    /// for only when it is the first one held back since the last summary.
    pub fn admit(&self, meta: &'static Metadata<'static>, now: Instant, sample: impl FnOnce() -> String) -> bool {
        if self.limit.lines == 0 || *meta.level() > Level::INFO || meta.target() == TARGET {
            return true;
        }
        let Ok(mut slots) = self.slots.lock() else { return true };
        let slot = slots.entry(meta.callsite()).or_insert_with(|| Slot {
            opened: now,
            passed: 0,
            held: 0,
            level: *meta.level(),
            target: meta.target(),
            sample: String::new(),
        });
        if now.saturating_duration_since(slot.opened) >= self.limit.window {
            slot.opened = now;
            slot.passed = 0;
        }
        if slot.passed < self.limit.lines {
            slot.passed += 1;
            return true;
        }
        if slot.held == 0 {
            slot.sample = sample();
        }
        slot.held += 1;
        false
    }

    /// Every call site's held-back lines since the last call, most first; resets the counts.
    pub fn take_held(&self) -> Vec<Held> {
        let Ok(mut slots) = self.slots.lock() else { return Vec::new() };
        let mut out: Vec<Held> = slots
            .values_mut()
            .filter(|s| s.held > 0)
            .map(|s| Held {
                count: std::mem::take(&mut s.held),
                level: s.level,
                target: s.target,
                sample: std::mem::take(&mut s.sample),
            })
            .collect();
        out.sort_by_key(|h| std::cmp::Reverse(h.count));
        out
    }

    /// Log a summary of what was held back, once per window, on a thread of its own.
    pub fn spawn_reporter(&self) {
        if self.limit.lines == 0 {
            return;
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new().name("log-repeats".into()).spawn(move || loop {
            std::thread::sleep(me.limit.window);
            for h in me.take_held() {
                tracing::warn!(
                    target: TARGET,
                    "held back {} more {} lines from {} in the last {} s (at most {} per window from one place; --log-repeat-limit): {}",
                    h.count,
                    h.level,
                    h.target,
                    me.limit.window.as_secs(),
                    me.limit.lines,
                    h.sample
                );
            }
        });
        if let Err(e) = spawned {
            eprintln!("clusterd: log repeat reporter not started: {e}");
        }
    }
}

impl<S: Subscriber> Layer<S> for RepeatLimit {
    fn event_enabled(&self, event: &Event<'_>, _cx: Context<'_, S>) -> bool {
        self.admit(event.metadata(), Instant::now(), || {
            let mut v = Message(String::new());
            event.record(&mut v);
            v.0
        })
    }
}

/// Collects an event's `message` field (and the other fields after it, as `name=value`).
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

/// Install the stderr subscriber: lines at `level` and above, repeats limited by `limit`.
pub fn init(level: Level, limit: Limit) {
    let repeats = RepeatLimit::new(limit);
    let installed = tracing_subscriber::registry()
        .with(tracing_subscriber::filter::LevelFilter::from_level(level))
        .with(repeats.clone())
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(false))
        .try_init();
    if installed.is_ok() {
        repeats.spawn_reporter();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metadata of three call sites: an openraft ERROR, a DEBUG line and a summary line.
    fn sites() -> Vec<&'static Metadata<'static>> {
        struct Collect(Arc<Mutex<Vec<&'static Metadata<'static>>>>);
        impl tracing::Subscriber for Collect {
            fn enabled(&self, _: &Metadata<'_>) -> bool {
                true
            }
            fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
                tracing::span::Id::from_u64(1)
            }
            fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
            fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
            fn event(&self, e: &Event<'_>) {
                if let Ok(mut v) = self.0.lock() {
                    v.push(e.metadata());
                }
            }
            fn enter(&self, _: &tracing::span::Id) {}
            fn exit(&self, _: &tracing::span::Id) {}
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        tracing::subscriber::with_default(Collect(seen.clone()), || {
            tracing::error!(target: "openraft::core", "timeout while confirming leadership");
            tracing::debug!(target: "openraft::core", "debug line");
            tracing::warn!(target: TARGET, "summary");
        });
        let all = seen.lock().map(|v| v.clone()).unwrap_or_default();
        assert_eq!(all.len(), 3);
        all
    }

    #[test]
    fn a_call_site_prints_its_budget_per_window_and_the_rest_is_counted_once() {
        let s = sites();
        let (err, debug, summary) = (s[0], s[1], s[2]);
        let r = RepeatLimit::new(Limit { lines: 3, window: Duration::from_secs(10) });
        let t0 = Instant::now();
        let passed = (0..100).filter(|_| r.admit(err, t0, || "timeout while confirming leadership".into())).count();
        assert_eq!(passed, 3, "three lines per window");
        // DEBUG lines and the summaries themselves are never held back.
        assert!((0..100).all(|_| r.admit(debug, t0, String::new)));
        assert!((0..100).all(|_| r.admit(summary, t0, String::new)));
        let held = r.take_held();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].count, 97);
        assert_eq!(held[0].level, Level::ERROR);
        assert_eq!(held[0].sample, "timeout while confirming leadership");
        assert!(r.take_held().is_empty(), "counts reset once reported");
        // Inside the same window the site stays quiet; a new window lets three through again.
        assert!(!r.admit(err, t0 + Duration::from_secs(9), String::new));
        let later = t0 + Duration::from_secs(10);
        assert_eq!((0..10).filter(|_| r.admit(err, later, String::new)).count(), 3);
    }

    #[test]
    fn zero_turns_the_limit_off() {
        let s = sites();
        let r = RepeatLimit::new("0".parse().expect("limit"));
        assert!((0..1000).all(|_| r.admit(s[0], Instant::now(), String::new)));
        assert!(r.take_held().is_empty());
    }

    #[test]
    fn limits_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!("5/10s".parse::<Limit>(), Ok(Limit { lines: 5, window: Duration::from_secs(10) }));
        assert_eq!("20/60".parse::<Limit>(), Ok(Limit { lines: 20, window: Duration::from_secs(60) }));
        assert_eq!("off".parse::<Limit>().map(|l| l.lines), Ok(0));
        for bad in ["5", "x/10s", "5/xs", "-1/10s"] {
            let e = bad.parse::<Limit>().expect_err(bad);
            assert!(e.contains("LINES/SECONDS"), "{e}");
        }
        assert!("5/0s".parse::<Limit>().expect_err("zero window").contains("at least 1 second"));
    }
}
