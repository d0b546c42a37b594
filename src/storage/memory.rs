//! A bucket in memory, for unit tests, with faults to inject: fail the Nth
//! call of an operation, lose a part, report another region. The Garage
//! tests are the proof against a real server; this is the seam that lets
//! the gate, the uploads, the sweep and the commit be tested in milliseconds.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{
    Body, Connect, ObjectInfo, PendingUpload, ReadBackend, StoreError, WriteBackend, WritePermit,
};
use crate::config::Target;

/// The operations of the backend traits, to count and to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Location,
    Get,
    Head,
    List,
    ListUploads,
    Put,
    PutNew,
    CreateUpload,
    UploadPart,
    CompleteUpload,
    AbortUpload,
    Delete,
}

#[derive(Debug, Default)]
struct State {
    region: String,
    objects: BTreeMap<String, Bytes>,
    /// upload id → (key, parts by number)
    uploads: BTreeMap<String, (String, BTreeMap<i32, Bytes>)>,
    calls: HashMap<Op, usize>,
    /// (op, nth call) → the error it returns
    faults: HashMap<(Op, usize), StoreError>,
    /// part numbers that are acknowledged but never stored
    lost_parts: Vec<i32>,
    /// runs after every whole-object write, as another process would act
    /// while the object travels
    after_put: Option<Hook>,
    next_id: u64,
}

#[derive(Clone)]
struct Hook(Arc<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

/// One bucket; clones share it.
#[derive(Debug, Clone, Default)]
pub struct Memory(Arc<Mutex<State>>);

impl Memory {
    /// An empty bucket that reports `region`.
    pub fn new(region: &str) -> Memory {
        let m = Memory::default();
        m.state().region = region.to_string();
        m
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    /// Makes the `nth` call (1-based, counted from now on) of `op` fail with `error`.
    pub fn fail(&self, op: Op, nth: usize, error: StoreError) {
        let mut s = self.state();
        let at = s.calls.get(&op).copied().unwrap_or(0) + nth;
        s.faults.insert((op, at), error);
    }

    /// Part `number` of every upload is acknowledged but not stored.
    pub fn lose_part(&self, number: i32) {
        self.state().lost_parts.push(number);
    }

    /// Runs `hook` with the key after every whole-object write.
    pub fn after_put(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        self.state().after_put = Some(Hook(Arc::new(hook)));
    }

    fn written(&self, key: &str) {
        let hook = self.state().after_put.clone();
        if let Some(Hook(f)) = hook {
            f(key);
        }
    }

    /// From now on, the bucket reports `region`.
    pub fn set_region(&self, region: &str) {
        self.state().region = region.to_string();
    }

    /// Every key, in order.
    pub fn keys(&self) -> Vec<String> {
        self.state().objects.keys().cloned().collect()
    }

    /// The object under `key`, as stored.
    pub fn object(&self, key: &str) -> Option<Bytes> {
        self.state().objects.get(key).cloned()
    }

    /// Writes an object directly, as another writer would.
    pub fn insert(&self, key: &str, body: &[u8]) {
        self.state()
            .objects
            .insert(key.to_string(), Bytes::copy_from_slice(body));
    }

    /// Unfinished multipart uploads.
    pub fn pending_uploads(&self) -> usize {
        self.state().uploads.len()
    }

    /// How many times `op` was called.
    pub fn calls(&self, op: Op) -> usize {
        self.state().calls.get(&op).copied().unwrap_or(0)
    }

    /// Counts the call, returns the injected fault if it is due.
    fn call(&self, op: Op) -> Result<std::sync::MutexGuard<'_, State>, StoreError> {
        let mut s = self.state();
        let n = s.calls.entry(op).or_insert(0);
        *n += 1;
        let n = *n;
        match s.faults.remove(&(op, n)) {
            Some(e) => Err(e),
            None => Ok(s),
        }
    }
}

impl ReadBackend for Memory {
    async fn bucket_location(&self) -> Result<String, StoreError> {
        Ok(self.call(Op::Location)?.region.clone())
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.call(Op::Get)?.objects.get(key).map(|b| b.to_vec()))
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.call(Op::Head)?.objects.contains_key(key))
    }

    async fn get_stream(
        &self,
        key: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<Option<Body>, StoreError> {
        let body = self.call(Op::Get)?.objects.get(key).cloned();
        let body = match (body, range) {
            (Some(b), Some(r)) => {
                let end = (r.end as usize).min(b.len());
                Some(b.slice((r.start as usize).min(end)..end))
            }
            (body, _) => body,
        };
        Ok(body.map(|b| Box::new(std::io::Cursor::new(b)) as Body))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let s = self.call(Op::List)?;
        Ok(s.objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectInfo {
                key: k.clone(),
                size: v.len() as u64,
            })
            .collect())
    }

    async fn list_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>, StoreError> {
        let s = self.call(Op::ListUploads)?;
        Ok(s.uploads
            .iter()
            .filter(|(_, (k, _))| k.starts_with(prefix))
            .map(|(id, (k, _))| PendingUpload {
                key: k.clone(),
                upload_id: id.clone(),
            })
            .collect())
    }
}

impl WriteBackend for Memory {
    async fn put(&self, _: &WritePermit, key: &str, body: Bytes) -> Result<(), StoreError> {
        self.call(Op::Put)?.objects.insert(key.to_string(), body);
        self.written(key);
        Ok(())
    }

    async fn put_new(&self, _: &WritePermit, key: &str, body: Bytes) -> Result<(), StoreError> {
        let mut s = self.call(Op::PutNew)?;
        if s.objects.contains_key(key) {
            return Err(StoreError::Exists {
                key: key.to_string(),
            });
        }
        s.objects.insert(key.to_string(), body);
        drop(s);
        self.written(key);
        Ok(())
    }

    async fn create_upload(&self, _: &WritePermit, key: &str) -> Result<String, StoreError> {
        let mut s = self.call(Op::CreateUpload)?;
        s.next_id += 1;
        let id = format!("upload-{}", s.next_id);
        s.uploads
            .insert(id.clone(), (key.to_string(), BTreeMap::new()));
        Ok(id)
    }

    async fn upload_part(
        &self,
        _: &WritePermit,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<String, StoreError> {
        let mut s = self.call(Op::UploadPart)?;
        let lost = s.lost_parts.contains(&number);
        let Some((k, parts)) = s.uploads.get_mut(upload_id) else {
            return Err(StoreError::Other(format!("NoSuchUpload {upload_id}")));
        };
        if k != key {
            return Err(StoreError::Other(format!(
                "upload {upload_id} is not of {key}"
            )));
        }
        let etag = format!("\"{}-{}\"", number, blake3::hash(&body).to_hex());
        if !lost {
            parts.insert(number, body);
        }
        Ok(etag)
    }

    async fn complete_upload(
        &self,
        _: &WritePermit,
        key: &str,
        upload_id: &str,
        parts: Vec<(i32, String)>,
    ) -> Result<(), StoreError> {
        let mut s = self.call(Op::CompleteUpload)?;
        let Some((k, stored)) = s.uploads.get(upload_id) else {
            return Err(StoreError::Other(format!("NoSuchUpload {upload_id}")));
        };
        if k != key {
            return Err(StoreError::Other(format!(
                "upload {upload_id} is not of {key}"
            )));
        }
        let mut body = Vec::new();
        for (n, etag) in &parts {
            match stored.get(n) {
                Some(b) if *etag == format!("\"{}-{}\"", n, blake3::hash(b).to_hex()) => {
                    body.extend_from_slice(b)
                }
                _ => return Err(StoreError::Other(format!("InvalidPart {n} of {key}"))),
            }
        }
        s.uploads.remove(upload_id);
        s.objects.insert(key.to_string(), Bytes::from(body));
        Ok(())
    }

    async fn abort_upload(
        &self,
        _: &WritePermit,
        _key: &str,
        upload_id: &str,
    ) -> Result<(), StoreError> {
        let mut s = self.call(Op::AbortUpload)?;
        s.uploads
            .remove(upload_id)
            .map(|_| ())
            .ok_or_else(|| StoreError::Other(format!("NoSuchUpload {upload_id}")))
    }

    async fn delete(&self, _: &WritePermit, key: &str) -> Result<(), StoreError> {
        self.call(Op::Delete)?.objects.remove(key);
        Ok(())
    }
}

/// Buckets by target name: what the gate connects to in unit tests. A
/// target seen for the first time gets an empty bucket in its configured
/// region.
#[derive(Debug, Default)]
pub struct Buckets(Mutex<HashMap<String, Memory>>);

impl Buckets {
    /// The bucket of `target` (the same one the gate gets).
    pub fn of(&self, target: &Target) -> Memory {
        self.0
            .lock()
            .unwrap()
            .entry(target.name.clone())
            .or_insert_with(|| Memory::new(&target.region))
            .clone()
    }
}

impl Connect for Buckets {
    type Backend = Memory;

    async fn connect(&self, target: &Target) -> Memory {
        self.of(target)
    }
}
