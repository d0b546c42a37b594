//! A BLAKE3 hash as records keep it: 32 bytes in memory, 64 hex digits in
//! manifests, state files and messages.
//!
//! Why not a hex `String`: a run keeps two hashes per unit (the tar's and
//! the change fingerprint) until its manifest is written; inline they are
//! 64 bytes, as strings they were two heap allocations of ~100 bytes each,
//! 20 MB for 100,000 units.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Blake3([u8; 32]);

impl Blake3 {
    pub fn of(data: &[u8]) -> Blake3 {
        Blake3::from(blake3::hash(data))
    }

    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Option<Blake3> {
        blake3::Hash::from_hex(text).ok().map(Blake3::from)
    }
}

impl From<blake3::Hash> for Blake3 {
    fn from(h: blake3::Hash) -> Blake3 {
        Blake3(*h.as_bytes())
    }
}

impl fmt::Display for Blake3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(blake3::Hash::from(self.0).to_hex().as_str())
    }
}

impl fmt::Debug for Blake3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blake3({self})")
    }
}

impl Serialize for Blake3 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Blake3 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Blake3, D::Error> {
        parse(&<std::borrow::Cow<'de, str>>::deserialize(d)?)
    }
}

fn parse<E: serde::de::Error>(text: &str) -> Result<Blake3, E> {
    Blake3::from_hex(text)
        .ok_or_else(|| E::custom(format!("{text:?} is not a BLAKE3 hash (64 hex digits)")))
}

/// For an optional hash written as `""` when absent (a unit without a
/// change fingerprint, as older manifests and dump units have).
pub mod or_empty {
    use super::*;

    pub fn serialize<S: Serializer>(h: &Option<Blake3>, s: S) -> Result<S::Ok, S::Error> {
        match h {
            Some(h) => h.serialize(s),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Blake3>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        match text.as_ref() {
            "" => Ok(None),
            text => parse(text).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_and_read_as_hex() {
        let h = Blake3::of(b"abc");
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, format!("\"{}\"", blake3::hash(b"abc").to_hex()));
        assert_eq!(serde_json::from_str::<Blake3>(&json).unwrap(), h);
        let err = serde_json::from_str::<Blake3>("\"abc\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a BLAKE3 hash"), "{err}");
        // an optional one: "" is none, anything else must be a hash
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct R {
            #[serde(with = "or_empty")]
            f: Option<Blake3>,
        }
        for r in [R { f: None }, R { f: Some(h) }] {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<R>(&json).unwrap(), r);
        }
        assert_eq!(
            serde_json::to_string(&R { f: None }).unwrap(),
            r#"{"f":""}"#
        );
        let err = serde_json::from_str::<R>(r#"{"f":"x"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a BLAKE3 hash"), "{err}");
    }
}
