//! The client's error type: remote failures with their wire code, transport errors, bad input.

use capsync_shared::{ErrorCode, TokenKind};

/// Everything a client call can fail with.
///
/// No variant ever carries a token's secret: the library never puts a token it was
/// given into an error, and the server promises the same for `Failure.message`.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with a `Failure` in the call's results: an application error.
    #[error("{}", remote_text(*code, message, *cursor))]
    Remote {
        /// What went wrong, as the server lets the caller know it.
        code: ErrorCode,
        /// The server's text, meant for people.
        message: String,
        /// The share's current cursor; meaningful with [`ErrorCode::CursorConflict`], else 0.
        cursor: u64,
    },
    /// A transport-level failure (disconnected, overloaded, unimplemented, a malformed
    /// message). Callers branch on `kind` only.
    #[error("{}", rpc_text(.0))]
    Rpc(#[from] capnp::Error),
    /// Could not reach the server at all.
    #[error("could not connect to {addr}: {source}")]
    Connect {
        /// The address as the caller gave it.
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// Reading a local file or writing output failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The token redeemed into another kind of capability than the caller needs.
    #[error("this is {} {got} token, but this needs {} {expected} token", article(*got), article(*expected))]
    WrongKind { expected: TokenKind, got: TokenKind },
    /// Client-side validation failed (a bad op file, export, duration or argument).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// `snapshot()` saw the share change between pages on every attempt.
    #[error(
        "the share kept changing while its snapshot was read ({attempts} attempts); try again, or follow it with opsSince"
    )]
    SnapshotUnstable { attempts: u32 },
}

impl From<capnp::NotInSchema> for ClientError {
    /// An enum value or union member this build does not know: the peer speaks a newer schema.
    fn from(e: capnp::NotInSchema) -> Self {
        Self::Rpc(e.into())
    }
}

impl From<std::str::Utf8Error> for ClientError {
    /// Text fields that are not UTF-8 are a malformed message, like any other decoding error.
    fn from(e: std::str::Utf8Error) -> Self {
        Self::Rpc(e.into())
    }
}

impl ClientError {
    /// The wire error code, for [`ClientError::Remote`]; `None` for every local or transport error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The transport error kind, for [`ClientError::Rpc`].
    pub fn rpc_kind(&self) -> Option<capnp::ErrorKind> {
        match self {
            Self::Rpc(e) => Some(e.kind),
            _ => None,
        }
    }

    /// Whether the connection is gone (the caller must reconnect and redeem again).
    pub fn is_disconnected(&self) -> bool {
        matches!(self.rpc_kind(), Some(capnp::ErrorKind::Disconnected))
    }

    /// A short stable name for machine-readable output (`{"error": {"code": ...}}`):
    /// the wire code for remote failures, a client-side name otherwise.
    pub fn code_str(&self) -> &'static str {
        match self {
            Self::Remote { code, .. } => code.as_str(),
            Self::Rpc(e) => match e.kind {
                capnp::ErrorKind::Disconnected => "disconnected",
                capnp::ErrorKind::Overloaded => "transportOverloaded",
                capnp::ErrorKind::Unimplemented => "unimplemented",
                _ => "transport",
            },
            Self::Connect { .. } => "connect",
            Self::Io(_) => "io",
            Self::WrongKind { .. } => "wrongKind",
            Self::InvalidInput(_) => "invalidInput",
            Self::SnapshotUnstable { .. } => "snapshotUnstable",
        }
    }

    /// Shorthand for [`ClientError::InvalidInput`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidInput(message.into())
    }
}

/// Words for people, so the CLI can print `error: permission denied: ...`.
fn code_words(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Internal => "internal server error",
        ErrorCode::Revoked => "revoked",
        ErrorCode::PermissionDenied => "permission denied",
        ErrorCode::NotFound => "not found",
        ErrorCode::InvalidArgument => "invalid argument",
        ErrorCode::TooLarge => "too large",
        ErrorCode::CursorConflict => "cursor conflict",
        ErrorCode::RateLimited => "rate limited",
        ErrorCode::Overloaded => "server overloaded",
    }
}

fn remote_text(code: ErrorCode, message: &str, cursor: u64) -> String {
    let mut text = code_words(code).to_owned();
    if !message.is_empty() {
        text.push_str(": ");
        text.push_str(message);
    }
    if code == ErrorCode::CursorConflict {
        text.push_str(&format!(" (current cursor {cursor})"));
    }
    text
}

fn rpc_text(e: &capnp::Error) -> String {
    let what = match e.kind {
        capnp::ErrorKind::Disconnected => "disconnected from the server",
        capnp::ErrorKind::Overloaded => "the server is overloaded",
        capnp::ErrorKind::Unimplemented => "the server does not implement this call",
        _ => "rpc failed",
    };
    if e.extra.is_empty() {
        what.to_owned()
    } else {
        format!("{what}: {}", e.extra)
    }
}

fn article(kind: TokenKind) -> &'static str {
    match kind {
        TokenKind::Admin | TokenKind::Agent => "an",
        TokenKind::Writer | TokenKind::Viewer => "a",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_errors_read_as_words_then_the_message() {
        let e = ClientError::Remote {
            code: ErrorCode::PermissionDenied,
            message: "token not accepted".into(),
            cursor: 0,
        };
        assert_eq!(e.to_string(), "permission denied: token not accepted");
        assert_eq!(e.code(), Some(ErrorCode::PermissionDenied));
        assert_eq!(e.code_str(), "permissionDenied");

        let e = ClientError::Remote {
            code: ErrorCode::CursorConflict,
            message: "expected 3".into(),
            cursor: 7,
        };
        assert_eq!(
            e.to_string(),
            "cursor conflict: expected 3 (current cursor 7)"
        );
    }

    #[test]
    fn wrong_kind_names_both_kinds() {
        let e = ClientError::WrongKind {
            expected: TokenKind::Agent,
            got: TokenKind::Viewer,
        };
        assert_eq!(
            e.to_string(),
            "this is a viewer token, but this needs an agent token"
        );
        assert_eq!(e.code(), None);
    }

    #[test]
    fn disconnects_are_recognised() {
        let e = ClientError::from(capnp::Error::disconnected("peer went away".into()));
        assert!(e.is_disconnected());
        assert_eq!(e.code_str(), "disconnected");
        assert_eq!(
            e.to_string(),
            "disconnected from the server: peer went away"
        );
    }
}
