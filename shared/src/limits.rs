//! Protocol limits both ends must agree on (server-side tunables live in the server's config).

/// Longest op id accepted, in bytes.
pub const MAX_OP_ID_BYTES: usize = 128;

/// Longest batch id accepted, in bytes.
pub const MAX_BATCH_ID_BYTES: usize = 128;

/// Most `dependsOn` entries on one op.
pub const MAX_DEPENDS_ON: usize = 64;

/// The server's default limit on one op's payload, in bytes (`--max-op-bytes`). Clients
/// that shrink what they send to fit (opencode attachments) aim below it.
pub const DEFAULT_MAX_OP_BYTES: usize = 1 << 20;

/// Longest id of a session, message, part or model, in bytes.
pub const MAX_RECORD_ID_BYTES: usize = 256;

/// Default page size for `opsSince` when the caller passes 0, and its cap.
pub const DEFAULT_OPS_PAGE: u32 = 1000;
pub const MAX_OPS_PAGE: u32 = 10_000;

/// Default and maximum byte budget of one snapshot page.
pub const DEFAULT_SNAPSHOT_PAGE_BYTES: u32 = 1 << 20;
pub const MAX_SNAPSHOT_PAGE_BYTES: u32 = 4 << 20;

/// Default and maximum page size of share listings.
pub const DEFAULT_LIST_PAGE: u32 = 100;
pub const MAX_LIST_PAGE: u32 = 1000;
