//! Target `cursor`: the pagination query of every list endpoint (`orbit_gateway::routes`).
//!
//! Input: one option byte; then either sixteen bytes read as the two numbers of a cursor
//! (option bit 0 set) or the text of `?cursor=` and, after a NUL, of `?limit=`.
//!
//! Properties:
//! - any cursor the API hands out reads back as itself, and is URL-safe as it stands;
//! - any other text is a page request with a limit from 1 to 1000, or a
//!   `400 invalid_request`; never a panic;
//! - a cursor that is accepted reads back the same once encoded again;
//! - an empty cursor is the first page, as an absent one.

use orbit_core::model::Cursor;
use orbit_gateway::routes::{encode_cursor, PageQuery};

use crate::Knobs;

pub fn check(data: &[u8]) {
    let (knobs, rest) = Knobs::split(data, 1);
    if knobs.byte(0) & 1 != 0 {
        let mut numbers = [0u8; 16];
        let n = rest.len().min(16);
        numbers[..n].copy_from_slice(&rest[..n]);
        let a = i64::from_le_bytes(numbers[..8].try_into().expect("8 bytes"));
        let b = i64::from_le_bytes(numbers[8..].try_into().expect("8 bytes"));
        round_trip(Cursor(a, b));
        return;
    }
    let text = String::from_utf8_lossy(rest);
    let (cursor, limit) = match text.split_once('\0') {
        Some((cursor, limit)) => (cursor, Some(limit)),
        None => (&text[..], None),
    };
    let query = PageQuery {
        limit: limit.map(str::to_owned),
        cursor: Some(cursor.to_owned()),
    };
    match query.parse() {
        Ok(page) => {
            assert!((1..=1000).contains(&page.limit), "limit {}", page.limit);
            match page.after {
                Some(after) => round_trip(after),
                None => assert!(cursor.is_empty(), "{cursor:?} read as no cursor"),
            }
        }
        Err(e) => {
            assert_eq!(e.status.as_u16(), 400, "{e:?}");
            assert_eq!(e.code, "invalid_request", "{e:?}");
        }
    }
}

fn round_trip(cursor: Cursor) {
    let text = encode_cursor(cursor);
    assert!(
        text.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{text:?} needs no escaping in a query string"
    );
    let query = PageQuery {
        limit: None,
        cursor: Some(text.clone()),
    };
    let page = query.parse().expect("a cursor the API made is accepted");
    assert_eq!(page.after, Some(cursor), "{text:?} reads back");
    assert_eq!(page.limit, 100, "the default limit");
}
