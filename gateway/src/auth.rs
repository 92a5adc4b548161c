//! Bearer tokens: random, shown once, stored only as a SHA-256 hash, bound to one organization.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use base64::Engine as _;
use chrono::Utc;
use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::app::AppState;
use crate::problem::ApiError;

const PREFIX: &str = "orb_";

/// A freshly generated token: the secret to show once, and the hash to store.
pub fn generate_token() -> (String, Vec<u8>) {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let token = format!(
        "{PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let hash = hash_token(&token);
    (token, hash)
}

pub fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// The authenticated caller: its token's organization is the request's context.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub organization_id: Uuid,
    pub user_id: Uuid,
}

impl Caller {
    /// The path's organization, which must be the caller's own.
    pub fn scope(&self, path_org: &str) -> Result<Uuid, ApiError> {
        let org = parse_id(path_org, "organization")?;
        if org != self.organization_id {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "organization_mismatch",
                "the token does not belong to this organization",
            ));
        }
        Ok(org)
    }
}

/// An id of the path: a UUID in its hyphenated form (`8-4-4-4-12` hex digits, any case), the
/// one form Orbit writes and the OpenAPI document's pattern; braced, URN and unhyphenated
/// spellings are refused rather than accepted behind the contract's back.
pub fn parse_id(raw: &str, what: &str) -> Result<Uuid, ApiError> {
    let invalid = || ApiError::invalid_request(format!("{what} id {raw:?} is not a UUID"));
    if raw.len() != 36 {
        return Err(invalid());
    }
    Uuid::try_parse(raw).map_err(|_| invalid())
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        // Extractors that scope a path ([`crate::routes::ScopedDirectory`]) authenticate too:
        // the token is looked up once per request.
        if let Some(caller) = parts.extensions.get::<Caller>() {
            return Ok(*caller);
        }
        let caller = Self::authenticate(parts, state).await?;
        parts.extensions.insert(caller);
        Ok(caller)
    }
}

impl Caller {
    async fn authenticate(parts: &Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthenticated(
                "an Authorization: Bearer token is required",
            ));
        };
        let invalid = || {
            ApiError::unauthenticated("the bearer token is malformed, unknown, expired or revoked")
                .with_header(header::WWW_AUTHENTICATE, "Bearer error=\"invalid_token\"")
        };
        let value = value.to_str().map_err(|_| invalid())?;
        let (scheme, token) = value.trim().split_once(' ').ok_or_else(invalid)?;
        let token = token.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || !token.starts_with(PREFIX) || token.len() > 128
        {
            return Err(invalid());
        }
        let hash = hash_token(token);
        let record = state
            .tokens
            .get_or_load(&hash, || state.store.find_token(&hash))
            .await?
            .ok_or_else(invalid)?;
        let now = Utc::now();
        if record.revoked_at.is_some() || record.expires_at.is_some_and(|e| e <= now) {
            return Err(invalid());
        }
        Ok(Caller {
            organization_id: record.organization_id,
            user_id: record.user_id,
        })
    }
}
