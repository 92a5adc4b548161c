//! Logging set-up: `tracing` to stderr as text or JSON, filtered by `RUST_LOG`.
//!
//! Every line goes through [`crate::redact`] on its way out, whichever crate logged it, so a
//! URL with a password in an error message never reaches the log. In JSON mode every line on
//! stderr is one JSON object, including a fatal start-up error ([`report_fatal`]). Colour
//! codes are written only when stderr is a terminal.

use std::io::{IsTerminal as _, Write};
use std::sync::OnceLock;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetrySettings};

/// The format of the subscriber this process installed, if any.
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

pub fn init(settings: &TelemetrySettings) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(RedactingStderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match settings.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    // Tests start several services in one process; the first subscriber wins.
    if result.is_ok() {
        let _ = FORMAT.set(settings.log_format);
    }
    if let Some(endpoint) = &settings.otlp_endpoint {
        anyhow::bail!(
            "telemetry.otlp_endpoint is set to {:?}, but OTLP export is not built into this version yet; unset it",
            crate::redact::redact(endpoint)
        );
    }
    Ok(())
}

/// Whether this process logs JSON, so that whatever else it writes to stderr must be JSON too.
pub fn json_logs() -> bool {
    FORMAT.get() == Some(&LogFormat::Json)
}

/// Reports the error a command exits with: a log event in JSON mode, else a plain line
/// `{command}: {error}`; redacted either way.
pub fn report_fatal(command: &str, error: &anyhow::Error) {
    let message = format!("{error:#}");
    let message = crate::redact::redact(&message);
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
            Ok(text) => stderr.write_all(crate::redact::redact(text).as_bytes())?,
            Err(_) => stderr.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
