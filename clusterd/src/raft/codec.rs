//! Binary encoding of what crosses the Raft hot path: log entries as stored in `clusterd.redb` and openraft's
//! peer RPC bodies. Both use postcard (serde, varint integers, strings as length + bytes), which costs a
//! fraction of JSON's escaping scan and is about half its size for a 256-byte value.
//!
//! Owns: the stored-entry format byte ([`ENTRY_POSTCARD`]), the peer content type ([`PEER_CONTENT_TYPE`]),
//! and reading stores written before this format (plain JSON entries, which always start with `{`). Does not:
//! the vote, committed hint, purge point and snapshot records, which stay JSON (rare writes, readable with
//! any redb tool), or the client API.
//!
//! A stored entry is `0x01` followed by the postcard encoding of `openraft::Entry<TypeConfig>`; the format
//! is in docs/architecture.md (on-disk layout); the peer encoding in docs/kv-api.md ("Peer port").

use openraft::Entry;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::TypeConfig;

/// First byte of a postcard-encoded stored log entry.
pub const ENTRY_POSTCARD: u8 = 0x01;

/// Content type of a postcard-encoded peer RPC body (request and answer).
pub const PEER_CONTENT_TYPE: &str = "application/x-keel-postcard";

/// Encode a log entry for the log table.
pub fn encode_entry(e: &Entry<TypeConfig>) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(64);
    out.push(ENTRY_POSTCARD);
    postcard::to_extend(e, out).map_err(|err| format!("encoding log entry {}: {err}", e.log_id.index))
}

/// Decode a log entry from the log table: postcard after [`ENTRY_POSTCARD`], or JSON (stores written
/// before the binary format).
pub fn decode_entry(bytes: &[u8]) -> Result<Entry<TypeConfig>, String> {
    match bytes.first() {
        Some(&ENTRY_POSTCARD) => decode(&bytes[1..]),
        Some(b'{') => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        Some(b) => Err(format!("unknown entry format byte {b:#04x}")),
        None => Err("empty entry".into()),
    }
}

/// Encode a peer RPC body.
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, String> {
    postcard::to_allocvec(v).map_err(|e| e.to_string())
}

/// Decode a peer RPC body; trailing bytes are an error (a cut or concatenated body must not pass).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match postcard::take_from_bytes(bytes) {
        Ok((v, [])) => Ok(v),
        Ok((_, rest)) => Err(format!("{} trailing bytes", rest.len())),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest};
    use openraft::{CommittedLeaderId, EntryPayload, LogId, Membership, Vote};

    use super::*;
    use crate::kv::{KvOp, OpKind};
    use crate::raft::{Member, Request};

    fn entries() -> Vec<Entry<TypeConfig>> {
        let lid = |i| LogId::new(CommittedLeaderId::new(3, 7), i);
        let op = KvOp {
            kind: OpKind::Put,
            key: "/a/b".into(),
            value: "x".repeat(256),
            ttl: Some(5),
            prev_exist: Some(false),
            ..KvOp::default()
        };
        let members: std::collections::BTreeMap<u64, Member> =
            [(7u64, Member { name: "a".into(), peer_url: "http://127.0.0.1:2380".into() })].into();
        vec![
            Entry { log_id: lid(1), payload: EntryPayload::Blank },
            Entry {
                log_id: lid(2),
                payload: EntryPayload::Membership(Membership::new(vec![[7u64].into()], members)),
            },
            Entry {
                log_id: lid(3),
                payload: EntryPayload::Normal(Request::Batch(vec![
                    Request::Kv { op, now: -5 },
                    Request::Expire { now: 9 },
                    Request::Attrs { id: 7, name: "a".into(), client_urls: vec!["http://x".into()] },
                ].into())),
            },
        ]
    }

    #[test]
    fn stored_entries_round_trip_and_old_json_entries_still_read() {
        for e in entries() {
            let b = encode_entry(&e).expect("encode");
            assert_eq!(b[0], ENTRY_POSTCARD);
            assert_eq!(decode_entry(&b).expect("decode"), e);
            let json = serde_json::to_vec(&e).expect("json");
            assert_eq!(decode_entry(&json).expect("json decode"), e);
            assert!(b.len() < json.len(), "binary {} >= json {}", b.len(), json.len());
        }
    }

    #[test]
    fn damaged_entries_are_errors() {
        let e = &entries()[2];
        let b = encode_entry(e).expect("encode");
        assert!(decode_entry(&b[..b.len() / 2]).is_err(), "a cut entry must not decode");
        assert!(decode_entry(&[]).is_err());
        assert!(decode_entry(&[0x7f, 1, 2]).unwrap_err().contains("format byte"));
        let mut long = b.clone();
        long.push(0);
        assert!(decode_entry(&long).unwrap_err().contains("trailing"));
    }

    #[test]
    fn peer_messages_round_trip() {
        let vote = Vote::new_committed(3, 7);
        let req = AppendEntriesRequest::<TypeConfig> {
            vote,
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(3, 7), 0)),
            entries: entries(),
            leader_commit: None,
        };
        let back: AppendEntriesRequest<TypeConfig> = decode(&encode(&req).expect("encode")).expect("decode");
        assert_eq!(back.entries, req.entries);
        assert_eq!(back.vote, vote);
        type Answer = Result<AppendEntriesResponse<u64>, openraft::error::RaftError<u64>>;
        let answers: [Answer; 4] = [
            Ok(AppendEntriesResponse::Success),
            Ok(AppendEntriesResponse::HigherVote(vote)),
            Ok(AppendEntriesResponse::Conflict),
            Err(openraft::error::RaftError::Fatal(openraft::error::Fatal::Stopped)),
        ];
        for a in answers {
            let back: Answer = decode(&encode(&a).expect("encode")).expect("decode");
            assert_eq!(format!("{back:?}"), format!("{a:?}"));
        }
        let v = VoteRequest::new(vote, None);
        let back: VoteRequest<u64> = decode(&encode(&v).expect("encode")).expect("decode");
        assert_eq!(back, v);
    }

    #[test]
    fn mutated_entries_and_peer_bodies_are_errors_not_panics() {
        let req = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 7),
            prev_log_id: None,
            entries: entries(),
            leader_commit: None,
        };
        let mut seeds: Vec<Vec<u8>> = entries().iter().map(|e| encode_entry(e).expect("encode")).collect();
        seeds.push([&[ENTRY_POSTCARD][..], &encode(&req).expect("encode")].concat());
        let mut decoded = 0;
        for seed in &seeds {
            for i in 0..seed.len() {
                for v in [0x00, 0x01, 0x02, 0x7f, 0x80, 0xff] {
                    let mut m = seed.clone();
                    m[i] = v;
                    decoded += usize::from(decode_entry(&m).is_ok());
                    let _ = decode::<AppendEntriesRequest<TypeConfig>>(&m[1..]);
                }
            }
        }
        for seed in &seeds[..seeds.len() - 1] {
            for i in 0..seed.len() {
                assert!(decode_entry(&seed[..i]).is_err(), "a prefix of {i} bytes decoded");
            }
        }
        assert!(decoded > 0, "some single-byte changes (e.g. inside a value) still decode");
    }
}
