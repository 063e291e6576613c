//! One part of the `status` report, contributed by a job module. The report itself
//! (`crate::jobs::status`) gathers the sections the registry lists; a section only reads.

use anyhow::Result;
use serde_json::Value;

use crate::context::Context;
use crate::output::Table;

/// One part of the status report.
#[derive(Debug, Clone)]
pub struct Section {
    /// Key in the JSON object (`databases`, `streams`, `integrity`, ...).
    pub key: &'static str,
    pub title: &'static str,
    pub json: Value,
    pub table: Table,
    /// Things an operator should act on, each with what to do.
    pub problems: Vec<String>,
}

/// How a job module builds a section: reads state, takes no lock, writes nothing.
pub type SectionFn = fn(&Context) -> Result<Section>;
