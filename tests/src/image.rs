//! The image under test: built once per test process by the workspace's `mkimage` into
//! target/keel-tests/image (≈ 4 s), so the tests always boot the binaries cargo just built.
//!
//! Owns: locating the workspace, running mkimage, handing out the manifest, and the per-test work
//! directories under target/keel-tests. Does not: boot anything (see `vm`).
//! `KEEL_TEST_IMAGE_DIR=<dir>` uses an image built elsewhere (a directory with keel.json) instead.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use keel_image::mkimage::Manifest;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "{} not found: build the workspace first (cargo build --release --workspace --bins)",
        path.display()
    )]
    NoMkimage { path: PathBuf },
    #[error("mkimage failed ({status}):\n{output}")]
    Mkimage { status: String, output: String },
    #[error("cannot run mkimage: {0}")]
    Spawn(std::io::Error),
    #[error("reading the manifest: {0}")]
    Manifest(String),
}

/// The workspace root (tests/..).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

pub fn release_dir() -> PathBuf {
    workspace().join("target/x86_64-unknown-linux-gnu/release")
}

/// target/keel-tests/<sub>, created.
pub fn work_dir(sub: &str) -> PathBuf {
    let d = workspace().join("target/keel-tests").join(sub);
    let _ = std::fs::create_dir_all(&d);
    d
}

fn build() -> Result<Manifest, ImageError> {
    if let Some(dir) = std::env::var_os("KEEL_TEST_IMAGE_DIR") {
        return Manifest::load(Path::new(&dir)).map_err(|e| ImageError::Manifest(e.to_string()));
    }
    let mkimage = release_dir().join("mkimage");
    if !mkimage.is_file() {
        return Err(ImageError::NoMkimage { path: mkimage });
    }
    let out = work_dir("image");
    let started = std::time::Instant::now();
    let res = Command::new(&mkimage).arg("--out").arg(&out).output().map_err(ImageError::Spawn)?;
    if !res.status.success() {
        return Err(ImageError::Mkimage {
            status: res.status.to_string(),
            output: String::from_utf8_lossy(&res.stderr).into_owned(),
        });
    }
    eprintln!("keel-tests: built the image in {:.1} s into {}", started.elapsed().as_secs_f64(), out.display());
    Manifest::load(&out).map_err(|e| ImageError::Manifest(e.to_string()))
}

/// The image under test (built on first use; later callers get the same result, error included).
pub fn image() -> Result<&'static Manifest, String> {
    static IMAGE: OnceLock<Result<Manifest, String>> = OnceLock::new();
    IMAGE.get_or_init(|| build().map_err(|e| e.to_string())).as_ref().map_err(Clone::clone)
}
