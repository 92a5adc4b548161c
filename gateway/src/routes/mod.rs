//! HTTP handlers, one module per resource, and the pagination shared by list endpoints.

pub mod directories;
pub mod export;
pub mod profiles;
pub mod sources;
pub mod system;
pub mod webhooks;

use std::collections::HashMap;

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use base64::Engine as _;
use orbit_core::model::{Cursor, Directory, Page, PageRequest, Source};
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

/// The path's parameters by name (`org`, `dir`, `source`, …).
async fn path_params(parts: &mut Parts, state: &AppState) -> ApiResult<HashMap<String, String>> {
    let Path(params) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
        .await
        .map_err(|e| ApiError::invalid_request(e.body_text()))?;
    Ok(params)
}

fn param<'a>(params: &'a HashMap<String, String>, name: &str) -> &'a str {
    params
        .get(name)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("the route has no {{{name}}} parameter"))
}

/// The path's directory (`…/organizations/{org}/directories/{dir}/…`): the caller's token
/// must be of `{org}` (else `403`), `{dir}` a UUID (else `400`) naming one of its directories
/// (else `404 directory_not_found`). Extracting it authenticates the request.
pub struct ScopedDirectory(pub Directory);

impl FromRequestParts<AppState> for ScopedDirectory {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        let caller = Caller::from_request_parts(parts, state).await?;
        let params = path_params(parts, state).await?;
        let org = caller.scope(param(&params, "org"))?;
        let dir = parse_id(param(&params, "dir"), "directory")?;
        let directory = state
            .store
            .get_directory(org, dir)
            .await?
            .ok_or_else(ApiError::directory_not_found)?;
        Ok(ScopedDirectory(directory))
    }
}

/// The path's source (`…/directories/{dir}/sources/{source}…`) within its
/// [`ScopedDirectory`]: `{source}` a UUID (else `400`) naming one of the directory's sources
/// (else `404 source_not_found`).
pub struct ScopedSource(pub Source);

impl FromRequestParts<AppState> for ScopedSource {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        let ScopedDirectory(dir) = ScopedDirectory::from_request_parts(parts, state).await?;
        let params = path_params(parts, state).await?;
        let source = parse_id(param(&params, "source"), "source")?;
        let source = state
            .store
            .get_source(dir.organization_id, dir.id, source)
            .await?
            .ok_or_else(|| {
                ApiError::not_found("source_not_found", "no such source in this directory")
            })?;
        Ok(ScopedSource(source))
    }
}
