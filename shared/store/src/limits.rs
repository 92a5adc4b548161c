//! Per-organization limits (docs/operations.md, "Per-organization limits"): an
//! organization's own values, set by `orbit-gateway admin set-limits` in
//! `organization_limits`, and the admission of uploads under them in `upload_admissions`.
//!
//! An upload is admitted before its body is read, in one transaction that takes the
//! organization's lock (a PostgreSQL advisory transaction lock; SQLite has one writer), counts
//! what the organization has in flight, queued and admitted in the last minute, and records the
//! admission. Every gateway admits through that lock, so however many replicas there are an
//! organization never holds more than its limit of admissions: the counts and the insert are
//! one critical section. The one thing not known at admission is how many rows an upload
//! brings: the queued-rows limit refuses uploads once the rows already recorded reach it, so
//! the uploads streaming at that moment may take the organization past it (by at most
//! `max_uploads_in_flight` files).

use std::time::Duration;

use async_trait::async_trait;
use orbit_config::TenantSettings;
use uuid::Uuid;

use crate::StoreResult;

/// How far back the per-minute limit counts admissions.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);
/// `Retry-After` of a refusal by the in-flight or queued-rows limit: room comes when one of the
/// organization's sources ends, which the admission cannot foresee cheaply; clients back off
/// further on their own (docs/api.md).
pub const BUSY_RETRY_AFTER: Duration = Duration::from_secs(30);

/// The class of the advisory locks that serialize one organization's admissions on
/// PostgreSQL (`pg_advisory_xact_lock(class, hashtext(organization))`); two organizations
/// whose ids hash alike only wait for each other's admissions.
pub const ADMISSION_LOCK_CLASS: i32 = 24_0024;

/// An organization's own values; `None` takes the configured default (`[tenants]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitOverrides {
    pub weight: Option<u32>,
    pub max_uploads_in_flight: Option<u64>,
    pub max_queued_rows: Option<u64>,
    pub max_uploads_per_minute: Option<u64>,
}

/// A change of an organization's values, per field: `None` keeps it, `Some(None)` resets it to
/// the default, `Some(Some(v))` sets it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitChange {
    pub weight: Option<Option<u32>>,
    pub max_uploads_in_flight: Option<Option<u64>>,
    pub max_queued_rows: Option<Option<u64>>,
    pub max_uploads_per_minute: Option<Option<u64>>,
}

impl LimitOverrides {
    /// These values after `change`.
    pub fn changed(self, change: &LimitChange) -> Self {
        LimitOverrides {
            weight: change.weight.unwrap_or(self.weight),
            max_uploads_in_flight: change
                .max_uploads_in_flight
                .unwrap_or(self.max_uploads_in_flight),
            max_queued_rows: change.max_queued_rows.unwrap_or(self.max_queued_rows),
            max_uploads_per_minute: change
                .max_uploads_per_minute
                .unwrap_or(self.max_uploads_per_minute),
        }
    }

    /// The upload limits in force: each override, else its default.
    pub fn upload_limits(&self, defaults: &TenantSettings) -> UploadLimits {
        UploadLimits {
            max_uploads_in_flight: self
                .max_uploads_in_flight
                .unwrap_or(defaults.max_uploads_in_flight),
            max_queued_rows: self.max_queued_rows.unwrap_or(defaults.max_queued_rows),
            max_uploads_per_minute: self
                .max_uploads_per_minute
                .unwrap_or(defaults.max_uploads_per_minute),
        }
    }
}

/// The upload limits in force for one organization; 0 is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UploadLimits {
    pub max_uploads_in_flight: u64,
    pub max_queued_rows: u64,
    pub max_uploads_per_minute: u64,
}

impl UploadLimits {
    /// Whether any limit is set: with none, uploads skip admission altogether.
    pub fn any(&self) -> bool {
        self.max_uploads_in_flight > 0
            || self.max_queued_rows > 0
            || self.max_uploads_per_minute > 0
    }
}

/// Which limit refused an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    UploadsInFlight,
    QueuedRows,
    UploadsPerMinute,
}

impl LimitKind {
    /// The limit's name, as the setting (`tenants.<name>`), the admin flag and the problem's
    /// `limit` member spell it.
    pub fn name(self) -> &'static str {
        match self {
            LimitKind::UploadsInFlight => "max_uploads_in_flight",
            LimitKind::QueuedRows => "max_queued_rows",
            LimitKind::UploadsPerMinute => "max_uploads_per_minute",
        }
    }
}

/// What an organization holds now, as its limits count it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Unfinished sources plus admitted uploads still streaming.
    pub uploads_in_flight: u64,
    /// Rows of unfinished sources not yet processed.
    pub queued_rows: u64,
    /// Uploads admitted in the last [`RATE_WINDOW`].
    pub uploads_last_minute: u64,
    /// When the oldest of those was admitted (ms since the epoch).
    pub oldest_in_window_ms: Option<i64>,
}

/// The answer of [`Limits::admit_upload`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Admitted: the id to pass to [`Limits::upload_recorded`] or [`Limits::release_admission`].
    Admitted(Uuid),
    /// Refused by `limit`, whose value is `value`; room is expected after `retry_after`.
    Refused {
        limit: LimitKind,
        value: u64,
        usage: Usage,
        retry_after: Duration,
    },
}

/// The first limit `usage` has reached, with when room is expected, at `now_ms`.
pub fn refusal(limits: &UploadLimits, usage: &Usage, now_ms: i64) -> Option<Admission> {
    let refuse = |limit, value, retry_after| {
        Some(Admission::Refused {
            limit,
            value,
            usage: *usage,
            retry_after,
        })
    };
    if limits.max_uploads_in_flight > 0 && usage.uploads_in_flight >= limits.max_uploads_in_flight {
        return refuse(
            LimitKind::UploadsInFlight,
            limits.max_uploads_in_flight,
            BUSY_RETRY_AFTER,
        );
    }
    if limits.max_queued_rows > 0 && usage.queued_rows >= limits.max_queued_rows {
        return refuse(
            LimitKind::QueuedRows,
            limits.max_queued_rows,
            BUSY_RETRY_AFTER,
        );
    }
    if limits.max_uploads_per_minute > 0
        && usage.uploads_last_minute >= limits.max_uploads_per_minute
    {
        // Room comes when the oldest admission of the window ages out of it.
        let window = RATE_WINDOW.as_millis() as i64;
        let wait_ms = usage
            .oldest_in_window_ms
            .map_or(window, |oldest| oldest + window - now_ms);
        let secs = (wait_ms.max(0) as u64).div_ceil(1000).max(1);
        return refuse(
            LimitKind::UploadsPerMinute,
            limits.max_uploads_per_minute,
            Duration::from_secs(secs),
        );
    }
    None
}

/// Per-organization limits and the admission of uploads under them.
#[async_trait]
pub trait Limits: Send + Sync + 'static {
    /// The organization's own values (all `None` when it has none).
    async fn organization_limits(&self, org: Uuid) -> StoreResult<LimitOverrides>;
    /// Applies `change` to the organization's own values and returns them.
    async fn set_organization_limits(
        &self,
        org: Uuid,
        change: &LimitChange,
    ) -> StoreResult<LimitOverrides>;
    /// What the organization holds now, as its limits count it.
    async fn organization_usage(&self, org: Uuid) -> StoreResult<Usage>;
    /// Admits an upload of `org` served by the process `owner` under `limits`, or says which
    /// limit refuses it. An admission counts as in flight until [`Limits::upload_recorded`],
    /// a commit that names it (`NewUpload::admission`) or [`Limits::release_admission`], for
    /// at most `open_for`, and only while `owner` heartbeats.
    async fn admit_upload(
        &self,
        org: Uuid,
        owner: &str,
        limits: &UploadLimits,
        open_for: Duration,
    ) -> StoreResult<Admission>;
    /// The admitted upload's source is recorded: from now on the source counts as in flight,
    /// and the admission only toward the per-minute limit.
    async fn upload_recorded(&self, admission: Uuid) -> StoreResult<()>;
    /// The admitted upload ended without a source: its admission counts for nothing.
    async fn release_admission(&self, admission: Uuid) -> StoreResult<()>;
    /// Whether `(org, key)` holds a finished request's answer on `dir` that a retry would be
    /// given (a replay, which creates nothing and so needs no admission).
    async fn idempotency_key_completed(&self, org: Uuid, dir: Uuid, key: &str)
        -> StoreResult<bool>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(in_flight: u64, rows: u64, per_minute: u64) -> UploadLimits {
        UploadLimits {
            max_uploads_in_flight: in_flight,
            max_queued_rows: rows,
            max_uploads_per_minute: per_minute,
        }
    }

    #[test]
    fn a_limit_refuses_at_its_value_and_zero_is_none() {
        let usage = Usage {
            uploads_in_flight: 2,
            queued_rows: 500,
            uploads_last_minute: 3,
            oldest_in_window_ms: Some(10_000),
        };
        assert_eq!(refusal(&limits(0, 0, 0), &usage, 20_000), None);
        assert_eq!(refusal(&limits(3, 501, 4), &usage, 20_000), None);
        let Some(Admission::Refused { limit, value, .. }) =
            refusal(&limits(2, 501, 4), &usage, 20_000)
        else {
            panic!("in flight at its limit")
        };
        assert_eq!((limit, value), (LimitKind::UploadsInFlight, 2));
        let Some(Admission::Refused { limit, .. }) = refusal(&limits(3, 500, 4), &usage, 20_000)
        else {
            panic!("rows at their limit")
        };
        assert_eq!(limit, LimitKind::QueuedRows);
        let Some(Admission::Refused {
            limit, retry_after, ..
        }) = refusal(&limits(3, 501, 3), &usage, 20_000)
        else {
            panic!("per minute at its limit")
        };
        assert_eq!(limit, LimitKind::UploadsPerMinute);
        // The oldest admission (at 10 s) leaves the window at 70 s: 50 s from 20 s.
        assert_eq!(retry_after, Duration::from_secs(50));
    }

    #[test]
    fn retry_after_is_at_least_a_second() {
        let usage = Usage {
            uploads_last_minute: 1,
            oldest_in_window_ms: Some(0),
            ..Usage::default()
        };
        let Some(Admission::Refused { retry_after, .. }) =
            refusal(&limits(0, 0, 1), &usage, 59_999)
        else {
            panic!("refused")
        };
        assert_eq!(retry_after, Duration::from_secs(1));
    }

    #[test]
    fn overrides_win_over_defaults_and_a_change_can_reset_them() {
        let defaults: TenantSettings = orbit_config::Settings::defaults().tenants;
        let own = LimitOverrides {
            max_uploads_in_flight: Some(3),
            ..LimitOverrides::default()
        };
        let limits = own.upload_limits(&defaults);
        assert_eq!(limits.max_uploads_in_flight, 3);
        assert_eq!(limits.max_queued_rows, defaults.max_queued_rows);
        let changed = own.changed(&LimitChange {
            max_uploads_in_flight: Some(None),
            weight: Some(Some(4)),
            ..LimitChange::default()
        });
        assert_eq!(
            changed,
            LimitOverrides {
                weight: Some(4),
                ..LimitOverrides::default()
            }
        );
    }
}
