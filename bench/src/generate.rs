//! The benchmark's input: a deterministic contacts CSV in the columns of the upload
//! contract (docs/api.md, "CSV rules").
//!
//! Every row has a unique email, and phones and LinkedIn URLs (when present) are unique too,
//! so each row becomes its own profile in Orbit and its own row in the baseline table: both
//! sides do the same amount of identity work. Values come from a fixed-seed splitmix64 rather
//! than `rand`, whose generators may change output between versions; the same arguments give
//! the same bytes on every machine.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub const HEADER: &str = "first_name,last_name,email,phone,company,title,linkedin_url,city,country";

const FIRST: &[&str] = &[
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "William",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Sarah",
    "Charles",
    "Karen",
    "Ana",
    "Luis",
    "Sofia",
    "Mateo",
    "Chloé",
    "Hugo",
    "Léa",
    "Zoë",
    "Amélie",
    "Yuki",
    "Wei",
    "Priya",
    "Arjun",
    "Fatima",
    "Omar",
    "Ingrid",
    "Lars",
    "Niamh",
    "Seán",
    "Aoife",
];
const LAST: &[&str] = &[
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Müller",
    "Dubois",
    "Rossi",
    "Nakamura",
    "Chen",
    "Patel",
    "Kowalski",
    "O'Brien",
    "Novák",
    "Søndergaard",
];
const DOMAINS: &[&str] = &[
    "example.com",
    "example.org",
    "example.net",
    "mail.example.com",
    "corp.example.org",
];
const COMPANIES: &[&str] = &[
    "Acme Corp",
    "Globex",
    "Initech",
    "Umbrella Group",
    "Hooli",
    "Stark Industries",
    "Wayne Enterprises",
    "Northwind Traders",
    "Contoso, Ltd.",
    "Fabrikam",
    "Tyrell \"Replicant\" Co",
    "Soylent",
    "Cyberdyne Systems",
    "Vandelay Industries",
    "",
];
const TITLES: &[&str] = &[
    "Software Engineer",
    "Senior Software Engineer",
    "Product Manager",
    "Head of Sales",
    "Account Executive",
    "CTO",
    "VP Marketing",
    "Data Scientist",
    "Designer",
    "Recruiter",
    "Customer Success Manager",
    "",
];
const PLACES: &[(&str, &str)] = &[
    ("New York", "US"),
    ("San Francisco", "US"),
    ("Austin", "US"),
    ("Chicago", "US"),
    ("Seattle", "US"),
    ("Boston", "US"),
    ("Paris", "FR"),
    ("Berlin", "DE"),
    ("London", "GB"),
    ("Dublin", "IE"),
    ("Toronto", "CA"),
    ("São Paulo", "BR"),
    ("Tokyo", "JP"),
    ("", ""),
];
/// Real US area codes: national numbers under them validate with the default region `US`.
const AREA_CODES: &[u32] = &[
    201, 202, 206, 212, 213, 303, 305, 312, 404, 415, 503, 512, 602, 617, 646, 702, 713, 718, 808,
    917,
];

struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() % items.len() as u64) as usize]
    }

    /// True `percent` times in a hundred.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn quoted(value: &str) -> std::borrow::Cow<'_, str> {
    if value.contains([',', '"', '\n']) {
        format!("\"{}\"", value.replace('"', "\"\"")).into()
    } else {
        value.into()
    }
}

/// Appends row `i` (0-based) to `out`.
fn row(rng: &mut SplitMix64, i: u64, out: &mut String) {
    use std::fmt::Write as _;
    let first = *rng.pick(FIRST);
    let last = *rng.pick(LAST);
    let domain = *rng.pick(DOMAINS);
    let slug = |s: &str| s.to_lowercase().replace(['\'', ' '], "");
    let _ = write!(out, "{first},{},", quoted(last));
    let _ = write!(out, "{}.{}.{i}@{domain},", slug(first), slug(last));
    // 90% have a phone in a national format, unique for the first 160M indexes: (area,
    // exchange) cycles through 16,000 pairs and the line number counts the cycles.
    if rng.chance(90) {
        let n = AREA_CODES.len() as u64;
        let area = AREA_CODES[(i % n) as usize];
        let exchange = 200 + (i / n) % 800;
        let line = (i / (n * 800)) % 10_000;
        let _ = write!(out, "({area}) {exchange}-{line:04}");
    }
    out.push(',');
    let _ = write!(out, "{},", quoted(rng.pick::<&str>(COMPANIES)));
    let _ = write!(out, "{},", rng.pick(TITLES));
    if rng.chance(80) {
        let _ = write!(
            out,
            "https://www.linkedin.com/in/{}-{}-{i:x}",
            slug(first),
            slug(last)
        );
    }
    let (city, country) = rng.pick(PLACES);
    let _ = writeln!(out, ",{city},{country}");
}

/// A CSV of rows `first..first + count`, with its header, from a stream of their own: distinct
/// uploads for the latency run (row indexes make every email unique).
pub fn rows(first: u64, count: u64) -> String {
    let mut rng = SplitMix64(first);
    let mut out = String::with_capacity(HEADER.len() + 1 + count as usize * 160);
    out.push_str(HEADER);
    out.push('\n');
    for i in first..first + count {
        row(&mut rng, i, &mut out);
    }
    out
}

/// What was written: rows and bytes.
#[derive(Debug, Clone, Copy)]
pub struct Generated {
    pub rows: u64,
    pub bytes: u64,
}

/// The seed of the bulk files' stream of rows.
const BULK_SEED: u64 = 0x0bb1_7c57_2026;

/// Writes `rows` rows, or as many as fit in `max_bytes`, whichever comes first.
pub fn write_csv(path: &Path, rows: u64, max_bytes: u64) -> anyhow::Result<Generated> {
    let mut rng = SplitMix64(BULK_SEED);
    write_rows(path, &mut rng, 0..rows, max_bytes)
}

/// The rows `write_csv(_, rows, _)` writes, split in order over `paths` (each with its header):
/// the same contacts as the one file, for uploads into several directories at once. The first
/// files take one row more when `rows` does not divide evenly.
pub fn write_csv_parts(paths: &[PathBuf], rows: u64) -> anyhow::Result<Vec<Generated>> {
    anyhow::ensure!(!paths.is_empty(), "no file to write");
    let parts = paths.len() as u64;
    let mut rng = SplitMix64(BULK_SEED);
    let mut first = 0;
    let mut written = Vec::with_capacity(paths.len());
    for (i, path) in paths.iter().enumerate() {
        let count = rows / parts + u64::from((i as u64) < rows % parts);
        written.push(write_rows(path, &mut rng, first..first + count, u64::MAX)?);
        first += count;
    }
    Ok(written)
}

/// Writes the header, then rows `indexes` drawn from `rng`, stopping before the file would
/// pass `max_bytes`.
fn write_rows(
    path: &Path,
    rng: &mut SplitMix64,
    indexes: std::ops::Range<u64>,
    max_bytes: u64,
) -> anyhow::Result<Generated> {
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut line = String::with_capacity(256);
    let mut bytes = HEADER.len() as u64 + 1;
    out.write_all(HEADER.as_bytes())?;
    out.write_all(b"\n")?;
    let mut written = 0;
    for i in indexes {
        line.clear();
        row(rng, i, &mut line);
        if bytes + line.len() as u64 > max_bytes {
            break;
        }
        out.write_all(line.as_bytes())?;
        bytes += line.len() as u64;
        written += 1;
    }
    out.flush()?;
    Ok(Generated {
        rows: written,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_arguments_same_bytes_and_unique_identities() {
        let dir = std::env::temp_dir().join(format!("orbit-bench-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.csv"), dir.join("b.csv"));
        let ga = write_csv(&a, 50_000, u64::MAX).unwrap();
        write_csv(&b, 50_000, u64::MAX).unwrap();
        let text = std::fs::read_to_string(&a).unwrap();
        assert_eq!(text, std::fs::read_to_string(&b).unwrap());
        assert_eq!(ga.bytes, text.len() as u64);

        let mut reader = csv::Reader::from_reader(text.as_bytes());
        let mut emails = std::collections::HashSet::new();
        let mut phones = std::collections::HashSet::new();
        let mut rows = 0;
        for record in reader.records() {
            let record = record.unwrap();
            assert_eq!(record.len(), 9);
            assert!(emails.insert(record[2].to_owned()), "{:?}", &record[2]);
            if !record[3].is_empty() {
                assert!(phones.insert(record[3].to_owned()), "{:?}", &record[3]);
            }
            rows += 1;
        }
        assert_eq!(rows, 50_000);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn parts_hold_the_rows_of_the_one_file_in_order() {
        let dir = std::env::temp_dir().join(format!("orbit-bench-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let whole = dir.join("whole.csv");
        write_csv(&whole, 1_003, u64::MAX).unwrap();
        let paths: Vec<PathBuf> = (0..4).map(|i| dir.join(format!("part-{i}.csv"))).collect();
        let parts = write_csv_parts(&paths, 1_003).unwrap();
        assert_eq!(
            parts.iter().map(|g| g.rows).collect::<Vec<_>>(),
            [251, 251, 251, 250]
        );
        let mut joined = format!("{HEADER}\n");
        for (path, g) in paths.iter().zip(&parts) {
            let text = std::fs::read_to_string(path).unwrap();
            assert_eq!(text.len() as u64, g.bytes);
            let body = text.strip_prefix(&format!("{HEADER}\n")).unwrap();
            assert_eq!(body.lines().count() as u64, g.rows);
            joined.push_str(body);
        }
        assert_eq!(joined, std::fs::read_to_string(&whole).unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn stops_before_the_byte_limit() {
        let path = std::env::temp_dir().join(format!("orbit-bench-{}.csv", uuid::Uuid::new_v4()));
        let g = write_csv(&path, u64::MAX, 10_000).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(len, g.bytes);
        assert!(len <= 10_000 && len > 9_500, "{len}");
    }
}
