//! Fuzzes clusterd's parsers of outside bytes: the keys-API request parser (method, key path, query, form
//! body from any client) and the binary decoders of stored log entries and peer RPC bodies.
#![no_main]

use keel_clusterd::api::params;
use keel_clusterd::raft::codec;
use keel_clusterd::raft::TypeConfig;
use libfuzzer_sys::fuzz_target;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};

fuzz_target!(|data: &[u8]| {
    let _ = codec::decode_entry(data);
    let _ = codec::decode::<AppendEntriesRequest<TypeConfig>>(data);
    let _ = codec::decode::<VoteRequest<u64>>(data);
    let _ = codec::decode::<InstallSnapshotRequest<TypeConfig>>(data);
    // "<path>?<query>\n<form body>"
    if let Ok(s) = std::str::from_utf8(data) {
        let (target, body) = s.split_once('\n').unwrap_or((s, ""));
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        for method in ["GET", "PUT", "POST", "DELETE", "HEAD"] {
            let _ = params::parse(method, path, query, Some(body.as_bytes()));
        }
    }
});
