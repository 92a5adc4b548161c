//! Target `multipart`: upload requests through the gateway's real router
//! (`orbit_gateway::app::router`, `orbit_gateway::upload`), in-process on the embedded stack
//! (SQLite and a local object directory in a temporary directory, tenant made by `admin
//! bootstrap`). axum's `Multipart` (multer) parses the body; what is fuzzed is the gateway's
//! handling around it: the content type check, field order and names, text fields, the file
//! stream fed to the planner and the object store, idempotency keys, clean-up on failure.
//!
//! Input: two option bytes, then the request. Bit 0 of the first byte: the request's first
//! line (up to LF) is its `Content-Type`; otherwise it is
//! `multipart/form-data; boundary=orbit`. Bit 1: an `Idempotency-Key` header, one of a few
//! chosen by the second byte (so keys are reused across inputs). The rest is the body.
//!
//! Properties, for every request:
//! - an answer within [`DEADLINE`] (no hang, whatever the body);
//! - never a 5xx;
//! - every 4xx is `application/problem+json` with a `code` and the same `status`;
//! - a 2xx names the source it made (or replayed);
//! - the object store holds exactly one object per source made, and no partial file: a request
//!   that failed left nothing behind.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::Router;
use orbit_config::Settings;
use orbit_gateway::{admin, app};
use tower::ServiceExt as _;

use crate::Knobs;

/// Longer than any request on an in-memory body should take, short enough to call a hang.
pub const DEADLINE: Duration = Duration::from_secs(10);
const DEFAULT_CONTENT_TYPE: &str = "multipart/form-data; boundary=orbit";
const MAX_CONTENT_TYPE_BYTES: usize = 256;
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// A gateway router over a fresh embedded stack, and what it has stored so far.
pub struct Gateway {
    runtime: tokio::runtime::Runtime,
    router: Router,
    upload_path: String,
    authorization: HeaderValue,
    objects: std::path::PathBuf,
    /// Sources made (not replayed) by the requests so far: one object each.
    sources: AtomicU64,
    // Dropped last: everything above lives in it.
    _data: tempfile::TempDir,
}

impl Gateway {
    pub fn new() -> Self {
        let data = tempfile::Builder::new()
            .prefix("orbit-fuzz-")
            .tempdir()
            .expect("a temporary directory");
        let mut settings = Settings::defaults();
        settings.database.url = format!("sqlite://{}/orbit.db", data.path().display())
            .parse()
            .unwrap();
        settings.object_store.url = format!("file://{}/objects", data.path().display())
            .parse()
            .unwrap();
        // Small synchronous prefix and chunks, so that fuzzed files reach the chunk planner.
        settings.ingest.sync_rows = 2;
        settings.ingest.chunk_rows = 2;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let (state, tenant) = runtime.block_on(async {
            let state = app::connect(&settings)
                .await
                .expect("embedded backends open");
            state.store.migrate().await.expect("migrations");
            let tenant = admin::bootstrap(&*state.store).await.expect("bootstrap");
            (state, tenant)
        });
        let field = |name: &str| tenant[name].as_str().expect("bootstrap output").to_owned();
        Gateway {
            runtime,
            router: app::router(state),
            upload_path: format!(
                "/v2/organizations/{}/directories/{}/sources/csv-upload",
                field("organization_id"),
                field("directory_id")
            ),
            authorization: HeaderValue::from_str(&format!("Bearer {}", field("token")))
                .expect("a token is a header value"),
            objects: data.path().join("objects"),
            sources: AtomicU64::new(0),
            _data: data,
        }
    }

    pub fn check(&self, data: &[u8]) {
        let (knobs, rest) = Knobs::split(data, 2);
        let (content_type, body) = match knobs.byte(0) & 1 {
            0 => (HeaderValue::from_static(DEFAULT_CONTENT_TYPE), rest),
            _ => {
                let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
                let line = &rest[..end.min(MAX_CONTENT_TYPE_BYTES)];
                let body = rest.get(end + 1..).unwrap_or_default();
                match HeaderValue::from_bytes(line) {
                    Ok(value) => (value, body),
                    // Not a header value: no client can send it.
                    Err(_) => return,
                }
            }
        };
        let mut request = Request::post(&self.upload_path)
            .header(header::AUTHORIZATION, self.authorization.clone())
            .header(header::CONTENT_TYPE, content_type);
        if knobs.byte(0) & 2 != 0 {
            request = request.header("idempotency-key", format!("key-{}", knobs.byte(1) % 4));
        }
        let request = request.body(Body::from(body.to_vec())).expect("a request");

        let (status, headers, bytes) = self.runtime.block_on(async {
            let response = tokio::time::timeout(DEADLINE, self.router.clone().oneshot(request))
                .await
                .expect("the gateway answers within the deadline")
                .expect("the router is infallible");
            let (parts, body) = response.into_parts();
            let bytes =
                tokio::time::timeout(DEADLINE, axum::body::to_bytes(body, MAX_RESPONSE_BYTES))
                    .await
                    .expect("the response body ends within the deadline")
                    .expect("a response body in memory");
            (parts.status, parts.headers, bytes)
        });
        let text = String::from_utf8_lossy(&bytes);
        assert!(!status.is_server_error(), "{status}: {text}");
        let json: serde_json::Value =
            serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{status}, {e}: {text}"));
        if status.is_client_error() {
            assert_eq!(
                headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes),
                Some(&b"application/problem+json"[..]),
                "{status}: {text}"
            );
            assert!(json["code"].is_string(), "{text}");
            assert_eq!(json["status"], status.as_u16(), "{text}");
        } else {
            assert!(status.is_success(), "{status}: {text}");
            assert!(json["source_id"].is_string(), "{text}");
            let replayed = headers.contains_key("idempotent-replayed");
            assert_eq!(replayed, status == StatusCode::OK, "{status}: {text}");
            if !replayed {
                self.sources.fetch_add(1, Ordering::Relaxed);
            }
        }
        let stored = count_files(&self.objects.join("sources"));
        assert_eq!(
            stored,
            self.sources.load(Ordering::Relaxed),
            "one object per source made ({status}: {text})"
        );
        assert_eq!(
            count_files(&self.objects.join(".partial")),
            0,
            "no partial object left ({status}: {text})"
        );
    }
}

impl Default for Gateway {
    fn default() -> Self {
        Self::new()
    }
}

fn count_files(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|e| e.expect("a directory entry"))
        .map(|e| {
            if e.file_type().expect("a file type").is_dir() {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}
