//! One trace per upload, across processes: an `orbit-gateway` and an `orbit-worker` process
//! export their spans over OTLP (HTTP/protobuf, configured only by the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT`) to a receiver in this test, on the distributed stack
//! (PostgreSQL, S3, RabbitMQ). The worker's spans must hang off the gateway's through the
//! queue, also for a chunk whose message was lost and that the reaper published again from
//! the trace context stored with the chunk. The embedded stack exports over gRPC to a second
//! receiver, through its in-process queue, and flushes on exit.

use crate::common;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use orbit_testkit::DistributedStack;
use prost::Message as _;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const GATEWAY: &str = env!("CARGO_BIN_EXE_orbit-gateway");

/// One exported span, flattened with its resource's `service.name`.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    kind: SpanKind,
    attributes: HashMap<String, String>,
}

impl Span {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

type Received = Arc<Mutex<Vec<Span>>>;

fn text(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes
        .iter()
        .filter_map(|kv| {
            let value = match kv.value.as_ref()?.value.as_ref()? {
                Any::StringValue(s) => s.clone(),
                Any::IntValue(i) => i.to_string(),
                Any::BoolValue(b) => b.to_string(),
                Any::DoubleValue(d) => d.to_string(),
                other => format!("{other:?}"),
            };
            Some((kv.key.clone(), value))
        })
        .collect()
}

/// `POST /v1/traces`, as an OpenTelemetry collector takes it: a protobuf
/// `ExportTraceServiceRequest`, answered with an (empty) `ExportTraceServiceResponse`.
async fn receive(State(received): State<Received>, body: Bytes) -> (StatusCode, Vec<u8>) {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, Vec::new());
    };
    collect(&received, request);
    (
        StatusCode::OK,
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

/// The same spans, taken from `ExportTraceServiceRequest`s however they arrived.
fn collect(received: &Received, request: ExportTraceServiceRequest) {
    let mut spans = received.lock().unwrap();
    for resource_spans in request.resource_spans {
        let resource = resource_spans
            .resource
            .map(|r| text(&r.attributes))
            .unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                spans.push(Span {
                    service: service.clone(),
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent_span_id: hex::encode(&span.parent_span_id),
                    kind: SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified),
                    attributes: text(&span.attributes),
                    name: span.name,
                });
            }
        }
    }
}

/// An OTLP/gRPC receiver: the collector's `TraceService` over HTTP/2.
struct GrpcReceiver(Received);

#[tonic::async_trait]
impl TraceService for GrpcReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        collect(&self.0, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn grpc_receiver() -> (String, Received) {
    let received = Received::default();
    let service = TraceServiceServer::new(GrpcReceiver(received.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = service.clone();
            tokio::spawn(async move {
                let call = hyper::service::service_fn(move |request| {
                    let mut service = service.clone();
                    async move { tower::Service::call(&mut service, request).await }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), call)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), received)
}

async fn otlp_receiver() -> (String, Received) {
    let received = Received::default();
    let app = Router::new()
        .route("/v1/traces", post(receive))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), received)
}

/// The settings both processes share: the stack, JSON logs, small chunks, a quick reaper,
/// and the exporter set up the standard way, through `OTEL_*` variables only.
fn env(stack: &DistributedStack, otlp: &str) -> Vec<(String, String)> {
    let mut env = stack.env();
    for (key, value) in [
        ("ORBIT__TELEMETRY__LOG_FORMAT", "json"),
        ("ORBIT__INGEST__SYNC_ROWS", "10"),
        ("ORBIT__INGEST__CHUNK_ROWS", "20"),
        ("ORBIT__WORKER__REAP_INTERVAL", "200ms"),
        ("ORBIT__WORKER__REQUEUE_AFTER", "3s"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("RUST_LOG", "info"),
    ] {
        env.push((key.into(), value.into()));
    }
    env
}

fn command(binary: &std::path::Path, env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(binary);
    cmd.env_remove("ORBIT_CONFIG")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_RESOURCE_ATTRIBUTES")
        .env_remove("OTEL_TRACES_SAMPLER")
        .env_remove("OTEL_SDK_DISABLED")
        .envs(env.iter().cloned())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// A process whose JSON log lines are collected as they come.
struct Process {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Process {
    /// Starts `cmd` and waits for a log line with `message`; returns it too.
    async fn start(mut cmd: Command, message: &str) -> (Self, Value) {
        let mut child = cmd.spawn().expect("starts");
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let deadline = Instant::now() + Duration::from_secs(60);
        let found = loop {
            let line = tokio::time::timeout_at(deadline.into(), stderr.next_line())
                .await
                .unwrap_or_else(|_| panic!("no {message:?} within 60s"))
                .expect("stderr readable")
                .unwrap_or_else(|| panic!("exited before {message:?}"));
            let event: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            lines.lock().unwrap().push(event.clone());
            if event["fields"]["message"] == message {
                break event;
            }
        };
        let sink = lines.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                if let Ok(event) = serde_json::from_str(&line) {
                    sink.lock().unwrap().push(event);
                }
            }
        });
        (Process { child, lines }, found)
    }

    fn logged(&self, message: &str) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["fields"]["message"] == message)
            .cloned()
            .collect()
    }

    /// SIGTERM, then the exit: the process flushes its last spans on the way out.
    async fn stop(mut self) {
        let pid = self.child.id().expect("running").to_string();
        assert!(std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let exit = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("exits within 60s after SIGTERM")
            .unwrap();
        assert!(exit.success(), "{exit:?}");
    }
}

async fn run(binary: &str, env: &[(String, String)], args: &[&str]) -> String {
    let out = command(std::path::Path::new(binary), env)
        .args(args)
        .output()
        .await
        .expect("runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Upload {
    request_id: &'static str,
    source_id: String,
}

async fn upload(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    request_id: &'static str,
) -> Upload {
    // 10 rows in the request, then 40 in two chunks of 20 for the worker.
    let response = client
        .post(url)
        .bearer_auth(token)
        .header("x-request-id", request_id)
        .multipart(common::file_form(common::contacts_csv(50, request_id)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();
    Upload {
        request_id,
        source_id: body["source_id"].as_str().unwrap().to_owned(),
    }
}

async fn wait_completed(client: &reqwest::Client, url: &str, token: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body: Value = client
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if body["source_status"] == "completed" {
            return;
        }
        assert!(Instant::now() < deadline, "not completed in 60s: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What one upload's trace must hold; returns the publish spans the worker's chunks hang off.
fn check_trace(spans: &[Span], upload: &Upload, worker: &str) -> Result<Vec<Span>, String> {
    let request = spans
        .iter()
        .find(|s| s.name.starts_with("POST ") && s.attr("request_id") == Some(upload.request_id))
        .ok_or("no request span yet")?;
    let trace = &request.trace_id;
    let in_trace: Vec<&Span> = spans.iter().filter(|s| &s.trace_id == trace).collect();
    let child_of = |parent: &Span, name: &str| -> Vec<&Span> {
        in_trace
            .iter()
            .copied()
            .filter(|s| s.parent_span_id == parent.span_id && s.name == name)
            .collect()
    };
    for name in ["upload.object_write", "upload.plan", "upload.commit"] {
        if child_of(request, name).is_empty() {
            return Err(format!("no {name} under the request span"));
        }
    }
    // Both chunks, each processed once to the end by the worker in this trace.
    let chunks: Vec<&Span> = in_trace
        .iter()
        .copied()
        .filter(|s| {
            s.name == "chunk"
                && s.service == worker
                && s.attr("orbit.source_id") == Some(upload.source_id.as_str())
                && child_of(s, "chunk.commit")
                    .iter()
                    .any(|c| c.attr("orbit.commit") == Some("done"))
        })
        .collect();
    let mut ids: Vec<_> = chunks
        .iter()
        .filter_map(|c| c.attr("orbit.chunk_id"))
        .collect();
    ids.sort();
    ids.dedup();
    if ids.len() != 2 {
        return Err(format!("{} of 2 chunks committed in the trace", ids.len()));
    }
    let mut publishers = Vec::new();
    for chunk in chunks {
        if chunk.kind != SpanKind::Consumer {
            return Err(format!("chunk span of kind {:?}", chunk.kind));
        }
        for name in [
            "chunk.claim",
            "chunk.read",
            "chunk.validate",
            "chunk.commit",
        ] {
            if child_of(chunk, name).is_empty() {
                return Err(format!("no {name} under a chunk span"));
            }
        }
        // Parented through the queue: the span that published the message it came in.
        let publish = in_trace
            .iter()
            .find(|s| s.span_id == chunk.parent_span_id)
            .ok_or("the chunk's parent span is not in the trace (yet)")?;
        if publish.name != "chunk.publish"
            || publish.kind != SpanKind::Producer
            || publish.attr("orbit.chunk_id") != chunk.attr("orbit.chunk_id")
            || publish.parent_span_id != request.span_id
        {
            return Err(format!("unexpected publish span {publish:?}"));
        }
        publishers.push((*publish).clone());
    }
    Ok(publishers)
}

async fn trace_of(received: &Received, upload: &Upload, worker: &str) -> Vec<Span> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans = received.lock().unwrap().clone();
        match check_trace(&spans, upload, worker) {
            Ok(publishers) => return publishers,
            Err(why) if Instant::now() > deadline => {
                panic!("trace of {}: {why}\n{spans:#?}", upload.request_id)
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_is_one_trace_across_gateway_queue_and_worker_even_after_a_republish() {
    let (otlp, received) = otlp_receiver().await;
    let stack = DistributedStack::create().await;
    let env = env(&stack, &otlp);
    run(GATEWAY, &env, &["migrate"]).await;
    let tenant: Value = serde_json::from_str(&run(GATEWAY, &env, &["admin", "bootstrap"]).await)
        .expect("bootstrap prints JSON");
    let (org, dir, token) = (
        tenant["organization_id"].as_str().unwrap(),
        tenant["directory_id"].as_str().unwrap(),
        tenant["token"].as_str().unwrap(),
    );
    let mut gateway_cmd = command(std::path::Path::new(GATEWAY), &env);
    gateway_cmd.env("ORBIT__HTTP__LISTEN", "127.0.0.1:0");
    let (gateway, listening) = Process::start(gateway_cmd, "Orbit is listening").await;
    let base = listening["fields"]["url"].as_str().unwrap().to_owned();
    let api = format!("{base}/v2/organizations/{org}/directories/{dir}");
    let client = reqwest::Client::new();

    // Lost messages: uploaded while no worker runs, then purged from the queue. The chunks
    // are still open in the database; the worker's reaper publishes them again.
    let lost = upload(
        &client,
        &format!("{api}/sources/csv-upload"),
        token,
        "lost-messages",
    )
    .await;
    let conn = lapin::Connection::connect(&stack.queue.url, lapin::ConnectionProperties::default())
        .await
        .expect("rabbitmq");
    let channel = conn.create_channel().await.unwrap();
    let purged = channel
        .queue_purge(
            stack.queue.name.as_str().into(),
            lapin::options::QueuePurgeOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(purged, 2, "both chunks' messages were waiting");
    let _ = conn.close(200, "OK".into()).await;

    let (worker, _) = Process::start(
        command(&common::worker_binary(), &env),
        "orbit-worker consuming",
    )
    .await;
    wait_completed(&client, &format!("{api}/sources/{}", lost.source_id), token).await;
    // A plain upload, with the worker running.
    let plain = upload(
        &client,
        &format!("{api}/sources/csv-upload"),
        token,
        "plain",
    )
    .await;
    wait_completed(
        &client,
        &format!("{api}/sources/{}", plain.source_id),
        token,
    )
    .await;

    let publishers = trace_of(&received, &plain, "orbit-worker").await;
    for publish in &publishers {
        assert_eq!(publish.service, "orbit-gateway", "{publish:?}");
        assert_eq!(publish.attr("orbit.publish_reason"), Some("upload"));
        assert_eq!(publish.attr("messaging.system"), Some("rabbitmq"));
    }
    // The reaper published the lost chunks again, as a child of the upload's request span
    // read back from the chunks' rows: the worker's spans are still in the upload's trace.
    let publishers = trace_of(&received, &lost, "orbit-worker").await;
    for publish in &publishers {
        assert_eq!(
            publish.attr("orbit.publish_reason"),
            Some("reaper"),
            "{publish:?}"
        );
    }

    let spans = received.lock().unwrap().clone();
    let request = spans
        .iter()
        .find(|s| s.attr("request_id") == Some("plain"))
        .unwrap();
    assert_eq!(request.service, "orbit-gateway");
    assert_eq!(request.kind, SpanKind::Server);
    assert_eq!(
        request.name,
        "POST /v2/organizations/{org}/directories/{dir}/sources/csv-upload"
    );
    assert_eq!(request.attr("http.response.status_code"), Some("202"));
    assert_eq!(
        request.attr("http.route"),
        Some("/v2/organizations/{org}/directories/{dir}/sources/csv-upload")
    );
    assert!(
        request.parent_span_id.is_empty(),
        "a root span: {request:?}"
    );
    // No secret rides along in any attribute.
    let password = stack.bucket.secret_key.as_str();
    for span in &spans {
        for value in span.attributes.values() {
            assert!(
                !value.contains(password) && !value.contains(token),
                "{span:?}"
            );
        }
    }

    // Log lines written inside a span carry its trace and span ids.
    let recorded = gateway
        .logged("upload recorded")
        .into_iter()
        .find(|e| e["span"]["request_id"] == "plain")
        .expect("the upload's log line");
    assert_eq!(
        recorded["trace_id"],
        request.trace_id.as_str(),
        "{recorded}"
    );
    assert_eq!(recorded["span_id"], request.span_id.as_str(), "{recorded}");
    let done = worker.logged("chunk done");
    let in_plain: Vec<_> = done
        .iter()
        .filter(|e| e["trace_id"] == request.trace_id.as_str())
        .collect();
    assert_eq!(in_plain.len(), 2, "{done:#?}");
    for line in in_plain {
        let span_id = line["span_id"].as_str().unwrap();
        assert!(
            spans
                .iter()
                .any(|s| s.span_id == span_id && s.name == "chunk"),
            "{line}"
        );
    }

    worker.stop().await;
    gateway.stop().await;
}

/// The embedded stack, exporting over gRPC: the chunks go through the in-process queue with
/// their trace context all the same. The batch exporter is set to wait ten minutes, so the
/// spans can only arrive through the flush at shutdown; `OTEL_SERVICE_NAME` names the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_stack_traces_over_grpc_through_its_in_process_queue_and_flushes_on_exit() {
    let (otlp, received) = grpc_receiver().await;
    let data = tempfile::tempdir().unwrap();
    let mut env: Vec<(String, String)> = vec![
        (
            "ORBIT__DATABASE__URL".into(),
            format!("sqlite://{}/orbit.db", data.path().display()),
        ),
        (
            "ORBIT__OBJECT_STORE__URL".into(),
            format!("file://{}/objects", data.path().display()),
        ),
    ];
    for (key, value) in [
        ("ORBIT__TELEMETRY__LOG_FORMAT", "json"),
        ("ORBIT__INGEST__SYNC_ROWS", "10"),
        ("ORBIT__INGEST__CHUNK_ROWS", "20"),
        ("ORBIT__HTTP__LISTEN", "127.0.0.1:0"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
        ("OTEL_SERVICE_NAME", "orbit-edge"),
        ("RUST_LOG", "info"),
    ] {
        env.push((key.into(), value.into()));
    }
    // Admin commands do not create the database; the gateway (or `migrate`) does.
    run(GATEWAY, &env, &["migrate"]).await;
    let tenant: Value = serde_json::from_str(&run(GATEWAY, &env, &["admin", "bootstrap"]).await)
        .expect("bootstrap prints JSON");
    let (org, dir, token) = (
        tenant["organization_id"].as_str().unwrap(),
        tenant["directory_id"].as_str().unwrap(),
        tenant["token"].as_str().unwrap(),
    );
    let (gateway, listening) = Process::start(
        command(std::path::Path::new(GATEWAY), &env),
        "Orbit is listening",
    )
    .await;
    let base = listening["fields"]["url"].as_str().unwrap().to_owned();
    let api = format!("{base}/v2/organizations/{org}/directories/{dir}");
    let client = reqwest::Client::new();
    let embedded = upload(
        &client,
        &format!("{api}/sources/csv-upload"),
        token,
        "embedded",
    )
    .await;
    wait_completed(
        &client,
        &format!("{api}/sources/{}", embedded.source_id),
        token,
    )
    .await;
    assert!(
        received.lock().unwrap().is_empty(),
        "nothing is exported before the batch delay or the exit"
    );
    gateway.stop().await;
    let publishers = trace_of(&received, &embedded, "orbit-edge").await;
    for publish in &publishers {
        assert_eq!(publish.service, "orbit-edge");
        assert_eq!(publish.attr("messaging.system"), Some("embedded"));
    }
}
