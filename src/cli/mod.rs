//! The command line: `store`, `build`, `serve` and the hidden helper subcommands.

use clap::{Parser, Subcommand, ValueEnum};
use std::process::ExitCode;

pub mod fs_daemon;
pub mod serve;
pub mod store;
pub mod store_args;

#[derive(Debug, Parser)]
#[command(
    name = "tvix-build-vm",
    version,
    about = "Run tvix builds in single-use microVMs"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less log output (repeat for less).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "verbose")]
    pub quiet: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve one build's inputs read-only to one VM over vhost-user virtio-fs (started by
    /// the runner).
    #[command(hide = true)]
    FsDaemon(fs_daemon::FsDaemonArgs),
    /// Work with the content-addressed store: import, ls, cat, export.
    Store(store::StoreCommand),
    /// Serve the castore (and later the build service) over gRPC.
    Serve(serve::ServeArgs),
}

/// Sets up tracing on stderr at the level the flags ask for (RUST_LOG overrides).
fn init_logging(cli: &Cli) {
    use tracing_subscriber::{fmt, EnvFilter};
    let level = match (cli.verbose as i8) - (cli.quiet as i8) {
        i8::MIN..=-2 => "error",
        -1 => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub fn run(cli: Cli) -> ExitCode {
    init_logging(&cli);
    match cli.command {
        Command::FsDaemon(args) => fs_daemon::run(args),
        Command::Store(cmd) => run_async(store::run(cmd)),
        Command::Serve(args) => run_async(serve::run(args)),
    }
}

/// Runs a command on a fresh tokio runtime; prints the whole error chain on failure.
/// Exit codes: 0 success, 1 failure.
fn run_async(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let result = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(fut));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
