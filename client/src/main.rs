//! `orbit`: see the crate docs of `orbit_client` and the README's "Upload clients" section.

use clap::{CommandFactory as _, Parser as _};
use orbit_client::api::Api;
use orbit_client::cli::{Cli, Command};
use orbit_client::commands::{self, parse_id};
use orbit_client::config;
use orbit_client::exit::{ClientError, ExitCode};
use orbit_client::progress::Progress;
use orbit_client::retry::Policy;
use orbit_client::upload::{self, UploadOptions};

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let json = cli.global.json;
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "error": { "code": e.code(), "message": e.to_string() } })
                );
            }
            eprintln!("orbit: {e}");
            e.exit_code()
        }
    };
    std::process::exit(code.code());
}

async fn run(cli: Cli) -> Result<ExitCode, ClientError> {
    let global = cli.global;
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "orbit", &mut std::io::stdout());
        return Ok(ExitCode::Completed);
    }
    let conn = config::resolve(&global)?;
    let policy = Policy {
        retries: global.retries,
        in_flight_wait: global.in_flight_wait,
        ..Policy::default()
    };
    let api = Api::new(conn, policy, global.connect_timeout)?;
    let progress = Progress::new(global.progress);
    let json = global.json;
    match cli.command {
        Command::Upload(args) => {
            let options = UploadOptions {
                directory: api.conn.directory()?,
                idempotency_key: args.idempotency_key,
                delimiter: args.delimiter,
                encoding: args.encoding,
                preflight: !args.no_preflight,
                wait: !args.no_wait,
                parallel: args.parallel.into(),
                poll_interval: global.poll_interval,
                print_lines: !json,
                mapping: args
                    .mapping
                    .as_deref()
                    .map(upload::parse_mapping)
                    .transpose()?,
                merge: args
                    .merge
                    .as_deref()
                    .map(upload::parse_merge)
                    .transpose()?
                    .unwrap_or_default(),
                dry_run: args.dry_run,
                compress: args.compress,
                compress_above: args.compress_above,
                resume_above: args.resume_above,
                resume: !args.no_resume,
            };
            upload::validate(&api, &args.files, &options).await?;
            let reports = upload::upload_all(&api, &progress, &args.files, &options).await;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&reports).expect("reports serialize")
                );
            }
            Ok(commands::exit_of(&reports))
        }
        Command::Watch { source } => {
            let dir = api.conn.directory()?;
            let source = parse_id(&source, "source")?;
            let report =
                commands::watch(&api, &progress, dir, source, global.poll_interval).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("reports serialize")
                );
            } else {
                println!("{}", report.line());
            }
            Ok(report.exit)
        }
        Command::Cancel { source } => {
            let source = parse_id(&source, "source")?;
            let cancelled = commands::cancel(&api, api.conn.directory()?, source).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&cancelled).expect("JSON serializes")
                );
            } else {
                println!(
                    "source {source}: cancelled, {} of {} rows processed ({} accepted, {} failed) stay",
                    cancelled["processed_rows"], cancelled["total_rows"], cancelled["accepted"], cancelled["failed"]
                );
            }
            Ok(ExitCode::Completed)
        }
        Command::Sources { limit } => {
            commands::sources(&api, api.conn.directory()?, limit, json).await?;
            Ok(ExitCode::Completed)
        }
        Command::Errors { source, limit } => {
            let source = parse_id(&source, "source")?;
            commands::errors(&api, api.conn.directory()?, source, limit, json).await?;
            Ok(ExitCode::Completed)
        }
        Command::FailedRows { source, output } => {
            let source = parse_id(&source, "source")?;
            let rows = commands::failed_rows(&api, api.conn.directory()?, source, &output).await?;
            if json {
                println!("{}", serde_json::json!({ "output": output, "rows": rows }));
            } else {
                eprintln!("wrote {rows} failed rows to {}", output.display());
            }
            Ok(ExitCode::Completed)
        }
        Command::Export {
            output,
            format,
            since,
        } => {
            let written = commands::export(
                &api,
                &progress,
                api.conn.directory()?,
                &output,
                format,
                since.as_deref(),
            )
            .await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "output": output, "format": format.as_str(), "profiles": written })
                );
            } else {
                eprintln!("wrote {written} profiles to {}", output.display());
            }
            Ok(ExitCode::Completed)
        }
        Command::Profiles { email } => {
            commands::profiles(&api, api.conn.directory()?, &email, json).await?;
            Ok(ExitCode::Completed)
        }
        Command::Directories => {
            commands::directories(&api, json).await?;
            Ok(ExitCode::Completed)
        }
        Command::Completions { .. } => unreachable!("handled above"),
    }
}
