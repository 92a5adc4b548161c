//! Request and response bodies, and their validators, that more than one module shares: the
//! routes, the upload and the `admin` subcommands hold them to the same rules, so none of them
//! borrows another's.

use crate::problem::{ApiError, ApiResult};

// The bodies a worker's webhook events carry too, so their shape is `orbit-core`'s.
pub use orbit_core::views::{SourceBody, UploadBody};

pub const MAX_NAME_CHARS: usize = 200;

/// 1 to `MAX_NAME_CHARS` characters as sent (so the OpenAPI document's `maxLength` is the
/// rule), some of them not white space, none a control character; stored trimmed.
pub fn validate_name(name: &str) -> ApiResult<&str> {
    if name.chars().count() > MAX_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(bad_name());
    }
    let name = name.trim();
    if name.is_empty() {
        return Err(bad_name());
    }
    Ok(name)
}

fn bad_name() -> ApiError {
    ApiError::invalid_request(format!(
        "name must be 1 to {MAX_NAME_CHARS} characters, not all white space, without control characters"
    ))
}
