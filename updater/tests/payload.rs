//! Payload format: build, verify, apply, and every refusal the issue lists.

use std::io::Cursor;
use std::path::Path;

use keel_updater::payload::apply::{
    apply, apply_chunks, never_cancel, ApplyOptions, ResumeStore, SeekSink, Sinks,
};
use keel_updater::payload::build::{build_payload, BuildSpec};
use keel_updater::payload::{
    verify_stream, KeyPair, PayloadError, PayloadHead, TrustedKeys, HEADER_LEN,
};

use crate::common;

use common::pseudo_random;

struct Fixture {
    _dir: tempfile::TempDir,
    payload: Vec<u8>,
    usr: Vec<u8>,
    kernel: Vec<u8>,
    keys: TrustedKeys,
}

fn fixture(version: &str, key: &KeyPair, usr_len: usize) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let usr = pseudo_random(usr_len, 7);
    let kernel = pseudo_random(300_000, 9);
    std::fs::write(dir.path().join("usr.img"), &usr).expect("write usr");
    std::fs::write(dir.path().join("uki.efi"), &kernel).expect("write uki");
    let mut spec = BuildSpec::new(version, "stable");
    spec.chunk_size = 64 << 10;
    let out = dir.path().join("out.payload");
    build_payload(
        &spec,
        &dir.path().join("usr.img"),
        &dir.path().join("uki.efi"),
        key,
        &out,
    )
    .expect("build");
    let payload = std::fs::read(&out).expect("read payload");
    let keys = TrustedKeys::from_keys([key.public()], "test keys");
    Fixture {
        _dir: dir,
        payload,
        usr,
        kernel,
        keys,
    }
}

fn key(n: u8) -> KeyPair {
    KeyPair::from_seed([n; 32])
}

fn apply_to_mem(
    f: &Fixture,
    payload: &[u8],
    running: Option<&str>,
) -> (Result<(), PayloadError>, Vec<u8>, Vec<u8>) {
    let mut usr = vec![0xEEu8; f.usr.len() + 4096];
    let mut kern = Vec::new();
    let r = {
        let mut sinks = Sinks {
            usr: Box::new(SeekSink(Cursor::new(&mut usr))),
            kernel: Box::new(SeekSink(Cursor::new(&mut kern))),
        };
        let cancel = never_cancel();
        apply(
            &mut Cursor::new(payload),
            &mut sinks,
            ApplyOptions {
                keys: &f.keys,
                running_version: running.map(|v| semver::Version::parse(v).expect("semver")),
                allow_downgrade: false,
                progress: &mut |_| {},
                cancel: &cancel,
            },
        )
        .map(|_| ())
    };
    (r, usr, kern)
}

#[test]
fn built_payload_verifies_and_applies_byte_for_byte() {
    let f = fixture("1.2.0", &key(1), 1_500_000);
    let head = verify_stream(&mut Cursor::new(&f.payload), &f.keys).expect("verify");
    assert_eq!(head.manifest.version, "1.2.0");
    let (r, usr, kern) = apply_to_mem(&f, &f.payload, Some("1.1.0"));
    r.expect("apply");
    assert_eq!(
        &usr[..f.usr.len()],
        &f.usr[..],
        "USR image differs after apply"
    );
    assert_eq!(kern, f.kernel, "kernel image differs after apply");
    assert!(
        f.payload.len() < f.usr.len() + f.kernel.len(),
        "payload did not compress at all"
    );
}

#[test]
fn flipped_byte_in_a_chunk_is_refused_and_header_stays_zero() {
    let f = fixture("1.2.0", &key(1), 1_500_000);
    let mut bad = f.payload.clone();
    let n = bad.len();
    bad[n - 1000] ^= 0x40;
    let (r, usr, _) = apply_to_mem(&f, &bad, None);
    let err = r.expect_err("corrupt payload applied");
    assert!(
        matches!(
            err,
            PayloadError::ChunkHash { .. } | PayloadError::ChunkDecompress { .. }
        ),
        "{err}"
    );
    assert_eq!(err.omaha_code(), 10);
    assert!(
        usr[..1 << 20].iter().all(|&b| b == 0),
        "USR header not cleared after a failed apply"
    );
}

#[test]
fn payload_signed_by_an_untrusted_key_writes_nothing() {
    let f = fixture("1.2.0", &key(1), 200_000);
    let other = fixture("1.2.0", &key(2), 200_000);
    let (r, usr, kern) = apply_to_mem(&f, &other.payload, None);
    let err = r.expect_err("foreign payload applied");
    assert!(matches!(err, PayloadError::UnknownKey { .. }), "{err}");
    assert!(
        usr.iter().all(|&b| b == 0xEE),
        "something was written before the signature check"
    );
    assert!(kern.is_empty());
}

#[test]
fn altered_manifest_fails_the_signature() {
    let f = fixture("1.2.0", &key(1), 200_000);
    let mut bad = f.payload.clone();
    let pos = bad
        .windows(5)
        .position(|w| w == b"1.2.0")
        .expect("version in manifest");
    bad[pos] = b'9';
    let err =
        verify_stream(&mut Cursor::new(&bad), &f.keys).expect_err("altered manifest verified");
    assert!(matches!(err, PayloadError::BadSignature { .. }), "{err}");
}

#[test]
fn truncated_payload_is_refused_as_truncated() {
    let f = fixture("1.2.0", &key(1), 1_500_000);
    for cut in [10, HEADER_LEN + 5, f.payload.len() / 2, f.payload.len() - 1] {
        let err = verify_stream(&mut Cursor::new(&f.payload[..cut]), &f.keys)
            .expect_err("truncated verified");
        assert!(
            matches!(err, PayloadError::Truncated { .. }),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn trailing_garbage_is_refused() {
    let f = fixture("1.2.0", &key(1), 200_000);
    let mut bad = f.payload.clone();
    bad.extend_from_slice(b"extra");
    let err = verify_stream(&mut Cursor::new(&bad), &f.keys).expect_err("oversized verified");
    assert!(matches!(err, PayloadError::TrailingData(5)), "{err}");
}

#[test]
fn downgrade_is_refused_unless_allowed() {
    let f = fixture("1.0.0", &key(1), 200_000);
    let (r, _, _) = apply_to_mem(&f, &f.payload, Some("1.1.0"));
    let err = r.expect_err("downgrade applied");
    assert!(matches!(err, PayloadError::Downgrade { .. }), "{err}");
    assert!(err.to_string().contains("--allow-downgrade"));
    let head = PayloadHead::read(&mut Cursor::new(&f.payload), &f.keys).expect("head");
    head.check_version(Some(&semver::Version::new(1, 1, 0)), true)
        .expect("allowed downgrade refused");
}

#[test]
fn resume_continues_from_the_last_checkpoint() {
    let f = fixture("1.2.0", &key(1), 3_000_000);
    let state = tempfile::tempdir().expect("tempdir");
    let store = ResumeStore::new(state.path());
    let head = PayloadHead::read(&mut Cursor::new(&f.payload), &f.keys).expect("head");
    let mut usr = vec![0u8; f.usr.len()];
    let mut kern = Vec::new();
    // First attempt: the connection drops after the USR target (a checkpoint) and part of the kernel.
    let usr_end = head.chunk_offset(head.manifest.targets[0].chunks.len() as u32) as usize;
    {
        let mut sinks = Sinks {
            usr: Box::new(SeekSink(Cursor::new(&mut usr))),
            kernel: Box::new(SeekSink(Cursor::new(&mut kern))),
        };
        let mut cut = Cursor::new(&f.payload[head.data_offset as usize..usr_end + 100]);
        let err = apply_chunks(
            &head,
            &mut cut,
            0,
            &mut sinks,
            Some(&store),
            &mut |_| {},
            &never_cancel(),
        )
        .expect_err("cut payload applied");
        assert!(err.is_transient(), "{err}");
    }
    assert!(
        usr[..1 << 20].iter().all(|&b| b == 0),
        "USR header visible before completion"
    );
    let point = store.load(&head);
    assert_eq!(
        point.next_chunk,
        head.manifest.targets[0].chunks.len() as u32,
        "checkpoint not at target end"
    );
    // Second attempt: a Range request from the resume point.
    let from = head.chunk_offset(point.next_chunk) as usize;
    let mut sinks = Sinks {
        usr: Box::new(SeekSink(Cursor::new(&mut usr))),
        kernel: Box::new(SeekSink(Cursor::new(&mut kern))),
    };
    apply_chunks(
        &head,
        &mut Cursor::new(&f.payload[from..]),
        point.next_chunk,
        &mut sinks,
        Some(&store),
        &mut |_| {},
        &never_cancel(),
    )
    .expect("resumed apply");
    drop(sinks);
    assert_eq!(usr, f.usr, "USR differs after resume");
    assert_eq!(kern, f.kernel, "kernel differs after resume");
    assert!(
        !state.path().join("resume.json").exists(),
        "resume state left after success"
    );
}

#[test]
fn mutated_inputs_never_panic_the_parser() {
    // Stable-toolchain stand-in for the cargo-fuzz target: seeded mutations of a valid payload head.
    let f = fixture("1.2.0", &key(1), 200_000);
    let head_len = PayloadHead::read(&mut Cursor::new(&f.payload), &f.keys)
        .expect("head")
        .data_offset as usize;
    let mut x: u64 = 0x9E3779B97F4A7C15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..3000 {
        let mut p = f.payload[..head_len].to_vec();
        for _ in 0..(next() % 4 + 1) {
            let i = (next() as usize) % p.len();
            p[i] = next() as u8;
        }
        if next() % 5 == 0 {
            p.truncate((next() as usize) % p.len());
        }
        let _ = PayloadHead::read(&mut Cursor::new(&p), &f.keys);
        let _ = keel_updater::payload::Manifest::parse(&p[HEADER_LEN.min(p.len())..]);
    }
}

#[allow(dead_code)]
fn exists(p: &Path) -> bool {
    p.exists()
}
