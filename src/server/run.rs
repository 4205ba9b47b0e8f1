//! The life of a serving process: serve gRPC (and the metrics side port) until a shutdown
//! signal, then stop accepting connections and builds (queued requests get UNAVAILABLE),
//! let running builds finish for the grace period, then cancel them (their VMs are killed)
//! and return.

use super::build_host::BuildHost;
use super::{CastoreRouter, Listener, ServerError};
use crate::metrics::Metrics;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// How long after cancelling the builds the process waits for connections to close.
const CLOSE_AFTER_CANCEL: Duration = Duration::from_secs(10);

/// What one serving process runs.
pub struct Serving {
    pub router: CastoreRouter,
    pub listener: Listener,
    /// The build host behind the router's build services; castore only without.
    pub host: Option<Arc<BuildHost>>,
    /// The Prometheus side port, and the metrics it shows when there is no build host.
    pub metrics: Option<(tokio::net::TcpListener, Arc<Metrics>)>,
    /// How long running builds may go on after the shutdown signal.
    pub grace: Duration,
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

impl Serving {
    /// Serves until `shutdown` completes, then drains, waits out the grace period and
    /// cancels what still runs (see the module documentation).
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        let Serving {
            router,
            listener,
            host,
            metrics,
            grace,
        } = self;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        // Fires when `run` returns, for what must outlive the drain (the probes).
        let (done, done_rx) = tokio::sync::watch::channel(false);
        let wait_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        if let Some((metrics_listener, metrics)) = metrics {
            let render: Box<dyn Fn() -> String + Send + Sync> = match &host {
                Some(h) => {
                    let h = Arc::clone(h);
                    Box::new(move || h.render_metrics())
                }
                None => Box::new(move || metrics.render(0, 0, None)),
            };
            // Not ready once the shutdown signal came (draining), though the port stays up
            // until the process ends, so a balancer reads "not ready" rather than a refused
            // connection while the running builds finish.
            let ready_host = host.clone();
            let ready_stop = stopped.clone();
            // Nor while the store's disk is below its floor: new builds would be refused.
            let ready = move || {
                if *ready_stop.borrow() {
                    return Err("draining".to_owned());
                }
                ready_host.as_ref().map_or(Ok(()), |h| h.ready())
            };
            tokio::spawn(super::metrics_http::serve(
                metrics_listener,
                render,
                ready,
                wait_stop(done_rx.clone()),
            ));
        }

        let serving = super::serve(router, listener, async move {
            shutdown.await;
            let _ = stop.send(true);
        });
        tokio::pin!(serving);
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
        let result = tokio::select! {
            r = &mut serving => r,
            () = enforce_grace => {
                warn!("connections stayed open after the builds were cancelled; exiting");
                Ok(())
            }
        };
        let _ = done.send(true);
        result?;
        info!("stopped");
        Ok(())
    }
}
