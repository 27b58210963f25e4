//! Fuzzes the unit-file model as fleet uses it: any cluster client can submit a unit (name + text), which
//! clusterd parses and every fleet agent (and then init) loads. Input: "<unit name>\n<unit file text>".
#![no_main]

use std::path::Path;

use keel_clusterd::fleet::units::parse_unit;
use keel_model::ini::IniFile;
use keel_model::name::UnitName;
use keel_model::unit::Unit;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let (name, text) = s.split_once('\n').unwrap_or(("fuzz.service", s));
    let _ = parse_unit(name, text);
    // The same text under a template instance name, with specifiers expanded for a real hostname (what init does).
    if let (Ok(n), Ok(ini)) = (UnitName::parse("web@fuzz.service"), IniFile::parse(Path::new("web@.service"), text)) {
        let _ = Unit::from_ini(n, &[ini], "keel-1");
    }
});
