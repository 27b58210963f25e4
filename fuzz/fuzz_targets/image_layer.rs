//! Fuzzes container-image layer unpacking (`keel_init::images::unpack`): a layer tarball comes from any registry
//! or archive the operator pulls, and init unpacks it as root. Whatever the bytes (plain, gzip or zstd tar with
//! symlinks, hard links, whiteouts, opaque markers), unpacking may fail but must create nothing outside the layer
//! directory: the harness puts a `fence` directory beside it (the seeds point symlinks at `../fence`) and checks
//! that it stays empty and that nothing else appears beside the layer.
#![no_main]

use keel_init::images::unpack::unpack_layer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() > 1 << 20 {
        return;
    }
    let Ok(base) = tempfile::tempdir() else { return };
    let blob = base.path().join("blob");
    let fence = base.path().join("fence");
    if std::fs::create_dir(&fence).is_err() || std::fs::write(&blob, data).is_err() {
        return;
    }
    let _ = unpack_layer(&blob, &base.path().join("layer"));
    let inside: Vec<_> = std::fs::read_dir(&fence).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(inside.is_empty(), "the layer wrote beside itself, into ../fence: {inside:?}");
    let mut beside: Vec<_> = std::fs::read_dir(base.path()).map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    beside.sort();
    assert!(beside.iter().all(|n| ["blob", "fence", "layer"].contains(&n.as_str())), "the layer made {beside:?} beside itself");
});
