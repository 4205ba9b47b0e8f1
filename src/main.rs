//! `tvix-build-vm`: parse the command line, set up logging, run the command.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = tvix_build_vm::cli::Cli::parse();
    tvix_build_vm::cli::run(cli)
}
