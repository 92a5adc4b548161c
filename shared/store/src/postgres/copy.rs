//! Rows for PostgreSQL's `COPY … FROM STDIN (FORMAT binary)`: how the bulk tables (profiles,
//! identities, records) are written. PostgreSQL takes binary fields as they are, where the text
//! format made it parse every key, version and id (`strtoull`, `uuid_in`: about a tenth of its
//! CPU during a bulk ingest), and the worker no longer formats each of them into a string.
//!
//! The format (PostgreSQL documentation, "COPY", "Binary Format"): a signature and two 32-bit
//! words, then per row a 16-bit field count and per field a 32-bit length (-1 for NULL) and
//! the value in the type's binary (`send`) representation, all big-endian; a 16-bit -1 ends it.

use uuid::Uuid;

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

pub(super) struct BinaryRows {
    buf: Vec<u8>,
    rows: usize,
}

impl BinaryRows {
    pub fn new() -> Self {
        let mut buf = Vec::with_capacity(64 * 1024);
        buf.extend_from_slice(SIGNATURE);
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        buf.extend_from_slice(&0i32.to_be_bytes()); // no header extension
        BinaryRows { buf, rows: 0 }
    }

    /// Starts a row of `fields` fields; the caller then writes exactly that many.
    pub fn row(&mut self, fields: i16) -> &mut Self {
        self.rows += 1;
        self.buf.extend_from_slice(&fields.to_be_bytes());
        self
    }

    fn field(&mut self, bytes: &[u8]) -> &mut Self {
        // Field lengths are 32-bit; a value that long is refused by validation long before.
        self.buf
            .extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        self.buf.extend_from_slice(bytes);
        self
    }

    fn null(&mut self) -> &mut Self {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
        self
    }

    pub fn uuid(&mut self, value: Uuid) -> &mut Self {
        self.field(value.as_bytes())
    }

    /// A `BIGINT`.
    pub fn int8(&mut self, value: i64) -> &mut Self {
        self.field(&value.to_be_bytes())
    }

    pub fn int8_or_null(&mut self, value: Option<i64>) -> &mut Self {
        match value {
            Some(v) => self.int8(v),
            None => self.null(),
        }
    }

    /// A `SMALLINT`.
    pub fn int2(&mut self, value: i16) -> &mut Self {
        self.field(&value.to_be_bytes())
    }

    /// A `TEXT`: its UTF-8 bytes, unescaped.
    pub fn text(&mut self, value: &str) -> &mut Self {
        self.field(value.as_bytes())
    }

    pub fn text_or_null(&mut self, value: Option<&str>) -> &mut Self {
        match value {
            Some(v) => self.text(v),
            None => self.null(),
        }
    }

    /// The COPY data, or `None` when no row was written (nothing to send).
    pub fn finish(mut self) -> Option<Vec<u8>> {
        if self.rows == 0 {
            return None;
        }
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        Some(self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_framed_as_copy_binary_format_defines() {
        let mut rows = BinaryRows::new();
        rows.row(3).int8(-2).text_or_null(None).text("é");
        let data = rows.finish().unwrap();
        let mut expected = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0".to_vec();
        expected.extend_from_slice(&[0, 3]);
        expected.extend_from_slice(&[0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]);
        expected.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        expected.extend_from_slice(&[0, 0, 0, 2, 0xc3, 0xa9]);
        expected.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(data, expected);
    }

    #[test]
    fn no_rows_means_nothing_to_send() {
        assert_eq!(BinaryRows::new().finish(), None);
    }
}
