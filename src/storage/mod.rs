//! Object storage, seen through two traits: [`ReadBackend`] and
//! [`WriteBackend`]` : ReadBackend`.
//!
//! Reading is open to anyone who holds a backend. Writing needs a
//! [`WritePermit`], which only [`crate::residency`] can create, and only for a
//! target that passed the residency check in this process: code that has not
//! been through the gate cannot name a permit, so it cannot write. The gate
//! also opens the backend it writes through itself, from the target that
//! passed ([`Connect`]), so a writer cannot point at another bucket.

#[cfg(test)]
pub mod memory;
pub mod s3;

use std::future::Future;

use bytes::Bytes;

use crate::config::Target;

pub use crate::residency::WritePermit;

/// A failure to talk to a target, sorted by what the operator has to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Nothing answered: connection refused, DNS, TLS or timeout.
    #[error("cannot reach {endpoint}: {cause}")]
    Unreachable { endpoint: String, cause: String },
    /// The server answered but refused the credentials.
    #[error("the server refused the credentials: {cause}")]
    Credentials { cause: String },
    /// The bucket does not exist on that server.
    #[error("bucket {bucket:?} does not exist on {endpoint}")]
    NoSuchBucket { endpoint: String, bucket: String },
    /// The server says the bucket lives in another region than the one the
    /// request was signed for. This is the bucket's reported location.
    #[error("the server reports the bucket in region {reported:?}")]
    WrongRegion { reported: String },
    /// A conditional write found an object under the key already.
    #[error("an object already exists under {key}")]
    Exists { key: String },
    /// Anything else the server or the client said.
    #[error("{0}")]
    Other(String),
}

/// One object in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Full key.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
}

/// An unfinished multipart upload, as listed by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpload {
    pub key: String,
    pub upload_id: String,
}

/// A streamed object body.
pub type Body = Box<dyn tokio::io::AsyncBufRead + Send + Unpin>;

/// The read operations zonevault needs from a bucket. Keys are full object keys.
pub trait ReadBackend: Send + Sync {
    /// The region the server itself reports for the bucket (GetBucketLocation),
    /// normalised: AWS's empty constraint is `us-east-1` and `EU` is `eu-west-1`.
    fn bucket_location(&self) -> impl Future<Output = Result<String, StoreError>> + Send;

    /// A small object in full, or `None` when there is none under `key`.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Vec<u8>>, StoreError>> + Send;

    /// Whether there is an object under `key` (a HEAD: nothing is read).
    fn exists(&self, key: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// An object as a stream, or `None` when there is none under `key`;
    /// with `range`, only those bytes of it (a unit in a pack). A server
    /// that answers a range with other bytes than asked is an error.
    fn get_stream(
        &self,
        key: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> impl Future<Output = Result<Option<Body>, StoreError>> + Send;

    /// Every object whose key starts with `prefix`.
    fn list(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<Vec<ObjectInfo>, StoreError>> + Send;

    /// Unfinished multipart uploads under `prefix`.
    fn list_uploads(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<Vec<PendingUpload>, StoreError>> + Send;
}

/// The write operations. Every one takes the [`WritePermit`] that only the
/// residency gate holds, so only the gate's [`crate::residency::Writable`]
/// calls them.
pub trait WriteBackend: ReadBackend {
    /// Writes a whole object.
    fn put(
        &self,
        permit: &WritePermit,
        key: &str,
        body: Bytes,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Writes a whole object only if none exists under `key` (a conditional
    /// `If-None-Match: *` PUT); [`StoreError::Exists`] otherwise. A server
    /// that ignores the condition overwrites: callers that must never
    /// overwrite check first as well.
    fn put_new(
        &self,
        permit: &WritePermit,
        key: &str,
        body: Bytes,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Starts a multipart upload; returns its id.
    fn create_upload(
        &self,
        permit: &WritePermit,
        key: &str,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;

    /// Uploads part `number` (1-based); returns its ETag.
    fn upload_part(
        &self,
        permit: &WritePermit,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;

    /// Completes a multipart upload from its parts' (number, ETag), in order.
    fn complete_upload(
        &self,
        permit: &WritePermit,
        key: &str,
        upload_id: &str,
        parts: Vec<(i32, String)>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Abandons a multipart upload and frees its parts.
    fn abort_upload(
        &self,
        permit: &WritePermit,
        key: &str,
        upload_id: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes an object (absent is not an error).
    fn delete(
        &self,
        permit: &WritePermit,
        key: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Opens the backend of a target: how the gate gets the client it checks
/// and then writes through, so the two cannot differ.
pub trait Connect: Sync {
    type Backend: WriteBackend;

    fn connect(&self, target: &Target) -> impl Future<Output = Self::Backend> + Send;
}

/// The region a GetBucketLocation constraint means: AWS answers an empty
/// constraint for us-east-1 and the legacy `EU` for eu-west-1.
pub fn normalize_location(constraint: Option<&str>) -> String {
    match constraint.map(str::trim) {
        None | Some("") => "us-east-1".to_string(),
        Some("EU") => "eu-west-1".to_string(),
        Some(other) => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::normalize_location;

    #[test]
    fn aws_location_quirks() {
        assert_eq!(normalize_location(None), "us-east-1");
        assert_eq!(normalize_location(Some("")), "us-east-1");
        assert_eq!(normalize_location(Some("EU")), "eu-west-1");
        assert_eq!(normalize_location(Some("ch-gva-2")), "ch-gva-2");
    }
}
