//! Symbols of every module loaded in a process.
