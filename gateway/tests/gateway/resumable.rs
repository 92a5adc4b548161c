//! Resumable uploads, tus 1.0 (issue 22): a file sent in `PATCH`es imports as a `csv-upload`
//! of it would; what a `204` acknowledged survives a killed gateway; bad requests get their
//! problem and change nothing; ended uploads lose their bytes; tuspy, a client nobody here
//! wrote, uploads through it. Runs on the embedded stack, and on the distributed one with
//! `ORBIT_TEST_STACK=distributed` (deploy/test.sh does both, and Citus).

use std::io::Write as _;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use reqwest::{Response, StatusCode};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::common::*;
use crate::process;

const TUS: (&str, &str) = ("tus-resumable", "1.0.0");
const OFFSET_STREAM: &str = "application/offset+octet-stream";

fn b64(text: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn header(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

/// A tus client for one tenant of a gateway at `base`, written from the protocol.
struct Tus {
    client: reqwest::Client,
    base: String,
    token: String,
    org: String,
    dir: String,
}

impl Tus {
    fn of(app: &TestApp) -> Self {
        Self::as_tenant(app, &app.tenant)
    }

    fn as_tenant(app: &TestApp, tenant: &Tenant) -> Self {
        Tus {
            client: app.client.clone(),
            base: app.base.clone(),
            token: tenant.token.clone(),
            org: tenant.org.to_string(),
            dir: tenant.dir.to_string(),
        }
    }

    fn at(&self, base: &str) -> Self {
        Tus {
            client: self.client.clone(),
            base: base.to_owned(),
            token: self.token.clone(),
            org: self.org.clone(),
            dir: self.dir.clone(),
        }
    }

    fn uploads(&self) -> String {
        format!(
            "{}/v2/organizations/{}/directories/{}/uploads",
            self.base, self.org, self.dir
        )
    }

    /// The absolute URL of a `Location` (a path).
    fn url(&self, location: &str) -> String {
        format!("{}{location}", self.base)
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, url)
            .bearer_auth(&self.token)
            .header(TUS.0, TUS.1)
    }

    async fn create_with(&self, headers: &[(&str, &str)]) -> Response {
        let mut request = self.request(reqwest::Method::POST, &self.uploads());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    }

    /// Creates an upload of `length` bytes with `metadata`; its URL.
    async fn create(&self, length: usize, metadata: &[(&str, &str)]) -> String {
        let metadata = metadata
            .iter()
            .map(|(k, v)| format!("{k} {}", b64(v.as_bytes())))
            .collect::<Vec<_>>()
            .join(",");
        let length = length.to_string();
        let response = self
            .create_with(&[("upload-length", &length), ("upload-metadata", &metadata)])
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(header(&response, "tus-resumable").as_deref(), Some("1.0.0"));
        assert!(header(&response, "upload-expires").is_some());
        self.url(&header(&response, "location").expect("a Location"))
    }

    async fn patch_with(
        &self,
        url: &str,
        offset: usize,
        body: impl Into<reqwest::Body>,
        headers: &[(&str, &str)],
    ) -> Response {
        let mut request = self
            .request(reqwest::Method::PATCH, url)
            .header("content-type", OFFSET_STREAM)
            .header("upload-offset", offset.to_string());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(body).send().await.unwrap()
    }

    async fn patch(&self, url: &str, offset: usize, body: &[u8]) -> Response {
        self.patch_with(url, offset, body.to_vec(), &[]).await
    }

    /// Sends `body` at `offset` and asserts the `204` and the new offset.
    async fn patch_ok(&self, url: &str, offset: usize, body: &[u8]) -> Response {
        let response = self.patch(url, offset, body).await;
        assert_eq!(
            response.status(),
            StatusCode::NO_CONTENT,
            "{:?}",
            response.headers()
        );
        assert_eq!(
            header(&response, "upload-offset"),
            Some((offset + body.len()).to_string())
        );
        response
    }

    async fn head(&self, url: &str) -> Response {
        self.request(reqwest::Method::HEAD, url)
            .send()
            .await
            .unwrap()
    }

    async fn offset(&self, url: &str) -> usize {
        let response = self.head(url).await;
        assert_eq!(response.status(), StatusCode::OK);
        header(&response, "upload-offset").unwrap().parse().unwrap()
    }

    async fn json(&self, url: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .get(url)
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

/// The source an upload's last `PATCH` named, once it has finished.
async fn imported_source(app: &TestApp, response: &Response) -> Value {
    let location = header(response, "orbit-source-location").expect("the source's URL");
    let id = location.rsplit('/').next().unwrap();
    app.wait_terminal(id, Duration::from_secs(120)).await
}

/// Waits until no part of any resumable upload is left in the object store.
async fn assert_parts_removed(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let parts: Vec<String> = app
            .stored_objects()
            .await
            .into_iter()
            .filter(|k| k.contains("uploads/"))
            .collect();
        if parts.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "parts left behind: {parts:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn options_say_what_the_server_speaks() {
    let app = TestApp::spawn().await;
    let tus = Tus::of(&app);
    // No token: a browser's preflight has none.
    let response = app
        .client
        .request(reqwest::Method::OPTIONS, tus.uploads())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&response, "tus-resumable").as_deref(), Some("1.0.0"));
    assert_eq!(header(&response, "tus-version").as_deref(), Some("1.0.0"));
    let extensions = header(&response, "tus-extension").unwrap();
    for extension in [
        "creation",
        "creation-with-upload",
        "creation-defer-length",
        "termination",
        "expiration",
        "checksum",
    ] {
        assert!(
            extensions.split(',').any(|e| e == extension),
            "{extensions}"
        );
    }
    assert_eq!(
        header(&response, "tus-checksum-algorithm").as_deref(),
        Some("sha1,sha256")
    );
    assert_eq!(
        header(&response, "tus-max-size"),
        Some(app.settings.ingest.max_upload_bytes.to_string())
    );
}

/// Two `PATCH`es, the first of more than one part, then the import: the same rows, hash and
/// profiles as a `csv-upload` of the file; a repeat of the last `PATCH` answers the same
/// source, and the parts are gone.
#[tokio::test]
async fn a_file_sent_in_patches_imports_as_csv_upload_would() {
    let app = TestApp::spawn().await;
    let tus = Tus::of(&app);
    const ROWS: usize = 70_000;
    let csv = contacts_csv(ROWS, "tus");
    let bytes = csv.as_bytes();
    assert!(bytes.len() > 4_500_000, "{}", bytes.len());
    let url = tus
        .create(
            bytes.len(),
            &[("filename", "crm-sync.csv"), ("filetype", "text/csv")],
        )
        .await;
    assert_eq!(tus.offset(&url).await, 0);
    let head = tus.head(&url).await;
    assert_eq!(
        header(&head, "upload-length"),
        Some(bytes.len().to_string())
    );
    assert_eq!(header(&head, "cache-control").as_deref(), Some("no-store"));

    let first = 4_500_000;
    let response = tus.patch_ok(&url, 0, &bytes[..first]).await;
    assert!(header(&response, "upload-expires").is_some());
    assert!(header(&response, "orbit-source-location").is_none());
    assert_eq!(tus.offset(&url).await, first);
    let (status, view) = tus.json(&url).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["state"], "receiving", "{view}");
    assert_eq!(view["offset"], first);
    assert_eq!(view["metadata"]["filename"], "crm-sync.csv");

    // On the distributed stack the rest goes to another gateway, which knows the upload as
    // well as the first.
    let second = match distributed() {
        true => Some(
            orbit_gateway::app::start(app.settings.clone())
                .await
                .expect("a second gateway starts"),
        ),
        false => None,
    };
    let (tus, url) = match &second {
        Some(second) => {
            let base = format!("http://{}", second.addr);
            (tus.at(&base), url.replace(&app.base, &base))
        }
        None => (tus, url),
    };
    assert_eq!(tus.offset(&url).await, first);
    let last = tus.patch_ok(&url, first, &bytes[first..]).await;
    let source = imported_source(&app, &last).await;
    assert_eq!(source["source_status"], "completed", "{source}");
    assert_eq!(source["accepted"], ROWS);
    assert_eq!(source["failed"], 0);
    assert_eq!(source["filename"], "crm-sync.csv");
    assert_eq!(source["byte_size"], bytes.len());
    assert_eq!(source["sha256"], sha256_hex(bytes));
    assert_eq!(source["compression"], "none");
    let profiles = app.collect(&app.dir_url("/profiles")).await;
    assert_eq!(profiles.len(), ROWS);

    let (_, view) = tus.json(&url).await;
    assert_eq!(view["state"], "imported", "{view}");
    assert_eq!(view["source_id"], source["source_id"]);
    assert_eq!(
        view["source_url"].as_str(),
        header(&last, "orbit-source-location").as_deref()
    );
    // The last PATCH again (its answer lost, say): the same source, nothing new.
    let again = tus.patch(&url, bytes.len(), b"").await;
    assert_eq!(again.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        header(&again, "orbit-source-location"),
        header(&last, "orbit-source-location")
    );
    let sources = app.collect(&app.dir_url("/sources")).await;
    assert_eq!(sources.len(), 1);
    assert_parts_removed(&app).await;
}

fn zstd(data: &[u8]) -> Vec<u8> {
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    encoder.include_checksum(true).unwrap();
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// A client compressing on the fly does not know the length: it creates the upload with its
/// first bytes and `Upload-Defer-Length`, and says the length with its last `PATCH`. The
/// metadata's options apply, as a `csv-upload`'s form fields would.
#[tokio::test]
async fn a_compressed_file_of_deferred_length_created_with_its_first_bytes() {
    let app = TestApp::spawn().await;
    let tus = Tus::of(&app);
    let csv = "Email;Company\nann@example.com;Acme\nbob@example.com;Initech\n".to_owned()
        + &(0..3000)
            .map(|i| format!("p{i}@example.com;Co {i}\n"))
            .collect::<String>();
    let packed = zstd(csv.as_bytes());
    let half = packed.len() / 2;
    let metadata = format!(
        "filename {},delimiter {},idempotency_key {}",
        b64(b"contacts.csv.zst"),
        b64(b";"),
        b64(b"nightly-2026-12-07")
    );
    let response = tus
        .request(reqwest::Method::POST, &tus.uploads())
        .header("upload-defer-length", "1")
        .header("upload-metadata", &metadata)
        .header("content-type", OFFSET_STREAM)
        .body(packed[..half].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(header(&response, "upload-offset"), Some(half.to_string()));
    let url = tus.url(&header(&response, "location").unwrap());
    let head = tus.head(&url).await;
    assert_eq!(header(&head, "upload-defer-length").as_deref(), Some("1"));
    assert!(header(&head, "upload-length").is_none());
    assert_eq!(header(&head, "upload-metadata"), Some(metadata));

    let length = packed.len().to_string();
    let last = tus
        .patch_with(
            &url,
            half,
            packed[half..].to_vec(),
            &[("upload-length", &length)],
        )
        .await;
    assert_eq!(last.status(), StatusCode::NO_CONTENT);
    let source = imported_source(&app, &last).await;
    assert_eq!(source["accepted"], 3002, "{source}");
    assert_eq!(source["compression"], "zstd");
    assert_eq!(source["received_bytes"], packed.len());
    assert_eq!(source["byte_size"], csv.len());
    assert_eq!(source["sha256"], sha256_hex(csv.as_bytes()));

    // The same file under the same key, as a form upload: the key's replay, no new source.
    let form = reqwest::multipart::Form::new()
        .text("idempotency_key", "nightly-2026-12-07")
        .text("delimiter", ";")
        .part(
            "file",
            reqwest::multipart::Part::bytes(packed.clone()).file_name("contacts.csv.zst"),
        );
    let replay = app
        .post(&app.upload_url())
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), StatusCode::OK);
    let body: Value = replay.json().await.unwrap();
    assert_eq!(body["source_id"], source["source_id"]);
}

#[tokio::test]
async fn bad_requests_get_their_problem_and_change_nothing() {
    let app = TestApp::spawn_with(|s| s.ingest.max_compressed_upload_bytes = 1 << 20).await;
    let tus = Tus::of(&app);
    let data = b"email\nann@example.com\nbob@example.com\n";
    let url = tus.create(data.len(), &[]).await;
    tus.patch_ok(&url, 0, &data[..10]).await;

    // No Tus-Resumable: 412, naming the version spoken.
    let response = app
        .client
        .head(&url)
        .bearer_auth(&tus.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(header(&response, "tus-version").as_deref(), Some("1.0.0"));
    let response = app
        .client
        .patch(&url)
        .bearer_auth(&tus.token)
        .header("content-type", OFFSET_STREAM)
        .header("upload-offset", "10")
        .body(data[10..].to_vec())
        .send()
        .await
        .unwrap();
    assert_problem(
        response,
        StatusCode::PRECONDITION_FAILED,
        "tus_version_unsupported",
    )
    .await;

    // The wrong offset: 409, saying where the upload is.
    let response = tus.patch(&url, 5, &data[5..]).await;
    assert_eq!(header(&response, "upload-offset").as_deref(), Some("10"));
    let problem = assert_problem(response, StatusCode::CONFLICT, "upload_offset_mismatch").await;
    assert_eq!(problem["offset"], 10);

    // A checksum that does not match: 460, nothing of the body kept.
    let wrong = format!("sha256 {}", b64(&Sha256::digest(b"something else")));
    let response = tus
        .patch_with(
            &url,
            10,
            data[10..20].to_vec(),
            &[("upload-checksum", &wrong)],
        )
        .await;
    assert_problem(
        response,
        StatusCode::from_u16(460).unwrap(),
        "checksum_mismatch",
    )
    .await;
    let response = tus
        .patch_with(
            &url,
            10,
            data[10..20].to_vec(),
            &[("upload-checksum", "md5 AAAA")],
        )
        .await;
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert_eq!(tus.offset(&url).await, 10);
    // A right one (sha1) is taken.
    let right = format!("sha1 {}", b64(&sha1::Sha1::digest(&data[10..20])));
    let response = tus
        .patch_with(
            &url,
            10,
            data[10..20].to_vec(),
            &[("upload-checksum", &right)],
        )
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(tus.offset(&url).await, 20);

    // Past the upload's length, whether announced or streamed: 413, nothing kept.
    let mut long = data[20..].to_vec();
    long.extend_from_slice(b"carol@example.com\n");
    let response = tus.patch(&url, 20, &long).await;
    assert_problem(response, StatusCode::PAYLOAD_TOO_LARGE, "upload_too_large").await;
    let stream = futures::stream::iter(vec![
        Ok::<_, std::io::Error>(Bytes::from(long[..5].to_vec())),
        Ok(Bytes::from(long[5..].to_vec())),
    ]);
    let response = tus
        .patch_with(&url, 20, reqwest::Body::wrap_stream(stream), &[])
        .await;
    assert_problem(response, StatusCode::PAYLOAD_TOO_LARGE, "upload_too_large").await;
    assert_eq!(tus.offset(&url).await, 20);
    // A length that contradicts the one given.
    let response = tus
        .patch_with(&url, 20, data[20..].to_vec(), &[("upload-length", "99")])
        .await;
    assert_problem(response, StatusCode::BAD_REQUEST, "upload_length_mismatch").await;
    // Not the tus media type.
    let response = tus
        .request(reqwest::Method::PATCH, &url)
        .header("content-type", "text/csv")
        .header("upload-offset", "20")
        .body(data[20..].to_vec())
        .send()
        .await
        .unwrap();
    assert_problem(
        response,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    assert_eq!(tus.offset(&url).await, 20);

    // Unknown, malformed, or another organization's upload: 404 alike.
    let unknown = format!("{}/{}", tus.uploads(), uuid::Uuid::now_v7());
    assert_eq!(tus.head(&unknown).await.status(), StatusCode::NOT_FOUND);
    let response = tus.patch(&unknown, 0, b"x").await;
    assert_problem(response, StatusCode::NOT_FOUND, "upload_not_found").await;
    let response = tus.head(&format!("{}/not-an-id", tus.uploads())).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let other = app.another_tenant().await;
    let theirs = Tus::as_tenant(&app, &other);
    let id = url.rsplit('/').next().unwrap();
    let as_theirs = format!("{}/{id}", theirs.uploads());
    assert_eq!(
        theirs.head(&as_theirs).await.status(),
        StatusCode::NOT_FOUND
    );
    let response = theirs.patch(&as_theirs, 20, &data[20..]).await;
    assert_problem(response, StatusCode::NOT_FOUND, "upload_not_found").await;
    let response = theirs
        .request(reqwest::Method::DELETE, &as_theirs)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "upload_not_found").await;

    // Creation: a length over the limit, neither or both lengths, bad metadata or options.
    let too_big = (app.settings.ingest.max_upload_bytes + 1).to_string();
    let response = tus.create_with(&[("upload-length", &too_big)]).await;
    assert_problem(response, StatusCode::PAYLOAD_TOO_LARGE, "upload_too_large").await;
    let response = tus.create_with(&[]).await;
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
    let response = tus
        .create_with(&[("upload-length", "10"), ("upload-defer-length", "1")])
        .await;
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
    let response = tus
        .create_with(&[("upload-length", "10"), ("upload-metadata", "filename ***")])
        .await;
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
    let merge = format!("merge {}", b64(br#"{"default":"sometimes"}"#));
    let response = tus
        .create_with(&[("upload-length", "10"), ("upload-metadata", &merge)])
        .await;
    let problem = assert_problem(response, StatusCode::BAD_REQUEST, "invalid_merge_rules").await;
    assert_eq!(problem["key"], "merge.default");
    let response = app
        .client
        .post(tus.uploads())
        .bearer_auth(&tus.token)
        .header("upload-length", "10")
        .send()
        .await
        .unwrap();
    assert_problem(
        response,
        StatusCode::PRECONDITION_FAILED,
        "tus_version_unsupported",
    )
    .await;

    // After all of it, the upload goes on from where it was.
    let last = tus.patch_ok(&url, 20, &data[20..]).await;
    let source = imported_source(&app, &last).await;
    assert_eq!(source["accepted"], 2, "{source}");
}

/// A file the import refuses ends the upload `failed`: the last `PATCH` gets the refusal,
/// so does a repeat of it, and the upload's JSON keeps it.
#[tokio::test]
async fn a_file_the_import_refuses_fails_the_upload() {
    let app = TestApp::spawn().await;
    let tus = Tus::of(&app);
    let data = b"name\nAnn\n";
    let url = tus.create(data.len(), &[]).await;
    let response = tus.patch(&url, 0, data).await;
    assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_csv").await;
    let response = tus.patch(&url, data.len(), b"").await;
    assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_csv").await;
    let (_, view) = tus.json(&url).await;
    assert_eq!(view["state"], "failed", "{view}");
    assert_eq!(view["error"]["code"], "invalid_csv");
    assert_eq!(view["source_id"], Value::Null);
    assert!(app.collect(&app.dir_url("/sources")).await.is_empty());
    assert_parts_removed(&app).await;
}

#[tokio::test]
async fn termination_removes_the_bytes() {
    let app = TestApp::spawn().await;
    let tus = Tus::of(&app);
    let data = contacts_csv(100, "gone");
    let url = tus.create(data.len(), &[]).await;
    tus.patch_ok(&url, 0, &data.as_bytes()[..1000]).await;
    let response = tus
        .request(reqwest::Method::DELETE, &url)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(tus.head(&url).await.status(), StatusCode::NOT_FOUND);
    let response = tus.patch(&url, 1000, &data.as_bytes()[1000..]).await;
    assert_problem(response, StatusCode::NOT_FOUND, "upload_not_found").await;
    assert_parts_removed(&app).await;
}

/// An upload nothing comes to for `ingest.resumable_ttl` expires: `410`, its bytes removed.
#[tokio::test]
async fn an_abandoned_upload_expires() {
    let app = TestApp::spawn_with(|s| {
        s.ingest.resumable_ttl = Duration::from_secs(1);
        s.ingest.sweep_interval = Duration::from_millis(200);
    })
    .await;
    let tus = Tus::of(&app);
    let data = contacts_csv(100, "late");
    let url = tus.create(data.len(), &[]).await;
    tus.patch_ok(&url, 0, &data.as_bytes()[..1000]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(tus.head(&url).await.status(), StatusCode::GONE);
    let (status, problem) = tus.json(&url).await;
    assert_eq!(status, StatusCode::GONE);
    assert_eq!(problem["code"], "upload_expired");
    let response = tus.patch(&url, 1000, &data.as_bytes()[1000..]).await;
    assert_problem(response, StatusCode::GONE, "upload_expired").await;
    assert_parts_removed(&app).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&app.metrics().await, "orbit_resumable_expired_total").unwrap_or(0.0) < 1.0 {
        assert!(Instant::now() < deadline, "no expiry counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two `PATCH`es at the same offset at once (a client that resumed while its first request
/// still streams): the later one takes the upload over and wins; the first is refused with
/// `409` when it tries to add its bytes, and they are not kept.
#[tokio::test]
async fn of_two_patches_at_once_one_wins() {
    let app = TestApp::spawn().await;
    let tus = Tus::of(&app);
    let data = contacts_csv(200, "race");
    let bytes = data.as_bytes().to_vec();
    let url = tus.create(bytes.len(), &[]).await;

    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Bytes, std::io::Error>>();
    tx.unbounded_send(Ok(Bytes::from(bytes[..100].to_vec())))
        .unwrap();
    let slow = {
        let tus = tus.at(&tus.base);
        let url = url.clone();
        tokio::spawn(async move {
            tus.patch_with(&url, 0, reqwest::Body::wrap_stream(rx), &[])
                .await
        })
    };
    // The slow one has taken the upload over once its first bytes are written.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let winner = tus.patch_ok(&url, 0, &bytes).await;
    tx.unbounded_send(Ok(Bytes::from(bytes[100..].to_vec())))
        .unwrap();
    drop(tx);
    let loser = slow.await.unwrap();
    assert_problem(loser, StatusCode::CONFLICT, "upload_taken_over").await;
    let source = imported_source(&app, &winner).await;
    assert_eq!(source["accepted"], 200);
    assert_eq!(source["sha256"], sha256_hex(&bytes));
    assert_parts_removed(&app).await;
}

/// What a `204` acknowledged survives a gateway killed with SIGKILL mid-`PATCH`: after a
/// restart `HEAD` reports at least that, and the parts recorded during the cut-off `PATCH`
/// too; the upload goes on from there and imports the file whole.
#[tokio::test]
async fn acknowledged_bytes_survive_a_killed_gateway() {
    let data = process::data_dir().await;
    let (_, boot, _) = process::admin(data.path(), &["bootstrap"]).await;
    let (mut gateway, base) = process::serve(data.path()).await;
    let tus = Tus {
        client: reqwest::Client::new(),
        base: base.clone(),
        token: boot["token"].as_str().unwrap().to_owned(),
        org: boot["organization_id"].as_str().unwrap().to_owned(),
        dir: boot["directory_id"].as_str().unwrap().to_owned(),
    };
    const ROWS: usize = 150_000;
    let csv = contacts_csv(ROWS, "kill");
    let bytes = csv.into_bytes();
    let url = tus.create(bytes.len(), &[]).await;
    let acknowledged = 1_000_000;
    tus.patch_ok(&url, 0, &bytes[..acknowledged]).await;

    // A second PATCH streams past one part, then stalls: the gateway dies under it.
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Bytes, std::io::Error>>();
    let streamed = acknowledged + 6_000_000;
    for piece in bytes[acknowledged..streamed].chunks(64 << 10) {
        tx.unbounded_send(Ok(Bytes::from(piece.to_vec()))).unwrap();
    }
    let stalled = {
        let tus = tus.at(&base);
        let url = url.clone();
        tokio::spawn(async move {
            tus.patch_with(&url, acknowledged, reqwest::Body::wrap_stream(rx), &[])
                .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while tus.offset(&url).await == acknowledged {
        assert!(
            Instant::now() < deadline,
            "no part of the stalled PATCH was recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gateway.kill().await.unwrap();
    drop(tx);
    let _ = stalled.await;

    let (_gateway, base) = process::serve(data.path()).await;
    let tus = tus.at(&base);
    let url = url.replace(&url[..url.find("/v2/").unwrap()], &base);
    let offset = tus.offset(&url).await;
    assert!(
        offset > acknowledged && offset <= streamed,
        "HEAD after the restart says {offset}"
    );
    let last = tus.patch_ok(&url, offset, &bytes[offset..]).await;
    let location = header(&last, "orbit-source-location").unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let source = loop {
        let (_, source) = tus.json(&tus.url(&location)).await;
        if source["source_status"] == "completed" {
            break source;
        }
        assert!(Instant::now() < deadline, "{source}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(source["accepted"], ROWS);
    assert_eq!(source["sha256"], sha256_hex(&bytes));
}

/// tuspy, the tus client from PyPI, uploads a 50 MB CSV in 5 MB chunks (smaller than S3's
/// 5 MiB part minimum) with sha1 checksums, and the import completes with the right counts.
#[tokio::test]
async fn tuspy_uploads_a_file_in_chunks() {
    let app = TestApp::spawn().await;
    let tus = Tus::of(&app);
    const ROWS: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("contacts.csv");
    let mut csv = String::from("email,company,notes\n");
    let notes = "x".repeat(480);
    for i in 0..ROWS {
        csv.push_str(&format!("py{i}@example.com,Co {},{notes}\n", i % 50));
    }
    assert!(csv.len() > 50_000_000, "{}", csv.len());
    std::fs::write(&path, &csv).unwrap();
    let script = r#"
import sys
from tusclient import client
url, token, path = sys.argv[1:4]
c = client.TusClient(url, headers={"Authorization": "Bearer " + token})
u = c.uploader(path, chunk_size=5_000_000, metadata={"filename": "py.csv"}, upload_checksum=True)
u.upload()
print(u.url)
"#;
    let output = tokio::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/tuspy.sh"))
        .args(["-c", script, &tus.uploads(), &tus.token])
        .arg(&path)
        .output()
        .await
        .expect("bash runs deploy/tuspy.sh");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let url = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    let (status, view) = tus.json(&url).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["state"], "imported", "{view}");
    let source = app
        .wait_terminal(
            view["source_id"].as_str().unwrap(),
            Duration::from_secs(300),
        )
        .await;
    assert_eq!(source["source_status"], "completed", "{source}");
    assert_eq!(source["accepted"], ROWS);
    assert_eq!(source["filename"], "py.csv");
    assert_eq!(source["sha256"], sha256_hex(csv.as_bytes()));
}
