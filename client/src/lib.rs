//! capsync client library.
