//! [`ReadBackend`] and [`WriteBackend`] on S3 (aws-sdk-s3), with errors sorted into [`StoreError`].
//!
//! Object bodies are sent with `UNSIGNED-PAYLOAD`: hashing every byte with
//! SHA-256 for the signature costs CPU that the pipeline needs, and adds
//! nothing here, because every body is age-encrypted (each 64 KiB chunk
//! authenticated) and its plain tar's BLAKE3 is in the encrypted manifest.

use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{Credentials, Region, timeout::TimeoutConfig};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};

use bytes::Bytes;

use super::{
    Body, Connect, ObjectInfo, PendingUpload, ReadBackend, StoreError, WriteBackend, WritePermit,
    normalize_location,
};
use crate::config::{Config, StaticCredentials, Target};

/// How long to wait for a TCP/TLS connection before calling an endpoint unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one attempt of a request may take: an 8 MiB part at 150 kB/s.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

/// Opens S3 clients for the targets of a config, with their credentials.
#[derive(Debug, Clone, Copy)]
pub struct S3Connect<'a>(pub &'a Config);

impl Connect for S3Connect<'_> {
    type Backend = S3Store;

    async fn connect(&self, target: &Target) -> S3Store {
        S3Store::connect(target, self.0.credentials(&target.name)).await
    }
}

/// One target's bucket on an S3 endpoint.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    endpoint: String,
    bucket: String,
    /// Secrets that must never appear in an error message, even when a
    /// server quotes them back.
    redact: Vec<String>,
}

impl S3Store {
    /// A client for `target`, signing for the target's configured region, with
    /// `credentials` or (when `None`) the standard AWS credential chain.
    pub async fn connect(target: &Target, credentials: Option<&StaticCredentials>) -> S3Store {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(&target.endpoint)
            .region(Region::new(target.region.clone()))
            // Transient faults (5xx, throttling, timeouts, reset connections)
            // are retried with exponential backoff inside a run.
            .retry_config(
                aws_config::retry::RetryConfig::standard()
                    .with_max_attempts(4)
                    .with_initial_backoff(std::time::Duration::from_millis(200))
                    .with_max_backoff(std::time::Duration::from_secs(5)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .build(),
            );
        if let Some(c) = credentials {
            loader = loader.credentials_provider(Credentials::new(
                c.access_key_id.expose(),
                c.secret_access_key.expose(),
                None,
                None,
                "zonevault-config",
            ));
        }
        let shared = loader.load().await;
        let config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(target.path_style)
            // zonevault checks integrity itself (BLAKE3); S3-compatible servers
            // differ in which of the newer checksum headers they accept.
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            )
            .build();
        S3Store {
            client: Client::from_conf(config),
            endpoint: target.endpoint.clone(),
            bucket: target.bucket.clone(),
            redact: credentials
                .map(|c| vec![c.secret_access_key.expose().to_string()])
                .unwrap_or_default(),
        }
    }

    fn classify<E>(&self, err: SdkError<E>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        redact(classify(&self.endpoint, &self.bucket, err), &self.redact)
    }
}

impl ReadBackend for S3Store {
    async fn bucket_location(&self) -> Result<String, StoreError> {
        let out = self
            .client
            .get_bucket_location()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        Ok(normalize_location(
            out.location_constraint().map(|c| c.as_str()),
        ))
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                return Ok(None);
            }
            Err(e) => return Err(self.classify(e)),
        };
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| StoreError::Other(format!("reading {key}: {e}")))?;
        Ok(Some(bytes.to_vec()))
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(false),
            Err(e) => Err(self.classify(e)),
        }
    }

    async fn get_stream(
        &self,
        key: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<Option<Body>, StoreError> {
        // HTTP ranges are inclusive
        let range = range
            .filter(|r| r.end > r.start)
            .map(|r| (r.start, r.end - 1));
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .set_range(range.map(|(first, last)| format!("bytes={first}-{last}")))
            .send()
            .await
        {
            Ok(out) => {
                // a server that ignored the range would send the whole pack
                if let Some((first, last)) = range {
                    let answered = out.content_range().unwrap_or("the whole object");
                    if !answered.starts_with(&format!("bytes {first}-{last}/")) {
                        return Err(StoreError::Other(format!(
                            "asked for bytes {first}-{last} of {key}, the server sent {answered}"
                        )));
                    }
                }
                Ok(Some(Box::new(out.body.into_async_read())))
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
            Err(e) => Err(self.classify(e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        let mut objects = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.classify(e))?;
            objects.extend(page.contents().iter().filter_map(|o| {
                Some(ObjectInfo {
                    key: o.key()?.to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                })
            }));
        }
        Ok(objects)
    }

    async fn list_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>, StoreError> {
        let mut uploads = Vec::new();
        let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
        loop {
            let out = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .send()
                .await
                .map_err(|e| self.classify(e))?;
            uploads.extend(out.uploads().iter().filter_map(|u| {
                Some(PendingUpload {
                    key: u.key()?.to_string(),
                    upload_id: u.upload_id()?.to_string(),
                })
            }));
            if !out.is_truncated().unwrap_or(false) {
                return Ok(uploads);
            }
            key_marker = out.next_key_marker().map(String::from);
            id_marker = out.next_upload_id_marker().map(String::from);
            if key_marker.is_none() {
                return Ok(uploads);
            }
        }
    }
}

impl WriteBackend for S3Store {
    async fn put(&self, _permit: &WritePermit, key: &str, body: Bytes) -> Result<(), StoreError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(body))
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        Ok(())
    }

    async fn put_new(
        &self,
        _permit: &WritePermit,
        key: &str,
        body: Bytes,
    ) -> Result<(), StoreError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .if_none_match("*")
            .body(ByteStream::from(body))
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map_err(|e| match e.raw_response().map(|r| r.status().as_u16()) {
                // 412: the condition failed; 409: a concurrent conditional write won
                Some(412 | 409) => StoreError::Exists {
                    key: key.to_string(),
                },
                _ => self.classify(e),
            })?;
        Ok(())
    }

    async fn create_upload(&self, _permit: &WritePermit, key: &str) -> Result<String, StoreError> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        out.upload_id()
            .map(String::from)
            .ok_or_else(|| StoreError::Other("the server returned no upload id".into()))
    }

    async fn upload_part(
        &self,
        _permit: &WritePermit,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<String, StoreError> {
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .body(ByteStream::from(body))
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        out.e_tag()
            .map(String::from)
            .ok_or_else(|| StoreError::Other(format!("no ETag for part {number} of {key}")))
    }

    async fn complete_upload(
        &self,
        _permit: &WritePermit,
        key: &str,
        upload_id: &str,
        parts: Vec<(i32, String)>,
    ) -> Result<(), StoreError> {
        let parts = parts
            .into_iter()
            .map(|(n, etag)| CompletedPart::builder().part_number(n).e_tag(etag).build())
            .collect();
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        Ok(())
    }

    async fn abort_upload(
        &self,
        _permit: &WritePermit,
        key: &str,
        upload_id: &str,
    ) -> Result<(), StoreError> {
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        Ok(())
    }

    async fn delete(&self, _permit: &WritePermit, key: &str) -> Result<(), StoreError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        Ok(())
    }
}

/// Replaces every secret in the error's text with `***`.
fn redact(e: StoreError, secrets: &[String]) -> StoreError {
    let clean = |s: String| {
        secrets
            .iter()
            .filter(|x| x.len() >= 4)
            .fold(s, |s, x| s.replace(x.as_str(), "***"))
    };
    match e {
        StoreError::Unreachable { endpoint, cause } => StoreError::Unreachable {
            endpoint,
            cause: clean(cause),
        },
        StoreError::Credentials { cause } => StoreError::Credentials {
            cause: clean(cause),
        },
        StoreError::Other(m) => StoreError::Other(clean(m)),
        other => other,
    }
}

/// Sorts an SDK error into what the operator must do about it.
fn classify<E>(endpoint: &str, bucket: &str, err: SdkError<E>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let unreachable = |cause: String| StoreError::Unreachable {
        endpoint: endpoint.to_string(),
        cause,
    };
    match &err {
        SdkError::TimeoutError(_) => {
            return unreachable(format!("no answer within {}s", ATTEMPT_TIMEOUT.as_secs()));
        }
        SdkError::DispatchFailure(d) => {
            if d.is_timeout() {
                return unreachable(format!(
                    "timed out (connect timeout {}s)",
                    CONNECT_TIMEOUT.as_secs()
                ));
            }
            return unreachable(root_cause(&err));
        }
        _ => {}
    }
    let Some(raw) = err.raw_response() else {
        return StoreError::Other(root_cause(&err));
    };
    let status = raw.status().as_u16();
    let header_region = raw.headers().get("x-amz-bucket-region").map(str::to_string);
    let body = raw
        .body()
        .bytes()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    let code = err.code().unwrap_or("");
    let message = err.message().unwrap_or("").to_string();

    // The region comes from the structured parts of the answer only: the
    // `x-amz-bucket-region` header or the `<Region>` element of the XML error
    // body (AWS sends it with AuthorizationHeaderMalformed, Garage with every
    // error). The human `Message` is never parsed.
    let wrong_region =
        code == "AuthorizationHeaderMalformed" || code == "PermanentRedirect" || status == 301;
    if wrong_region && let Some(reported) = header_region.or_else(|| xml_element(&body, "Region")) {
        return StoreError::WrongRegion { reported };
    }
    match code {
        "NoSuchBucket" => StoreError::NoSuchBucket {
            endpoint: endpoint.to_string(),
            bucket: bucket.to_string(),
        },
        "AccessDenied"
        | "InvalidAccessKeyId"
        | "SignatureDoesNotMatch"
        | "InvalidToken"
        | "ExpiredToken"
        | "InvalidSecurity" => StoreError::Credentials {
            cause: describe(code, &message, status),
        },
        _ if status == 404 && code.is_empty() => StoreError::NoSuchBucket {
            endpoint: endpoint.to_string(),
            bucket: bucket.to_string(),
        },
        _ if status == 403 => StoreError::Credentials {
            cause: describe(code, &message, status),
        },
        _ => StoreError::Other(describe(code, &message, status)),
    }
}

fn describe(code: &str, message: &str, status: u16) -> String {
    match (code.is_empty(), message.is_empty()) {
        (false, false) => format!("{code}: {message} (HTTP {status})"),
        (false, true) => format!("{code} (HTTP {status})"),
        (true, false) => format!("{message} (HTTP {status})"),
        (true, true) => format!("HTTP {status}"),
    }
}

/// The innermost cause of an error: "Connection refused (os error 111)"
/// rather than "dispatch failure".
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut last: &dyn std::error::Error = err;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}

/// The text of the first `<name>...</name>` element in an XML error body.
fn xml_element(body: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = body.find(&open)? + open.len();
    let end = body[start..].find("</")? + start;
    let value = body[start..end].trim();
    (!value.is_empty()).then(|| value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted() {
        let e = StoreError::Credentials {
            cause: "AccessDenied: No such key: s3cr3tvalue (HTTP 403)".into(),
        };
        assert_eq!(
            redact(e, &["s3cr3tvalue".to_string()]).to_string(),
            "the server refused the credentials: AccessDenied: No such key: *** (HTTP 403)"
        );
    }

    #[test]
    fn region_from_xml() {
        let body =
            "<Error><Code>AuthorizationHeaderMalformed</Code><Region>eu-central-1</Region></Error>";
        assert_eq!(xml_element(body, "Region").as_deref(), Some("eu-central-1"));
        assert_eq!(xml_element(body, "Missing"), None);
        // Garage's answer to a request signed for another region: the region
        // is in <Region>, the message is for humans
        let garage = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>AuthorizationHeaderMalformed</Code><Message>Authorization header malformed, unexpected scope: '20261126/ch-dk-2/s3/aws4_request', expected: '20261126/de-fra-1/s3/aws4_request'</Message><Resource>/b</Resource><Region>de-fra-1</Region></Error>";
        assert_eq!(xml_element(garage, "Region").as_deref(), Some("de-fra-1"));
    }
}
