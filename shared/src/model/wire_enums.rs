//! The model's enums to and from their schema counterparts, in one place for both ends.

use super::types::{RecordKind, RejectReason};
use crate::capsync_capnp as wire;

impl From<wire::RecordKind> for RecordKind {
    fn from(kind: wire::RecordKind) -> Self {
        match kind {
            wire::RecordKind::Session => Self::Session,
            wire::RecordKind::Model => Self::Model,
            wire::RecordKind::Diffs => Self::Diffs,
            wire::RecordKind::Message => Self::Message,
            wire::RecordKind::Part => Self::Part,
        }
    }
}

impl From<RecordKind> for wire::RecordKind {
    fn from(kind: RecordKind) -> Self {
        match kind {
            RecordKind::Session => Self::Session,
            RecordKind::Model => Self::Model,
            RecordKind::Diffs => Self::Diffs,
            RecordKind::Message => Self::Message,
            RecordKind::Part => Self::Part,
        }
    }
}

impl From<wire::RejectReason> for RejectReason {
    fn from(reason: wire::RejectReason) -> Self {
        match reason {
            wire::RejectReason::MissingDependency => Self::MissingDependency,
            wire::RejectReason::Invalid => Self::Invalid,
            wire::RejectReason::StaleTransition => Self::StaleTransition,
            wire::RejectReason::OpIdReused => Self::OpIdReused,
            wire::RejectReason::TooLarge => Self::TooLarge,
        }
    }
}

impl From<RejectReason> for wire::RejectReason {
    fn from(reason: RejectReason) -> Self {
        match reason {
            RejectReason::MissingDependency => Self::MissingDependency,
            RejectReason::Invalid => Self::Invalid,
            RejectReason::StaleTransition => Self::StaleTransition,
            RejectReason::OpIdReused => Self::OpIdReused,
            RejectReason::TooLarge => Self::TooLarge,
        }
    }
}
