//! The periodic garbage collection of the embedded store inside `serve` (see
//! [`crate::castore::gc`] for what is kept and why it is safe beside running work).

use crate::castore::blob::LocalBlobService;
use crate::castore::directory_service::redb::RedbDirectoryService;
use crate::castore::error::error_chain;
use crate::castore::gc::{self, Options};
use crate::metrics::{GcRun, Metrics};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// Collects every `interval` (the first time one interval after the start) until aborted.
pub fn spawn(
    blobs: LocalBlobService,
    dirs: RedbDirectoryService,
    interval: Duration,
    options: Options,
    metrics: Arc<Metrics>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            match gc::collect(&blobs, &dirs, options.clone(), vec![]).await {
                Ok(r) => {
                    info!(
                        directories_kept = r.directories_kept,
                        directories_removed = r.directories_removed,
                        blobs_kept = r.blobs_kept,
                        blobs_removed = r.blobs_removed,
                        bytes_freed = r.bytes_freed,
                        seconds = r.seconds,
                        "garbage collection done"
                    );
                    metrics.observe_gc(Some(GcRun {
                        bytes_freed: r.bytes_freed,
                        blobs_removed: r.blobs_removed,
                        directories_removed: r.directories_removed,
                        seconds: r.seconds,
                    }));
                }
                Err(e) => {
                    warn!(error = %error_chain(&e), "garbage collection failed");
                    metrics.observe_gc(None);
                }
            }
        }
    })
}
