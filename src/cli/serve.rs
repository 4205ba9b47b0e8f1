//! `tvix-build-vm serve`: serve the castore over gRPC until SIGINT or SIGTERM.

use super::store_args::StoreArgs;
use crate::server::{self, ListenAddr, Listener};
use anyhow::Context;

/// Serve the castore (Blob and Directory services, health, reflection) over gRPC.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Where to listen: host:port, or unix:/abs/path.sock.
    #[arg(long, default_value = "[::]:8000")]
    pub listen: ListenAddr,
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
            tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down");
}

/// Runs the server.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let (blobs, directories) = args.store.open().context("opening the store")?;
    let router = server::router(blobs, directories).await?;
    let listener = Listener::bind(&args.listen).await?;
    match listener.local_addr() {
        Some(a) => tracing::info!(listen = %a, "serving"),
        None => tracing::info!(listen = %args.listen, "serving"),
    }
    server::serve(router, listener, shutdown_signal()).await?;
    Ok(())
}
