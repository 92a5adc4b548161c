//! The re-import phase (issue 21): the same contacts imported again into their directory, as
//! a nightly full sync does, against the first import's rows/s; then two such re-imports at
//! once, each into a directory of its own.
//!
//! Every row of a re-import lands on the profile the first import made of it, so the
//! directory must hold exactly one profile per row afterwards: a re-import that made new
//! profiles, or lost any, would be measuring something else.

use serde_json::{json, Value};

use crate::orbit::StackKind;
use crate::{export, generate, measure_uploads, report_ingest, Args, Upload};

pub async fn run(args: &Args) -> anyhow::Result<Value> {
    let csv = args
        .work_dir
        .join(format!("contacts-{}.csv", args.reimport_rows));
    let rows = generate::write_csv(&csv, args.reimport_rows, u64::MAX)?.rows;
    let mut orbit = crate::stack(StackKind::Distributed, args).await?;
    let (a, b) = (
        orbit.tenant.dir,
        orbit.create_directory("re-import b").await?,
    );
    let upload = |dir| Upload {
        dir,
        csv: &csv,
        rows,
    };
    let timed = |name: &str, i: &crate::Ingest| {
        let line = report_ingest(name, rows * i.sources.len() as u64, i);
        (line["rows_per_second"].as_f64().unwrap_or(0.0), line)
    };

    let first = measure_uploads(&mut orbit, &[upload(a)]).await?;
    let (first_rate, first_line) = timed("import", &first);
    let again = measure_uploads(&mut orbit, &[upload(a)]).await?;
    let (again_rate, again_line) = timed("re-import", &again);
    // Directory b's first import is not timed: it only gives the pair something to re-import.
    measure_uploads(&mut orbit, &[upload(b)]).await?;
    let pair = measure_uploads(&mut orbit, &[upload(a), upload(b)]).await?;
    let (pair_rate, pair_line) = timed("2 re-imports", &pair);
    for dir in [a, b] {
        let profiles = export::directory_profiles(&orbit, dir).await?;
        anyhow::ensure!(
            profiles == rows,
            "{profiles} profiles after re-importing {rows} rows"
        );
    }
    let ratio = again_rate / first_rate;
    let pair_ratio = pair_rate / first_rate;
    println!("  re-import / import rows/s: {ratio:.2}; two re-imports together / import: {pair_ratio:.2}");
    Ok(json!({
        "rows": rows,
        "import": first_line,
        "reimport": again_line,
        "two_reimports": pair_line,
        "ratio_reimport_to_import": ratio,
        "ratio_two_reimports_to_import": pair_ratio,
    }))
}
