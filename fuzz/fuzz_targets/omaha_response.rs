//! Fuzzes the Omaha XML parsers (server response on the client, request on the server).
#![no_main]

use keel_updater::omaha::{Request, Response, KEEL_APPID};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Response::parse(data, KEEL_APPID);
    let _ = Request::parse(data);
});
