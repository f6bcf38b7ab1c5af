//! The process's one `SIGTRAP` dispatcher.
