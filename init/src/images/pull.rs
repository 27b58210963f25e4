//! Pulling an image from a registry (distribution v2 API): manifest by tag or digest, an OCI index or Docker
//! manifest list narrowed to this platform, then the config and layer blobs, each digest-checked as it streams
//! into the store. Progress goes to stderr when it is a terminal.
//!
//! Owns: reference parsing and the HTTP exchange. Plain HTTP for `localhost`/`127.*`/`[::1]` registries and
//! for any registry named with an `http://` prefix; others are tried over HTTPS (this build has no TLS: it says
//! so). Anonymous bearer tokens (`WWW-Authenticate: Bearer realm=…`) are fetched when a registry asks.
//! Does not: unpack or record images (see `Store::register`).

use std::io::{IsTerminal, Read, Write};
use std::time::{Duration, Instant};

use super::{ImageError, ImageRecord, Store};

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// `registry/repo[:tag][@digest]`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub scheme: &'static str,
    pub registry: String,
    pub repository: String,
    /// A tag or a `sha256:` digest.
    pub reference: String,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference, ImageError> {
        let bad = || ImageError::BadReference(s.to_string());
        let (forced_http, rest) = match s.strip_prefix("http://") {
            Some(r) => (true, r),
            None => (false, s.strip_prefix("https://").unwrap_or(s)),
        };
        let (first, path) = rest.split_once('/').ok_or_else(bad)?;
        let is_registry = first.contains('.') || first.contains(':') || first == "localhost";
        let (registry, path) = if is_registry { (first.to_string(), path.to_string()) } else { ("registry-1.docker.io".to_string(), rest.to_string()) };
        let (repo, reference) = if let Some((r, d)) = path.split_once('@') {
            (r.to_string(), d.to_string())
        } else {
            match path.rsplit_once(':') {
                Some((r, t)) if !t.contains('/') => (r.to_string(), t.to_string()),
                _ => (path.clone(), "latest".to_string()),
            }
        };
        if repo.is_empty() || reference.is_empty() {
            return Err(bad());
        }
        let host = registry.split(':').next().unwrap_or("");
        let local = host == "localhost" || host.starts_with("127.") || registry.starts_with("[::1]");
        Ok(Reference { scheme: if forced_http || local { "http" } else { "https" }, registry, repository: repo, reference })
    }

    /// The name the image gets in the store.
    pub fn name(&self) -> String {
        if self.reference.starts_with("sha256:") {
            format!("{}/{}@{}", self.registry, self.repository, self.reference)
        } else {
            format!("{}/{}:{}", self.registry, self.repository, self.reference)
        }
    }

    fn url(&self, kind: &str, what: &str) -> String {
        format!("{}://{}/v2/{}/{kind}/{what}", self.scheme, self.registry, self.repository)
    }
}

struct Session {
    agent: ureq::Agent,
    reference: Reference,
    token: Option<String>,
    progress: bool,
}

impl Session {
    fn err(&self, why: impl Into<String>) -> ImageError {
        ImageError::Registry { registry: self.reference.registry.clone(), why: why.into() }
    }

    fn get(&mut self, url: &str, accept: Option<&str>) -> Result<ureq::Response, ImageError> {
        for attempt in 0..2 {
            let mut req = self.agent.get(url);
            if let Some(a) = accept {
                req = req.set("Accept", a);
            }
            if let Some(t) = &self.token {
                req = req.set("Authorization", &format!("Bearer {t}"));
            }
            match req.call() {
                Ok(r) => return Ok(r),
                Err(ureq::Error::Status(401, r)) if attempt == 0 => {
                    let challenge = r.header("www-authenticate").unwrap_or("").to_string();
                    self.token = Some(self.fetch_token(&challenge)?);
                }
                Err(ureq::Error::Status(code, r)) => {
                    let body = r.into_string().unwrap_or_default();
                    return Err(self.err(format!("GET {url}: HTTP {code} {}", body.chars().take(200).collect::<String>())));
                }
                Err(e) => return Err(self.err(format!("GET {url}: {e}"))),
            }
        }
        Err(self.err(format!("GET {url}: still unauthorized after fetching a token (private images are not supported)")))
    }

    fn fetch_token(&self, challenge: &str) -> Result<String, ImageError> {
        let params = challenge.strip_prefix("Bearer ").ok_or_else(|| self.err(format!("unsupported authentication {challenge:?}")))?;
        let mut realm = String::new();
        let mut query = Vec::new();
        for part in params.split(',') {
            let Some((k, v)) = part.trim().split_once('=') else { continue };
            let v = v.trim_matches('"');
            if k == "realm" {
                realm = v.to_string();
            } else {
                query.push(format!("{k}={v}"));
            }
        }
        let url = format!("{realm}?{}", query.join("&"));
        let v: serde_json::Value = self
            .agent
            .get(&url)
            .call()
            .map_err(|e| self.err(format!("token from {realm}: {e}")))?
            .into_json()
            .map_err(|e| self.err(format!("token from {realm}: {e}")))?;
        v.get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .map(str::to_string)
            .ok_or_else(|| self.err(format!("token reply from {realm} has no token")))
    }

    /// Fetch a manifest (or index) into the store, checking its digest when asked for by digest.
    fn manifest(&mut self, store: &Store, reference: &str) -> Result<String, ImageError> {
        let url = self.reference.url("manifests", reference);
        let resp = self.get(&url, Some(ACCEPT))?;
        let header_digest = resp.header("docker-content-digest").map(str::to_string);
        let mut body = Vec::new();
        resp.into_reader().take(8 << 20).read_to_end(&mut body).map_err(|e| self.err(format!("GET {url}: {e}")))?;
        let expected = if reference.starts_with("sha256:") { Some(reference.to_string()) } else { header_digest };
        let (digest, _) = store.put_blob(&mut &body[..], expected.as_deref(), &format!("manifest {url}"))?;
        Ok(digest)
    }

    fn blob(&mut self, store: &Store, digest: &str, size: u64, label: &str) -> Result<(), ImageError> {
        if store.has_blob(digest) {
            if self.progress {
                eprintln!("{label} {} already present", short(digest));
            }
            return Ok(());
        }
        let url = self.reference.url("blobs", digest);
        let resp = self.get(&url, None)?;
        let mut reader = Progress { inner: resp.into_reader(), done: 0, size, label: format!("{label} {}", short(digest)), last: None, on: self.progress };
        store.put_blob(&mut reader, Some(digest), &format!("{label} {url}"))?;
        reader.finish();
        Ok(())
    }
}

fn short(d: &str) -> &str {
    let hex = d.strip_prefix("sha256:").unwrap_or(d);
    &hex[..hex.len().min(12)]
}

struct Progress<R> {
    inner: R,
    done: u64,
    size: u64,
    label: String,
    last: Option<Instant>,
    on: bool,
}

impl<R: Read> Progress<R> {
    fn show(&mut self, force: bool) {
        if !self.on || (!force && self.last.is_some_and(|t| t.elapsed() < Duration::from_millis(100))) {
            return;
        }
        self.last = Some(Instant::now());
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        eprint!("\r{}: {:.1}/{:.1} MiB", self.label, mib(self.done), mib(self.size));
        let _ = std::io::stderr().flush();
    }

    fn finish(&mut self) {
        self.show(true);
        if self.on {
            eprintln!(" done");
        }
    }
}

impl<R: Read> Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        self.show(false);
        Ok(n)
    }
}

/// Pull `reference` into `store`.
pub fn pull(store: &Store, reference: &str) -> Result<ImageRecord, ImageError> {
    let r = Reference::parse(reference)?;
    if r.scheme == "https" {
        return Err(ImageError::Registry {
            registry: r.registry.clone(),
            why: "this build speaks plain HTTP only (loopback registries, or name the registry with an http:// prefix)".into(),
        });
    }
    let agent = ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(10)).timeout_read(Duration::from_secs(60)).build();
    let mut s = Session { agent, reference: r.clone(), token: None, progress: std::io::stderr().is_terminal() };
    let top = s.manifest(store, &r.reference)?;
    // An index names the platform manifest by digest: fetch it the same way, then follow it.
    let mut digest = top.clone();
    for _ in 0..4 {
        let bytes = store.read_blob(&digest)?;
        let doc: serde_json::Value = serde_json::from_slice(&bytes).map_err(|err| ImageError::Json { what: format!("manifest {digest}"), err })?;
        let mt = doc.get("mediaType").and_then(|v| v.as_str()).unwrap_or("");
        if !super::oci::is_index(mt, &doc) {
            break;
        }
        let idx: super::oci::Index = serde_json::from_slice(&bytes).map_err(|err| ImageError::Json { what: format!("index {digest}"), err })?;
        let d = super::oci::pick_platform(&idx).ok_or_else(|| ImageError::NoPlatform {
            image: reference.into(),
            platform: format!("linux/{}", super::oci::host_arch()),
        })?;
        let next = d.digest.clone();
        digest = s.manifest(store, &next)?;
    }
    let m = store.manifest(&digest)?;
    s.blob(store, &m.config.digest, m.config.size, "config")?;
    for (i, l) in m.layers.iter().enumerate() {
        s.blob(store, &l.digest, l.size, &format!("layer {}/{}", i + 1, m.layers.len()))?;
    }
    store.register(&[r.name()], &digest, &r.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_with_tags_digests_and_ports() {
        let r = Reference::parse("localhost:5000/keel/busybox:1.36").expect("parse");
        assert_eq!((r.scheme, r.registry.as_str(), r.repository.as_str(), r.reference.as_str()), ("http", "localhost:5000", "keel/busybox", "1.36"));
        let d = Reference::parse("127.0.0.1:5000/bb@sha256:abc").expect("parse");
        assert_eq!(d.reference, "sha256:abc");
        assert_eq!(Reference::parse("localhost:5000/bb").expect("parse").reference, "latest");
        assert_eq!(Reference::parse("quay.io/x/y:2").expect("parse").scheme, "https");
        assert!(Reference::parse("justaname").is_err());
    }
}
