#![allow(clippy::unwrap_used)]

use super::*;

fn small() -> Limits {
    Limits {
        max_total_bytes: 16 * 1024,
        max_segment_bytes: 4 * 1024,
    }
}

fn open(dir: &Path, boot: &str) -> Journal {
    Journal::open(dir, Limits::default(), boot).unwrap()
}

fn seg_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

fn seqs(rs: &[Record]) -> Vec<u64> {
    rs.iter().map(|r| r.seq).collect()
}

fn all(j: &Journal) -> Vec<Record> {
    j.query(&Query::default()).unwrap()
}

#[test]
fn append_and_query_by_unit() {
    let d = tempfile::tempdir().unwrap();
    let mut j = open(d.path(), "boot-a");
    assert_eq!(j.last_seq(), 0);
    assert_eq!(j.append("web", Stream::Stdout, "hello\n").unwrap(), 1);
    assert_eq!(j.append("db", Stream::Stderr, "oops\r\n").unwrap(), 2);
    assert_eq!(j.append("web", Stream::Stdout, "world").unwrap(), 3);
    j.append("init", Stream::Init, "started web").unwrap();
    assert_eq!(j.last_seq(), 4);

    let web = j
        .query(&Query {
            unit: Some("web".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        web.iter().map(|r| r.message.as_str()).collect::<Vec<_>>(),
        vec!["hello", "world"]
    );
    assert!(web
        .iter()
        .all(|r| r.boot == "boot-a" && r.stream == Stream::Stdout && r.ts_us > 0));
    let db = j
        .query(&Query {
            unit: Some("db".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(db.len(), 1);
    assert_eq!(db[0].message, "oops");
    assert_eq!(db[0].stream, Stream::Stderr);
    assert!(j
        .query(&Query {
            unit: Some("nope".into()),
            ..Default::default()
        })
        .unwrap()
        .is_empty());
    // Visible before and after flush/sync.
    j.sync().unwrap();
    assert_eq!(seqs(&all(&j)), vec![1, 2, 3, 4]);
    assert!(j.recovery_notes().is_empty());
}

#[test]
fn long_message_truncated_with_marker() {
    let d = tempfile::tempdir().unwrap();
    let mut j = open(d.path(), "b");
    let long = "é".repeat(MAX_MESSAGE_BYTES); // 2 bytes each
    j.append("u", Stream::Stdout, &long).unwrap();
    let r = &all(&j)[0];
    assert!(r.message.len() <= MAX_MESSAGE_BYTES);
    assert!(r.message.ends_with(TRUNCATION_MARKER));
    assert!(r.message.starts_with("éé"));
}

#[test]
fn boot_offsets_after_reopen() {
    let d = tempfile::tempdir().unwrap();
    {
        let mut j = open(d.path(), "boot-1");
        j.append("u", Stream::Stdout, "one-a").unwrap();
        j.append("u", Stream::Stdout, "one-b").unwrap();
    }
    {
        let mut j = open(d.path(), "boot-2");
        j.append("u", Stream::Stdout, "two").unwrap();
    }
    let mut j = open(d.path(), "boot-3");
    j.append("u", Stream::Stdout, "three").unwrap();
    let q = |sel: BootSel| {
        j.query(&Query {
            boot: Some(sel),
            ..Default::default()
        })
    };
    let msgs = |rs: Vec<Record>| rs.into_iter().map(|r| r.message).collect::<Vec<_>>();
    assert_eq!(msgs(q(BootSel::Offset(-1)).unwrap()), vec!["two"]);
    assert_eq!(
        msgs(q(BootSel::Offset(-2)).unwrap()),
        vec!["one-a", "one-b"]
    );
    assert_eq!(msgs(q(BootSel::Offset(0)).unwrap()), vec!["three"]);
    assert_eq!(msgs(q(BootSel::Current).unwrap()), vec!["three"]);
    assert_eq!(msgs(q(BootSel::Offset(1)).unwrap()), vec!["one-a", "one-b"]);
    assert_eq!(msgs(q(BootSel::Id("boot-2".into())).unwrap()), vec!["two"]);
    let err = q(BootSel::Offset(-3)).unwrap_err();
    assert!(
        matches!(err, JournalError::NoSuchBoot { known: 2, .. }),
        "{err}"
    );
    assert!(q(BootSel::Offset(4)).is_err());
    let boots = j.boots().unwrap();
    assert_eq!(
        boots.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(),
        vec!["boot-1", "boot-2", "boot-3"]
    );
    assert_eq!(boots[0].first_seq, 1);
    assert_eq!(boots[1].first_seq, 3);
    assert!(boots[0].first_ts_us <= boots[0].last_ts_us);
}

#[test]
fn previous_boot_when_current_has_no_records_yet() {
    let d = tempfile::tempdir().unwrap();
    {
        let mut j = open(d.path(), "old");
        j.append("u", Stream::Stdout, "x").unwrap();
    }
    let j = open(d.path(), "new");
    let r = j
        .query(&Query {
            boot: Some(BootSel::Offset(-1)),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(r.len(), 1);
    assert!(j
        .query(&Query {
            boot: Some(BootSel::Current),
            ..Default::default()
        })
        .unwrap()
        .is_empty());
}

#[test]
fn since_last_and_after_seq() {
    let d = tempfile::tempdir().unwrap();
    let mut j = open(d.path(), "b");
    for i in 1..=10u64 {
        let unit = if i % 2 == 0 { "even" } else { "odd" };
        j.append_at(unit, Stream::Stdout, &format!("m{i}"), i * 100)
            .unwrap();
    }
    let since = j
        .query(&Query {
            since_us: Some(800),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(seqs(&since), vec![8, 9, 10]);
    let last = j
        .query(&Query {
            last: Some(3),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(seqs(&last), vec![8, 9, 10]);
    let last_even = j
        .query(&Query {
            unit: Some("even".into()),
            last: Some(2),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(seqs(&last_even), vec![8, 10]);
    assert!(j
        .query(&Query {
            last: Some(0),
            ..Default::default()
        })
        .unwrap()
        .is_empty());
    assert_eq!(
        j.query(&Query {
            last: Some(100),
            ..Default::default()
        })
        .unwrap()
        .len(),
        10
    );

    // Follow: poll with after_seq = last seen.
    let mut seen = 0;
    let got = j
        .query(&Query {
            after_seq: Some(seen),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(got.len(), 10);
    seen = got.last().unwrap().seq;
    assert!(j
        .query(&Query {
            after_seq: Some(seen),
            ..Default::default()
        })
        .unwrap()
        .is_empty());
    j.append("odd", Stream::Stderr, "new").unwrap();
    let got = j
        .query(&Query {
            after_seq: Some(seen),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(seqs(&got), vec![11]);
    let got = j
        .query(&Query {
            after_seq: Some(seen),
            unit: Some("even".into()),
            ..Default::default()
        })
        .unwrap();
    assert!(got.is_empty());
}

#[test]
fn rotation_keeps_total_bound_and_newest_records() {
    let d = tempfile::tempdir().unwrap();
    let limits = small();
    let mut j = Journal::open(d.path(), limits, "b").unwrap();
    let mut last = 0;
    for i in 0..2000 {
        last = j
            .append(
                &format!("unit{}", i % 7),
                Stream::Stdout,
                &format!("line number {i} with some padding text"),
            )
            .unwrap();
        if i % 97 == 0 {
            j.flush().unwrap();
            let on_disk: u64 = seg_files(d.path())
                .iter()
                .map(|p| fs::metadata(p).unwrap().len())
                .sum();
            assert!(on_disk <= limits.max_total_bytes, "on disk {on_disk}");
        }
    }
    j.sync().unwrap();
    let files = seg_files(d.path());
    assert!(
        files.len() >= 3,
        "expected several segments, got {}",
        files.len()
    );
    for f in &files {
        assert!(fs::metadata(f).unwrap().len() <= limits.max_segment_bytes);
    }
    let on_disk: u64 = files.iter().map(|p| fs::metadata(p).unwrap().len()).sum();
    assert!(on_disk <= limits.max_total_bytes);
    let recs = all(&j);
    assert_eq!(recs.last().unwrap().seq, last);
    assert!(
        recs.first().unwrap().seq > 1,
        "oldest records should have been rotated away"
    );
    // Contiguous from the oldest retained to the newest.
    assert!(recs.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    // last N across segments = tail of the full result.
    let tail = j
        .query(&Query {
            last: Some(100),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(tail, recs[recs.len() - 100..].to_vec());
    let tail_u = j
        .query(&Query {
            unit: Some("unit3".into()),
            last: Some(10),
            ..Default::default()
        })
        .unwrap();
    let full_u: Vec<Record> = recs.iter().filter(|r| r.unit == "unit3").cloned().collect();
    assert_eq!(tail_u, full_u[full_u.len() - 10..].to_vec());
    // Sidecar indexes of closed segments exist.
    assert!(fs::read_dir(d.path()).unwrap().any(|e| e
        .unwrap()
        .path()
        .extension()
        .is_some_and(|e| e == "idx")));
    drop(j);

    // Reopen (using sidecars), and with sidecars corrupted (rescan): same view.
    let j = Journal::open(d.path(), limits, "b2").unwrap();
    assert_eq!(all(&j), recs);
    assert!(j.recovery_notes().is_empty(), "{:?}", j.recovery_notes());
    drop(j);
    for e in fs::read_dir(d.path()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|e| e == "idx") {
            fs::write(&p, b"{garbage").unwrap();
        }
    }
    let mut j = Journal::open(d.path(), limits, "b2").unwrap();
    assert_eq!(all(&j), recs);
    assert_eq!(j.append("x", Stream::Stdout, "after").unwrap(), last + 1);
}

#[test]
fn shrinking_limits_on_reopen_deletes_oldest() {
    let d = tempfile::tempdir().unwrap();
    {
        let mut j = Journal::open(
            d.path(),
            Limits {
                max_total_bytes: 64 * 1024,
                max_segment_bytes: 4 * 1024,
            },
            "b",
        )
        .unwrap();
        for i in 0..1500 {
            j.append("u", Stream::Stdout, &format!("record {i} padding padding"))
                .unwrap();
        }
    }
    let j = Journal::open(d.path(), small(), "b").unwrap();
    assert!(j.disk_usage() <= small().max_total_bytes);
    assert_eq!(all(&j).last().unwrap().seq, 1500);
}

#[test]
fn survives_reopen_and_seq_continues() {
    let d = tempfile::tempdir().unwrap();
    {
        let mut j = open(d.path(), "b");
        for i in 0..5 {
            j.append("u", Stream::Stdout, &format!("{i}")).unwrap();
        }
        // No explicit sync: Drop flushes (an init re-exec should call sync first).
    }
    let mut j = open(d.path(), "b");
    assert_eq!(j.last_seq(), 5);
    assert_eq!(j.append("u", Stream::Stdout, "again").unwrap(), 6);
    assert_eq!(seqs(&all(&j)), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(
        seg_files(d.path()).len(),
        1,
        "reopen keeps appending to the newest segment"
    );
}

#[test]
fn torn_tail_is_truncated() {
    let d = tempfile::tempdir().unwrap();
    {
        let mut j = open(d.path(), "b");
        for i in 0..10 {
            j.append("u", Stream::Stdout, &format!("message {i}"))
                .unwrap();
        }
        j.sync().unwrap();
    }
    let seg = seg_files(d.path()).pop().unwrap();
    let len = fs::metadata(&seg).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 5)
        .unwrap();

    let mut j = open(d.path(), "b");
    assert_eq!(j.recovery_notes().len(), 2, "{:?}", j.recovery_notes()); // corrupt record + truncation
    assert!(j.recovery_notes().iter().any(|n| n.contains("truncated")));
    assert_eq!(seqs(&all(&j)), (1..=9).collect::<Vec<_>>());
    assert_eq!(j.append("u", Stream::Stdout, "new").unwrap(), 10);
    drop(j);
    let j = open(d.path(), "b");
    assert!(j.recovery_notes().is_empty(), "{:?}", j.recovery_notes());
    let recs = all(&j);
    assert_eq!(seqs(&recs), (1..=10).collect::<Vec<_>>());
    assert_eq!(recs[9].message, "new");
}

#[test]
fn torn_header_of_fresh_segment() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join(seg_name(1)), b"KEEL").unwrap();
    let mut j = open(d.path(), "b");
    assert_eq!(j.recovery_notes().len(), 1);
    assert_eq!(j.append("u", Stream::Stdout, "x").unwrap(), 1);
    drop(j);
    assert_eq!(all(&open(d.path(), "b")).len(), 1);
}

#[test]
fn foreign_file_is_ignored_not_overwritten() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join(seg_name(1)), b"this is not a journal segment").unwrap();
    let mut j = open(d.path(), "b");
    assert!(j.recovery_notes()[0].contains("not a journal segment"));
    assert_eq!(j.append("u", Stream::Stdout, "x").unwrap(), 2);
    assert_eq!(
        fs::read(d.path().join(seg_name(1))).unwrap(),
        b"this is not a journal segment"
    );
}

fn flip_byte_in_record(seg: &Path, needle: &str) {
    let mut data = fs::read(seg).unwrap();
    let pos = data
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .unwrap();
    data[pos + needle.len()] ^= 0x01;
    fs::write(seg, data).unwrap();
}

#[test]
fn corrupt_crc_in_middle_is_skipped() {
    let d = tempfile::tempdir().unwrap();
    {
        let mut j = open(d.path(), "b");
        for i in 1..=10 {
            j.append("u", Stream::Stdout, &format!("message {i}"))
                .unwrap();
        }
    }
    let seg = seg_files(d.path()).pop().unwrap();
    flip_byte_in_record(&seg, "\"m\":\"message 5");
    let len_before = fs::metadata(&seg).unwrap().len();

    let mut j = open(d.path(), "b");
    let notes = j.recovery_notes().to_vec();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("checksum"), "{notes:?}");
    assert_eq!(
        fs::metadata(&seg).unwrap().len(),
        len_before,
        "records after the corruption are kept"
    );
    assert_eq!(seqs(&all(&j)), vec![1, 2, 3, 4, 6, 7, 8, 9, 10]);
    assert_eq!(
        seqs(
            &j.query(&Query {
                last: Some(2),
                ..Default::default()
            })
            .unwrap()
        ),
        vec![9, 10]
    );
    assert_eq!(j.append("u", Stream::Stdout, "more").unwrap(), 11);
}

#[test]
fn garbage_everywhere_never_panics() {
    let d = tempfile::tempdir().unwrap();
    {
        let mut j = Journal::open(d.path(), small(), "b").unwrap();
        for i in 0..300 {
            j.append(
                "u",
                Stream::Stdout,
                &format!("message {i} xxxxxxxxxxxxxxxxxxxx"),
            )
            .unwrap();
        }
    }
    // Overwrite assorted regions of every segment with junk, including frame magics.
    for (k, seg) in seg_files(d.path()).iter().enumerate() {
        let mut data = fs::read(seg).unwrap();
        let n = data.len();
        for (i, b) in data.iter_mut().enumerate().skip(8) {
            if (i * 7 + k) % 13 == 0 {
                *b = b.wrapping_mul(31).wrapping_add(i as u8);
            }
        }
        if n > 100 {
            data[50..54].copy_from_slice(&format::FRAME_MAGIC);
            data[54..58].copy_from_slice(&u32::MAX.to_le_bytes());
        }
        fs::write(seg, data).unwrap();
        let _ = fs::remove_file(idx_path(seg));
    }
    let mut j = Journal::open(d.path(), small(), "b").unwrap();
    assert!(!j.recovery_notes().is_empty());
    let _ = all(&j);
    let _ = j.boots().unwrap();
    let s = j.append("u", Stream::Stdout, "still works").unwrap();
    assert_eq!(all(&j).last().unwrap().seq, s);
}

#[test]
fn write_failure_returns_err_and_recovers() {
    let d = tempfile::tempdir().unwrap();
    let mut j = open(d.path(), "b");
    j.append("u", Stream::Stdout, "before").unwrap();
    j.flush().unwrap();
    // Simulate a full disk: /dev/full fails every write with ENOSPC.
    let full = OpenOptions::new().write(true).open("/dev/full").unwrap();
    j.active.as_mut().unwrap().file = full;
    let mut errors = 0;
    let mut lost = 0;
    for i in 0..2000 {
        match j.append(
            "u",
            Stream::Stdout,
            &format!("during {i} {}", "z".repeat(40)),
        ) {
            Ok(_) => {}
            Err(e) => {
                errors += 1;
                lost += e.lost_records();
                assert!(e.to_string().contains("free space"), "{e}");
                // The failed segment is abandoned; the next append starts a new one.
                break;
            }
        }
    }
    assert_eq!(errors, 1);
    assert!(lost > 1);
    assert!(j.pending.is_empty(), "buffer must not grow after failures");
    let s = j.append("u", Stream::Stdout, "after").unwrap();
    j.sync().unwrap();
    let recs = all(&j);
    assert_eq!(recs.first().unwrap().message, "before");
    assert_eq!(recs.last().unwrap().seq, s);
    assert_eq!(recs.len(), 2);
}

#[test]
fn unwritable_directory_is_an_error_not_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("plainfile");
    fs::write(&file, b"x").unwrap();
    let err = Journal::open(&file.join("journal"), Limits::default(), "b")
        .err()
        .unwrap();
    assert!(err.to_string().contains("plainfile"), "{err}");

    // Directory removed under a running journal: appends fail (Err), never panic.
    let dir = d.path().join("j");
    let mut j = Journal::open(&dir, small(), "b").unwrap();
    j.append("u", Stream::Stdout, "x").unwrap();
    fs::remove_dir_all(&dir).unwrap();
    fs::write(&dir, b"now a file").unwrap();
    let mut failed = 0;
    for i in 0..500 {
        if j.append("u", Stream::Stdout, &format!("line {i} {}", "p".repeat(60)))
            .is_err()
        {
            failed += 1;
        }
    }
    assert!(failed > 0);
    assert!(j.sync().is_err() || failed > 0);
}

#[test]
fn invalid_arguments() {
    let d = tempfile::tempdir().unwrap();
    assert!(matches!(
        Journal::open(
            d.path(),
            Limits {
                max_total_bytes: 1000,
                max_segment_bytes: 1000
            },
            "b"
        ),
        Err(JournalError::InvalidLimits { .. })
    ));
    assert!(matches!(
        Journal::open(d.path(), Limits::default(), ""),
        Err(JournalError::InvalidBootId { .. })
    ));
    assert!(matches!(
        Journal::open(d.path(), Limits::default(), "a\nb"),
        Err(JournalError::InvalidBootId { .. })
    ));
}

#[test]
fn serde_shapes() {
    let q: Query =
        serde_json::from_str(r#"{"unit":"web","boot":{"offset":-1},"last":10}"#).unwrap();
    assert!(matches!(q.boot, Some(BootSel::Offset(-1))));
    let q: Query = serde_json::from_str(r#"{"boot":"current"}"#).unwrap();
    assert!(matches!(q.boot, Some(BootSel::Current)));
    let r = Record {
        seq: 1,
        ts_us: 2,
        boot: "b".into(),
        unit: "u".into(),
        stream: Stream::Stderr,
        message: "m".into(),
    };
    let s = serde_json::to_string(&r).unwrap();
    assert!(s.contains(r#""stream":"stderr""#), "{s}");
}

/// Rough cost check on a full default-size journal (64 MiB). Run with
/// `cargo test --release -- --ignored big_journal --nocapture`.
#[test]
#[ignore]
fn big_journal_timings() {
    use std::time::Instant;
    let d = tempfile::tempdir().unwrap();
    let mut j = open(d.path(), "b");
    let t = Instant::now();
    let mut n = 0u64;
    while j.disk_usage() < 63 * 1024 * 1024 {
        j.append(
            &format!("unit{}", n % 50),
            Stream::Stdout,
            &format!("{n} the quick brown fox jumps over the lazy dog, some log line here"),
        )
        .unwrap();
        n += 1;
    }
    j.sync().unwrap();
    eprintln!(
        "append {n} records: {:?} ({:?}/record)",
        t.elapsed(),
        t.elapsed() / n as u32
    );
    drop(j);
    let t = Instant::now();
    let j = open(d.path(), "b");
    eprintln!("reopen (sidecars): {:?}", t.elapsed());
    let t = Instant::now();
    let r = j
        .query(&Query {
            last: Some(100),
            ..Default::default()
        })
        .unwrap();
    eprintln!("last 100: {:?} ({})", t.elapsed(), r.len());
    let t = Instant::now();
    let r = j
        .query(&Query {
            unit: Some("unit7".into()),
            last: Some(100),
            ..Default::default()
        })
        .unwrap();
    eprintln!("unit last 100: {:?} ({})", t.elapsed(), r.len());
    let t = Instant::now();
    let r = j
        .query(&Query {
            after_seq: Some(n - 5),
            ..Default::default()
        })
        .unwrap();
    eprintln!("follow after_seq: {:?} ({})", t.elapsed(), r.len());
    let t = Instant::now();
    let r = j.query(&Query {
        boot: Some(BootSel::Offset(-1)),
        ..Default::default()
    });
    eprintln!("boot -1 (none): {:?} ({})", t.elapsed(), r.is_err());
    let t = Instant::now();
    let r = j
        .query(&Query {
            unit: Some("unit7".into()),
            ..Default::default()
        })
        .unwrap();
    eprintln!("full unit scan: {:?} ({})", t.elapsed(), r.len());
    drop(j);
    for e in fs::read_dir(d.path()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|e| e == "idx") {
            fs::remove_file(p).unwrap();
        }
    }
    let t = Instant::now();
    let _j = open(d.path(), "b");
    eprintln!("reopen (no sidecars, full scan): {:?}", t.elapsed());
}

#[test]
fn seek_marks_give_same_results_as_full_scan() {
    let d = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_total_bytes: 4 * 1024 * 1024,
        max_segment_bytes: 1024 * 1024,
    };
    let mut j = Journal::open(d.path(), limits, "b").unwrap();
    for i in 0..12_000u64 {
        j.append(
            &format!("u{}", i % 3),
            Stream::Stdout,
            &format!("record {i} {}", "y".repeat((i % 50) as usize)),
        )
        .unwrap();
        if i % 1000 == 999 {
            // Some records flushed, some still buffered at query time.
            if i % 2000 == 999 {
                j.flush().unwrap();
            }
            let full = all(&j);
            assert!(i < 5000 || j.segs.iter().any(|s| s.idx.marks.len() > 3));
            for after in [0, i / 2, i.saturating_sub(700), i - 3, i + 1] {
                let want: Vec<u64> = full
                    .iter()
                    .filter(|r| r.seq > after)
                    .map(|r| r.seq)
                    .collect();
                let got = j
                    .query(&Query {
                        after_seq: Some(after),
                        ..Default::default()
                    })
                    .unwrap();
                assert_eq!(seqs(&got), want, "after {after}");
                let want_last: Vec<u64> = want[want.len().saturating_sub(777)..].to_vec();
                let got = j
                    .query(&Query {
                        after_seq: Some(after),
                        last: Some(777),
                        ..Default::default()
                    })
                    .unwrap();
                assert_eq!(seqs(&got), want_last, "after {after} last 777");
            }
            let want: Vec<Record> = full.iter().filter(|r| r.unit == "u1").cloned().collect();
            let got = j
                .query(&Query {
                    unit: Some("u1".into()),
                    last: Some(2500),
                    ..Default::default()
                })
                .unwrap();
            assert_eq!(got, want[want.len().saturating_sub(2500)..].to_vec());
        }
    }
    drop(j);
    let j = Journal::open(d.path(), limits, "b").unwrap();
    let got = j
        .query(&Query {
            after_seq: Some(11_990),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(seqs(&got), (11_991..=12_000).collect::<Vec<_>>());
}

#[test]
fn unreadable_segment_is_ignored_with_a_note() {
    let d = tempfile::tempdir().unwrap();
    {
        let mut j = open(d.path(), "b");
        j.append("u", Stream::Stdout, "kept").unwrap();
    }
    // A directory where a segment should be: reading it fails with EISDIR.
    fs::create_dir(d.path().join(seg_name(7))).unwrap();
    let mut j = open(d.path(), "b");
    assert_eq!(j.recovery_notes().len(), 1, "{:?}", j.recovery_notes());
    assert!(j.recovery_notes()[0].contains(&seg_name(7)));
    assert_eq!(j.append("u", Stream::Stdout, "new").unwrap(), 8);
    assert_eq!(
        all(&j)
            .iter()
            .map(|r| r.message.as_str())
            .collect::<Vec<_>>(),
        vec!["kept", "new"]
    );
}
