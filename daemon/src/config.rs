//! Istio configuration as Drover reads it: the serde mirror of the CRDs ([`crd`]), the loader
//! for YAML files and directories ([`source`]), the map from field paths to file positions
//! ([`locate`]), Istio's validation rules ([`validate`]) and the validated types they produce
//! ([`policy`]).
//!
//! Invariant: every error this module reports names a file and, where the document parsed, the
//! line and column of the offending node plus its field path.

pub mod crd;
pub mod locate;
pub mod policy;
pub mod source;
pub mod validate;

#[cfg(test)]
mod coverage;

use std::{fmt, path::PathBuf};

/// Where in a file a problem sits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    /// 1-based; 0 when unknown.
    pub line: usize,
    /// 1-based; 0 when unknown.
    pub col: usize,
}

/// One located configuration problem: `file:line:col: field: message`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Problem {
    pub location: Location,
    /// Field path inside the document (`spec.ports[0].number`), empty for whole-document errors.
    pub field: String,
    pub message: String,
}

/// Errors of the configuration layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: the configuration reaches {bytes} bytes with this file, above the limit of {limit} bytes (split it across daemons, or trim it)"
    )]
    TooLarge {
        path: PathBuf,
        bytes: u64,
        limit: u64,
    },
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

// === impl Location ===

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.col) {
            (0, _) => write!(f, "{}", self.file.display()),
            (l, 0) => write!(f, "{}:{l}", self.file.display()),
            (l, c) => write!(f, "{}:{l}:{c}", self.file.display()),
        }
    }
}

// === impl Problem ===

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.location, self.message)
        } else {
            write!(f, "{}: {}: {}", self.location, self.field, self.message)
        }
    }
}
