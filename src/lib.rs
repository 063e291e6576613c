//! cr0sync: keeps the SQLite databases, IRC logs and file-integrity state of a fleet of IRC
//! bots and their website consistent through one central store. See README.md.
//!
//! Architecture (ARCHITECTURE.md has the picture): `cli` and `commands` parse and
//! dispatch; `jobs` is the registry of jobs with the runner and `status`; `db`, `logs`,
//! `files` and `security` are the jobs; `remote` reaches peers on other hosts over ssh; `context`, `config`, `layout`, `fsutil`, `util`, `output`,
//! `error` and `ops` (locks, state, task runs, schedule, logging, fault points) are the
//! foundation, which knows no job.

pub mod cli;
pub(crate) mod commands;
pub(crate) mod config;
pub(crate) mod conflicts;
pub(crate) mod context;
pub(crate) mod db;
pub(crate) mod demo;
pub mod error;
pub(crate) mod files;
pub(crate) mod fsutil;
pub(crate) mod init;
pub(crate) mod jobs;
pub(crate) mod layout;
pub(crate) mod logs;
pub(crate) mod ops;
pub(crate) mod output;
pub(crate) mod remote;
pub(crate) mod security;
pub(crate) mod util;
