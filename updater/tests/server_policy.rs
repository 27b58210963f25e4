//! Rollout policy of the update server, without HTTP: pause, rate limit, halt on error, resume, Range parsing.

use keel_updater::omaha::{Event, Request, KEEL_APPID};
use keel_updater::server::http::parse_range;
use keel_updater::server::{Decision, Release, State};

fn release(v: &str) -> Release {
    Release {
        version: v.into(),
        file: format!("keel-{v}.payload"),
        size: 10,
        sha256: "0".repeat(64),
        key_id: "k".into(),
        published_at: 0,
    }
}

fn check(machine: &str, version: &str, events: Vec<Event>) -> Request {
    Request {
        appid: KEEL_APPID.into(),
        version: version.into(),
        track: "stable".into(),
        machineid: machine.into(),
        updatecheck: true,
        ping: true,
        events,
        ..Request::default()
    }
}

#[test]
fn newer_version_is_granted_same_version_is_not() {
    let mut s = State::default();
    s.publish("stable", release("1.1.0"));
    assert_eq!(
        s.handle(&check("m1", "1.0.0", vec![]), 100),
        Decision::Grant(release("1.1.0"))
    );
    assert_eq!(
        s.handle(&check("m2", "1.1.0", vec![]), 100),
        Decision::NoUpdate
    );
    assert_eq!(
        s.handle(&check("m3", "2.0.0", vec![]), 100),
        Decision::NoUpdate,
        "offered a downgrade by default"
    );
    assert_eq!(s.machines["m1"].state, "granted");
}

#[test]
fn paused_group_refuses_and_resume_restores() {
    let mut s = State::default();
    s.publish("stable", release("1.1.0"));
    s.groups.get_mut("stable").expect("group").paused = true;
    assert_eq!(
        s.handle(&check("m1", "1.0.0", vec![]), 100),
        Decision::Refused("error-updatesDisabled")
    );
    s.groups.get_mut("stable").expect("group").paused = false;
    assert!(matches!(
        s.handle(&check("m1", "1.0.0", vec![]), 100),
        Decision::Grant(_)
    ));
}

#[test]
fn max_updates_per_period_limits_new_grants_but_lets_granted_machines_continue() {
    let mut s = State::default();
    s.publish("stable", release("1.1.0"));
    let g = s.groups.get_mut("stable").expect("group");
    g.max_updates_per_period = 2;
    g.period_secs = 3600;
    assert!(matches!(
        s.handle(&check("m1", "1.0.0", vec![]), 100),
        Decision::Grant(_)
    ));
    assert!(matches!(
        s.handle(&check("m2", "1.0.0", vec![]), 200),
        Decision::Grant(_)
    ));
    assert_eq!(
        s.handle(&check("m3", "1.0.0", vec![]), 300),
        Decision::Refused("error-maxUpdatesPerPeriodLimitReached")
    );
    assert!(
        matches!(
            s.handle(&check("m1", "1.0.0", vec![Event::download_started()]), 400),
            Decision::Grant(_)
        ),
        "resume refused"
    );
    assert!(
        matches!(
            s.handle(&check("m3", "1.0.0", vec![]), 100 + 3600),
            Decision::Grant(_)
        ),
        "next period still refused"
    );
}

#[test]
fn an_error_or_rollback_halts_the_group_until_resumed() {
    let mut s = State::default();
    s.publish("stable", release("1.1.0"));
    assert!(matches!(
        s.handle(&check("m1", "1.0.0", vec![]), 100),
        Decision::Grant(_)
    ));
    s.handle(&check("m1", "1.0.0", vec![Event::error(44)]), 200);
    assert_eq!(s.machines["m1"].state, "rolled-back");
    let halted = s.groups["stable"].halted.clone().expect("not halted");
    assert!(
        halted.contains("m1") && halted.contains("rollback"),
        "{halted}"
    );
    assert_eq!(
        s.handle(&check("m2", "1.0.0", vec![]), 300),
        Decision::Refused("error-updatesDisabled")
    );
    s.groups.get_mut("stable").expect("group").halted = None;
    assert!(matches!(
        s.handle(&check("m2", "1.0.0", vec![]), 400),
        Decision::Grant(_)
    ));
}

#[test]
fn events_drive_machine_state() {
    let mut s = State::default();
    s.publish("stable", release("1.1.0"));
    s.handle(&check("m1", "1.0.0", vec![]), 1);
    for (e, want) in [
        (Event::download_started(), "downloading"),
        (Event::download_finished(), "downloaded"),
        (Event::installed(), "installed"),
    ] {
        s.handle(&check("m1", "1.0.0", vec![e]), 2);
        assert_eq!(s.machines["m1"].state, want);
    }
    s.handle(
        &check("m1", "1.1.0", vec![Event::complete_after_reboot("1.0.0")]),
        3,
    );
    assert_eq!(
        (
            s.machines["m1"].state.as_str(),
            s.machines["m1"].version.as_str()
        ),
        ("complete", "1.1.0")
    );
}

#[test]
fn range_headers() {
    assert_eq!(parse_range("bytes=0-", 100), Some((0, 99)));
    assert_eq!(parse_range("bytes=10-19", 100), Some((10, 19)));
    assert_eq!(parse_range("bytes=90-200", 100), Some((90, 99)));
    assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
    assert_eq!(parse_range("bytes=100-", 100), None);
    assert_eq!(parse_range("bytes=5-1", 100), None);
    assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
    assert_eq!(parse_range("items=0-1", 100), None);
}
