//! The `orbit-gateway` command: `serve` (the default), `migrate` and `admin …`.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use orbit_config::{DatabaseBackend, Settings};
use orbit_core::redact::redact;
use orbit_gateway::{admin, app};
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "orbit-gateway",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("ORBIT_COMMIT"), ")"),
    about = "Orbit CSV ingestion gateway"
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
    /// Serve the HTTP API (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Operator commands; each prints JSON on stdout.
    Admin {
        #[command(subcommand)]
        command: Admin,
    },
}

/// Operator commands. Each prints JSON on stdout and, on stderr, the database it used; none
/// creates a database (start the gateway or run `migrate` first).
#[derive(Subcommand)]
enum Admin {
    /// Create an organization, a directory and a token: `{organization_id, directory_id, token}`.
    /// The token is shown once.
    Bootstrap,
    /// Create an organization: `{organization_id}`.
    CreateOrg {
        /// Its name: 1 to 200 characters, no control characters.
        #[arg(long)]
        name: String,
    },
    /// Create a directory in an organization: `{directory_id}`.
    CreateDirectory {
        /// The organization's id.
        #[arg(long)]
        org: Uuid,
        /// Its name: 1 to 200 characters, no control characters.
        #[arg(long)]
        name: String,
    },
    /// Create a bearer token for a user of an organization: `{token, user_id, expires_at}`.
    /// The token is shown once and stored only as a hash.
    CreateToken {
        /// The organization's id.
        #[arg(long)]
        org: Uuid,
        /// The user the token acts as, created if new (default admin@localhost).
        #[arg(long)]
        user_email: Option<String>,
        /// How long the token lives, such as `30d` or `12h` (1m to 100years); forever when absent.
        #[arg(long, value_parser = admin::parse_lifetime)]
        expires_in: Option<Duration>,
    },
    /// Revoke a token at once: `{revoked: true}`; fails when no live token matches.
    RevokeToken {
        /// The token itself (`orb_…`).
        #[arg(long)]
        token: String,
    },
    /// Archive a directory: it stays readable and takes no more uploads.
    /// `{directory_id, archived, archived_at}`.
    ArchiveDirectory {
        /// The organization's id.
        #[arg(long)]
        org: Uuid,
        /// The directory's id.
        #[arg(long)]
        directory: Uuid,
    },
    /// Resume a failed source: its unfinished chunks run again, exactly once.
    /// `{source_id, source_status, chunks_to_run}`.
    RetrySource {
        /// The organization's id.
        #[arg(long)]
        org: Uuid,
        /// The directory's id.
        #[arg(long)]
        directory: Uuid,
        /// The failed source's id.
        #[arg(long)]
        source: Uuid,
    },
    /// Set an organization's own weight and upload limits (docs/operations.md,
    /// "Per-organization limits"); prints them as get-limits does. Each value is a whole number
    /// (0 is no limit; the weight is at least 1) or `default` to take the configured
    /// `[tenants]` default again; values not given are kept.
    SetLimits {
        /// The organization's id.
        #[arg(long)]
        org: Uuid,
        /// Its share of the workers against other organizations waiting (fair scheduler).
        #[arg(long, value_parser = admin::parse_limit_value)]
        weight: Option<admin::LimitValue>,
        /// Uploads admitted and not yet completed or failed.
        #[arg(long, value_parser = admin::parse_limit_value)]
        max_uploads_in_flight: Option<admin::LimitValue>,
        /// Rows of its unfinished uploads not yet processed.
        #[arg(long, value_parser = admin::parse_limit_value)]
        max_queued_rows: Option<admin::LimitValue>,
        /// Uploads admitted in any 60 seconds.
        #[arg(long, value_parser = admin::parse_limit_value)]
        max_uploads_per_minute: Option<admin::LimitValue>,
        /// Reset every value to its default first (values given with it still apply).
        #[arg(long)]
        reset: bool,
    },
    /// An organization's weight and upload limits in force, each with its source (`override`
    /// or `default`), and its usage now: `{organization_id, weight: {value, source}, …, usage}`.
    GetLimits {
        /// The organization's id.
        #[arg(long)]
        org: Uuid,
    },
    /// Move messages from the dead-letter queue (`{queue.name}.dead`) back to the work queue:
    /// `{replayed, kept, dead_letters_left}`. Needs a RabbitMQ queue.url.
    ReplayDeadLetters {
        /// Dead letters to move at most.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
        limit: u64,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let code = match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            orbit_adapters::telemetry::report_fatal("orbit-gateway", &e);
            std::process::ExitCode::FAILURE
        }
    };
    // The spans still queued for export; blocking, and bounded by the exporter's timeout.
    let _ = tokio::task::spawn_blocking(orbit_adapters::telemetry::shutdown).await;
    code
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(settings).await,
        Command::Migrate => {
            orbit_adapters::telemetry::init(&settings.telemetry, None)?;
            let state = app::connect(&settings).await?;
            state.store.migrate().await?;
            tracing::info!(database = state.store.backend(), "migrations applied");
            Ok(())
        }
        Command::Admin { command } => {
            admin::check_database(&settings.database.url)?;
            let state = app::connect(&settings).await?;
            if settings.database.url.backend() == DatabaseBackend::Sqlite {
                state.store.migrate().await?;
            }
            let store = &*state.store;
            let out = match command {
                Admin::Bootstrap => admin::bootstrap(store).await?,
                Admin::CreateOrg { name } => admin::create_org(store, &name).await?,
                Admin::CreateDirectory { org, name } => {
                    admin::create_directory(store, org, &name).await?
                }
                Admin::CreateToken {
                    org,
                    user_email,
                    expires_in,
                } => admin::create_token(store, org, user_email.as_deref(), expires_in).await?,
                Admin::RevokeToken { token } => admin::revoke_token(store, &token).await?,
                Admin::ArchiveDirectory { org, directory } => {
                    admin::archive_directory(store, org, directory).await?
                }
                Admin::RetrySource {
                    org,
                    directory,
                    source,
                } => admin::retry_source(store, org, directory, source).await?,
                Admin::SetLimits {
                    org,
                    weight,
                    max_uploads_in_flight,
                    max_queued_rows,
                    max_uploads_per_minute,
                    reset,
                } => {
                    let set = admin::SetLimits {
                        weight,
                        max_uploads_in_flight,
                        max_queued_rows,
                        max_uploads_per_minute,
                        reset,
                    };
                    admin::set_limits(store, &settings.tenants, org, set).await?
                }
                Admin::GetLimits { org } => {
                    admin::get_limits(store, &settings.tenants, org).await?
                }
                Admin::ReplayDeadLetters { limit } => {
                    admin::replay_dead_letters(&*state.queue, limit).await?
                }
            };
            println!("{out}");
            // On stderr, so that stdout stays the JSON: which database this was, since a
            // relative `sqlite://./data/…` depends on where the command ran.
            eprintln!(
                "database: {}",
                admin::describe_database(&settings.database.url)
            );
            Ok(())
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    orbit_adapters::telemetry::init(&settings.telemetry, Some("orbit-gateway"))?;
    let mut running = app::start(settings.clone())
        .await
        .context("starting orbit-gateway")?;
    print_welcome(&settings, &running).await;
    tokio::select! {
        _ = shutdown_signal() => {
            tracing::info!("shutting down: finishing in-flight requests and chunks");
            running.shutdown().await;
        }
        _ = running.stopped() => anyhow::bail!("the HTTP server stopped unexpectedly"),
    }
    Ok(())
}

/// What to do next, once the gateway listens: a block of text for a person at a terminal, or
/// one log event when logs are JSON (where every line must be JSON).
async fn print_welcome(settings: &Settings, running: &app::Running) {
    let base = if settings.http.public_url.is_empty() {
        format!("http://{}", running.addr)
    } else {
        settings.public_url()
    };
    let config = std::env::args()
        .skip_while(|a| a != "--config")
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    let admin = format!(
        "orbit-gateway {config}{}admin",
        if config.is_empty() { "" } else { " " }
    );
    let database = redact(&settings.database.url);
    let objects = redact(&settings.object_store.url);
    let queue = redact(&settings.queue.url);
    if orbit_adapters::telemetry::json_logs() {
        tracing::info!(
            url = %base,
            %database,
            object_store = %objects,
            %queue,
            next = %format!("{admin} bootstrap"),
            "Orbit is listening"
        );
        return;
    }
    eprintln!(
        "\nOrbit is listening on {base} (database: {database}, objects: {objects}, queue: {queue})\n\
         \n\
         Get an organization, a directory and a token (printed once, as JSON):\n\
         \x20   {admin} bootstrap\n\
         \n\
         Then upload a CSV, with ORG, DIR and TOKEN set from that output:\n\
         \x20   curl -sS -H \"Authorization: Bearer $TOKEN\" -F file=@contacts.csv \\\n\
         \x20     {base}/v2/organizations/$ORG/directories/$DIR/sources/csv-upload\n",
    );
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::Cli;

    /// `--help` says what every command and every flag is for.
    #[test]
    fn every_command_and_flag_has_help() {
        fn check(command: &clap::Command, path: &str) {
            let path = format!("{path} {}", command.get_name());
            assert!(command.get_about().is_some(), "{path} has no help text");
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                assert!(arg.get_help().is_some(), "{path} --{id} has no help text");
            }
            for sub in command.get_subcommands() {
                check(sub, &path);
            }
        }
        let cli = Cli::command();
        cli.clone().debug_assert();
        check(&cli, "");
    }
}
