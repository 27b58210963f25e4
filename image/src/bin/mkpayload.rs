//! `mkpayload`: generate signing keys, build and sign update payloads, verify them.
//!
//! Owns: the command line only. The format, signing and verification live in `keel_updater::payload`
//! so that the builder and the machine that applies a payload share one implementation.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use keel_updater::payload::build::{build_payload, BuildSpec};
use keel_updater::payload::keys::{load_public, DEFAULT_KEYS_DIR};
use keel_updater::payload::{verify_stream, KeyPair, TrustedKeys, DEFAULT_CHUNK_SIZE};

#[derive(Parser)]
#[command(
    name = "mkpayload",
    version,
    about = "Build, sign and verify Keel update payloads",
    long_about = "Build, sign and verify Keel update payloads (format: docs/payload-format.md).\n\n\
A payload carries a USR filesystem image and the slot's kernel image (UKI), cut into independently\n\
zstd-compressed chunks, described by a manifest signed with ed25519.\n\n\
Examples:\n  \
mkpayload keygen --out keys/                       # writes keys/<id>.key and keys/<id>.pub\n  \
mkpayload build --key keys/<id>.key --version 1.2.0 --channel stable \\\n      \
--usr out/usr.img --kernel out/keel.efi -o out/keel-1.2.0.payload\n  \
mkpayload verify --keys keys/ out/keel-1.2.0.payload\n\n\
Key rotation: put the new .pub next to the old one in /usr/share/keel/update-keys of one release,\n\
then sign the following releases with the new key."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate an ed25519 signing key: <DIR>/<id>.key (secret, 0600) and <DIR>/<id>.pub
    #[command(
        long_about = "Generate an ed25519 signing key.\n\nWrites <DIR>/<id>.key (secret, mode 0600) and <DIR>/<id>.pub; \
the id is the first 8 bytes of sha256(public key) in hex. Copy the .pub into the image's\n\
/usr/share/keel/update-keys/ so machines trust it.\n\nExample:\n  mkpayload keygen --out keys/"
    )]
    Keygen {
        /// Directory to write the key pair into (created if missing)
        #[arg(long)]
        out: PathBuf,
    },
    /// Build and sign a payload from a USR image and a UKI
    #[command(
        override_usage = "mkpayload build [OPTIONS] --key <KEY> --version <VERSION> --channel <CHANNEL>\n                      \
                          --usr <USR> --kernel <KERNEL> --output <OUTPUT>",
        long_about = "Build and sign a payload from a USR image and a kernel image (UKI).\n\nExample:\n  \
mkpayload build --key keys/ab12.key --version 1.2.0 --channel stable \\\n      --usr usr.img --kernel keel.efi -o keel-1.2.0.payload\n\n\
--min-version sets a floor: machines running older versions refuse the payload (install the floor first)."
    )]
    Build {
        /// Secret key file written by `mkpayload keygen`
        #[arg(long)]
        key: PathBuf,
        /// Semantic version of the OS in this payload (e.g. 1.2.0)
        #[arg(long)]
        version: String,
        /// Channel the payload is for (e.g. stable, beta)
        #[arg(long)]
        channel: String,
        /// USR filesystem image (erofs/squashfs)
        #[arg(long)]
        usr: PathBuf,
        /// Kernel image (UKI .efi) for the slot
        #[arg(long)]
        kernel: PathBuf,
        /// Output payload file
        #[arg(short = 'o', long)]
        output: PathBuf,
        /// Oldest running version allowed to install this payload
        #[arg(long)]
        min_version: Option<String>,
        /// Uncompressed chunk size in bytes (power of two, 64 KiB..16 MiB)
        #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE)]
        chunk_size: u32,
        /// zstd compression level (1-19)
        #[arg(long, default_value_t = 3)]
        level: i32,
    },
    /// Verify a payload's signature and every chunk hash; print its manifest summary
    #[command(
        long_about = "Verify a payload: signature against the trusted keys, then every chunk's sha256.\n\n\
Examples:\n  mkpayload verify --keys /usr/share/keel/update-keys keel-1.2.0.payload\n  \
mkpayload verify --pub keys/ab12.pub --json keel-1.2.0.payload"
    )]
    Verify {
        /// Payload file
        payload: PathBuf,
        /// Directory of trusted *.pub keys
        #[arg(long, default_value = DEFAULT_KEYS_DIR)]
        keys: PathBuf,
        /// A single trusted public key file (instead of --keys)
        #[arg(long = "pub")]
        public: Option<PathBuf>,
        /// Print the manifest as JSON
        #[arg(long)]
        json: bool,
    },
}

/// Run; on failure one line on stderr (`mkpayload: what failed: why`) and exit status 1.
fn main() -> std::process::ExitCode {
    keel_model::report::exit("mkpayload", run())
}

fn run() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Keygen { out } => {
            let kp = KeyPair::generate();
            let (k, p) = kp.write_to_dir(&out)?;
            println!(
                "key id {}\nsecret {}\npublic {}",
                kp.id,
                k.display(),
                p.display()
            );
        }
        Cmd::Build {
            key,
            version,
            channel,
            usr,
            kernel,
            output,
            min_version,
            chunk_size,
            level,
        } => {
            let kp = KeyPair::load(&key)?;
            let spec = BuildSpec {
                version,
                channel,
                min_version,
                chunk_size,
                level,
            };
            let m = build_payload(&spec, &usr, &kernel, &kp, &output)
                .with_context(|| format!("building {}", output.display()))?;
            let size = std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0);
            println!(
                "{}: version {} channel {} key {} ({} chunks, {} bytes uncompressed, {} bytes payload)",
                output.display(),
                m.version,
                m.channel,
                kp.id,
                m.total_chunks(),
                m.total_size(),
                size
            );
        }
        Cmd::Verify {
            payload,
            keys,
            public,
            json,
        } => {
            let trusted = match public {
                Some(p) => TrustedKeys::from_keys([load_public(&p)?], &p.display().to_string()),
                None => TrustedKeys::load_dir(&keys)?,
            };
            let f =
                File::open(&payload).with_context(|| format!("opening {}", payload.display()))?;
            let head = verify_stream(&mut BufReader::with_capacity(1 << 20, f), &trusted)
                .with_context(|| format!("verifying {}", payload.display()))?;
            if json {
                let mut v = serde_json::to_value(&head.manifest)?;
                if let Some(o) = v.as_object_mut() {
                    o.insert("key_id".into(), head.key_id.clone().into());
                    o.insert(
                        "manifest_sha256".into(),
                        head.manifest_sha256.clone().into(),
                    );
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "OK {}: version {} channel {} signed by {} ({} chunks, {} bytes uncompressed)",
                    payload.display(),
                    head.manifest.version,
                    head.manifest.channel,
                    head.key_id,
                    head.manifest.total_chunks(),
                    head.manifest.total_size()
                );
            }
        }
    }
    Ok(())
}
