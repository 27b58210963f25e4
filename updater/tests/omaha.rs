//! Omaha v3 XML: what we send parses back; a Flatcar/Nebraska-style response parses; hostile input is refused.

use keel_updater::omaha::{Event, OmahaError, Request, Response, Update, KEEL_APPID, MAX_XML_LEN};

fn sample_request() -> Request {
    Request {
        installsource: "scheduler".into(),
        os_version: "Keel".into(),
        platform: "qemu".into(),
        arch: "amd64".into(),
        appid: KEEL_APPID.into(),
        version: "1.0.0".into(),
        track: "stable".into(),
        bootid: "{0d2d4b5e-0000-4000-8000-000000000001}".into(),
        machineid: "abc123".into(),
        oem: "".into(),
        board: "amd64-usr".into(),
        ping: true,
        updatecheck: true,
        events: vec![Event::complete_after_reboot("0.9.0"), Event::error(44)],
    }
}

#[test]
fn request_round_trips_with_events() {
    let r = sample_request();
    let xml = r.to_xml();
    assert!(
        xml.contains("<event eventtype=\"3\" eventresult=\"2\" previousversion=\"0.9.0\">"),
        "{xml}"
    );
    assert!(xml.contains("errorcode=\"44\""), "{xml}");
    assert!(xml.contains("sp=\"1.0.0_amd64\""), "{xml}");
    assert_eq!(Request::parse(xml.as_bytes()).expect("parse"), r);
}

#[test]
fn flatcar_style_response_parses() {
    let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<response protocol="3.0" server="nebraska"><daystart elapsed_seconds="49008"></daystart>
<app appid="{9b1c7a52-4e1f-4d7e-9a4d-6b0b8a1d5e11}" status="ok"><updatecheck status="ok">
<urls><url codebase="http://127.0.0.1:8080/payloads/"></url></urls>
<manifest version="1.1.0"><packages><package name="keel-1.1.0.payload" hash="aGFzaA==" size="12345" required="true"
 hash_sha256="ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789"></package></packages>
<actions><action event="postinstall" sha256="x" DisablePayloadBackoff="true"></action></actions></manifest>
</updatecheck><ping status="ok"></ping><event status="ok"></event></app></response>"#;
    let r = Response::parse(xml.as_bytes(), KEEL_APPID).expect("parse");
    let u = r.update.expect("update offered");
    assert_eq!(u.version, "1.1.0");
    assert_eq!(u.size, 12345);
    assert_eq!(
        u.payload_url().as_deref(),
        Some("http://127.0.0.1:8080/payloads/keel-1.1.0.payload")
    );
    assert_eq!(
        u.hash_sha256,
        "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"
    );
    assert_eq!(r.daystart_elapsed_seconds, Some(49008));
}

#[test]
fn our_response_builder_parses_back() {
    let u = Update {
        urls: vec!["http://h/p/".into()],
        version: "2.0.0".into(),
        package_name: "k.payload".into(),
        size: 9,
        hash_sha256: "0".repeat(64),
    };
    let xml = Response::xml(KEEL_APPID, "ok", Some("ok"), Some(&u), true, 2);
    assert_eq!(
        Response::parse(xml.as_bytes(), KEEL_APPID)
            .expect("parse")
            .update,
        Some(u)
    );
    let none =
        Response::parse(Response::noupdate(KEEL_APPID).as_bytes(), KEEL_APPID).expect("parse");
    assert_eq!(
        (none.updatecheck_status.as_deref(), none.update),
        (Some("noupdate"), None)
    );
    let refused = Response::xml(KEEL_APPID, "error-updatesDisabled", None, None, true, 0);
    assert_eq!(
        Response::parse(refused.as_bytes(), KEEL_APPID)
            .expect("parse")
            .app_status,
        "error-updatesDisabled"
    );
}

#[test]
fn hostile_documents_are_refused() {
    let big = vec![b' '; MAX_XML_LEN + 1];
    assert!(matches!(
        Response::parse(&big, KEEL_APPID),
        Err(OmahaError::TooLarge(_))
    ));
    let deep = "<a>".repeat(100) + &"</a>".repeat(100);
    assert!(matches!(
        Response::parse(deep.as_bytes(), KEEL_APPID),
        Err(OmahaError::TooComplex)
    ));
    let dtd = r#"<!DOCTYPE x [<!ENTITY a "aaaa">]><response protocol="3.0"/>"#;
    assert!(Response::parse(dtd.as_bytes(), KEEL_APPID).is_err());
    assert!(Response::parse(b"<response protocol=\"3.0\"><app", KEEL_APPID).is_err());
    let traversal = Response::xml(
        KEEL_APPID,
        "ok",
        Some("ok"),
        Some(&Update {
            urls: vec!["http://h/".into()],
            version: "1".into(),
            package_name: "../x".into(),
            size: 1,
            hash_sha256: "0".repeat(64),
        }),
        false,
        0,
    );
    assert!(Response::parse(traversal.as_bytes(), KEEL_APPID).is_err());
}

#[test]
fn mutated_responses_never_panic() {
    // Stable-toolchain stand-in for fuzz/fuzz_targets/omaha_response.rs: seeded byte mutations.
    let u = Update {
        urls: vec!["http://h/p/".into()],
        version: "2.0.0".into(),
        package_name: "k".into(),
        size: 9,
        hash_sha256: "a".repeat(64),
    };
    let base = Response::xml(KEEL_APPID, "ok", Some("ok"), Some(&u), true, 1).into_bytes();
    let req = sample_request().to_xml().into_bytes();
    let mut x: u64 = 0xDEADBEEFCAFEF00D;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..4000 {
        let mut d = if round % 2 == 0 {
            base.clone()
        } else {
            req.clone()
        };
        for _ in 0..(next() % 6 + 1) {
            let i = (next() as usize) % d.len();
            d[i] = b"<>\"=/ a&;\x00\xff"[(next() % 11) as usize];
        }
        let _ = Response::parse(&d, KEEL_APPID);
        let _ = Request::parse(&d);
    }
}
