//! Resolved profiles of a directory.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Path, Query, State};
use axum::Json;
use chrono::{DateTime, Utc};
use orbit_core::domain::header::KnownField;
use orbit_core::domain::normalize;
use orbit_core::model::Profile;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{PageBody, PageQuery, ScopedDirectory};
use crate::app::AppState;
use crate::auth::parse_id;
use crate::problem::{ApiError, ApiResult};

#[derive(Serialize)]
pub struct ProfileBody {
    pub id: Uuid,
    pub directory_id: Uuid,
    /// Every known field, null when no record gave it a value or an import cleared it.
    #[serde(flatten)]
    pub fields: BTreeMap<&'static str, Option<String>>,
    pub attributes: BTreeMap<String, String>,
    pub identities: Identities,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Serialize, Default)]
pub struct Identities {
    pub emails: Vec<String>,
    pub phones: Vec<String>,
    pub linkedin_urls: Vec<String>,
}

impl From<Profile> for ProfileBody {
    fn from(p: Profile) -> Self {
        let fields = KnownField::ALL
            .into_iter()
            .map(|f| {
                (
                    f.as_str(),
                    p.state
                        .fields
                        .get(f.as_str())
                        .and_then(|v| v.shown().map(str::to_owned)),
                )
            })
            .collect();
        let mut identities = Identities::default();
        for (kind, value) in p.identities {
            match kind.as_str() {
                "email" => identities.emails.push(value),
                "phone" => identities.phones.push(value),
                _ => identities.linkedin_urls.push(value),
            }
        }
        ProfileBody {
            id: p.id,
            directory_id: p.directory_id,
            fields,
            // A cleared attribute is gone, as an attribute never written is.
            attributes: p
                .state
                .attributes
                .into_iter()
                .filter(|(_, v)| v.shown().is_some())
                .map(|(k, v)| (k, v.value))
                .collect(),
            identities,
            created_at: p.created_at,
            updated_at: p.updated_at,
        }
    }
}

#[derive(Deserialize)]
pub struct ProfileQuery {
    pub email: Option<String>,
    #[serde(flatten)]
    pub page: PageQuery,
}

pub async fn list(
    State(state): State<AppState>,
    ScopedDirectory(dir): ScopedDirectory,
    Query(query): Query<ProfileQuery>,
) -> ApiResult<Json<PageBody<ProfileBody>>> {
    // Matched as stored: normalized the way rows are, so `Ann@Example.com ` finds ann@example.com.
    // `email=` (empty) is no filter, as with `cursor=`.
    let email = query
        .email
        .as_deref()
        .filter(|e| !e.is_empty())
        .map(|e| normalize::email(e).unwrap_or_else(|| e.trim().to_lowercase()));
    let page = state
        .store
        .list_profiles(
            dir.organization_id,
            dir.id,
            email.as_deref(),
            &query.page.parse()?,
        )
        .await?;
    Ok(Json(PageBody::from_page(page, ProfileBody::from)))
}

pub async fn get(
    State(state): State<AppState>,
    ScopedDirectory(dir): ScopedDirectory,
    Path(params): Path<HashMap<String, String>>,
) -> ApiResult<Json<ProfileBody>> {
    let profile = parse_id(&params["profile"], "profile")?;
    let profile = state
        .store
        .get_profile(dir.organization_id, dir.id, profile)
        .await?
        .ok_or_else(|| {
            ApiError::not_found("profile_not_found", "no such profile in this directory")
        })?;
    Ok(Json(profile.into()))
}
