//! The header check before a file is sent: settle the dialect exactly as the server will (the
//! same `probe`), read the header row with `csv-async`, and match it with the server's own
//! rules. A header the server would reject with `422 invalid_csv` is caught before a gigabyte
//! goes over the wire; columns that map to no profile field are reported, since Orbit keeps
//! them only as custom attributes.

use std::io::SeekFrom;
use std::path::Path;

use futures::StreamExt as _;
use orbit_core::domain::csv::{probe, Dialect, Probe, ProbeOptions, TextEncoding};
use orbit_core::domain::header::{Column, ColumnMap, ColumnMapping};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

/// The server's default `ingest.max_header_bytes`; a server configured larger still decides.
const MAX_HEADER_BYTES: usize = 65_536;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub dialect: Dialect,
    /// The header as written.
    pub names: Vec<String>,
    /// Columns that match no known field: kept as custom attributes, not mapped.
    pub unmapped: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// The server would answer `422 invalid_csv`.
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read the file: {0}")]
    Io(#[from] std::io::Error),
}

pub async fn check(
    path: &Path,
    delimiter_hint: Option<u8>,
    encoding_hint: Option<TextEncoding>,
    mapping: Option<&ColumnMapping>,
) -> Result<Header, PreflightError> {
    let mut file = tokio::fs::File::open(path).await?;
    // Blank lines before the header and the header itself are each bounded by the limit.
    let budget = MAX_HEADER_BYTES * 2 + 8;
    let mut prefix = Vec::with_capacity(64 * 1024);
    let mut at_eof = false;
    let options = ProbeOptions {
        encoding_hint,
        delimiter_hint,
        max_header_bytes: MAX_HEADER_BYTES,
    };
    let dialect = loop {
        match probe(&prefix, at_eof, &options).map_err(|e| PreflightError::Invalid(e.0))? {
            Probe::Ready(dialect) => break dialect,
            Probe::NeedMore if prefix.len() >= budget => {
                return Err(PreflightError::Invalid(format!(
                    "the header row is longer than {MAX_HEADER_BYTES} bytes"
                )))
            }
            Probe::NeedMore => {
                let mut buf = vec![0u8; 64 * 1024];
                let n = file.read(&mut buf).await?;
                prefix.extend_from_slice(&buf[..n]);
                at_eof = n == 0;
            }
        }
    };
    let names = if dialect.encoding == TextEncoding::Utf8 {
        file.seek(SeekFrom::Start(dialect.bom_len)).await?;
        read_header(file, dialect.delimiter).await?
    } else {
        // csv-async reads ASCII-compatible bytes; transcode the (bounded) prefix first.
        let text = decode(dialect.encoding, &prefix[dialect.bom_len as usize..]);
        read_header(text.as_bytes(), dialect.delimiter).await?
    };
    // The column limit is the server's setting; only the server can apply it.
    let map = ColumnMap::from_header_mapped(&names, usize::MAX, mapping)
        .map_err(|e| PreflightError::Invalid(e.0))?;
    // A column the mapping names was placed on purpose: only the others are worth a warning.
    let unmapped = map
        .columns
        .iter()
        .zip(&map.names)
        .filter(|(_, name)| mapping.is_none_or(|m| !m.0.contains_key(*name)))
        .filter_map(|(c, _)| match c {
            Column::Custom(name) => Some(name.clone()),
            Column::Known(_) | Column::Ignored => None,
        })
        .collect();
    Ok(Header {
        dialect,
        names,
        unmapped,
    })
}

async fn read_header<R>(reader: R, delimiter: u8) -> Result<Vec<String>, PreflightError>
where
    R: tokio::io::AsyncRead + Unpin + Send,
{
    let mut csv = csv_async::AsyncReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(false)
        .flexible(true)
        .create_reader(reader);
    let mut records = csv.byte_records();
    let Some(first) = records.next().await else {
        return Err(PreflightError::Invalid("the file has no header row".into()));
    };
    let first = first.map_err(|e| PreflightError::Invalid(format!("the header row: {e}")))?;
    first
        .iter()
        .map(|field| {
            String::from_utf8(field.to_vec()).map_err(|_| {
                PreflightError::Invalid("the header row is not valid utf-8 text".into())
            })
        })
        .collect()
}

fn decode(encoding: TextEncoding, raw: &[u8]) -> String {
    let encoding = match encoding {
        TextEncoding::Utf8 => encoding_rs::UTF_8,
        TextEncoding::Utf16Le => encoding_rs::UTF_16LE,
        TextEncoding::Utf16Be => encoding_rs::UTF_16BE,
        TextEncoding::Windows1252 | TextEncoding::Latin1 => encoding_rs::WINDOWS_1252,
    };
    encoding.decode_without_bom_handling(raw).0.into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn header_of(bytes: &[u8]) -> Result<Header, PreflightError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.csv");
        std::fs::write(&path, bytes).unwrap();
        check(&path, None, None, None).await
    }

    #[tokio::test]
    async fn unmapped_columns_are_those_the_server_keeps_as_attributes() {
        let h = header_of(b"\xEF\xBB\xBFE-mail;Given Name;Favourite Colour\r\na@b.c;Ann;red\r\n")
            .await
            .unwrap();
        assert_eq!(h.dialect.delimiter, b';');
        assert_eq!(h.names, ["E-mail", "Given Name", "Favourite Colour"]);
        assert_eq!(h.unmapped, ["Favourite Colour"]);
    }

    #[tokio::test]
    async fn quoted_newlines_and_leading_blank_lines_are_read_like_the_server() {
        let h = header_of(b"\n\n\"Phone\nNumber\",\"Shoe, Size\"\n1,2\n")
            .await
            .unwrap();
        assert_eq!(h.names, ["Phone\nNumber", "Shoe, Size"]);
        assert_eq!(h.unmapped, ["Shoe, Size"]);
    }

    #[tokio::test]
    async fn utf16_headers_are_transcoded_first() {
        let mut bytes = vec![0xFF, 0xFE];
        for unit in "email,Team\r\nx@y.z,a\r\n".encode_utf16() {
            bytes.extend_from_slice(&unit.to_le_bytes());
        }
        let h = header_of(&bytes).await.unwrap();
        assert_eq!(h.dialect.encoding, TextEncoding::Utf16Le);
        assert_eq!(h.unmapped, ["Team"]);
    }

    #[tokio::test]
    async fn headers_the_server_rejects_are_rejected_here() {
        for (bytes, words) in [
            (
                &b"first name,company\nAnn,Acme\n"[..],
                "no identifier column",
            ),
            (b"email,Email\n", "duplicate"),
            (b"", "empty"),
            (b"\n\n", "no header row"),
        ] {
            match header_of(bytes).await {
                Err(PreflightError::Invalid(m)) => assert!(m.contains(words), "{m}"),
                other => panic!("{bytes:?}: {other:?}"),
            }
        }
    }
}
