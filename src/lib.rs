//! cr0sync: keeps the SQLite databases, IRC logs and file-integrity state of a fleet of IRC
//! bots and their website consistent through one central store. See README.md.
//!
//! Architecture: `cli` and `commands` parse and dispatch; `context`, `config`, `layout`,
//! `fsutil` and `ops` (jobs, locks, state, runs, schedule, logging, status) are the
//! foundation every job stands on.

pub mod cli;
pub mod commands;
pub mod config;
pub mod context;
pub mod db;
pub mod demo;
pub mod error;
pub mod fsutil;
pub mod init;
pub mod jobs;
pub mod layout;
pub mod logs;
pub mod ops;
pub mod output;
pub mod security;
pub mod util;
