//! The HTTP side: one `reqwest` client, bearer auth, problem+json errors, and reads that retry.

use std::future::Future;
use std::time::{Duration, Instant};

use reqwest::{Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::config::Connection;
use crate::exit::{ClientError, Problem, Result};
use crate::retry::{self, Policy};

/// A source as the status endpoint reports it (the fields the client uses; the rest is kept).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceStatus {
    pub source_id: Uuid,
    pub source_status: String,
    #[serde(default)]
    pub accepted: u64,
    #[serde(default)]
    pub failed: u64,
    #[serde(default)]
    pub warnings: u64,
    #[serde(default)]
    pub total_rows: u64,
    #[serde(default)]
    pub processed_rows: u64,
    #[serde(default)]
    pub error: Option<SourceError>,
    /// Present while the source waits out transient trouble on the server's side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retrying: Option<Retrying>,
    #[serde(flatten)]
    pub rest: serde_json::Map<String, Value>,
}

/// Since when a source has been retrying, and what its last attempt said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retrying {
    pub since: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceError {
    pub code: String,
    pub message: String,
}

impl SourceStatus {
    pub fn is_terminal(&self) -> bool {
        matches!(self.source_status.as_str(), "completed" | "failed")
    }
}

/// The `csv-upload` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadBody {
    pub source_id: Uuid,
    pub directory_id: Uuid,
    pub source_status: String,
    pub accepted: u64,
    pub failed: u64,
    pub warnings: u64,
    pub is_idempotent: bool,
}

#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub conn: Connection,
    pub policy: Policy,
}

impl Api {
    pub fn new(conn: Connection, policy: Policy, connect_timeout: Duration) -> Result<Self> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("orbit-client/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(connect_timeout)
            .build()
            .map_err(|e| ClientError::Usage(format!("cannot set up HTTP: {e}")))?;
        Ok(Api { http, conn, policy })
    }

    pub fn org_url(&self, rest: &str) -> String {
        format!("{}/v2/organizations/{}{rest}", self.conn.url, self.conn.org)
    }

    pub fn dir_url(&self, dir: Uuid, rest: &str) -> String {
        self.org_url(&format!("/directories/{dir}{rest}"))
    }

    pub fn get(&self, url: &str) -> reqwest::RequestBuilder {
        self.http.get(url).bearer_auth(&self.conn.token)
    }

    /// Runs `attempt` until it succeeds, fails for good, or runs out of retries; waits out
    /// [`Attempt::InFlight`] without using retries. `on_retry` hears about each wait, so
    /// progress output can say why nothing moves.
    pub async fn retrying<T, F, Fut>(&self, mut attempt: F, on_retry: impl Fn(&str)) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Attempt<T>>,
    {
        let mut retry = 0;
        let in_flight_deadline = Instant::now() + self.policy.in_flight_wait;
        loop {
            let (why, after) = match attempt().await {
                Attempt::Done(value) => return Ok(value),
                Attempt::Fatal(e) => return Err(e),
                Attempt::Transient { why, retry_after } => (why, retry_after),
                Attempt::InFlight { retry_after } => {
                    if Instant::now() >= in_flight_deadline {
                        return Err(ClientError::Network(format!(
                            "the same upload was still in flight on the server after {}",
                            humantime::format_duration(self.policy.in_flight_wait)
                        )));
                    }
                    let wait = retry_after
                        .unwrap_or(Duration::from_secs(1))
                        .min(self.policy.cap);
                    on_retry(&format!(
                        "the same upload is still in flight on the server (409 idempotency_key_in_use); waiting {}",
                        humantime::format_duration(wait)
                    ));
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            retry += 1;
            if retry > self.policy.retries {
                return Err(ClientError::Network(format!(
                    "{why} (gave up after {} retries)",
                    self.policy.retries
                )));
            }
            let wait = self.policy.wait(retry, after);
            on_retry(&format!(
                "{why}; retry {retry}/{} in {}",
                self.policy.retries,
                humantime::format_duration(Duration::from_millis(wait.as_millis() as u64))
            ));
            tokio::time::sleep(wait).await;
        }
    }

    /// A GET whose JSON answer is `T`, retried on transient failures.
    pub async fn get_json<T: DeserializeOwned>(&self, url: &str) -> Result<T> {
        self.retrying(
            move || async move {
                match self.get(url).send().await {
                    Ok(response) => json_attempt(response).await,
                    Err(e) => Attempt::transient(transport_error(&e), None),
                }
            },
            |_| {},
        )
        .await
    }

    /// Every item of a cursor-paginated list, up to `limit`, handed to `each` page by page.
    pub async fn for_each_item(
        &self,
        url: &str,
        limit: Option<usize>,
        mut each: impl FnMut(Value) -> Result<()>,
    ) -> Result<usize> {
        let mut seen = 0usize;
        let mut cursor: Option<String> = None;
        loop {
            let page_size = limit.map_or(1000, |l| (l - seen).clamp(1, 1000));
            let sep = if url.contains('?') { '&' } else { '?' };
            let mut page_url = format!("{url}{sep}limit={page_size}");
            if let Some(c) = &cursor {
                page_url.push_str(&format!("&cursor={c}"));
            }
            let page: Page = self.get_json(&page_url).await?;
            for item in page.data {
                if limit.is_some_and(|l| seen >= l) {
                    return Ok(seen);
                }
                each(item)?;
                seen += 1;
            }
            match page.next_cursor {
                Some(next) if limit.is_none_or(|l| seen < l) => cursor = Some(next),
                _ => return Ok(seen),
            }
        }
    }

    pub async fn source(&self, dir: Uuid, source: Uuid) -> Result<SourceStatus> {
        self.get_json(&self.dir_url(dir, &format!("/sources/{source}")))
            .await
    }
}

#[derive(Deserialize)]
struct Page {
    data: Vec<Value>,
    next_cursor: Option<String>,
}

/// One try's outcome, for [`Api::retrying`].
pub enum Attempt<T> {
    Done(T),
    Transient {
        why: String,
        retry_after: Option<Duration>,
    },
    /// `409 idempotency_key_in_use`: our own earlier attempt is still being processed.
    InFlight {
        retry_after: Option<Duration>,
    },
    Fatal(ClientError),
}

impl<T> Attempt<T> {
    pub fn transient(why: impl Into<String>, retry_after: Option<Duration>) -> Self {
        Attempt::Transient {
            why: why.into(),
            retry_after,
        }
    }
}

/// A 2xx parsed as `T`; a transient status to retry; any other status as its problem.
pub async fn json_attempt<T: DeserializeOwned>(response: Response) -> Attempt<T> {
    let status = response.status();
    if status.is_success() {
        return match response.json::<T>().await {
            Ok(value) => Attempt::Done(value),
            Err(e) => Attempt::transient(format!("the answer broke off: {e}"), None),
        };
    }
    let after = retry::retry_after(response.headers());
    let problem = problem(response).await;
    if problem.status == 409 && problem.code == "idempotency_key_in_use" {
        Attempt::InFlight { retry_after: after }
    } else if retry::transient_status(status.as_u16()) {
        Attempt::transient(problem.to_string(), after)
    } else {
        Attempt::Fatal(ClientError::Api(problem))
    }
}

/// The problem+json body of an error answer, or a stand-in when it is something else.
pub async fn problem(response: Response) -> Problem {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    #[derive(Deserialize)]
    struct Body {
        code: Option<String>,
        detail: Option<String>,
        title: Option<String>,
    }
    let parsed: Option<Body> = serde_json::from_str(&text).ok();
    let fallback_code = match status {
        StatusCode::UNAUTHORIZED => "unauthenticated",
        s if s.is_server_error() => "server_error",
        _ => "http_error",
    };
    Problem {
        status: status.as_u16(),
        code: parsed
            .as_ref()
            .and_then(|b| b.code.clone())
            .unwrap_or_else(|| fallback_code.to_owned()),
        detail: parsed
            .and_then(|b| b.detail.or(b.title))
            .unwrap_or_else(|| text.chars().take(200).collect()),
    }
}

/// A transport failure in words a user can act on.
pub fn transport_error(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut message = if e.is_connect() {
        "cannot connect".to_owned()
    } else if e.is_timeout() {
        "timed out".to_owned()
    } else {
        "the connection failed".to_owned()
    };
    let mut source = e.source();
    while let Some(inner) = source {
        message.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    message
}
