//! The storage engine's own numbers in `stats`: one variant per engine, since
//! what is worth knowing about a SQLite file and a PostgreSQL database differs.

/// What the engine says of its own storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageStats {
    Sqlite(SqliteStats),
    Postgres(PostgresStats),
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

/// What PostgreSQL says of capsync's tables (those of the schema the server uses).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PostgresStats {
    /// The whole database (`pg_database_size`), other schemas included.
    pub database_bytes: u64,
    /// capsync's tables by name.
    pub tables: Vec<TableStats>,
}

/// One table, from `pg_stat_user_tables`. Row counts are PostgreSQL's estimates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    pub name: String,
    /// The table with its indexes and TOAST data.
    pub total_bytes: u64,
    pub index_bytes: u64,
    pub live_rows: u64,
    /// Rows deleted or updated that autovacuum has not cleaned yet.
    pub dead_rows: u64,
}
