//! Reboot strategies, as locksmith named them.
//!
//! Owns: [`Strategy`] and its parsing. Does not: act on it (see the parent module).

use serde::{Deserialize, Serialize};

/// What the reboot manager does once an update is installed (UPDATED_NEED_REBOOT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Reboot at once (inside a reboot window, if any are set).
    Reboot,
    /// Inside a reboot window: take the cluster semaphore, drain fleet units away, then reboot.
    EtcdLock,
    /// Never reboot for an update; an operator does (`initctl reboot`).
    #[default]
    Off,
}

impl Strategy {
    /// Parses `reboot`, `etcd-lock` (also `etcd_lock`) or `off`.
    pub fn parse(s: &str) -> Result<Strategy, String> {
        match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "reboot" => Ok(Strategy::Reboot),
            "etcd-lock" => Ok(Strategy::EtcdLock),
            "off" => Ok(Strategy::Off),
            "best-effort" => Err(
                "reboot strategy \"best-effort\" is not supported: it reboots without the lock whenever the KV store \
                 cannot be reached, which is exactly when the cluster is weakest; use etcd-lock (or reboot on a single machine)"
                    .into(),
            ),
            other => Err(format!(
                "unknown reboot strategy {other:?}; use reboot, etcd-lock or off"
            )),
        }
    }

    /// The name as written in cloud-config.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Reboot => "reboot",
            Strategy::EtcdLock => "etcd-lock",
            Strategy::Off => "off",
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_mistakes_are_explained() {
        for s in [Strategy::Reboot, Strategy::EtcdLock, Strategy::Off] {
            assert_eq!(Strategy::parse(s.name()), Ok(s));
        }
        assert_eq!(Strategy::parse("ETCD_LOCK"), Ok(Strategy::EtcdLock));
        assert!(Strategy::parse("best-effort")
            .unwrap_err()
            .contains("etcd-lock"));
        assert!(Strategy::parse("sometimes")
            .unwrap_err()
            .contains("reboot, etcd-lock or off"));
    }
}
