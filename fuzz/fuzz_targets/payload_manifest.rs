//! Fuzzes the payload header + signature + manifest parser: it must never panic or allocate unboundedly.
#![no_main]

use keel_updater::payload::{KeyPair, Manifest, PayloadHead, TrustedKeys};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = KeyPair::from_seed([7; 32]);
    let keys = TrustedKeys::from_keys([key.public()], "fuzz");
    let _ = PayloadHead::read(&mut &data[..], &keys);
    let _ = Manifest::parse(data);
    // Also exercise the manifest validator behind a valid signature.
    if data.len() < 1 << 20 {
        let mut p = Vec::new();
        if keel_updater::payload::build::write_head(&mut p, data, &key).is_ok() {
            let _ = PayloadHead::read(&mut &p[..], &keys);
        }
    }
});
