//! The reading commands: `watch`, `sources`, `errors`, `failed-rows`, `export`, `profiles`,
//! `directories`.

use std::path::Path;
use std::time::Instant;

use futures::TryStreamExt as _;
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;
use uuid::Uuid;

use crate::api::Api;
use crate::exit::{ClientError, ExitCode, Result};
use crate::progress::Progress;
use crate::upload::{self, FileReport};

pub fn parse_id(value: &str, what: &str) -> Result<Uuid> {
    value
        .trim()
        .parse()
        .map_err(|_| ClientError::Usage(format!("{what} {value:?} is not a UUID")))
}

/// Follows a source to its end; the report is shaped like an upload's.
pub async fn watch(
    api: &Api,
    progress: &Progress,
    dir: Uuid,
    source: Uuid,
    poll_interval: std::time::Duration,
) -> Result<FileReport> {
    let started = Instant::now();
    let first = api.source(dir, source).await?;
    let name = first
        .rest
        .get("filename")
        .and_then(Value::as_str)
        .unwrap_or("source")
        .to_owned();
    let tracker = progress.track(&name);
    let status = upload::follow(api, &tracker, dir, source, poll_interval).await;
    tracker.finish();
    let status = status?;
    let mut report = FileReport::for_source(&name, &status);
    report.settle(&status, started.elapsed());
    Ok(report)
}

/// Cancels a source; its status body after the cancel. Not retried: a cancel whose answer
/// was lost is seen as `409 source_terminal` by the next try.
pub async fn cancel(api: &Api, dir: Uuid, source: Uuid) -> Result<Value> {
    let response = api
        .http
        .post(api.dir_url(dir, &format!("/sources/{source}/cancel")))
        .bearer_auth(&api.conn.token)
        .send()
        .await
        .map_err(|e| crate::exit::ClientError::Network(crate::api::transport_error(&e)))?;
    if !response.status().is_success() {
        let problem = crate::api::problem(response).await;
        // The source ended before the cancel: exit 1, like a source that failed.
        if problem.code == "source_terminal" {
            return Err(crate::exit::ClientError::Rejected {
                message: problem.detail,
                code: problem.code,
            });
        }
        return Err(crate::exit::ClientError::Api(problem));
    }
    response
        .json()
        .await
        .map_err(|e| crate::exit::ClientError::Network(format!("the answer broke off: {e}")))
}

/// Left-aligned columns, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.trim_end().to_owned()
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.clone()));
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(" "),
        other => other.to_string(),
    }
}

async fn collect(api: &Api, url: &str, limit: Option<usize>) -> Result<Vec<Value>> {
    let mut items = Vec::new();
    api.for_each_item(url, limit, |item| {
        items.push(item);
        Ok(())
    })
    .await?;
    Ok(items)
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values serialize")
    );
}

pub async fn sources(api: &Api, dir: Uuid, limit: usize, json: bool) -> Result<()> {
    let items = collect(api, &api.dir_url(dir, "/sources"), Some(limit)).await?;
    if json {
        print_json(&Value::Array(items));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|s| {
            vec![
                text(&s["source_id"]),
                text(&s["source_status"]),
                format!("{}/{}", text(&s["processed_rows"]), text(&s["total_rows"])),
                text(&s["accepted"]),
                text(&s["failed"]),
                text(&s["warnings"]),
                text(&s["created_at"]),
                text(&s["filename"]),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &["SOURCE", "STATUS", "ROWS", "ACCEPTED", "FAILED", "WARNINGS", "CREATED", "FILE"],
            &rows
        )
    );
    Ok(())
}

/// Per-row problems, printed as they are fetched so a large source starts showing at once.
pub async fn errors(
    api: &Api,
    dir: Uuid,
    source: Uuid,
    limit: Option<usize>,
    json: bool,
) -> Result<()> {
    let url = api.dir_url(dir, &format!("/sources/{source}/errors"));
    if json {
        // One JSON array, written item by item.
        let mut first = true;
        print!("[");
        api.for_each_item(&url, limit, |item| {
            print!("{}\n  {item}", if first { "" } else { "," });
            first = false;
            Ok(())
        })
        .await?;
        println!("{}]", if first { "" } else { "\n" });
        return Ok(());
    }
    println!("ROW\tLINE\tSEVERITY\tCODE\tCOLUMN\tMESSAGE\tVALUE");
    api.for_each_item(&url, limit, |e| {
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}",
            text(&e["row_number"]),
            text(&e["line_number"]),
            text(&e["severity"]),
            text(&e["code"]),
            text(&e["column"]),
            text(&e["message"]),
            text(&e["value"])
        );
        Ok(())
    })
    .await?;
    Ok(())
}

/// Streams the failed-rows CSV record by record into `output` (`-` for stdout), through an
/// [`OutputFile`]. Returns the number of rows written.
pub async fn failed_rows(api: &Api, dir: Uuid, source: Uuid, output: &Path) -> Result<u64> {
    let url = api.dir_url(dir, &format!("/sources/{source}/failed-rows"));
    let body = reader_of(send_ok(api.get(&url)).await?);
    let (file, sink) = OutputFile::create(output).await?;
    let copied = copy_csv(body, sink).await;
    file.settle(copied).await
}

/// A response's body as a reader, to stream.
fn reader_of(response: reqwest::Response) -> impl tokio::io::AsyncRead + Send + Unpin {
    tokio_util::io::StreamReader::new(response.bytes_stream().map_err(std::io::Error::other))
}

/// Sends a request: its response when successful, the server's problem or the network error
/// otherwise.
async fn send_ok(request: reqwest::RequestBuilder) -> Result<reqwest::Response> {
    match request.send().await {
        Ok(r) if r.status().is_success() => Ok(r),
        Ok(r) => Err(ClientError::Api(crate::api::problem(r).await)),
        Err(e) => Err(ClientError::Network(crate::api::transport_error(&e))),
    }
}

/// Where a download is written: stdout for `-`; otherwise a `.part` file beside `output`,
/// renamed to it only once the whole body is written, so a broken download never leaves a
/// short file under the final name.
struct OutputFile<'a> {
    output: &'a Path,
    /// `None` for stdout.
    partial: Option<std::path::PathBuf>,
}

type Sink = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;

impl<'a> OutputFile<'a> {
    /// The file, and the sink to copy the body into.
    async fn create(output: &'a Path) -> Result<(OutputFile<'a>, Sink)> {
        if output == Path::new("-") {
            let file = OutputFile {
                output,
                partial: None,
            };
            return Ok((file, Box::new(tokio::io::stdout())));
        }
        let mut partial = output.as_os_str().to_owned();
        partial.push(".part");
        let partial = std::path::PathBuf::from(partial);
        let file = tokio::fs::File::create(&partial)
            .await
            .map_err(|e| ClientError::Usage(format!("cannot write {}: {e}", partial.display())))?;
        let sink = Box::new(file);
        let file = OutputFile {
            output,
            partial: Some(partial),
        };
        Ok((file, sink))
    }

    /// Renames the part file to its final name when the copy succeeded, removes it when it
    /// failed.
    async fn settle(self, copied: Result<u64>) -> Result<u64> {
        let Some(partial) = self.partial else {
            return copied;
        };
        match copied {
            Ok(n) => {
                tokio::fs::rename(&partial, self.output)
                    .await
                    .map_err(|e| {
                        ClientError::Usage(format!("cannot write {}: {e}", self.output.display()))
                    })?;
                Ok(n)
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&partial).await;
                Err(e)
            }
        }
    }
}

/// Streams the directory's export into `output` (`-` for stdout), gzip or zstd on the wire
/// (reqwest asks for both and decodes), with a bar of profiles written, through an
/// [`OutputFile`]: an export cut short never leaves a file under the final name. Returns the
/// number of profiles.
pub async fn export(
    api: &Api,
    progress: &Progress,
    dir: Uuid,
    output: &Path,
    format: crate::cli::ExportFormat,
    since: Option<&str>,
) -> Result<u64> {
    let url = api.dir_url(dir, "/profiles/export");
    let mut query = vec![("format", format.as_str())];
    if let Some(since) = since {
        query.push(("updated_since", since));
    }
    let response = send_ok(api.get(&url).query(&query)).await?;
    let total = response
        .headers()
        .get("orbit-profile-count")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let name = if output == Path::new("-") {
        "export".to_owned()
    } else {
        output.display().to_string()
    };
    let tracker = progress.track(&name);
    tracker.start_exporting(total);
    let body = reader_of(response);
    let (file, sink) = OutputFile::create(output).await?;
    let copied = match format {
        crate::cli::ExportFormat::Csv => copy_export_csv(body, sink, |n| tracker.exported(n)).await,
        crate::cli::ExportFormat::Ndjson => copy_lines(body, sink, |n| tracker.exported(n)).await,
    };
    tracker.end_phase();
    tracker.finish();
    file.settle(copied).await
}

fn write_error(e: impl std::fmt::Display) -> ClientError {
    ClientError::Usage(format!("cannot write the output: {e}"))
}

/// NDJSON: one profile a line.
async fn copy_lines<R, W>(reader: R, mut writer: W, exported: impl Fn(u64)) -> Result<u64>
where
    R: tokio::io::AsyncRead + Unpin + Send,
    W: tokio::io::AsyncWrite + Unpin + Send,
{
    use tokio::io::AsyncReadExt as _;
    let mut reader = reader;
    let mut buf = vec![0u8; 256 * 1024];
    let mut profiles = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|e| ClientError::Network(format!("the export broke off: {e}")))?;
        if n == 0 {
            break;
        }
        let lines = buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
        writer.write_all(&buf[..n]).await.map_err(write_error)?;
        profiles += lines;
        exported(lines);
    }
    writer.flush().await.map_err(write_error)?;
    Ok(profiles)
}

/// CSV, record by record. A profile with several identities of a kind spans consecutive
/// rows that share an identity with an earlier row of the group (docs/api.md), while two
/// profiles never share one: a row that shares none with the rows before it starts the next
/// profile.
async fn copy_export_csv<R, W>(reader: R, writer: W, exported: impl Fn(u64)) -> Result<u64>
where
    R: tokio::io::AsyncRead + Unpin + Send,
    W: tokio::io::AsyncWrite + Unpin + Send,
{
    let broke = |e: csv_async::Error| ClientError::Network(format!("the export broke off: {e}"));
    let mut csv_in = csv_async::AsyncReaderBuilder::new()
        .has_headers(true)
        .create_reader(reader);
    let mut csv_out = csv_async::AsyncWriterBuilder::new().create_writer(writer);
    let header = csv_in.byte_headers().await.map_err(broke)?.clone();
    let identity_columns: Vec<usize> = header
        .iter()
        .enumerate()
        .filter(|(_, name)| matches!(*name, b"email" | b"phone" | b"linkedin_url"))
        .map(|(i, _)| i)
        .collect();
    if identity_columns.len() != 3 {
        return Err(ClientError::Network(
            "the export is not the CSV Orbit sends (no email, phone and linkedin_url columns)"
                .into(),
        ));
    }
    csv_out.write_byte_record(&header).await.map_err(broke)?;
    let mut record = csv_async::ByteRecord::new();
    let mut group: Vec<Vec<u8>> = Vec::new();
    let mut profiles = 0u64;
    let mut unreported = 0u64;
    while csv_in.read_byte_record(&mut record).await.map_err(broke)? {
        csv_out.write_byte_record(&record).await.map_err(broke)?;
        let identities: Vec<&[u8]> = identity_columns
            .iter()
            .filter_map(|&i| record.get(i))
            .filter(|v| !v.is_empty())
            .collect();
        if !identities.iter().any(|v| group.iter().any(|g| g == v)) {
            group.clear();
            profiles += 1;
            unreported += 1;
            if unreported >= 1000 {
                exported(unreported);
                unreported = 0;
            }
        }
        group.extend(identities.into_iter().map(<[u8]>::to_vec));
    }
    exported(unreported);
    let mut inner = csv_out.into_inner().await.map_err(write_error)?;
    inner.flush().await.map_err(write_error)?;
    Ok(profiles)
}

/// Every record from `reader` to `writer`; the header must end with the three columns the
/// server appends, and every row must be as wide as the header.
async fn copy_csv<R, W>(reader: R, writer: W) -> Result<u64>
where
    R: tokio::io::AsyncRead + Unpin + Send,
    W: tokio::io::AsyncWrite + Unpin + Send,
{
    let broke = |e: csv_async::Error| {
        ClientError::Network(format!("the failed-rows download broke off: {e}"))
    };
    let mut csv_in = csv_async::AsyncReaderBuilder::new()
        .has_headers(true)
        .create_reader(reader);
    let mut csv_out = csv_async::AsyncWriterBuilder::new().create_writer(writer);
    let header = csv_in.byte_headers().await.map_err(broke)?.clone();
    let tail: Vec<&[u8]> = header.iter().rev().take(3).collect();
    if tail != [&b"error_message"[..], b"error_code", b"line_number"] {
        return Err(ClientError::Network(
            "the failed-rows download is not the CSV Orbit sends".into(),
        ));
    }
    csv_out.write_byte_record(&header).await.map_err(broke)?;
    let mut record = csv_async::ByteRecord::new();
    let mut rows = 0u64;
    while csv_in.read_byte_record(&mut record).await.map_err(broke)? {
        csv_out.write_byte_record(&record).await.map_err(broke)?;
        rows += 1;
    }
    let mut inner = csv_out
        .into_inner()
        .await
        .map_err(|e| ClientError::Usage(format!("cannot write the output: {e}")))?;
    inner
        .flush()
        .await
        .map_err(|e| ClientError::Usage(format!("cannot write the output: {e}")))?;
    Ok(rows)
}

pub async fn profiles(api: &Api, dir: Uuid, email: &str, json: bool) -> Result<()> {
    let mut url = reqwest::Url::parse(&api.dir_url(dir, "/profiles"))
        .map_err(|e| ClientError::Usage(format!("bad URL: {e}")))?;
    url.query_pairs_mut().append_pair("email", email);
    let items = collect(api, url.as_str(), None).await?;
    if json {
        print_json(&Value::Array(items));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|p| {
            let name = match text(&p["full_name"]) {
                n if !n.is_empty() => n,
                _ => format!("{} {}", text(&p["first_name"]), text(&p["last_name"]))
                    .trim()
                    .to_owned(),
            };
            vec![
                text(&p["id"]),
                name,
                text(&p["identities"]["emails"]),
                text(&p["identities"]["phones"]),
                text(&p["identities"]["linkedin_urls"]),
                text(&p["company"]),
                text(&p["title"]),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &["PROFILE", "NAME", "EMAILS", "PHONES", "LINKEDIN", "COMPANY", "TITLE"],
            &rows
        )
    );
    Ok(())
}

pub async fn directories(api: &Api, json: bool) -> Result<()> {
    let items = collect(api, &api.org_url("/directories"), None).await?;
    if json {
        print_json(&Value::Array(items));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|d| {
            vec![
                text(&d["id"]),
                text(&d["name"]),
                if d["archived"] == Value::Bool(true) {
                    "archived".into()
                } else {
                    "active".into()
                },
                text(&d["created_at"]),
            ]
        })
        .collect();
    println!(
        "{}",
        table(&["DIRECTORY", "NAME", "STATE", "CREATED"], &rows)
    );
    Ok(())
}

/// The exit code for a set of reports: the largest.
pub fn exit_of(reports: &[FileReport]) -> ExitCode {
    reports
        .iter()
        .map(|r| r.exit)
        .max()
        .unwrap_or(ExitCode::Completed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failed_rows_are_copied_record_by_record_and_counted() {
        let input = b"email,Note\r\nnope,\"a, \"\"quoted\"\"\nline\",2,missing_identifier,no\n\"x\",,3,c,m\n";
        let mut out = Vec::new();
        let rows = copy_csv(&input[..], &mut out).await;
        assert!(rows.is_err(), "the header lacks the appended columns");
        let input = b"email,Note,line_number,error_code,error_message\nnope,\"a, \"\"q\"\"\nline\",2,missing_identifier,no id\n";
        let rows = copy_csv(&input[..], &mut out).await.unwrap();
        assert_eq!(rows, 1);
        assert_eq!(&out[..], &input[..]);
    }

    #[tokio::test]
    async fn a_truncated_download_is_an_error() {
        let input = b"email,line_number,error_code,error_message\nnope,2,missing_identifier\n";
        let err = copy_csv(&input[..], Vec::new()).await.unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::Network, "{err}");
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1");
    }
}
