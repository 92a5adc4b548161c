//! Logs and traces: `tracing` to stderr as text or JSON, filtered by `RUST_LOG`, and, when an
//! OTLP endpoint is configured, the same spans exported as OpenTelemetry traces.
//!
//! Every line goes through [`orbit_core::redact`] on its way out, whichever crate logged it, so a
//! URL with a password in an error message never reaches the log. In JSON mode every line on
//! stderr is one JSON object, including a fatal start-up error ([`report_fatal`]), and a line
//! written inside a traced span carries its `trace_id` and `span_id`. Colour codes are written
//! only when stderr is a terminal.
//!
//! Traces ([`init`] with a service name): the endpoint, protocol, service name and sampler come
//! from `telemetry.*` when set there, else from the standard `OTEL_*` variables, read by the
//! OpenTelemetry SDK itself. Nothing is exported (and no span is built for OpenTelemetry)
//! unless an endpoint is configured one way or the other. [`shutdown`] flushes what is queued.
//! The W3C trace context crosses the queue in [`ChunkRef`]: [`inject_current`] on the way in,
//! [`set_parent`] on the way out.

use std::collections::HashMap;
use std::io::{IsTerminal as _, Write};
use std::sync::{Mutex, OnceLock};

use anyhow::Context as _;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, MakeWriter};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

use orbit_config::{LogFormat, OtlpProtocol, TelemetrySettings};
use orbit_core::model::ChunkRef;

/// The format of the subscriber this process installed, if any.
static FORMAT: OnceLock<LogFormat> = OnceLock::new();
/// The tracer provider, kept to flush it on the way out.
static PROVIDER: Mutex<Option<SdkTracerProvider>> = Mutex::new(None);

/// Installs the log subscriber; with `service` (the binary's name, the default `service.name`)
/// also the trace exporter, if one is configured. Tests start several services in one
/// process: the first subscriber wins, and later calls only check their settings.
pub fn init(settings: &TelemetrySettings, service: Option<&str>) -> anyhow::Result<()> {
    let export = match service {
        Some(service) => ExportPlan::resolve(settings, service, &|name| std::env::var(name).ok())?,
        None => None,
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let ansi = std::io::stderr().is_terminal();
    let logs = match settings.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .event_format(WithTraceIds(Format::default().json()))
            .with_writer(RedactingStderr)
            .with_ansi(false)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(RedactingStderr)
            .with_ansi(ansi)
            .with_filter(filter)
            .boxed(),
    };
    let registry = tracing_subscriber::registry().with(logs);
    let result = match export {
        Some(plan) => {
            // Built inside the runtime: the gRPC channel needs one.
            let provider = plan.build()?;
            let tracer = provider.tracer("orbit");
            let traces = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(orbit_spans());
            let installed = registry.with(traces).try_init();
            if installed.is_ok() {
                *PROVIDER.lock().unwrap_or_else(|e| e.into_inner()) = Some(provider);
            } else {
                let _ = provider.shutdown();
            }
            installed
        }
        None => registry.try_init(),
    };
    if result.is_ok() {
        let _ = FORMAT.set(settings.log_format);
    }
    Ok(())
}

/// Sends the spans still queued and stops the exporter; waits at most the exporter's timeout.
/// Blocking: call it from a thread that may block (`spawn_blocking`) or after the runtime.
pub fn shutdown() {
    let provider = PROVIDER.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(provider) = provider {
        if let Err(e) = provider.shutdown() {
            tracing::warn!(error = %e, "could not flush the last spans");
        }
    }
}

/// Whether trace export is running in this process.
pub fn tracing_enabled() -> bool {
    PROVIDER.lock().unwrap_or_else(|e| e.into_inner()).is_some()
}

/// Only Orbit's own spans (and the events inside them) become OpenTelemetry spans, at `INFO`
/// and above, whatever `RUST_LOG` says: quieting the logs does not cut the traces. (A target
/// matches by prefix: `orbit` covers `orbit_gateway`, `orbit_worker`, `orbit_store`.)
fn orbit_spans() -> Targets {
    Targets::new().with_target("orbit", tracing::Level::INFO)
}

/// Where and how to export, resolved once at start.
#[derive(Debug, PartialEq)]
struct ExportPlan {
    protocol: OtlpProtocol,
    /// Set only from `telemetry.otlp_endpoint` (as the full URL the exporter takes); otherwise
    /// the exporter reads `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`.
    endpoint: Option<String>,
    /// The endpoint in force, only to tell whether gRPC needs TLS.
    https: bool,
    /// `None`: the SDK reads `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` itself.
    sampling_ratio: Option<f64>,
    /// `None`: `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` name the service.
    service_name: Option<String>,
}

impl ExportPlan {
    /// `None` when nothing is to be exported: no endpoint anywhere, `OTEL_SDK_DISABLED=true` or
    /// `OTEL_TRACES_EXPORTER=none`.
    fn resolve(
        settings: &TelemetrySettings,
        service: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Option<Self>> {
        let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let exporter = var("OTEL_TRACES_EXPORTER").map(|v| v.trim().to_ascii_lowercase());
        match exporter.as_deref() {
            Some("none") => return Ok(None),
            None | Some("otlp") => {}
            Some(other) => anyhow::bail!(
                "OTEL_TRACES_EXPORTER={other:?}: Orbit exports traces with OTLP only (otlp or none)"
            ),
        }
        let env_endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
        let configured = settings.otlp_endpoint.as_ref().or(env_endpoint.as_ref());
        // The SDKs' default is to export to localhost; Orbit exports only when asked to.
        if configured.is_none() && exporter.is_none() {
            return Ok(None);
        }
        let protocol = match settings.otlp_protocol {
            Some(protocol) => protocol,
            None => match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            {
                None => OtlpProtocol::HttpProtobuf,
                Some(name) => OtlpProtocol::parse(&name).with_context(|| {
                    format!("OTLP protocol {name:?}: Orbit speaks grpc or http/protobuf")
                })?,
            },
        };
        let endpoint = settings.otlp_endpoint.as_ref().map(|base| match protocol {
            OtlpProtocol::Grpc => base.clone(),
            OtlpProtocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
        });
        let https = configured.is_some_and(|e| e.trim().to_ascii_lowercase().starts_with("https:"));
        let named_by_env = var("OTEL_SERVICE_NAME").is_some()
            || var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attrs| {
                attrs
                    .split(',')
                    .any(|pair| pair.split('=').next().map(str::trim) == Some("service.name"))
            });
        let service_name = match &settings.service_name {
            Some(name) => Some(name.clone()),
            None if named_by_env => None,
            None => Some(service.to_owned()),
        };
        Ok(Some(ExportPlan {
            protocol,
            endpoint,
            https,
            sampling_ratio: settings.sampling_ratio,
            service_name,
        }))
    }

    fn build(self) -> anyhow::Result<SdkTracerProvider> {
        let exporter = match self.protocol {
            OtlpProtocol::HttpProtobuf => {
                let mut builder = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
                if let Some(endpoint) = &self.endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                builder.build()
            }
            OtlpProtocol::Grpc => {
                let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
                if let Some(endpoint) = &self.endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                if self.https {
                    // The system's roots, as for every other TLS connection Orbit makes.
                    builder = builder.with_tls_config(
                        opentelemetry_otlp::tonic_types::transport::ClientTlsConfig::new()
                            .with_native_roots(),
                    );
                }
                builder.build()
            }
        }
        .context("setting up the OTLP trace exporter")?;
        let mut resource = Resource::builder()
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
        if let Some(name) = self.service_name {
            resource = resource.with_service_name(name);
        }
        let mut provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build());
        if let Some(ratio) = self.sampling_ratio {
            provider = provider.with_sampler(Sampler::ParentBased(Box::new(
                Sampler::TraceIdRatioBased(ratio),
            )));
        }
        Ok(provider.build())
    }
}

/// The W3C trace context (`traceparent`, `tracestate`) of `span`, when it is traced.
pub fn trace_context_of(span: &tracing::Span) -> (Option<String>, Option<String>) {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return (None, None);
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    let traceparent = carrier.remove("traceparent");
    let tracestate = carrier.remove("tracestate").filter(|s| !s.is_empty());
    (traceparent, tracestate)
}

/// Stamps `message` with the current span's trace context, so the worker that takes it
/// continues this trace. Leaves the message's own context when this process does not trace.
pub fn inject_current(message: &mut ChunkRef) {
    if let (Some(traceparent), tracestate) = trace_context_of(&tracing::Span::current()) {
        message.traceparent = Some(traceparent);
        message.tracestate = tracestate;
    }
}

/// Makes `span` a child of the remote span described by a W3C `traceparent` (and
/// `tracestate`); does nothing when there is none, it does not parse, or this process does not
/// trace. Call it before anything is logged in `span`.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    let Some(traceparent) = traceparent else {
        return;
    };
    let mut carrier = HashMap::new();
    carrier.insert("traceparent".to_owned(), traceparent.to_owned());
    if let Some(state) = tracestate {
        carrier.insert("tracestate".to_owned(), state.to_owned());
    }
    let context = TraceContextPropagator::new().extract(&carrier);
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

/// Sets an attribute on `span`'s OpenTelemetry span only, leaving its log fields alone.
pub fn set_attribute(
    span: &tracing::Span,
    key: &'static str,
    value: impl Into<opentelemetry::Value>,
) {
    span.set_attribute(key, value);
}

/// Marks `span` as failed, with `message` (which must hold no secret) as the status.
pub fn record_error(span: &tracing::Span, message: &str) {
    span.set_status(opentelemetry::trace::Status::error(
        orbit_core::redact::redact(message).into_owned(),
    ));
}

/// The JSON event format, plus the `trace_id` and `span_id` of the span the event was written
/// in when that span is traced, so a log line leads to its trace.
struct WithTraceIds(Format<Json>);

impl<S, N> FormatEvent<S, N> for WithTraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    Format<Json>: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let context = tracing::Span::current().context();
        let span = context.span();
        let ids = span.span_context();
        if ids.is_valid() {
            // The line is one JSON object: add the two fields before its closing brace.
            if let Some(end) = line.rfind('}') {
                line.insert_str(
                    end,
                    &format!(
                        ",\"trace_id\":\"{}\",\"span_id\":\"{}\"",
                        ids.trace_id(),
                        ids.span_id()
                    ),
                );
            }
        }
        writer.write_str(&line)
    }
}

/// Whether this process logs JSON, so that whatever else it writes to stderr must be JSON too.
pub fn json_logs() -> bool {
    FORMAT.get() == Some(&LogFormat::Json)
}

/// Reports the error a command exits with: a log event in JSON mode, else a plain line
/// `{command}: {error}`; redacted either way.
///
/// An error before logging was set up (the configuration did not load) still honours
/// `ORBIT__TELEMETRY__LOG_FORMAT=json`, where every line must be JSON.
pub fn report_fatal(command: &str, error: &anyhow::Error) {
    let json_asked = std::env::var("ORBIT__TELEMETRY__LOG_FORMAT")
        .is_ok_and(|v| v.trim().eq_ignore_ascii_case("json"));
    if FORMAT.get().is_none() && json_asked {
        let mut settings = orbit_config::Settings::defaults().telemetry;
        settings.log_format = orbit_config::LogFormat::Json;
        // No service: nothing is exported, only the line below is logged.
        let _ = init(&settings, None);
    }
    let message = format!("{error:#}");
    let message = orbit_core::redact::redact(&message);
    if json_logs() {
        tracing::error!(command, error = %message, "{command} failed");
    } else {
        eprintln!("{command}: {message}");
    }
}

/// Stderr, with every line redacted on the way out.
struct RedactingStderr;

impl<'a> MakeWriter<'a> for RedactingStderr {
    type Writer = RedactingWriter;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter
    }
}

struct RedactingWriter;

impl Write for RedactingWriter {
    // The formatter hands over each event whole, so a URL is never split across two calls.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut stderr = std::io::stderr().lock();
        match std::str::from_utf8(buf) {
            Ok(text) => stderr.write_all(orbit_core::redact::redact(text).as_bytes())?,
            Err(_) => stderr.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> TelemetrySettings {
        TelemetrySettings {
            otlp_endpoint: None,
            otlp_protocol: None,
            service_name: None,
            sampling_ratio: None,
            log_format: LogFormat::Text,
            gauges_refresh: std::time::Duration::from_secs(10),
        }
    }

    fn resolve(
        settings: &TelemetrySettings,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Option<ExportPlan>> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ExportPlan::resolve(settings, "orbit-worker", &|name| env.get(name).cloned())
    }

    #[test]
    fn nothing_is_exported_without_an_endpoint() {
        assert_eq!(resolve(&settings(), &[]).unwrap(), None);
        assert_eq!(
            resolve(
                &settings(),
                &[
                    ("OTEL_SERVICE_NAME", "x"),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
                ]
            )
            .unwrap(),
            None
        );
    }

    #[test]
    fn the_standard_variables_apply_when_orbit_sets_nothing() {
        let plan = resolve(
            &settings(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_SERVICE_NAME", "ingest-worker"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(plan.protocol, OtlpProtocol::Grpc);
        // Left to the exporter, which reads the variable (and appends nothing for gRPC).
        assert_eq!(plan.endpoint, None);
        assert!(plan.https);
        assert_eq!(plan.service_name, None);
        assert_eq!(plan.sampling_ratio, None);
        let plan = resolve(
            &settings(),
            &[(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://c:4318/v1/traces",
            )],
        )
        .unwrap()
        .unwrap();
        assert_eq!(plan.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(plan.service_name.as_deref(), Some("orbit-worker"));
        let named = resolve(
            &settings(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_RESOURCE_ATTRIBUTES", "team=a,service.name=w"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(named.service_name, None);
    }

    #[test]
    fn orbit_settings_win_over_the_variables() {
        let mut s = settings();
        s.otlp_endpoint = Some("http://collector:4318/".into());
        s.otlp_protocol = Some(OtlpProtocol::HttpProtobuf);
        s.service_name = Some("orbit-eu".into());
        s.sampling_ratio = Some(0.1);
        let plan = resolve(
            &s,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://elsewhere:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_SERVICE_NAME", "other"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            plan.endpoint.as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(plan.protocol, OtlpProtocol::HttpProtobuf);
        assert!(!plan.https);
        assert_eq!(plan.service_name.as_deref(), Some("orbit-eu"));
        assert_eq!(plan.sampling_ratio, Some(0.1));
        s.otlp_protocol = Some(OtlpProtocol::Grpc);
        let plan = resolve(&s, &[]).unwrap().unwrap();
        assert_eq!(plan.endpoint.as_deref(), Some("http://collector:4318/"));
    }

    #[test]
    fn export_can_be_switched_off_or_refused() {
        let mut s = settings();
        s.otlp_endpoint = Some("http://collector:4318".into());
        assert_eq!(resolve(&s, &[("OTEL_SDK_DISABLED", "true")]).unwrap(), None);
        assert_eq!(
            resolve(&s, &[("OTEL_TRACES_EXPORTER", "none")]).unwrap(),
            None
        );
        let err = resolve(&s, &[("OTEL_TRACES_EXPORTER", "zipkin")]).unwrap_err();
        assert!(err.to_string().contains("OTLP only"), "{err}");
        let err = resolve(
            &settings(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ],
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("grpc or http/protobuf"),
            "{err:#}"
        );
        // Asking for OTLP by name exports to the SDK's default endpoint, as any SDK would.
        let plan = resolve(&settings(), &[("OTEL_TRACES_EXPORTER", "otlp")])
            .unwrap()
            .unwrap();
        assert_eq!(plan.endpoint, None);
    }
}
