//! Data keys: the age keys that units and manifests are encrypted to.
//!
//! Each user has one, for their units; the core has one, for its shared and
//! volume units and its manifests. A key's identity is made on the core,
//! written to every target of the zone wrapped to the zone's recipients as a
//! key object (`<core>/keys/<random>.age`, an identity file inside an age
//! file), and forgotten: the core keeps only the recipient and the key
//! object's name, in `<state_dir>/keys.json`, so it stays write-only.
//!
//! Why: deleting a user's key objects makes every copy of their units
//! unreadable at once (crypto-shredding), also where an object cannot be
//! deleted (Object Lock, a replica) — that is how `zonevault erase` works;
//! and a rotation of the zone's keys re-wraps the key objects only, not every
//! data object. The zone's recipients wrap keys (and the erasure ledger) and
//! nothing else.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::audit::ObjectKind;
use crate::budget::Budget;
use crate::pipeline::{self, Digest, OpenError};
use crate::repository::layout;
use crate::residency::{Contents, Writable};
use crate::storage::WriteBackend;

/// An age identity, as the decrypting side holds it.
pub type Identity = Box<dyn age::Identity + Send + Sync>;

const FILE_NAME: &str = "keys.json";

/// A data key as the core knows it: its key object and its recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Saved", into = "Saved")]
pub struct KeyRef {
    /// The key object, relative to the target prefix.
    pub object: Arc<str>,
    pub recipient: age::x25519::Recipient,
}

/// How a [`KeyRef`] is written in `keys.json`.
#[derive(Serialize, Deserialize)]
struct Saved {
    object: String,
    recipient: String,
}

impl TryFrom<Saved> for KeyRef {
    type Error = String;

    fn try_from(s: Saved) -> std::result::Result<KeyRef, String> {
        let recipient = age::x25519::Recipient::from_str(&s.recipient)
            .map_err(|e| format!("recipient {}: {e}", s.recipient))?;
        Ok(KeyRef {
            object: s.object.into(),
            recipient,
        })
    }
}

impl From<KeyRef> for Saved {
    fn from(k: KeyRef) -> Saved {
        Saved {
            object: k.object.to_string(),
            recipient: k.recipient.to_string(),
        }
    }
}

/// `<state_dir>/keys.json`: the data keys of one core.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Keys {
    pub core: String,
    /// The core's own key (shared and volume units, manifests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own: Option<KeyRef>,
    /// Each user's key, by user id.
    #[serde(default)]
    pub users: HashMap<String, KeyRef>,
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

impl Keys {
    /// The keys of `core` in `state_dir`; none when there is no file yet.
    /// A damaged file is an error: new keys would leave the old ones'
    /// objects unnamed here (they are still named in the audit log).
    pub fn load(state_dir: &Path, core: &str) -> Result<Keys> {
        let path = path(state_dir);
        let file = match std::fs::File::open(&path) {
            Ok(f) => std::io::BufReader::with_capacity(256 << 10, f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Keys {
                    core: core.to_string(),
                    ..Keys::default()
                });
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let keys: Keys = serde_json::from_reader(file).with_context(|| {
            format!(
                "{} is damaged; move it aside to start new data keys (the old key objects stay named in the audit log)",
                path.display()
            )
        })?;
        if keys.core != core {
            anyhow::bail!(
                "{} holds the data keys of core {}, not {core}",
                path.display(),
                keys.core
            );
        }
        Ok(keys)
    }

    /// The keys whose key objects `present` (the ids of the key objects on
    /// every target, [`layout::data_key_id`]) holds: a key whose object is
    /// gone was shredded (an erasure run from another machine) and must
    /// never encrypt anything again.
    pub fn present_on_targets(mut self, present: &std::collections::HashSet<u128>) -> Keys {
        let here =
            |k: &KeyRef| layout::data_key_id(&k.object).is_some_and(|id| present.contains(&id));
        let before = self.users.len();
        self.users.retain(|_, k| here(k));
        if self.own.as_ref().is_some_and(|k| !here(k)) {
            tracing::warn!(
                "the core's own data key is no longer on every target: a new one is made"
            );
            self.own = None;
        }
        if self.users.len() < before {
            tracing::info!(
                users = before - self.users.len(),
                "data keys no longer on every target (erased, or lost): those users get new keys"
            );
        }
        self
    }

    /// Writes the keys (atomically).
    pub fn save(&self, state_dir: &Path) -> Result<()> {
        crate::state::write_atomic_with(&path(state_dir), |w| {
            serde_json::to_writer(w, self).map_err(std::io::Error::other)
        })
    }
}

/// A new data key: the identity file text, wrapped to `zone`, and its
/// recipient.
pub fn wrap_new(zone: &[age::x25519::Recipient]) -> Result<(Vec<u8>, age::x25519::Recipient)> {
    let new = crate::keys::generate();
    let sealed = pipeline::encrypt_small(zone, new.file_text.as_bytes())?;
    let recipient = age::x25519::Recipient::from_str(&new.recipient)
        .map_err(|e| anyhow::anyhow!("a generated recipient does not parse: {e}"))?;
    Ok((sealed, recipient))
}

/// Why a key object did not give a key.
#[derive(Debug, thiserror::Error)]
pub enum UnwrapError {
    #[error("none of the identities can decrypt it")]
    NoMatchingKeys,
    #[error("it is damaged: {0}")]
    Damaged(String),
}

/// The identity in a key object, opened with the zone's identities.
pub fn unwrap(sealed: &[u8], zone: &[Identity]) -> Result<age::x25519::Identity, UnwrapError> {
    let plain = pipeline::decrypt_small(sealed, zone).map_err(|e| match e {
        OpenError::NoMatchingKeys => UnwrapError::NoMatchingKeys,
        other => UnwrapError::Damaged(other.to_string()),
    })?;
    let text = String::from_utf8(plain).map_err(|_| UnwrapError::Damaged("not text".into()))?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .ok_or_else(|| UnwrapError::Damaged("it holds no age identity".into()))?;
    age::x25519::Identity::from_str(line).map_err(|e| UnwrapError::Damaged(e.to_string()))
}

/// The data keys of one backup run: the ones `keys.json` knows, and new ones
/// made as units need them. A new key encrypts its unit at once; its key
/// object is written to every target alongside ([`RunKeys::write`]), off
/// the unit's path, and the run commits only once every one is written (a
/// unit whose key never landed is in no committed snapshot: the next run's
/// cleanup removes it).
pub struct RunKeys<'a, S> {
    targets: &'a [Writable<S>],
    snapshot: &'a str,
    zone: &'a [age::x25519::Recipient],
    budget: &'a Budget,
    keys: Mutex<Keys>,
    /// Whether a key was added since the load.
    added: std::sync::atomic::AtomicBool,
    /// Where new key objects wait for [`RunKeys::write`]; `None` once closed.
    queue: Mutex<Option<tokio::sync::mpsc::Sender<NewKey>>>,
}

/// A key object to write: its key, the wrapped identity, its user.
pub struct NewKey {
    object: layout::Key,
    body: Bytes,
    users: Vec<String>,
}

/// The key objects a run made, for [`RunKeys::write`].
pub type KeyQueue = tokio::sync::mpsc::Receiver<NewKey>;

/// Key objects written at once.
const KEY_WRITES: usize = 16;

impl<'a, S: WriteBackend> RunKeys<'a, S> {
    pub fn new(
        keys: Keys,
        targets: &'a [Writable<S>],
        snapshot: &'a str,
        zone: &'a [age::x25519::Recipient],
        budget: &'a Budget,
    ) -> (Self, KeyQueue) {
        // bounded: a store that is slow to take key objects slows the units
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let keys = RunKeys {
            targets,
            snapshot,
            zone,
            budget,
            keys: Mutex::new(keys),
            added: false.into(),
            queue: Mutex::new(Some(tx)),
        };
        (keys, rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Keys> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The core's own key, made on its first use.
    pub async fn own(&self) -> Result<KeyRef> {
        if let Some(k) = self.lock().own.clone() {
            return Ok(k);
        }
        let key = self.create(&[]).await?;
        self.lock().own = Some(key.clone());
        Ok(key)
    }

    /// `user`'s key, made on their first backup (or their first after an
    /// erasure). One unit per user and run, so no two calls make one user's.
    pub async fn user(&self, user: &str) -> Result<KeyRef> {
        if let Some(k) = self.lock().users.get(user).cloned() {
            return Ok(k);
        }
        let key = self.create(&[user.to_string()]).await?;
        self.lock().users.insert(user.to_string(), key.clone());
        Ok(key)
    }

    /// A new key, wrapped, its key object queued for [`RunKeys::write`].
    async fn create(&self, users: &[String]) -> Result<KeyRef> {
        let core = self.lock().core.clone();
        let (sealed, recipient) = wrap_new(self.zone)?;
        let object = layout::new_data_key(&core);
        let shared = object.shared();
        let queue = self
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .context("the run's data keys are closed")?;
        let new = NewKey {
            object,
            body: Bytes::from(sealed),
            users: users.to_vec(),
        };
        queue
            .send(new)
            .await
            .map_err(|_| anyhow::anyhow!("a data key could not be written to every target"))?;
        self.added.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(KeyRef {
            object: shared,
            recipient,
        })
    }

    /// No more keys: [`RunKeys::write`] ends once the queued ones are written.
    pub fn close(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Writes the queued key objects to every target (on the record, with
    /// the user each is for) until [`RunKeys::close`]; the first failure
    /// stops taking keys, so the units that would need one fail too.
    pub async fn write(&self, mut queue: KeyQueue) -> Result<()> {
        use futures::StreamExt;
        let mut first_error = None;
        let incoming = futures::stream::poll_fn(|cx| queue.poll_recv(cx));
        let mut writes = incoming
            .map(|new| self.write_one(new))
            .buffer_unordered(KEY_WRITES);
        while let Some(written) = writes.next().await {
            if let Err(e) = written
                && first_error.is_none()
            {
                first_error = Some(e);
                self.close();
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn write_one(&self, new: NewKey) -> Result<()> {
        let digest = Digest::of(&new.body);
        let contents = Contents {
            kind: ObjectKind::Key,
            snapshot: Some(self.snapshot),
            users: &new.users,
            ranges: &[],
            packed: 0,
        };
        crate::upload::put_whole(
            self.targets,
            &new.object,
            new.body,
            &contents,
            &digest,
            self.budget,
        )
        .await
        .context("writing a new data key")
    }

    /// The keys, for `keys.json`, when the run added any: taken, not
    /// copied (100,000 users' keys are megabytes); the run makes no key
    /// after this.
    pub fn take_added(&self) -> Option<Keys> {
        if !self.added.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let mut keys = self.lock();
        Some(Keys {
            core: keys.core.clone(),
            own: keys.own.clone(),
            users: std::mem::take(&mut keys.users),
        })
    }
}

/// The identities that open a restore's objects: the zone's, and the data
/// keys unwrapped from their key objects.
pub struct Keyring {
    zone: Arc<Vec<Identity>>,
    data: HashMap<Arc<str>, std::result::Result<Arc<Vec<Identity>>, String>>,
}

impl Keyring {
    pub fn new(zone: Arc<Vec<Identity>>) -> Keyring {
        Keyring {
            zone,
            data: HashMap::new(),
        }
    }

    /// The zone's identities.
    pub fn zone(&self) -> &[Identity] {
        &self.zone
    }

    /// Adds the outcome of fetching the key object `object`: its identity,
    /// or why there is none.
    pub fn insert(
        &mut self,
        object: Arc<str>,
        key: std::result::Result<age::x25519::Identity, String>,
    ) {
        let key = key.map(|i| Arc::new(vec![Box::new(i) as Identity]));
        self.data.insert(object, key);
    }

    /// Whether the key object `object` was fetched already.
    pub fn has(&self, object: &str) -> bool {
        self.data.contains_key(object)
    }

    /// The identities that open an object encrypted to `data_key` (none:
    /// to the zone's recipients).
    pub fn for_key(&self, data_key: Option<&str>) -> Result<Arc<Vec<Identity>>> {
        let Some(object) = data_key else {
            return Ok(Arc::clone(&self.zone));
        };
        match self.data.get(object) {
            Some(Ok(ids)) => Ok(Arc::clone(ids)),
            Some(Err(why)) => Err(anyhow::anyhow!("its data key {object}: {why}")),
            None => Err(anyhow::anyhow!("its data key {object} was not fetched")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_key_opens_with_the_zone_identity_only() {
        let zone = age::x25519::Identity::generate();
        let (sealed, recipient) = wrap_new(&[zone.to_public()]).unwrap();
        let ids: Vec<Identity> = vec![Box::new(zone)];
        let key = unwrap(&sealed, &ids).unwrap();
        assert_eq!(key.to_public().to_string(), recipient.to_string());
        let other: Vec<Identity> = vec![Box::new(age::x25519::Identity::generate())];
        assert!(matches!(
            unwrap(&sealed, &other),
            Err(UnwrapError::NoMatchingKeys)
        ));
    }

    #[test]
    fn keys_round_trip_through_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut keys = Keys::load(dir.path(), "core-a").unwrap();
        assert!(keys.users.is_empty() && keys.own.is_none());
        let (_, recipient) = wrap_new(&[age::x25519::Identity::generate().to_public()]).unwrap();
        let k = KeyRef {
            object: "core-a/keys/00.age".into(),
            recipient,
        };
        keys.users.insert("u1".into(), k.clone());
        keys.own = Some(k.clone());
        keys.save(dir.path()).unwrap();
        let back = Keys::load(dir.path(), "core-a").unwrap();
        assert_eq!(back.users.get("u1"), Some(&k));
        assert_eq!(back.own, Some(k));
        let e = Keys::load(dir.path(), "core-b").unwrap_err();
        assert!(format!("{e:#}").contains("not core-b"), "{e:#}");
        std::fs::write(dir.path().join(FILE_NAME), b"{").unwrap();
        let e = Keys::load(dir.path(), "core-a").unwrap_err();
        assert!(format!("{e:#}").contains("is damaged"), "{e:#}");
    }
}
