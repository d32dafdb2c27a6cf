//! `fedsend`: the command line. Everything it runs lives in the library.

use std::io::BufWriter;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fedsend_host_native::demo::{self, DemoArgs};
use fedsend_host_native::scenario::{self, ScenarioArgs};
use fedsend_host_native::serve::{self, ServeArgs};
use fedsend_host_native::synapse_worker::{self, SynapseArgs};

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
    /// Run the federation sender service (ingest API, SQLite, HTTPS) until SIGTERM.
    Serve(ServeArgs),
    /// Run the service against loopback remote servers it starts itself; print a delivery report.
    Demo(DemoArgs),
    /// Be a `federation_sender` instance of a Synapse deployment on PostgreSQL and Redis.
    Synapse(SynapseArgs),
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
        Command::Demo(args) => match demo::run(&args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => {
                eprintln!("fedsend demo: not every remote converged (see the report above)");
                ExitCode::FAILURE
            }
            Err(message) => {
                eprintln!("fedsend demo: {message}");
                ExitCode::FAILURE
            }
        },
        Command::Synapse(args) => match synapse_worker::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("fedsend synapse: {message}");
                ExitCode::FAILURE
            }
        },
        Command::Serve(args) => match serve::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("fedsend serve: {message}");
                ExitCode::FAILURE
            }
        },
    }
}
