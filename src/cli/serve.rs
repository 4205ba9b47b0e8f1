//! `tvix-build-vm serve`: the multi-tenant build host. Serves the castore and, given a
//! guest kernel and agent, the build services over gRPC (TCP or a unix socket, optionally
//! TLS or mutual TLS), Prometheus metrics on a side port, until SIGINT or SIGTERM.
//!
//! Shutdown: stop accepting connections and builds (queued requests get UNAVAILABLE), let
//! running builds finish for the grace period, then cancel them (their VMs are killed) and
//! exit. See docs/serve.md for the configuration file and an example systemd unit.

use super::runner_args::RunnerArgs;
use super::store_args::StoreArgs;
use crate::metrics::Metrics;
use crate::runner::admission::Admission;
use crate::server::build_host::{BuildHost, HostOptions};
use crate::server::config::{ServeConfig, ServeOptions};
use crate::server::{self, Listener, RouterOptions};
use anyhow::Context;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// How long after cancelling the builds the process waits for connections to close.
const CLOSE_AFTER_CANCEL: Duration = Duration::from_secs(10);

/// Serve the castore and (with --kernel and --agent) builds over gRPC.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// A TOML file with the options below (keys are the long flag names); flags and
    /// environment variables override it.
    #[arg(long, env = "TVIX_BUILD_VM_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as a config file and exit.
    #[arg(long)]
    pub print_config: bool,
    #[command(flatten)]
    pub options: Box<ServeOptions>,
    /// The VM options; without --kernel and --agent only the castore is served.
    #[command(flatten)]
    pub runner: Box<RunnerArgs>,
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot watch SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    info!("shutting down");
}

/// Total memory of this host, from /proc/meminfo (0 if unreadable).
fn host_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            kib.checked_mul(1024)
        })
        .unwrap_or(0)
}

/// The effective configuration: flags and environment over the config file over defaults.
pub fn config(args: &ServeArgs) -> anyhow::Result<ServeConfig> {
    let file = match &args.config {
        Some(path) => ServeOptions::load(path)?,
        None => ServeOptions::default(),
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let vm_memory = args.runner.vm_memory;
    let default_max_vms = Admission::default_max_running(cores, host_memory_bytes(), vm_memory);
    Ok((*args.options)
        .clone()
        .over(file)
        .resolve(default_max_vms)?)
}

/// Runs the server.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = config(&args).context("configuration")?;
    if args.print_config {
        print!("{}", toml::to_string(&config.to_options())?);
        return Ok(());
    }
    if let Some(sh) = &config.bin_sh {
        anyhow::ensure!(sh.is_file(), "--bin-sh {} is not a file", sh.display());
    }
    let (blobs, directories) = args.store.open().context("opening the store")?;
    let metrics = Arc::new(Metrics::default());

    // The handle owns the runner's private castore socket: it lives until we return.
    let mut _runner_handle = None;
    anyhow::ensure!(
        args.runner.kernel.is_some() == args.runner.agent.is_some(),
        "--kernel and --agent go together (both to serve builds, neither for the castore only)"
    );
    let host = match args.runner.can_build() {
        true => {
            let handle = args
                .runner
                .runner(
                    &args.store,
                    blobs.clone(),
                    directories.clone(),
                    config.bin_sh.as_deref(),
                    config.pool_size,
                )
                .await?;
            let host = Arc::new(BuildHost::new(
                Arc::clone(&handle.runner),
                Admission::new(config.max_vms, config.max_queue),
                Arc::clone(&metrics),
                HostOptions {
                    allow_network: config.allow_network,
                    bin_sh: config.bin_sh.is_some(),
                },
            ));
            _runner_handle = Some(handle);
            info!(protocol = %config.protocol, max_vms = config.max_vms, pool_size = config.pool_size, max_queue = config.max_queue, "serving builds");
            Some(host)
        }
        false => {
            info!("no --kernel/--agent: serving the castore only");
            None
        }
    };

    let tls = config.tls.as_ref().map(|t| t.load()).transpose()?;
    let router = server::router_with(
        RouterOptions {
            tls,
            max_message_bytes: Some(config.max_message_bytes),
            builds: host.clone().map(|h| (config.protocol, h)),
        },
        blobs,
        directories,
    )
    .await?;
    let listener = Listener::bind(&config.listen).await?;
    match listener.local_addr() {
        Some(a) => info!(listen = %a, tls = config.tls.is_some(), "serving"),
        None => info!(listen = %config.listen, tls = config.tls.is_some(), "serving"),
    }

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let wait_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    if let Some(addr) = config.metrics_listen {
        let metrics_listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for metrics on {addr}"))?;
        info!(metrics = %addr, "serving metrics at /metrics");
        let render: Box<dyn Fn() -> String + Send + Sync> = match &host {
            Some(h) => {
                let h = Arc::clone(h);
                Box::new(move || h.render_metrics())
            }
            None => {
                let m = Arc::clone(&metrics);
                Box::new(move || m.render(0, 0, None))
            }
        };
        tokio::spawn(server::metrics_http::serve(
            metrics_listener,
            render,
            wait_stop(stopped.clone()),
        ));
    }

    let serving = server::serve(router, listener, async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    tokio::pin!(serving);
    let grace = config.grace_period;
    let enforce_grace = async {
        wait_stop(stopped.clone()).await;
        let Some(host) = &host else {
            return std::future::pending().await;
        };
        host.drain();
        if host.running() > 0 {
            info!(running = host.running(), grace = ?grace, "waiting for running builds");
        }
        tokio::time::sleep(grace).await;
        warn!(
            running = host.running(),
            "grace period over: cancelling the remaining builds"
        );
        host.cancel_all();
        tokio::time::sleep(CLOSE_AFTER_CANCEL).await;
    };
    tokio::select! {
        r = &mut serving => r?,
        () = enforce_grace => warn!("connections stayed open after the builds were cancelled; exiting"),
    }
    info!("stopped");
    Ok(())
}
