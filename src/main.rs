//! The `cr0sync` binary: parse, run, turn the result into an exit code.

use std::process::ExitCode;

use clap::Parser;
use cr0sync::cli::Cli;
use cr0sync::error::{self, ExitCode as Code};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            let code = if e.use_stderr() {
                Code::Usage
            } else {
                Code::Success
            };
            return ExitCode::from(code as u8);
        }
    };
    match cli.run() {
        Ok(outcome) => ExitCode::from(Code::from(outcome) as u8),
        Err(err) => {
            for line in error::render(&err) {
                eprintln!("{line}");
            }
            ExitCode::from(error::exit_code_of(&err) as u8)
        }
    }
}
