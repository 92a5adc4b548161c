//! Logging set-up: `tracing` to stderr as text or JSON, filtered by `RUST_LOG`.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetrySettings};

pub fn init(settings: &TelemetrySettings) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match settings.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    // Tests start several services in one process; the first subscriber wins.
    let _ = result;
    if let Some(endpoint) = &settings.otlp_endpoint {
        anyhow::bail!(
            "telemetry.otlp_endpoint is set to {endpoint:?}, but OTLP export is not built into this version yet; unset it"
        );
    }
    Ok(())
}
