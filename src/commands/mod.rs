//! One file per subcommand: argument struct and a thin `run` that calls the library.

pub mod completions;
pub mod cron;
pub mod db;
pub mod demo;
pub mod files;
pub mod init;
pub mod logs;
pub mod run;
pub mod security;
pub mod serve;
pub mod status;
