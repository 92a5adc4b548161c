//! The upload's idempotency key: claimed before the file is stored (or, for a key sent after
//! the file, once it has been read), settled against a finished request's receipt, replayed,
//! and released again when the request creates nothing.
//!
//! A key belongs to one `(organization, key)`; a replay must name the same directory and send
//! the same file with the same options, else it is refused rather than answered with another
//! upload's receipt.

use axum::http::{header, StatusCode};
use orbit_core::model::{IdempotencyClaim, KeyState, UploadReceipt};
use orbit_store::Store;

use super::limits::{admit_under, Admitted};
use super::pipeline::FileRead;
use super::{Outcome, Upload};
use crate::problem::{ApiError, ApiResult};

/// What the idempotency key said before the file was read.
pub(super) enum KeyPlan {
    None,
    Claimed(IdempotencyClaim),
    /// A finished request with this key on this directory: hash the file and compare.
    Replay {
        sha256: String,
        receipt: UploadReceipt,
    },
}

impl KeyPlan {
    /// The claim to complete with the commit, if this request holds one.
    pub(super) fn claim(&self) -> Option<IdempotencyClaim> {
        match self {
            KeyPlan::Claimed(claim) => Some(claim.clone()),
            _ => None,
        }
    }

    /// The claim to release, if any, leaving no plan behind.
    pub(super) fn take_claim(&mut self) -> Option<IdempotencyClaim> {
        match std::mem::replace(self, KeyPlan::None) {
            KeyPlan::Claimed(claim) => Some(claim),
            _ => None,
        }
    }
}

impl Upload<'_> {
    /// Claims the key, or answers from it. Returns a response when the request ends here.
    pub(super) async fn settle_key(&mut self) -> ApiResult<Option<Outcome>> {
        let Some(key) = self.key.clone() else {
            return Ok(None);
        };
        if !matches!(self.key_plan, KeyPlan::None) {
            return Ok(None);
        }
        let settings = &self.state.settings.idempotency;
        let state = self
            .state
            .store
            .claim_idempotency_key(
                self.org,
                &key,
                self.dir,
                &self.state.process,
                settings.ttl,
                settings.in_flight_timeout,
            )
            .await?;
        match state {
            KeyState::Claimed(claim) => {
                self.key_plan = KeyPlan::Claimed(claim);
                // The key looked finished before the body was read, so the upload was not
                // counted; it expired since, and this is a new upload after all.
                if let Admitted::Replay(limits) = self.admitted {
                    self.admitted =
                        Admitted::Counted(admit_under(self.state, self.org, &limits).await?);
                }
            }
            KeyState::OtherDirectory => return Err(key_reused()),
            KeyState::InFlight => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "idempotency_key_in_use",
                    "a request with this idempotency key is still in progress",
                )
                .with_header(header::RETRY_AFTER, "1"))
            }
            KeyState::Completed {
                directory_id,
                sha256,
                receipt,
            } => {
                if directory_id != self.dir {
                    return Err(key_reused());
                }
                if let Some(FileRead::Stored(file)) = &self.file {
                    // The file was stored before the key arrived: compare, then drop our copy.
                    let same = file.sha256 == sha256 && receipt.options == self.options;
                    self.clean_up().await;
                    return if same {
                        Ok(Some(replay_receipt(receipt)))
                    } else {
                        Err(key_reused())
                    };
                }
                self.key_plan = KeyPlan::Replay { sha256, receipt };
            }
        }
        Ok(None)
    }

    pub(super) fn replay(&self, sha256: &str) -> ApiResult<Outcome> {
        match &self.key_plan {
            KeyPlan::Replay {
                sha256: original,
                receipt,
            } if original == sha256 && receipt.options == self.options => {
                Ok(replay_receipt(receipt.clone()))
            }
            _ => Err(key_reused()),
        }
    }
}

fn replay_receipt(receipt: UploadReceipt) -> Outcome {
    Outcome {
        receipt,
        replayed: true,
    }
}

/// Releases the claim of a request that created nothing, so a retry runs fresh.
pub(super) async fn release(store: &dyn Store, claim: &IdempotencyClaim, what: &str) {
    if let Err(e) = store.release_idempotency_key(claim).await {
        tracing::warn!(error = %e, "could not release {what}");
    }
}

pub(super) fn validate_key(raw: &str) -> ApiResult<String> {
    if raw.is_empty() || raw.len() > 255 || !raw.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(bad_key());
    }
    Ok(raw.to_owned())
}

pub(super) fn bad_key() -> ApiError {
    ApiError::invalid_request("the idempotency key must be 1 to 255 printable ASCII characters")
}

fn key_reused() -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
        "this idempotency key was used for a different file or directory",
    )
}
