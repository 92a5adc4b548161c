//! HTTP handlers, one module per resource, and the pagination shared by list endpoints.

pub mod directories;
pub mod profiles;
pub mod sources;
pub mod system;

use base64::Engine as _;
use orbit_shared::model::{Cursor, Page, PageRequest};
use serde::{Deserialize, Serialize};

use crate::app::AppState;
use crate::auth::{parse_id, Caller};
use crate::problem::{ApiError, ApiResult};

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;

#[derive(Debug, Deserialize)]
pub struct PageQuery {
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

impl PageQuery {
    pub fn parse(&self) -> ApiResult<PageRequest> {
        let limit = match &self.limit {
            None => DEFAULT_LIMIT,
            Some(raw) => raw
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| {
                    ApiError::invalid_request(format!(
                        "limit must be a number from 1 to {MAX_LIMIT}"
                    ))
                })?,
        };
        // An empty cursor is the first page, as an absent one: clients that template
        // `?cursor=${next_cursor}` need no special case for the first request.
        let after = self
            .cursor
            .as_deref()
            .filter(|c| !c.is_empty())
            .map(decode_cursor)
            .transpose()?;
        Ok(PageRequest { after, limit })
    }
}

fn decode_cursor(raw: &str) -> ApiResult<Cursor> {
    let invalid = || ApiError::invalid_request("cursor is not one this API returned");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw)
        .map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let (a, b) = text.split_once('.').ok_or_else(invalid)?;
    Ok(Cursor(
        a.parse().map_err(|_| invalid())?,
        b.parse().map_err(|_| invalid())?,
    ))
}

pub fn encode_cursor(cursor: Cursor) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}.{}", cursor.0, cursor.1))
}

#[derive(Serialize)]
pub struct PageBody<T> {
    pub data: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> PageBody<T> {
    pub fn from_page<S>(page: Page<S>, f: impl FnMut(S) -> T) -> Self {
        PageBody {
            data: page.items.into_iter().map(f).collect(),
            next_cursor: page.next.map(encode_cursor),
        }
    }
}

/// Checks the caller's scope over `org` and that `dir` is one of its directories.
pub async fn scoped_directory(
    state: &AppState,
    caller: &Caller,
    org: &str,
    dir: &str,
) -> ApiResult<orbit_shared::model::Directory> {
    let org = caller.scope(org)?;
    let dir = parse_id(dir, "directory")?;
    state.store.get_directory(org, dir).await?.ok_or_else(|| {
        ApiError::not_found(
            "directory_not_found",
            "no such directory in this organization",
        )
    })
}
