//! Signing keys and the trusted-keys directory.
//!
//! Owns: key file formats (`<id>.key`: hex ed25519 seed, mode 0600; `<id>.pub`: hex public key) and key ids
//! (first 8 bytes of sha256(public key), hex). Several `.pub` files in one directory are all trusted, which is
//! how keys rotate: ship the new public key in USR one release before signing with it.
//! Does not: read payloads (see the parent module).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use super::{PayloadError, Result};

/// Default location of trusted public keys on a Keel machine.
pub const DEFAULT_KEYS_DIR: &str = "/usr/share/keel/update-keys";

/// Key id of a public key: hex of the first 8 bytes of its sha256.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// A signing key with its id.
pub struct KeyPair {
    pub signing: SigningKey,
    pub id: String,
}

impl KeyPair {
    pub fn generate() -> KeyPair {
        let signing = SigningKey::generate(&mut rand_core::OsRng);
        let id = key_id(&signing.verifying_key());
        KeyPair { signing, id }
    }

    /// Deterministic key from a seed (tests and reproducible fixtures only).
    pub fn from_seed(seed: [u8; 32]) -> KeyPair {
        let signing = SigningKey::from_bytes(&seed);
        let id = key_id(&signing.verifying_key());
        KeyPair { signing, id }
    }

    pub fn public(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// Raw 8-byte key id as stored in the signature block.
    pub fn id_bytes(&self) -> [u8; 8] {
        let mut out = [0u8; 8];
        out.copy_from_slice(&Sha256::digest(self.public().as_bytes())[..8]);
        out
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.signing.sign(msg).to_bytes()
    }

    /// Writes `<dir>/<id>.key` (0600) and `<dir>/<id>.pub`; returns both paths.
    pub fn write_to_dir(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir)
            .map_err(|e| PayloadError::io(format!("creating {}", dir.display()), e))?;
        let key_path = dir.join(format!("{}.key", self.id));
        let pub_path = dir.join(format!("{}.pub", self.id));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .map_err(|e| {
                PayloadError::io(
                    format!(
                        "creating {} (refusing to overwrite a key)",
                        key_path.display()
                    ),
                    e,
                )
            })?;
        writeln!(f, "{}", hex::encode(self.signing.to_bytes()))
            .map_err(|e| PayloadError::io(format!("writing {}", key_path.display()), e))?;
        std::fs::write(
            &pub_path,
            format!("{}\n", hex::encode(self.public().as_bytes())),
        )
        .map_err(|e| PayloadError::io(format!("writing {}", pub_path.display()), e))?;
        Ok((key_path, pub_path))
    }

    /// Loads a `.key` file written by [`KeyPair::write_to_dir`].
    pub fn load(path: &Path) -> Result<KeyPair> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PayloadError::io(format!("reading {}", path.display()), e))?;
        let bytes = decode_hex32(text.trim()).map_err(|reason| PayloadError::Key {
            path: path.display().to_string(),
            reason: format!("{reason}; expected 64 hex digits as written by `mkpayload keygen`"),
        })?;
        Ok(KeyPair::from_seed(bytes))
    }
}

fn decode_hex32(s: &str) -> std::result::Result<[u8; 32], String> {
    let v = hex::decode(s).map_err(|e| format!("not hex ({e})"))?;
    v.try_into()
        .map_err(|v: Vec<u8>| format!("{} bytes, expected 32", v.len()))
}

/// The set of public keys a machine accepts payloads from.
#[derive(Clone, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<String, VerifyingKey>,
    source: String,
}

impl TrustedKeys {
    /// Loads every `*.pub` file in `dir`. An empty or missing directory is an error: a machine that
    /// trusts nothing could never update, which is never what anyone wants.
    pub fn load_dir(dir: &Path) -> Result<TrustedKeys> {
        let mut keys = BTreeMap::new();
        let entries = std::fs::read_dir(dir).map_err(|e| {
            PayloadError::io(
                format!("reading trusted keys directory {}", dir.display()),
                e,
            )
        })?;
        for entry in entries {
            let entry =
                entry.map_err(|e| PayloadError::io(format!("reading {}", dir.display()), e))?;
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("pub") {
                continue;
            }
            let key = load_public(&path)?;
            keys.insert(key_id(&key), key);
        }
        if keys.is_empty() {
            return Err(PayloadError::Key {
                path: dir.display().to_string(),
                reason: "no *.pub files; copy the public key written by `mkpayload keygen` there"
                    .into(),
            });
        }
        Ok(TrustedKeys {
            keys,
            source: dir.display().to_string(),
        })
    }

    /// A key set built in memory (tests, `mkpayload verify --pub`).
    pub fn from_keys(keys: impl IntoIterator<Item = VerifyingKey>, source: &str) -> TrustedKeys {
        TrustedKeys {
            keys: keys.into_iter().map(|k| (key_id(&k), k)).collect(),
            source: source.to_string(),
        }
    }

    pub fn get(&self, id: &str) -> Option<&VerifyingKey> {
        self.keys.get(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    pub fn source(&self) -> &str {
        &self.source
    }
}

/// Loads one `.pub` file.
pub fn load_public(path: &Path) -> Result<VerifyingKey> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| PayloadError::io(format!("reading {}", path.display()), e))?;
    let bytes = decode_hex32(text.trim()).map_err(|reason| PayloadError::Key {
        path: path.display().to_string(),
        reason: format!("{reason}; expected 64 hex digits"),
    })?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| PayloadError::Key {
        path: path.display().to_string(),
        reason: format!("not a valid ed25519 public key ({e})"),
    })
}
