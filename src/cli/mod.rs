//! The command line: `store`, `build`, `serve` and the hidden helper subcommands.

use clap::{Parser, Subcommand, ValueEnum};
use std::process::ExitCode;

pub mod build;
pub mod fs_daemon;
pub mod initrd;
pub mod keygen;
pub mod nix_builder;
pub mod request_args;
pub mod runner_args;
pub mod serve;
pub mod signing_args;
pub mod store;
pub mod store_args;
pub mod store_gc;
pub mod store_pins_remote;
pub mod verify;

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
    /// Run one build in a fresh microVM (see `build --help` for exit codes).
    Build(Box<build::BuildArgs>),
    /// Work with the content-addressed store: import, ls, cat, export, gc, pin.
    Store(store::StoreCommand),
    /// Serve the castore (and later the build service) over gRPC.
    Serve(serve::ServeArgs),
    /// Write the initramfs the VMs boot (the agent as /init).
    Initrd(initrd::InitrdArgs),
    /// Generate the host's Ed25519 key pair for signing provenance.
    Keygen(keygen::KeygenArgs),
    /// Check a signed provenance envelope against a Build and/or output trees (see
    /// `verify --help` for exit codes).
    Verify(verify::VerifyArgs),
    /// Build one derivation for Nix's `external-builders` (Nix passes BUILD_JSON; see
    /// docs/nix.md for the nix.conf lines and exit codes).
    NixBuilder(nix_builder::NixBuilderArgs),
    /// Serve one build's inputs read-only to one VM over vhost-user virtio-fs (started by
    /// the runner).
    #[command(hide = true)]
    FsDaemon(fs_daemon::FsDaemonArgs),
}

/// The log target of tonic's TLS accept loop.
const TLS_ACCEPT_ERRORS: &str = "tonic::transport::server::io_stream";

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
    // tonic reports a refused TLS handshake (a client certificate that is expired or of
    // another CA) only at debug; at the default levels an operator should see it too.
    let directives = match level {
        "info" | "warn" => format!("{level},{TLS_ACCEPT_ERRORS}=debug"),
        _ => level.to_owned(),
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(directives));
    let builder = fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub fn run(cli: Cli) -> ExitCode {
    init_logging(&cli);
    match cli.command {
        Command::Build(args) => run_async(build::run(*args)).unwrap_or(ExitCode::from(4)),
        Command::Store(cmd) => run_async(store::run(cmd)).unwrap_or(ExitCode::FAILURE),
        Command::Serve(args) => run_async(serve::run(args)).unwrap_or(ExitCode::FAILURE),
        Command::FsDaemon(args) => fs_daemon::run(args),
        Command::NixBuilder(args) => nix_builder::main(args),
        Command::Verify(args) => verify::run(args),
        Command::Keygen(args) => match keygen::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Initrd(args) => match initrd::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// What a command's future may return: nothing (exit 0) or its own exit code.
trait IntoExitCode {
    fn into_exit_code(self) -> ExitCode;
}

impl IntoExitCode for () {
    fn into_exit_code(self) -> ExitCode {
        ExitCode::SUCCESS
    }
}

impl IntoExitCode for ExitCode {
    fn into_exit_code(self) -> ExitCode {
        self
    }
}

/// Runs a command on a fresh tokio runtime. On error prints the whole error chain and
/// returns `None`, for the caller to pick the command's exit code.
fn run_async<T: IntoExitCode>(
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> Option<ExitCode> {
    let result = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(fut));
    match result {
        Ok(t) => Some(t.into_exit_code()),
        Err(e) => {
            eprintln!("error: {e:#}");
            None
        }
    }
}
