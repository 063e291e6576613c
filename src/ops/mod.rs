//! The foundation every job stands on: the clock, fault points, locks, logging, the
//! schedule of periodic tasks, the state store, what a running task sees and what a status
//! section is. It knows no job: jobs are names handed in from above (`crate::jobs`).

pub mod clock;
pub mod fault;
pub mod lock;
pub mod logging;
pub mod schedule;
pub mod section;
pub mod state;
pub mod task;
