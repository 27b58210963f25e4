//! `initctl image …`: the image store from the command line.
//!
//! Owns: argument shapes, tables and JSON for people and scripts. Works on the store directly (not through
//! init): pulls take seconds to minutes and must not block init's single-threaded loop, and nothing here needs
//! init's state; the store's flock serialises concurrent changes and init's leases keep images in use.

use std::path::PathBuf;

use super::{import, pull, Store};

#[derive(clap::Subcommand, Debug)]
pub enum ImageCmd {
    /// Import an OCI layout directory, oci-archive or docker-save tarball (gzip/zstd too).
    #[command(after_help = "EXAMPLES\n  initctl image import ./web-oci/\n  skopeo copy docker://… oci-archive:web.tar && initctl image import web.tar --name web:1\n  docker save web:1 | zstd > web.tar.zst && initctl image import web.tar.zst")]
    Import {
        path: PathBuf,
        /// Name the image (default: the name recorded in the archive, else the file name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Pull from a registry (distribution v2): REGISTRY/NAME[:TAG] or REGISTRY/NAME@sha256:DIGEST.
    #[command(after_help = "EXAMPLE\n  initctl image pull localhost:5000/keel/web:1.4")]
    Pull { reference: String },
    /// Make busybox:latest from this machine's static busybox (a minimal base image).
    Busybox {
        /// The busybox binary (must be static).
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
        #[arg(long, default_value = "busybox:latest")]
        name: String,
    },
    /// List images: name, id, layers, size.
    List,
    /// Show an image's record and config.
    Inspect { reference: String },
    /// Remove images (refused while a container uses one); blobs go at the next prune.
    Rm {
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Remove untagged images and every blob and layer no image references.
    Prune,
}

/// The store root: `KEEL_IMAGES_ROOT`, else /var/lib/keel/images.
pub fn store_root() -> PathBuf {
    std::env::var_os("KEEL_IMAGES_ROOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(super::DEFAULT_ROOT))
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Run one image command; returns the exit code.
pub fn run(cmd: &ImageCmd, json: bool) -> anyhow::Result<i32> {
    let store = Store::open(&store_root())?;
    match cmd {
        ImageCmd::Import { path, name } => {
            let recs = import::import(&store, path, name.as_deref())?;
            for r in recs {
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!("imported {} {} ({} layers, {})", r.names.join(","), r.id(), r.layers.len(), mib(r.size));
                }
            }
        }
        ImageCmd::Pull { reference } => {
            let r = pull::pull(&store, reference)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("pulled {} {} ({} layers, {})", r.names.join(","), r.id(), r.layers.len(), mib(r.size));
            }
        }
        ImageCmd::Busybox { busybox, name } => {
            let dir = store.root().join("tmp").join(format!("busybox-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            import::write_busybox_layout(&dir, busybox, "latest")?;
            let res = import::import(&store, &dir, Some(name));
            let _ = std::fs::remove_dir_all(&dir);
            let r = res?.into_iter().next().ok_or_else(|| anyhow::anyhow!("nothing imported"))?;
            println!("imported {} {}", r.names.join(","), r.id());
        }
        ImageCmd::List => {
            let list = store.list()?;
            if json {
                println!("{}", serde_json::to_string(&list)?);
            } else {
                println!("{:<48} {:<12} {:>6} {:>10}", "NAME", "ID", "LAYERS", "SIZE");
                for r in list {
                    let names = if r.names.is_empty() { vec!["<none>".to_string()] } else { r.names.clone() };
                    for n in names {
                        println!("{:<48} {:<12} {:>6} {:>10}", n, r.id(), r.layers.len(), mib(r.size));
                    }
                }
            }
        }
        ImageCmd::Inspect { reference } => {
            let r = store.resolve(reference)?;
            let cfg = store.config(&r)?;
            let v = serde_json::json!({ "image": r, "config": cfg });
            if json {
                println!("{v}");
            } else {
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
        }
        ImageCmd::Rm { references } => {
            let mut code = 0;
            for reference in references {
                match store.remove(reference) {
                    Ok(r) => println!("removed {reference} ({})", r.id()),
                    Err(e) => {
                        eprintln!("initctl: {e}");
                        code = 1;
                    }
                }
            }
            return Ok(code);
        }
        ImageCmd::Prune => {
            let p = store.prune()?;
            if json {
                println!("{}", serde_json::to_string(&p)?);
            } else {
                println!("removed {} blobs and {} layers, {} freed", p.blobs, p.layers, mib(p.bytes));
            }
        }
    }
    Ok(0)
}
