//! Operations shared by every job: what a job is, its lock, the state store, run records,
//! schedules, the clock, logging and `status`.
//!
//! A job module (db, logs, security) only adds its own tasks: [`runner::run_job`] takes the
//! lock, sets up the job's log, times the run and writes its record.

pub mod clock;
pub mod fault;
pub mod job;
pub mod lock;
pub mod logging;
pub mod runner;
pub mod schedule;
pub mod state;
pub mod status;
