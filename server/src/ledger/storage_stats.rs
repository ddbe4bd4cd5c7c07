//! The storage engine's own numbers in `stats`: one variant per engine, since
//! what is worth knowing about a SQLite file and a PostgreSQL database differs.

/// What the engine says of its own storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageStats {
    Sqlite(SqliteStats),
}

/// What SQLite says of its files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SqliteStats {
    /// Bytes of the main database file.
    pub db_file_bytes: u64,
    /// Bytes of the write-ahead log (0 when there is none): large means checkpoints lag.
    pub wal_file_bytes: u64,
    pub page_size: u64,
    pub page_count: u64,
    /// Pages on the freelist: allocated on disk, holding no data; what an
    /// incremental vacuum gives back to the file system.
    pub free_pages: u64,
}
