//! The `cr0sync` binary: parse, run, turn the result into an exit code.

use std::process::ExitCode;

use clap::Parser;
use cr0sync::cli::Cli;
use cr0sync::error::{self, ExitCode as Code};

fn main() -> ExitCode {
    // The last resort: a bug is one line on stderr and exit 1, never a backtrace in the
    // cron mail. What a run had begun is completed by the next (every write is
    // crash-safe, and a lock dies with its process).
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        eprintln!(
            "cr0sync: internal error: {what}{at}. Try: run the same command again (the next \
             run completes what this one began), and report this line as a bug"
        );
        std::process::exit(Code::Runtime as i32);
    }));
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
