//! What can go wrong, and the exit code each kind of failure ends the process with.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | every file or source completed (rows may still have failed individually) |
//! | 1 | some file was rejected (`invalid_csv`, `upload_too_large`, …) or some source failed |
//! | 2 | usage, configuration or authentication: bad flags, no token, 401, 403, unknown directory |
//! | 3 | network: the server could not be reached, or kept failing, after the retries |
//!
//! When several apply (many files), the largest wins.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExitCode {
    Completed = 0,
    SourceFailed = 1,
    Usage = 2,
    Network = 3,
}

impl ExitCode {
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// A problem+json answer from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub status: u16,
    pub code: String,
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.detail)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad flags, missing configuration, an unreadable file.
    #[error("{0}")]
    Usage(String),
    /// The server answered with an error that retrying will not fix.
    #[error("{0}")]
    Api(Problem),
    /// The file will be rejected (found before sending it) or was rejected.
    #[error("{code}: {message}")]
    Rejected { code: String, message: String },
    /// The server could not be reached or kept failing, after every retry.
    #[error("{0}")]
    Network(String),
}

impl ClientError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            ClientError::Usage(_) => ExitCode::Usage,
            ClientError::Rejected { .. } => ExitCode::SourceFailed,
            ClientError::Network(_) => ExitCode::Network,
            ClientError::Api(p) => match p.status {
                // The file itself is the problem: too large, not CSV, key used for another file.
                413 | 415 | 422 => ExitCode::SourceFailed,
                500..=599 => ExitCode::Network,
                _ => ExitCode::Usage,
            },
        }
    }

    /// The stable code for `--json` output.
    pub fn code(&self) -> &str {
        match self {
            ClientError::Usage(_) => "usage",
            ClientError::Api(p) => &p.code,
            ClientError::Rejected { code, .. } => code,
            ClientError::Network(_) => "network",
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16) -> ClientError {
        ClientError::Api(Problem {
            status,
            code: "x".into(),
            detail: "y".into(),
        })
    }

    #[test]
    fn server_answers_map_to_the_documented_codes() {
        assert_eq!(api(401).exit_code(), ExitCode::Usage);
        assert_eq!(api(403).exit_code(), ExitCode::Usage);
        assert_eq!(api(404).exit_code(), ExitCode::Usage);
        assert_eq!(api(422).exit_code(), ExitCode::SourceFailed);
        assert_eq!(api(413).exit_code(), ExitCode::SourceFailed);
        assert_eq!(api(503).exit_code(), ExitCode::Network);
        assert!(ExitCode::Network > ExitCode::Usage && ExitCode::Usage > ExitCode::SourceFailed);
    }
}
