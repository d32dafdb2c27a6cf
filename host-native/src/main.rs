//! `fedsend`: the command line. Everything it runs lives in the library.

use std::io::BufWriter;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fedsend_host_native::scenario::{self, ScenarioArgs};

/// A Matrix federation sender.
#[derive(Debug, Parser)]
#[command(name = "fedsend", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a scenario file and print its trace on stdout, one JSON object per line.
    Scenario(ScenarioArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Scenario(args) => match scenario::run(&args, &mut BufWriter::new(std::io::stdout().lock())) {
            Ok(()) => ExitCode::SUCCESS,
            Err(failure) => {
                eprintln!("fedsend: {}", failure.message);
                ExitCode::from(failure.exit_code)
            }
        },
    }
}
