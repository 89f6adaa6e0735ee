//! [`QueueId`]: the ULID that names a queued message (`queued as <ULID>`).

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The id of a queued message: a ULID, shown and serialized as its 26-character string.
/// Ids made by [`QueueId::new`] increase monotonically within a process, so sorting by id sorts
/// by creation time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub ulid::Ulid);

/// A string that is not a ULID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid queue id {input:?}: {reason}")]
pub struct ParseQueueIdError {
    /// The rejected input (truncated to 64 characters).
    pub input: String,
    /// Why it was rejected.
    pub reason: String,
}

impl QueueId {
    /// A new id from a process-wide monotonic generator (strictly increasing, even within one
    /// millisecond).
    pub fn new() -> Self {
        static GENERATOR: Mutex<ulid::Generator> = Mutex::new(ulid::Generator::new());
        let mut generator = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
        // The generator only fails after 2^80 ids in one millisecond; a random ULID is then still unique.
        QueueId(generator.generate().unwrap_or_else(|_| ulid::Ulid::new()))
    }

    /// Milliseconds since the Unix epoch encoded in the id.
    pub fn timestamp_ms(&self) -> u64 {
        self.0.timestamp_ms()
    }
}

impl Default for QueueId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; ulid::ULID_LEN];
        f.write_str(self.0.array_to_str(&mut buf))
    }
}

impl FromStr for QueueId {
    type Err = ParseQueueIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ulid::Ulid::from_string(s)
            .map(QueueId)
            .map_err(|e| ParseQueueIdError {
                input: s.chars().take(64).collect(),
                reason: e.to_string(),
            })
    }
}

impl Serialize for QueueId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; ulid::ULID_LEN];
        serializer.serialize_str(self.0.array_to_str(&mut buf))
    }
}

impl<'de> Deserialize<'de> for QueueId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn display_parse_roundtrip() {
        let id = QueueId::new();
        let s = id.to_string();
        assert_eq!(s.len(), 26);
        assert_eq!(s.parse::<QueueId>().unwrap(), id);
        assert!("not-a-ulid".parse::<QueueId>().is_err());
    }

    #[test]
    fn monotonic() {
        let mut prev = QueueId::new();
        for _ in 0..10_000 {
            let next = QueueId::new();
            assert!(next > prev);
            prev = next;
        }
    }

    #[test]
    fn serde_as_string() {
        let id = QueueId::new();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<QueueId>(&json).unwrap(), id);
    }
}
