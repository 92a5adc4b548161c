//! Directories: list, create, archive.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Utc};
use orbit_core::model::Directory;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{PageBody, PageQuery, ScopedDirectory};
use crate::app::AppState;
use crate::auth::Caller;
use crate::problem::{ApiError, ApiResult};
use crate::types::validate_name;

#[derive(Serialize)]
pub struct DirectoryBody {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub name: String,
    pub archived: bool,
    pub created_at: DateTime<Utc>,
    pub archived_at: Option<DateTime<Utc>>,
}

impl From<Directory> for DirectoryBody {
    fn from(d: Directory) -> Self {
        DirectoryBody {
            id: d.id,
            organization_id: d.organization_id,
            name: d.name,
            archived: d.archived,
            created_at: d.created_at,
            archived_at: d.archived_at,
        }
    }
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    Query(query): Query<PageQuery>,
) -> ApiResult<Json<PageBody<DirectoryBody>>> {
    let org = caller.scope(&org)?;
    let page = state.store.list_directories(org, &query.parse()?).await?;
    Ok(Json(PageBody::from_page(page, DirectoryBody::from)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateDirectory {
    name: String,
}

pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let org = caller.scope(&org)?;
    let request: CreateDirectory = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid_request(format!("body must be JSON {{\"name\": \"…\"}}: {e}"))
    })?;
    let name = validate_name(&request.name)?;
    let dir = state.store.create_directory(org, name).await?;
    let location = format!("/v2/organizations/{org}/directories/{}", dir.id);
    Ok((
        StatusCode::CREATED,
        [(axum::http::header::LOCATION, location)],
        Json(DirectoryBody::from(dir)),
    ))
}

pub async fn archive(
    State(state): State<AppState>,
    ScopedDirectory(dir): ScopedDirectory,
) -> ApiResult<Json<DirectoryBody>> {
    let archived = state
        .store
        .archive_directory(dir.organization_id, dir.id)
        .await?
        .ok_or_else(ApiError::directory_not_found)?;
    // This gateway takes no upload into it from now on; others within `http.lookup_ttl`.
    state.directories.forget(&(dir.organization_id, dir.id));
    Ok(Json(archived.into()))
}
