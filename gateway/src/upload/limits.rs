//! The organization's upload limits (docs/operations.md, "Per-organization limits"): an
//! upload is admitted, or refused with `429 organization_limit_exceeded`, after the cheap
//! checks of the request's head and before its body is read, so a refusal stores no object,
//! no source and no idempotency key.
//!
//! An upload whose `Idempotency-Key` header names a finished request on this directory is not
//! counted: it can only be answered from that key (or refused as a reuse), creating nothing,
//! so a client retrying an upload whose answer it lost gets the answer even while its
//! organization is at its limits. The key is only looked at here; it is claimed, as for any
//! upload, once the file field starts. Should it have expired in between, the claim admits the
//! upload then (see `Upload::settle_key`). A key sent only as a form field is read with the
//! body, after the admission: such a retry is counted like a new upload.

use axum::http::{header, StatusCode};
use orbit_store::limits::{Admission, LimitKind, UploadLimits};
use uuid::Uuid;

use crate::app::AppState;
use crate::problem::{ApiError, ApiResult};

/// Added to `ingest.max_upload_duration` for how long an admission may count as streaming.
const OPEN_MARGIN: std::time::Duration = std::time::Duration::from_secs(60);

/// What the limits said before the body was read.
pub(super) enum Admitted {
    /// The organization has no limit: nothing was counted.
    Unlimited,
    /// Admitted; the id goes with the request until its source is recorded or it ends.
    Counted(Uuid),
    /// Not counted because the header's key replays a finished request; should the claim of
    /// the key turn out to start a new upload after all, it is admitted under these limits.
    Replay(UploadLimits),
}

/// The limits in force for `org`, or `None` when it has none (the cheap path: one primary-key
/// read and no transaction).
async fn limits_of(state: &AppState, org: Uuid) -> ApiResult<Option<UploadLimits>> {
    let own = state.store.organization_limits(org).await?;
    let limits = own.upload_limits(&state.settings.tenants);
    Ok(limits.any().then_some(limits))
}

/// Admits an upload of `org` to `dir`, or refuses it with `429`.
pub(super) async fn admit(
    state: &AppState,
    org: Uuid,
    dir: Uuid,
    header_key: Option<&str>,
) -> ApiResult<Admitted> {
    let Some(limits) = limits_of(state, org).await? else {
        return Ok(Admitted::Unlimited);
    };
    if let Some(key) = header_key {
        if state.store.idempotency_key_completed(org, dir, key).await? {
            return Ok(Admitted::Replay(limits));
        }
    }
    admit_under(state, org, &limits)
        .await
        .map(Admitted::Counted)
}

/// Counts an upload of `org` under `limits`: its admission id, or the `429`.
pub(super) async fn admit_under(
    state: &AppState,
    org: Uuid,
    limits: &UploadLimits,
) -> ApiResult<Uuid> {
    // An admission outlives no request: one still streaming after `max_upload_duration` is
    // cut (`408 upload_timeout`; the margin covers the moments between admission and the
    // start of that timer), and one of a gateway that died stops counting as soon as that
    // gateway's heartbeat runs out (`worker.liveness_timeout`).
    let open_for = state.settings.ingest.max_upload_duration + OPEN_MARGIN;
    match state
        .store
        .admit_upload(org, &state.process, limits, open_for)
        .await?
    {
        Admission::Admitted(id) => Ok(id),
        Admission::Refused {
            limit,
            value,
            usage,
            retry_after,
        } => {
            let (held, what) = match limit {
                LimitKind::UploadsInFlight => (
                    usage.uploads_in_flight,
                    "uploads in flight (admitted and not yet completed or failed)",
                ),
                LimitKind::QueuedRows => (usage.queued_rows, "rows queued and not yet processed"),
                LimitKind::UploadsPerMinute => (
                    usage.uploads_last_minute,
                    "uploads started in the last minute",
                ),
            };
            let name = limit.name();
            tracing::info!(organization = %org, limit = name, value, held, "upload refused by an organization limit");
            Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "organization_limit_exceeded",
                format!(
                    "the organization has {held} {what}, and its limit {name} is {value}; \
                     nothing of this upload was kept, send it again after Retry-After"
                ),
            )
            .with_header(
                header::RETRY_AFTER,
                &retry_after.as_secs().max(1).to_string(),
            )
            .with_member("limit", name)
            .with_member("limit_value", value))
        }
    }
}
