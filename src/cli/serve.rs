//! `tvix-build-vm serve`: the multi-tenant build host. Serves the castore and, given a
//! guest kernel and agent, the build services over gRPC (TCP or a unix socket, optionally
//! TLS or mutual TLS), Prometheus metrics on a side port, until SIGINT or SIGTERM (see
//! [`crate::server::run`] for the shutdown). See docs/serve.md for the configuration file
//! and an example systemd unit.

use super::runner_args::RunnerArgs;
use super::signing_args::SigningArgs;
use super::store_args::StoreArgs;
use crate::assembly::assemble;
use crate::castore::blob::floor::{DiskFloor, FlooredBlobService};
use crate::metrics::Metrics;
use crate::server::admission::Admission;
use crate::server::build_host::BuildHost;
use crate::server::config::{ServeConfig, ServeOptions};
use crate::server::quota::UploadQuota;
use crate::server::run::{shutdown_signal, Serving};
use crate::server::tenant::Authenticator;
use crate::server::{self, Listener, RouterOptions};
use anyhow::Context;
use std::path::PathBuf;
use std::sync::Arc;
use tracing::info;

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
    #[command(flatten)]
    pub signing: SigningArgs,
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

/// Rereads the tokens file on every SIGHUP, for as long as the process lives; running and
/// queued builds are not touched, and a file that does not parse keeps the old tokens.
fn reload_on_sighup(auth: Arc<Authenticator>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            auth.reload_logged();
        }
    });
    Ok(())
}

/// Runs the server.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = config(&args).context("configuration")?;
    if args.print_config {
        print!("{}", toml::to_string(&config.to_options())?);
        return Ok(());
    }
    anyhow::ensure!(
        args.runner.kernel.is_some() == args.runner.agent.is_some(),
        "--kernel and --agent go together (both to serve builds, neither for the castore only)"
    );
    // Checked before anything is opened or started.
    let settings = match args.runner.can_build() {
        true => Some(args.runner.settings(
            config.bin_sh.as_deref(),
            config.allow_network,
            config.pool_size,
        )?),
        false => None,
    };
    let signing = args.signing.load()?;
    anyhow::ensure!(
        signing.is_none() || settings.is_some(),
        "--signing-key signs builds: it needs --kernel and --agent"
    );
    // Read now: a bad tokens file stops the start, not the first request.
    let auth = Arc::new(Authenticator::new(
        config.tokens.clone(),
        config.require_auth,
    )?);
    if let Some(path) = &config.tokens {
        info!(tokens = %path.display(), require_auth = config.require_auth, "bearer tokens enabled (SIGHUP rereads the file)");
    }
    reload_on_sighup(Arc::clone(&auth))?;
    let (mut castore, mut embedded) = args.store.castore_embedded().context("opening the store")?;
    if let Some(e) = &mut embedded {
        // A client that checks a blob (Stat) and then names it in a directory within half
        // the grace period finds it kept.
        e.blobs = e.blobs.clone().refresh_on_has(config.gc_grace / 2);
        castore.blobs = Arc::new(e.blobs.clone());
    }
    // The floor guards the disk of the embedded store; a remote store guards its own.
    let disk_floor = match (config.min_free_bytes, &args.store.blob_service_addr) {
        (0, _) | (_, Some(_)) => None,
        (min_free_bytes, None) => Some(Arc::new(DiskFloor {
            path: args.store.store_dir()?,
            min_free_bytes,
        })),
    };
    if let Some(floor) = &disk_floor {
        castore.blobs = Arc::new(FlooredBlobService::new(castore.blobs, Arc::clone(floor)));
    }
    let metrics = Arc::new(Metrics::default());
    let quota = Arc::new(UploadQuota::new(
        config.shares.clone(),
        Arc::clone(&metrics),
    ));
    let records = embedded.as_ref().map(|e| e.dirs.clone());
    let pins = embedded.as_ref().map(|e| server::pins::PinStore {
        blobs: e.blobs.clone(),
        dirs: e.dirs.clone(),
        shares: config.shares.clone(),
    });
    let gc = match (embedded, config.gc_interval.is_zero()) {
        (_, true) => None,
        (Some(e), false) => {
            info!(interval = ?config.gc_interval, grace = ?config.gc_grace, keep_for = ?config.keep_for, "collecting the embedded store's garbage periodically");
            let options = crate::castore::gc::Options {
                grace: config.gc_grace,
                keep_for: config.keep_for,
                dry_run: false,
            };
            Some(AbortOnDrop(server::gc_task::spawn(
                e.blobs,
                e.dirs,
                config.gc_interval,
                options,
                Arc::clone(&metrics),
            )))
        }
        (None, false) if gc_interval_set(&args)? => anyhow::bail!(
            "--gc-interval (gc-interval) collects the embedded store only, not {} / {}: \
             leave it unset or 0 (an object store's bucket has lifecycle rules for this)",
            castore.blob_addr,
            castore.dir_addr
        ),
        (None, false) => {
            info!(blob = %castore.blob_addr, directory = %castore.dir_addr, "not the embedded store: no periodic garbage collection (--gc-interval applies to the embedded store only)");
            None
        }
    };

    // Owns the runner's private castore socket: it lives until we return.
    let mut _assembled = None;
    let host = match settings {
        Some(settings) => {
            let assembled = assemble(settings, castore.clone()).await?;
            let attestor = signing.map(|s| s.attestor(&assembled)).transpose()?;
            if let Some(a) = &attestor {
                info!(key_id = a.key_id(), "signing the provenance of every build");
            }
            let host = Arc::new(
                BuildHost::new(
                    Arc::clone(&assembled.runner),
                    Admission::with_shares(config.max_vms, config.max_queue, config.shares.clone()),
                    Arc::clone(&metrics),
                )
                .with_attestor(attestor)
                .with_disk_floor(disk_floor)
                .with_quota(Some(Arc::clone(&quota)))
                .with_build_records(records),
            );
            _assembled = Some(assembled);
            info!(protocol = %config.protocol, max_vms = config.max_vms, pool_size = config.pool_size, max_queue = config.max_queue, "serving builds");
            Some(host)
        }
        None => {
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
            auth: Some(auth),
            quota: Some(quota),
            pins,
        },
        castore.blobs,
        castore.dirs,
    )
    .await?;
    let listener = Listener::bind(&config.listen).await?;
    match listener.local_addr() {
        Some(a) => info!(listen = %a, tls = config.tls.is_some(), "serving"),
        None => info!(listen = %config.listen, tls = config.tls.is_some(), "serving"),
    }
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening for metrics on {addr}"))?;
            info!(metrics = %addr, "serving metrics at /metrics");
            Some((l, metrics))
        }
        None => None,
    };
    Serving {
        router,
        listener,
        host,
        metrics,
        grace: config.grace_period,
    }
    .run(shutdown_signal())
    .await?;
    drop(gc);
    Ok(())
}

/// Whether --gc-interval was asked for (flag, environment or config file), not defaulted.
fn gc_interval_set(args: &ServeArgs) -> anyhow::Result<bool> {
    let file = args.config.as_deref().map(ServeOptions::load).transpose()?;
    let set = |o: &ServeOptions| o.gc_interval.as_deref().is_some_and(|v| v != "0");
    Ok(set(&args.options) || file.as_ref().is_some_and(set))
}

/// Stops the periodic GC when serve returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
