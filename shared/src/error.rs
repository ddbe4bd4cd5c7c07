//! Wire error codes, mirrored as a Rust enum so both ends can match on them.

use crate::capsync_capnp::ErrorCode as WireCode;
use std::fmt;

/// What went wrong, as the caller is allowed to know it. See `ErrorCode` in the schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    Internal,
    Revoked,
    PermissionDenied,
    NotFound,
    InvalidArgument,
    TooLarge,
    CursorConflict,
    RateLimited,
    Overloaded,
    SnapshotRequired,
    StorageFull,
    OutOfOrder,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Internal => "internal",
            Self::Revoked => "revoked",
            Self::PermissionDenied => "permissionDenied",
            Self::NotFound => "notFound",
            Self::InvalidArgument => "invalidArgument",
            Self::TooLarge => "tooLarge",
            Self::CursorConflict => "cursorConflict",
            Self::RateLimited => "rateLimited",
            Self::Overloaded => "overloaded",
            Self::SnapshotRequired => "snapshotRequired",
            Self::StorageFull => "storageFull",
            Self::OutOfOrder => "outOfOrder",
        }
    }

    /// Whether retrying the same request later can succeed without the caller changing anything.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::Overloaded | Self::RateLimited | Self::Internal | Self::StorageFull
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<WireCode> for ErrorCode {
    fn from(code: WireCode) -> Self {
        match code {
            WireCode::Internal => Self::Internal,
            WireCode::Revoked => Self::Revoked,
            WireCode::PermissionDenied => Self::PermissionDenied,
            WireCode::NotFound => Self::NotFound,
            WireCode::InvalidArgument => Self::InvalidArgument,
            WireCode::TooLarge => Self::TooLarge,
            WireCode::CursorConflict => Self::CursorConflict,
            WireCode::RateLimited => Self::RateLimited,
            WireCode::Overloaded => Self::Overloaded,
            WireCode::SnapshotRequired => Self::SnapshotRequired,
            WireCode::StorageFull => Self::StorageFull,
            WireCode::OutOfOrder => Self::OutOfOrder,
        }
    }
}

impl From<ErrorCode> for WireCode {
    fn from(code: ErrorCode) -> Self {
        match code {
            ErrorCode::Internal => Self::Internal,
            ErrorCode::Revoked => Self::Revoked,
            ErrorCode::PermissionDenied => Self::PermissionDenied,
            ErrorCode::NotFound => Self::NotFound,
            ErrorCode::InvalidArgument => Self::InvalidArgument,
            ErrorCode::TooLarge => Self::TooLarge,
            ErrorCode::CursorConflict => Self::CursorConflict,
            ErrorCode::RateLimited => Self::RateLimited,
            ErrorCode::Overloaded => Self::Overloaded,
            ErrorCode::SnapshotRequired => Self::SnapshotRequired,
            ErrorCode::StorageFull => Self::StorageFull,
            ErrorCode::OutOfOrder => Self::OutOfOrder,
        }
    }
}
