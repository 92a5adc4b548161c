//! The command line: global connection flags, output flags, and one subcommand per task.

use crate::upload::Compress;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("ORBIT_COMMIT"),
    ")"
);

#[derive(Debug, Parser)]
#[command(
    name = "orbit",
    version = VERSION,
    about = "Upload contact CSVs to Orbit and follow them until workers finish",
    after_help = "Exit codes: 0 all completed, 1 some file or source failed, \
                  2 usage or authentication, 3 network.\n\
                  Environment: ORBIT_URL, ORBIT_TOKEN, ORBIT_ORG, ORBIT_DIRECTORY, ORBIT_PROFILE, \
                  ORBIT_PROFILES_FILE."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// The Orbit API, e.g. `https://orbit.example.com` [default: http://127.0.0.1:8080]
    #[arg(long, env = "ORBIT_URL", global = true)]
    pub url: Option<String>,
    /// A bearer token (`orb_…`).
    #[arg(long, env = "ORBIT_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// The organization id.
    #[arg(long, env = "ORBIT_ORG", global = true)]
    pub org: Option<String>,
    /// The directory id (uploads, sources, errors, failed rows, profiles).
    #[arg(long, short = 'd', env = "ORBIT_DIRECTORY", global = true)]
    pub directory: Option<String>,
    /// A profile of the profiles file [default: `default`, when that file has it].
    #[arg(long, env = "ORBIT_PROFILE", global = true)]
    pub profile: Option<String>,
    /// The profiles file [default: $XDG_CONFIG_HOME/orbit/profiles.toml, else ~/.config/orbit/profiles.toml].
    #[arg(long, env = "ORBIT_PROFILES_FILE", global = true)]
    pub profiles_file: Option<PathBuf>,
    /// Print results as JSON on stdout, for scripts.
    #[arg(long, global = true)]
    pub json: bool,
    /// How to show progress on stderr: bars on a terminal, plain lines otherwise.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto, global = true)]
    pub progress: ProgressMode,
    /// Retries of a failed request (dropped connection, 5xx, 429) before giving up.
    #[arg(long, default_value_t = 5, global = true)]
    pub retries: u32,
    /// How long to wait out `409 idempotency_key_in_use` (the same upload still in flight).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h", global = true)]
    pub in_flight_wait: Duration,
    /// How often to ask for a source's progress while workers finish it.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s", global = true)]
    pub poll_interval: Duration,
    /// Give up connecting to the server after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s", global = true)]
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    /// Bars when stderr is a terminal, plain lines otherwise.
    Auto,
    Bar,
    Plain,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    Csv,
    Ndjson,
}

impl ExportFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ExportFormat::Csv => "csv",
            ExportFormat::Ndjson => "ndjson",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Upload CSV files, show progress while they are sent and processed, and report each.
    Upload(UploadArgs),
    /// Follow a source until it completes or fails.
    Watch { source: String },
    /// Cancel a pending or processing source: it ends failed with error code `cancelled`;
    /// rows committed before the cancel stay.
    Cancel { source: String },
    /// List the directory's sources, newest first.
    Sources {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// A source's per-row problems.
    Errors {
        source: String,
        /// At most this many (all by default).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Download a source's failed rows as CSV.
    FailedRows {
        source: String,
        /// Where to write them; `-` for stdout.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Download every profile of the directory as CSV (which imports back into the same
    /// profiles) or NDJSON, from one snapshot, compressed on the wire.
    Export {
        /// Where to write it; `-` (the default) for stdout. A file is written beside its
        /// name and renamed once complete.
        #[arg(short, long, default_value = "-")]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "csv")]
        format: ExportFormat,
        /// Only profiles updated at or after this RFC 3339 time (`2026-11-29T12:00:00Z`).
        #[arg(long)]
        since: Option<String>,
    },
    /// Look up resolved profiles by email.
    Profiles {
        #[arg(long)]
        email: String,
    },
    /// List the organization's directories.
    Directories,
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Args)]
pub struct UploadArgs {
    /// CSV files to upload.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Files uploaded at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parallel: u16,
    /// The idempotency key (one file only) [default: derived from the directory and the file's SHA-256].
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// The delimiter (`,` `;` `tab` `|`) [default: detected from the header].
    #[arg(long)]
    pub delimiter: Option<String>,
    /// The encoding (`utf-8`, `utf-16`, `windows-1252`, `iso-8859-1`) [default: utf-8; a BOM wins].
    #[arg(long)]
    pub encoding: Option<String>,
    /// Skip the header check before sending.
    #[arg(long)]
    pub no_preflight: bool,
    /// Return once the server has the file; do not wait for workers to finish it.
    #[arg(long)]
    pub no_wait: bool,
    /// Column mapping, as JSON or `@FILE`: header name to an Orbit field (`email`, …),
    /// `attributes.<name>` or `ignore`; other columns are matched by their names as usual.
    #[arg(long)]
    pub mapping: Option<String>,
    /// Merge rules, as JSON or `@FILE`: `{"default": RULE, "fields": {"company": RULE},
    /// "empty_cells": "ignore"|"clear"}` with RULE `newer_wins`, `keep_existing` or
    /// `overwrite` (docs/imports.md).
    #[arg(long)]
    pub merge: Option<String>,
    /// Validate the files exactly as an import would, and import nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Compress each file on the fly as it is sent: `auto` (zstd for files over
    /// `--compress-above`), `zstd`, `gzip` or `none`. The server stores and hashes the CSV
    /// itself, so a compressed and a plain upload of one file are the same upload.
    #[arg(long, value_enum, default_value_t = Compress::Auto)]
    pub compress: Compress,
    /// With `--compress auto`, the size in bytes above which a file is compressed.
    #[arg(long, default_value_t = 32 << 20)]
    pub compress_above: u64,
    /// Files larger than this many bytes go as resumable uploads: in pieces that survive a
    /// dropped connection or a restart of this command, never resending what the server has.
    #[arg(long, default_value_t = 32 << 20)]
    pub resume_above: u64,
    /// Send every file in one request, whatever its size.
    #[arg(long)]
    pub no_resume: bool,
}
