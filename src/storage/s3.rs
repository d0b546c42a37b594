//! [`Store`] on S3 (aws-sdk-s3), with errors sorted into [`StoreError`].

use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{Credentials, Region, timeout::TimeoutConfig};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;

use super::{Store, StoreError, WritePermit, normalize_location};
use crate::config::{StaticCredentials, Target};

/// How long to wait for a TCP/TLS connection before calling an endpoint unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one attempt of a small request may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// One target's bucket on an S3 endpoint.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    endpoint: String,
    bucket: String,
}

impl S3Store {
    /// A client for `target`, signing for the target's configured region, with
    /// `credentials` or (when `None`) the standard AWS credential chain.
    pub async fn connect(target: &Target, credentials: Option<&StaticCredentials>) -> S3Store {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(&target.endpoint)
            .region(Region::new(target.region.clone()))
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
        }
    }

    fn classify<E>(&self, err: SdkError<E>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        classify(&self.endpoint, &self.bucket, err)
    }
}

impl Store for S3Store {
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

    async fn put(&self, _permit: &WritePermit, key: &str, body: Vec<u8>) -> Result<(), StoreError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        Ok(())
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

    let wrong_region =
        code == "AuthorizationHeaderMalformed" || code == "PermanentRedirect" || status == 301;
    if wrong_region
        && let Some(reported) = header_region
            .or_else(|| xml_element(&body, "Region"))
            .or_else(|| region_in_message(&message))
    {
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

/// The region a wrong-region error message says the server expects, e.g.
/// Garage's "... expected region X ..." or AWS's "... expecting 'X'".
fn region_in_message(message: &str) -> Option<String> {
    let lower = message.to_ascii_lowercase();
    for marker in ["expecting", "expected"] {
        if let Some(i) = lower.rfind(marker) {
            let rest = &message[i + marker.len()..];
            let token = rest
                .trim_start_matches(|c: char| c.is_whitespace() || c == ':')
                .trim_start_matches("region")
                .trim_start_matches(|c: char| c.is_whitespace() || c == ':')
                .split(|c: char| c.is_whitespace() || c == ',' || c == ')')
                .next()?
                .trim_matches(|c: char| matches!(c, '\'' | '"' | '`' | '.'));
            // Garage names the whole credential scope: DATE/REGION/s3/aws4_request.
            let region = match token.split('/').collect::<Vec<_>>().as_slice() {
                [_date, region, _service, "aws4_request"] => *region,
                _ => token,
            };
            if !region.is_empty() {
                return Some(region.to_string());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_from_aws_message() {
        assert_eq!(
            region_in_message(
                "The authorization header is malformed; the region 'us-east-1' is wrong; expecting 'eu-west-1'"
            )
            .as_deref(),
            Some("eu-west-1")
        );
    }

    #[test]
    fn region_from_garage_message() {
        assert_eq!(
            region_in_message(
                "Authorization header malformed, unexpected scope: '20261126/ch-dk-2/s3/aws4_request', expected: '20261126/de-fra-1/s3/aws4_request'"
            )
            .as_deref(),
            Some("de-fra-1")
        );
    }

    #[test]
    fn region_from_xml() {
        let body =
            "<Error><Code>AuthorizationHeaderMalformed</Code><Region>eu-central-1</Region></Error>";
        assert_eq!(xml_element(body, "Region").as_deref(), Some("eu-central-1"));
        assert_eq!(xml_element(body, "Missing"), None);
    }
}
