//! `tvix-build-vm`: parse the command line, set up logging, run the command.

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Two TLS providers are linked (ring through tonic, aws-lc-rs through object_store's
    // HTTP client); rustls refuses to guess between them, so name one for the process. An
    // error means one is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = tvix_build_vm::cli::Cli::parse();
    tvix_build_vm::cli::run(cli)
}
