//! Fuzzes init's `#cloud-config` parser: user-data comes from outside the machine (fw_cfg, a config drive,
//! a metadata service) and is parsed by PID 1 at every boot, so any bytes must give a config plus problems,
//! never a panic.
#![no_main]

use keel_init::cloudconfig::{self, Vars};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let vars: Vars = [("private_ipv4".to_string(), "10.0.0.5".to_string()), ("public_ipv4".to_string(), "203.0.113.5".to_string())]
        .into_iter()
        .collect();
    // As written, and behind the header that makes it a cloud-config (most mutations lose it).
    let _ = cloudconfig::parse(text, &vars);
    let _ = cloudconfig::parse(&format!("#cloud-config\n{text}"), &vars);
});
