//! The fuzz targets in `cargo test`: the committed corpus replayed, then a fixed number of
//! structured random cases per target (a few seconds in all). `PROPTEST_CASES=N` runs N cases
//! per target instead, for a longer run without AFL.

use std::path::PathBuf;

use orbit_fuzz::multipart::Gateway;
use orbit_fuzz::{cursor, decompress, header, normalize, splitter, PURE_TARGETS};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no inputs", dir.display());
    files
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).expect("a corpus file");
            (path, bytes)
        })
        .collect()
}

#[test]
fn corpus_replays_clean() {
    for (target, check) in PURE_TARGETS {
        for (path, input) in corpus(target) {
            eprintln!("{}", path.display());
            check(&input);
        }
    }
    let gateway = Gateway::new();
    for (path, input) in corpus("multipart") {
        eprintln!("{}", path.display());
        gateway.check(&input);
    }
}

/// `cases` unless `PROPTEST_CASES` says otherwise; failures are reported, not persisted (the
/// corpus is where a failing input goes).
fn runner(cases: u32) -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

/// Bytes made of pieces, so that random inputs look like what the target reads.
fn pieces(alphabet: &'static [&'static [u8]], max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(alphabet), 0..max).prop_map(|p| p.concat())
}

fn with_knobs(n: usize, body: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (prop::collection::vec(any::<u8>(), n), body).prop_map(|(mut knobs, body)| {
        knobs.extend(body);
        knobs
    })
}

const CSV: &[&[u8]] = &[
    b"a",
    b"Zo\xC3\xAB",
    b"u@example.com",
    b"+1 415 555 2671",
    b",",
    b";",
    b"\t",
    b"|",
    b"\"",
    b"\"\"",
    b"\r",
    b"\n",
    b"\r\n",
    b" ",
    b"\xEF\xBB\xBF",
    b"\xFF",
    b"\x00",
    b"\xF0\x9F\x98\x80",
    b"\xE2\x82",
    b"email",
    b"\x00a",
    b"a\x00",
];

#[test]
fn splitter_properties() {
    runner(300)
        .run(&with_knobs(4, pieces(CSV, 120)), |input| {
            splitter::check(&input);
            Ok(())
        })
        .unwrap();
}

#[test]
fn decompress_properties() {
    // CSV-like data, for the modes that compress it, and raw bytes that claim to be gzip or
    // zstd, for the modes that do not.
    let raw = prop::collection::vec(any::<u8>(), 0..600);
    runner(600)
        .run(
            &with_knobs(2, prop_oneof![pieces(CSV, 400), raw]),
            |input| {
                decompress::check(&input);
                Ok(())
            },
        )
        .unwrap();
}

const NAMES: &[&[u8]] = &[
    b"e",
    b"mail",
    b"E",
    b"MAIL",
    b"-",
    b"_",
    b" ",
    b"\t",
    b"\n",
    b"first",
    b"name",
    b"phone",
    b"linked",
    b"in",
    b"URL",
    b"company",
    b"\xC3\x9F",
    b"\xC4\xB0",
    b"\xE2\x84\xAA",
    b"column_2",
    b"@",
];

#[test]
fn header_properties() {
    runner(500)
        .run(&with_knobs(1, pieces(NAMES, 40)), |input| {
            header::check(&input);
            Ok(())
        })
        .unwrap();
}

const VALUES: &[&[u8]] = &[
    b"Ann",
    b"Lee",
    b" ",
    b"  ",
    b"\t",
    b",",
    b"@",
    b".",
    b"example.com",
    b"EXAMPLE.COM",
    b"mailto:",
    b"MAILTO:",
    b"\"",
    b"(",
    b")",
    b"+",
    b"1",
    b"44",
    b"415",
    b"555",
    b"2671",
    b"020",
    b"7946",
    b"0958",
    b"ext",
    b"https://",
    b"www.",
    b"linkedin.com",
    b"/in/",
    b"ann-lee",
    b"/",
    b"?",
    b"%41",
    b"\xC4\xB0",
    b"\xC3\x9F",
    b"\xFF",
];

#[test]
fn normalize_properties() {
    runner(500)
        .run(&with_knobs(2, pieces(VALUES, 24)), |input| {
            normalize::check(&input);
            Ok(())
        })
        .unwrap();
}

#[test]
fn cursor_properties() {
    let numbers = (any::<i64>(), any::<i64>()).prop_map(|(a, b)| {
        let mut input = vec![1];
        input.extend(a.to_le_bytes());
        input.extend(b.to_le_bytes());
        input
    });
    let text = (any::<String>(), prop::option::of("[0-9+-]{0,6}")).prop_map(|(c, l)| {
        let mut input = vec![0];
        input.extend(c.bytes().filter(|&b| b != 0));
        if let Some(l) = l {
            input.push(0);
            input.extend(l.bytes());
        }
        input
    });
    runner(1000)
        .run(&prop_oneof![numbers, text], |input| {
            cursor::check(&input);
            Ok(())
        })
        .unwrap();
}

/// One part of a multipart body.
#[derive(Debug, Clone)]
struct Part {
    name: &'static str,
    filename: Option<&'static str>,
    content: Vec<u8>,
}

fn part() -> impl Strategy<Value = Part> {
    let name = prop::sample::select(
        &[
            "file",
            "file",
            "delimiter",
            "encoding",
            "idempotency_key",
            "note",
        ][..],
    );
    let filename = prop::option::of(prop::sample::select(
        &["contacts.csv", "", "a\u{7}b.csv", "../x.csv"][..],
    ));
    let content = prop_oneof![
        pieces(CSV, 60).prop_map(|body| {
            let mut file = b"email,name\n".to_vec();
            file.extend(body);
            file
        }),
        pieces(CSV, 20),
        prop::sample::select(&[",", ";", "tab", "utf-16", "latin1", "x", "key-1"][..])
            .prop_map(|s| s.as_bytes().to_vec()),
    ];
    (name, filename, content).prop_map(|(name, filename, content)| Part {
        name,
        filename,
        content,
    })
}

/// A multipart body with the target's default boundary, maybe cut short or damaged.
fn multipart_input() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u8>(),
        prop::collection::vec(part(), 0..4),
        any::<bool>(),
        prop::option::of((any::<prop::sample::Index>(), any::<u8>())),
    )
        .prop_map(|(key, parts, close, damage)| {
            let mut body = Vec::new();
            for p in &parts {
                body.extend(b"--orbit\r\nContent-Disposition: form-data; name=\"");
                body.extend(p.name.as_bytes());
                body.push(b'"');
                if let Some(f) = p.filename {
                    body.extend(format!("; filename=\"{f}\"").bytes());
                }
                body.extend(b"\r\n\r\n");
                body.extend(&p.content);
                body.extend(b"\r\n");
            }
            if close {
                body.extend(b"--orbit--\r\n");
            }
            if let Some((at, byte)) = damage {
                if !body.is_empty() {
                    let i = at.index(body.len());
                    body[i] = byte;
                }
            }
            // Default content type; an idempotency key on some.
            let mut input = vec![key & 2, key];
            input.extend(body);
            input
        })
}

#[test]
fn multipart_properties() {
    let gateway = Gateway::new();
    runner(120)
        .run(&multipart_input(), |input| {
            gateway.check(&input);
            Ok(())
        })
        .unwrap();
}
