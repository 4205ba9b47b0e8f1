//! What one fs-daemon process serves, as one typed value: the runner (and the benches) turn
//! it into the hidden `fs-daemon` subcommand's arguments with [`DaemonSpec::to_args`], and
//! the subcommand parses its arguments back into the same value, so the two sides cannot
//! drift apart.

use std::ffi::OsString;
use std::path::PathBuf;

/// Where a castore share's root directory comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootSource {
    /// A file holding an encoded `tvix.castore.v1.Directory`.
    File(PathBuf),
    /// The same, read from stdin while already serving (a VM booted before its request).
    Stdin,
}

/// What the share holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShareSource {
    /// Castore content: the root's entries, read through these services.
    Castore {
        root: RootSource,
        blob_service_addr: String,
        directory_service_addr: String,
    },
    /// One host directory, read-only.
    HostDir(PathBuf),
}

/// One fs-daemon's whole configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonSpec {
    /// The vhost-user socket it creates.
    pub socket: PathBuf,
    pub source: ShareSource,
    /// The virtio-fs tag announced to the guest.
    pub tag: Option<String>,
    /// Open files the guest may hold at once (host descriptors for a host directory).
    pub max_handles: u64,
    /// Inodes tracked at once.
    pub max_inodes: u64,
    /// virtiofsd worker threads; 0 serves requests on the queue thread.
    pub threads: u64,
    /// Where a castore share counts what it served (see [`super::stats`]).
    pub stats: Option<PathBuf>,
}

/// Inodes a daemon tracks at once unless told otherwise.
pub const DEFAULT_MAX_INODES: u64 = 1 << 18;
/// Worker threads unless told otherwise: requests are served on the queue thread.
pub const DEFAULT_THREADS: u64 = 0;

impl DaemonSpec {
    /// The command line of the binary's `fs-daemon` subcommand, starting with its name.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["fs-daemon".into(), "--socket".into()];
        args.push(self.socket.clone().into());
        match &self.source {
            ShareSource::Castore {
                root,
                blob_service_addr,
                directory_service_addr,
            } => {
                match root {
                    RootSource::File(path) => {
                        args.push("--root-directory".into());
                        args.push(path.clone().into());
                    }
                    RootSource::Stdin => args.push("--root-from-stdin".into()),
                }
                args.push("--blob-service-addr".into());
                args.push(blob_service_addr.into());
                args.push("--directory-service-addr".into());
                args.push(directory_service_addr.into());
            }
            ShareSource::HostDir(dir) => {
                args.push("--ro-dir".into());
                args.push(dir.clone().into());
            }
        }
        if let Some(tag) = &self.tag {
            args.push("--tag".into());
            args.push(tag.into());
        }
        args.push("--max-handles".into());
        args.push(self.max_handles.to_string().into());
        args.push("--max-inodes".into());
        args.push(self.max_inodes.to_string().into());
        args.push("--threads".into());
        args.push(self.threads.to_string().into());
        if let Some(stats) = &self.stats {
            args.push("--stats-file".into());
            args.push(stats.clone().into());
        }
        args
    }
}
