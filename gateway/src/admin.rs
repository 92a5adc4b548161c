//! `orbit-gateway admin …`: operator commands that print JSON on stdout.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use orbit_adapters::queue::Queue;
use orbit_config::TenantSettings;
use orbit_core::model::Retried;
use orbit_store::limits::LimitChange;
use orbit_store::Store;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::auth::{generate_token, hash_token};
use crate::types::validate_name;

/// The file of an embedded database URL (`sqlite://./data/orbit.db`, `sqlite:x.db?mode=rwc`),
/// or `None` for another backend or an in-memory database.
pub fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}

/// The database as a person should read it: an embedded one by its absolute file name, any
/// other by its URL with the password masked.
pub fn describe_database(url: &str) -> String {
    match sqlite_file(url) {
        Some(file) => std::path::absolute(&file)
            .unwrap_or(file)
            .display()
            .to_string(),
        None => orbit_core::redact::redact(url).into_owned(),
    }
}

/// Admin commands never create an embedded database. One that does not exist yet is almost
/// always the wrong one: the default `sqlite://./data/orbit.db` is relative to the directory
/// the command runs in, so run from elsewhere it would make a second, empty database, and the
/// token it printed would get `401` from the running gateway.
pub fn check_database(url: &str) -> anyhow::Result<()> {
    let Some(file) = sqlite_file(url) else {
        return Ok(());
    };
    if file.exists() {
        return Ok(());
    }
    anyhow::bail!(
        "there is no database at {}: admin commands do not create one, because a gateway using \
         another database would not see what they write. Run this command in the directory \
         where the gateway runs (database.url {url:?} is relative to it), or give it the \
         gateway's --config or ORBIT__DATABASE__URL; for a new installation, start the gateway \
         (or run `orbit-gateway migrate`) first",
        describe_database(url)
    )
}

/// Email recorded for tokens created without `--user-email`.
pub const DEFAULT_USER_EMAIL: &str = "admin@localhost";

pub async fn create_org(store: &dyn Store, name: &str) -> anyhow::Result<Value> {
    let name = validate_name(name).map_err(|e| anyhow::anyhow!(e.detail))?;
    let org = store.create_organization(name).await?;
    Ok(json!({ "organization_id": org.id }))
}

pub async fn create_directory(store: &dyn Store, org: Uuid, name: &str) -> anyhow::Result<Value> {
    anyhow::ensure!(
        store.organization_exists(org).await?,
        "no organization {org}"
    );
    let name = validate_name(name).map_err(|e| anyhow::anyhow!(e.detail))?;
    let dir = store.create_directory(org, name).await?;
    Ok(json!({ "directory_id": dir.id }))
}

pub async fn create_token(
    store: &dyn Store,
    org: Uuid,
    user_email: Option<&str>,
    expires_in: Option<Duration>,
) -> anyhow::Result<Value> {
    // Checked before anything is written, so a refused command leaves nothing behind.
    let expires_at = expires_in.map(expiry).transpose()?;
    anyhow::ensure!(
        store.organization_exists(org).await?,
        "no organization {org}"
    );
    let email = user_email
        .unwrap_or(DEFAULT_USER_EMAIL)
        .trim()
        .to_lowercase();
    anyhow::ensure!(
        orbit_core::domain::normalize::email(&email).is_some() || email == DEFAULT_USER_EMAIL,
        "--user-email {email:?} is not an email address"
    );
    let user = store.ensure_user(org, &email).await?;
    let (token, hash) = generate_token();
    store.insert_token(&hash, org, user, expires_at).await?;
    Ok(json!({ "token": token, "user_id": user, "expires_at": expires_at }))
}

/// The shortest and longest lifetimes `--expires-in` takes.
pub const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// A hundred years as humantime counts them (365.25 days), so it prints as `100years`.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(100 * 31_557_600);

/// `--expires-in`: a humantime duration from [`MIN_TOKEN_LIFETIME`] to [`MAX_TOKEN_LIFETIME`],
/// checked as the command line is read, before anything is opened or written.
pub fn parse_lifetime(text: &str) -> Result<Duration, String> {
    let lifetime = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if !(MIN_TOKEN_LIFETIME..=MAX_TOKEN_LIFETIME).contains(&lifetime) {
        return Err(format!(
            "must be from {} to {} (leave it out for a token that never expires)",
            humantime::format_duration(MIN_TOKEN_LIFETIME),
            humantime::format_duration(MAX_TOKEN_LIFETIME)
        ));
    }
    Ok(lifetime)
}

/// When a token made now with lifetime `lifetime` expires; an error, not a panic, past the
/// calendar's end.
fn expiry(lifetime: Duration) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    let lifetime = chrono::Duration::from_std(lifetime).context("--expires-in is too long")?;
    chrono::Utc::now()
        .checked_add_signed(lifetime)
        .context("--expires-in is too long")
}

pub async fn revoke_token(store: &dyn Store, token: &str) -> anyhow::Result<Value> {
    let revoked = store.revoke_token(&hash_token(token.trim())).await?;
    anyhow::ensure!(revoked, "no live token matches");
    Ok(json!({ "revoked": true }))
}

pub async fn archive_directory(store: &dyn Store, org: Uuid, dir: Uuid) -> anyhow::Result<Value> {
    let dir = store
        .archive_directory(org, dir)
        .await?
        .with_context(|| format!("no directory {dir} in organization {org}"))?;
    Ok(json!({ "directory_id": dir.id, "archived": true, "archived_at": dir.archived_at }))
}

/// An organization, a directory and a token: everything needed for a first upload.
pub async fn bootstrap(store: &dyn Store) -> anyhow::Result<Value> {
    let org = store.create_organization("Default organization").await?;
    let dir = store.create_directory(org.id, "Contacts").await?;
    let token = create_token(store, org.id, None, None).await?;
    Ok(json!({
        "organization_id": org.id,
        "directory_id": dir.id,
        "token": token["token"],
    }))
}

/// Resumes a failed source; workers (their reapers) pick its chunks up within seconds.
pub async fn retry_source(
    store: &dyn Store,
    org: Uuid,
    dir: Uuid,
    source: Uuid,
) -> anyhow::Result<Value> {
    match store.retry_source(org, dir, source).await? {
        Retried::Reopened(source, chunks) => Ok(json!({
            "source_id": source.id,
            "source_status": source.status,
            "chunks_to_run": chunks.len(),
        })),
        Retried::NotFound => {
            anyhow::bail!("no source {source} in directory {dir} of organization {org}")
        }
        Retried::NotFailed(s) => anyhow::bail!(
            "the source is {}; only a failed source can be retried",
            s.status.as_str()
        ),
        Retried::NothingToRetry(_) => anyhow::bail!(
            "every chunk of the source was processed; running them again would not change how it ended"
        ),
    }
}

/// Moves up to `limit` dead letters back to the work queue: `{replayed, kept, dead_letters_left}`.
/// A replayed chunk that is already done or failed is acknowledged and dropped by the worker
/// that receives it, so replaying is always safe.
pub async fn replay_dead_letters(queue: &dyn Queue, limit: u64) -> anyhow::Result<Value> {
    let replayed = queue.replay_dead_letters(limit).await?;
    Ok(serde_json::to_value(replayed)?)
}

/// One value of `admin set-limits`: a number, or `default` to drop the organization's own value
/// and take the configured default again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitValue(pub Option<u64>);

/// Reads a `set-limits` value: a whole number (0 is no limit) or `default`.
pub fn parse_limit_value(text: &str) -> Result<LimitValue, String> {
    match text.trim() {
        "default" => Ok(LimitValue(None)),
        n => n.parse::<u64>().map(|n| LimitValue(Some(n))).map_err(|_| {
            format!("{text:?} is neither a whole number (0 is no limit) nor `default`")
        }),
    }
}

/// What `admin set-limits` asks for, each field absent (kept), a value, or `default`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetLimits {
    pub weight: Option<LimitValue>,
    pub max_uploads_in_flight: Option<LimitValue>,
    pub max_queued_rows: Option<LimitValue>,
    pub max_uploads_per_minute: Option<LimitValue>,
    /// Every field back to its default first; the fields given then apply over that.
    pub reset: bool,
}

/// Sets an organization's own weight and limits, then prints them as [`get_limits`] does.
pub async fn set_limits(
    store: &dyn Store,
    defaults: &TenantSettings,
    org: Uuid,
    set: SetLimits,
) -> anyhow::Result<Value> {
    anyhow::ensure!(
        store.organization_exists(org).await?,
        "no organization {org}"
    );
    let weight = match set.weight {
        Some(LimitValue(Some(w))) => {
            let w = u32::try_from(w)
                .ok()
                .filter(|w| *w > 0 && i32::try_from(*w).is_ok())
                .with_context(|| format!("--weight must be from 1 to {}, or default", i32::MAX))?;
            Some(Some(w))
        }
        Some(LimitValue(None)) => Some(None),
        None => None,
    };
    let count = |v: Option<LimitValue>, flag: &str| -> anyhow::Result<Option<Option<u64>>> {
        match v {
            Some(LimitValue(Some(n))) if i64::try_from(n).is_err() => {
                anyhow::bail!("--{flag} must be at most {}", i64::MAX)
            }
            v => Ok(v.map(|v| v.0)),
        }
    };
    let mut change = LimitChange {
        weight,
        max_uploads_in_flight: count(set.max_uploads_in_flight, "max-uploads-in-flight")?,
        max_queued_rows: count(set.max_queued_rows, "max-queued-rows")?,
        max_uploads_per_minute: count(set.max_uploads_per_minute, "max-uploads-per-minute")?,
    };
    if set.reset {
        change.weight = Some(change.weight.flatten());
        change.max_uploads_in_flight = Some(change.max_uploads_in_flight.flatten());
        change.max_queued_rows = Some(change.max_queued_rows.flatten());
        change.max_uploads_per_minute = Some(change.max_uploads_per_minute.flatten());
    }
    store.set_organization_limits(org, &change).await?;
    get_limits(store, defaults, org).await
}

/// An organization's weight and limits in force, each with where it comes from (`override`,
/// set by `set-limits`, or `default`, the `[tenants]` setting), and what it holds now as the
/// limits count it: `{organization_id, weight: {value, source}, max_uploads_in_flight: …,
/// max_queued_rows: …, max_uploads_per_minute: …, usage: {…}}`. A limit of 0 is no limit.
pub async fn get_limits(
    store: &dyn Store,
    defaults: &TenantSettings,
    org: Uuid,
) -> anyhow::Result<Value> {
    anyhow::ensure!(
        store.organization_exists(org).await?,
        "no organization {org}"
    );
    let own = store.organization_limits(org).await?;
    let usage = store.organization_usage(org).await?;
    fn field(own: Option<u64>, default: u64) -> Value {
        match own {
            Some(value) => json!({ "value": value, "source": "override" }),
            None => json!({ "value": default, "source": "default" }),
        }
    }
    Ok(json!({
        "organization_id": org,
        "weight": field(own.weight.map(u64::from), u64::from(defaults.default_weight)),
        "max_uploads_in_flight": field(own.max_uploads_in_flight, defaults.max_uploads_in_flight),
        "max_queued_rows": field(own.max_queued_rows, defaults.max_queued_rows),
        "max_uploads_per_minute": field(own.max_uploads_per_minute, defaults.max_uploads_per_minute),
        "usage": {
            "uploads_in_flight": usage.uploads_in_flight,
            "queued_rows": usage.queued_rows,
            "uploads_last_minute": usage.uploads_last_minute,
        },
    }))
}
