//! The `orbit-worker` command: consumes chunks from the configured queue until SIGTERM, then
//! finishes the chunks it holds and exits. Serves `/metrics`, `/healthz` (the process is up)
//! and `/readyz` (its database, object store and broker answer) on `worker.metrics_listen`
//! when that is set.

use anyhow::Context as _;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clap::{Parser, Subcommand};
use orbit_adapters::backends::{Backends, MetricsPage};
use orbit_config::{QueueBackend, Settings};
use orbit_worker::Worker;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// How long the `/metrics` server gets to close its connections at exit.
const METRICS_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let code = match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            orbit_adapters::telemetry::report_fatal("orbit-worker", &e);
            std::process::ExitCode::FAILURE
        }
    };
    // The spans still queued for export; blocking, and bounded by the exporter's timeout.
    let _ = tokio::task::spawn_blocking(orbit_adapters::telemetry::shutdown).await;
    code
}

#[derive(Parser)]
#[command(
    name = "orbit-worker",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("ORBIT_COMMIT"), ")"),
    about = "Orbit's chunk worker: processes the chunks queued on RabbitMQ until SIGTERM",
    long_about = "Orbit's chunk worker: claims the chunks queued on RabbitMQ (queue.url = amqp://…) \
        under a lease, validates and commits their rows, and republishes lost chunks. On SIGTERM \
        or Ctrl-C it finishes the chunks in hand, then exits.\n\n\
        Settings: built-in defaults, then the TOML file (--config or ORBIT_CONFIG), then \
        ORBIT__SECTION__KEY variables (README, \"Configuration\")."
)]
struct Cli {
    /// TOML configuration file (also ORBIT_CONFIG); ORBIT__SECTION__KEY variables override it.
    #[arg(long, global = true)]
    config: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Process queued chunks until SIGTERM (the default).
    Run,
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let Command::Run = cli.command.unwrap_or(Command::Run);
    let settings = Settings::load(cli.config.as_deref())?;
    orbit_adapters::telemetry::init(&settings.telemetry, Some("orbit-worker"))?;
    orbit_adapters::metrics::set_build_info(env!("CARGO_PKG_VERSION"), env!("ORBIT_COMMIT"));
    anyhow::ensure!(
        settings.queue.url.backend() != QueueBackend::Embedded,
        "queue.url is \"embedded\": the in-process queue lives inside orbit-gateway, so a separate worker would never see a chunk; point queue.url at RabbitMQ (amqp://…)"
    );
    let backends = Backends::open(&settings).await?;
    let worker = Worker::new(
        backends.store.clone(),
        backends.store.clone(),
        backends.blobs.clone(),
        backends.queue.clone(),
        std::sync::Arc::new(settings.clone()),
    );
    let handle = worker.start();
    // The `/metrics` server, kept so it stops after the worker has drained (its last scrape
    // still sees the drain) and before the process exits.
    let metrics_stop = CancellationToken::new();
    let mut metrics_server = None;
    if !settings.worker.metrics_listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(&settings.worker.metrics_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on worker.metrics_listen {}",
                    settings.worker.metrics_listen
                )
            })?;
        tracing::info!(addr = %listener.local_addr()?, "worker metrics listening");
        let page = std::sync::Arc::new(MetricsPage::from_settings(&settings));
        let app =
            Router::new()
                .route("/healthz", get(|| async { "ok" }))
                .route("/readyz", get(readyz))
                .route(
                    "/metrics",
                    get(|State(b): State<Backends>| async move {
                        page.render(&*b.store, &*b.queue).await
                    }),
                )
                .with_state(backends.clone());
        let stop = metrics_stop.clone();
        metrics_server = Some(tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "the metrics server failed");
            }
        }));
    }
    tracing::info!(
        owner = worker.owner,
        concurrency = settings.worker_concurrency(),
        queue = backends.queue.backend(),
        "orbit-worker consuming"
    );
    shutdown_signal().await;
    tracing::info!("SIGTERM: finishing the chunks in hand");
    handle.shutdown().await;
    metrics_stop.cancel();
    if let Some(server) = metrics_server {
        if tokio::time::timeout(METRICS_STOP_WAIT, server)
            .await
            .is_err()
        {
            tracing::warn!("the metrics server did not stop in time");
        }
    }
    tracing::info!("drained; exiting");
    Ok(())
}

/// 200 when the database, the object store and the broker all answer; else 503 with a
/// problem+json body naming each one that did not, as the gateway's `/readyz` does.
async fn readyz(State(backends): State<Backends>) -> Response {
    let failures = backends.not_ready().await;
    if failures.is_empty() {
        return Json(json!({
            "status": "ready",
            "database": backends.store.backend(),
            "object_store": backends.blobs.backend(),
            "queue": backends.queue.backend(),
        }))
        .into_response();
    }
    let status = StatusCode::SERVICE_UNAVAILABLE;
    let problem = json!({
        "type": "https://orbit.dev/problems/not-ready",
        "title": status.canonical_reason(),
        "status": status.as_u16(),
        "detail": failures.join("; "),
        "code": "not_ready",
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        problem.to_string(),
    )
        .into_response()
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::Cli;

    #[test]
    fn every_command_and_flag_has_help() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        for command in std::iter::once(&cli).chain(cli.get_subcommands()) {
            assert!(command.get_about().is_some(), "{}", command.get_name());
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                assert!(
                    id == "help" || id == "version" || arg.get_help().is_some(),
                    "--{id}"
                );
            }
        }
    }
}
