//! `tvix-build-vm fs-daemon`: serves one build's inputs, read-only, to one VM over a
//! vhost-user virtio-fs socket, and exits when the VM disconnects. With `--ro-dir` it
//! serves one host directory read-only instead (see [`crate::fs::passthrough`]). The runner
//! starts it; it is hidden from `--help`.
//!
//! Exit codes: 0 after the VM disconnected; 2 for invalid arguments, an invalid root
//! directory file or a directory that cannot be shared; 1 for anything else (castore
//! unreachable, socket, serving).

use crate::castore::directory::{Directory, ValidationError};
use crate::castore::{self, BlobService, DirectoryService};
use crate::fs::daemon::{self, DaemonConfig, DaemonError};
use crate::fs::passthrough::{self, PassthroughError};
use crate::fs::sandbox::{self, SandboxError};
use crate::fs::spec::{DEFAULT_MAX_INODES, DEFAULT_THREADS};
use crate::fs::stats::ReadStats;
use crate::fs::{
    CastoreFs, CastoreSource, DaemonSpec, FsError, FsLimits, Listing, RootAssigner, RootSource,
    ShareSource,
};
use crate::proto::castore as pb;
use prost::Message;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// Largest root directory file accepted (a Directory message from tonic is at most 4 MiB).
const MAX_ROOT_FILE: u64 = 64 << 20;

/// File descriptors the daemon needs beyond one per open handle: stdio, socket, epoll and
/// event fds, the runtime's, the castore's connections, one staging memfd per thread.
const FD_RESERVE: u64 = 128;

/// Arguments of `fs-daemon`.
#[derive(Debug, clap::Args)]
pub struct FsDaemonArgs {
    /// The vhost-user socket to create; it appears once the daemon accepts a connection.
    #[arg(long)]
    pub socket: PathBuf,
    /// A file holding an encoded `tvix.castore.v1.Directory` whose entries are the share's
    /// root entries (the build's inputs).
    #[arg(long, required_unless_present_any = ["root_from_stdin", "ro_dir"])]
    pub root_directory: Option<PathBuf>,
    /// Read the root directory (as for `--root-directory`) from stdin, to its end, while
    /// already serving: a pooled VM boots before its build's inputs are known. Requests that
    /// need the root's entries wait for them; the daemon exits (code 2) if stdin ends without
    /// a valid Directory.
    #[arg(long, conflicts_with = "root_directory")]
    pub root_from_stdin: bool,
    /// Serve this host directory, read-only, instead of castore content (an operator's
    /// `--allow-ro-path`). `--max-handles` then bounds the host descriptors the guest may
    /// hold, looked-up entries and open files together.
    #[arg(long, conflicts_with_all = ["root_directory", "root_from_stdin", "blob_service_addr", "directory_service_addr"])]
    pub ro_dir: Option<PathBuf>,
    /// Blob service address (e.g. `/var/lib/tvix-build-vm/blobs`).
    #[arg(long, required_unless_present = "ro_dir")]
    pub blob_service_addr: Option<String>,
    /// Directory service address (e.g. `redb:///var/lib/tvix-build-vm/directories.redb`).
    #[arg(long, required_unless_present = "ro_dir")]
    pub directory_service_addr: Option<String>,
    /// virtio-fs tag announced to the guest (at most 36 bytes); default: whatever the VMM's
    /// device sets.
    #[arg(long)]
    pub tag: Option<String>,
    /// Open files the guest may hold at once; beyond, open fails with ENFILE.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_handles: u64,
    /// Inodes the daemon tracks at once; beyond (all still in use by the guest), lookups fail
    /// with ENOMEM.
    #[arg(long, default_value_t = DEFAULT_MAX_INODES, value_parser = clap::value_parser!(u64).range(16..=1 << 26))]
    pub max_inodes: u64,
    /// virtiofsd worker threads; 0 serves requests on the queue thread.
    #[arg(long, default_value_t = DEFAULT_THREADS, value_parser = clap::value_parser!(u64).range(0..=64))]
    pub threads: u64,
    /// Count the files opened and bytes served into this file (16 bytes, see
    /// `fs::stats`), for the runner's accounting.
    #[arg(long, conflicts_with = "ro_dir")]
    pub stats_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum FsDaemonError {
    #[error("cannot read the root directory file {path}")]
    ReadRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("root directory file {path} has {len} bytes, more than {MAX_ROOT_FILE}")]
    RootTooLarge { path: PathBuf, len: u64 },
    #[error("root directory file {path} is not an encoded tvix.castore.v1.Directory")]
    DecodeRoot {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },
    #[error("root directory file {path} is not a valid Directory")]
    InvalidRoot {
        path: PathBuf,
        #[source]
        source: ValidationError,
    },
    #[error("root directory")]
    RootListing(#[source] FsError),
    #[error("restricting the daemon's privileges failed")]
    Sandbox(#[source] SandboxError),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot create the stats file {path}")]
    Stats {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the {what} service at {addr:?}")]
    Castore {
        what: &'static str,
        addr: String,
        #[source]
        source: Box<castore::addr::AddrError>,
    },
    #[error("a required argument is missing: {0}")]
    MissingArg(&'static str),
    #[error("cannot share the directory")]
    RoDir(#[source] PassthroughError),
    #[error(transparent)]
    Daemon(DaemonError),
}

impl FsDaemonError {
    fn exit_code(&self) -> u8 {
        match self {
            FsDaemonError::ReadRoot { .. }
            | FsDaemonError::RootTooLarge { .. }
            | FsDaemonError::DecodeRoot { .. }
            | FsDaemonError::InvalidRoot { .. }
            | FsDaemonError::RootListing(_)
            | FsDaemonError::MissingArg(_)
            | FsDaemonError::RoDir(
                PassthroughError::NotAbsolute { .. }
                | PassthroughError::Stat { .. }
                | PassthroughError::NotADirectory { .. }
                | PassthroughError::Reserved { .. },
            )
            | FsDaemonError::Daemon(DaemonError::InvalidTag(_)) => 2,
            _ => 1,
        }
    }
}

impl TryFrom<FsDaemonArgs> for DaemonSpec {
    type Error = FsDaemonError;

    /// clap has checked which arguments go together; this names what is still missing.
    fn try_from(args: FsDaemonArgs) -> Result<Self, FsDaemonError> {
        let source = match args.ro_dir {
            Some(dir) => ShareSource::HostDir(dir),
            None => ShareSource::Castore {
                root: match args.root_directory {
                    Some(path) => RootSource::File(path),
                    None if args.root_from_stdin => RootSource::Stdin,
                    None => return Err(FsDaemonError::MissingArg("--root-directory")),
                },
                blob_service_addr: args
                    .blob_service_addr
                    .ok_or(FsDaemonError::MissingArg("--blob-service-addr"))?,
                directory_service_addr: args
                    .directory_service_addr
                    .ok_or(FsDaemonError::MissingArg("--directory-service-addr"))?,
            },
        };
        Ok(DaemonSpec {
            socket: args.socket,
            source,
            tag: args.tag,
            max_handles: args.max_handles,
            max_inodes: args.max_inodes,
            threads: args.threads,
            stats: args.stats_file,
        })
    }
}

/// Runs the daemon; never returns before the VM disconnected or an error.
pub fn run(args: FsDaemonArgs) -> ExitCode {
    match DaemonSpec::try_from(args).and_then(serve) {
        Ok(()) => {
            tracing::info!("VM disconnected, exiting");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("fs-daemon: {}", castore::error::error_chain(&e));
            ExitCode::from(e.exit_code())
        }
    }
}

fn serve(spec: DaemonSpec) -> Result<(), FsDaemonError> {
    let cfg = DaemonConfig {
        socket: spec.socket.clone(),
        tag: spec.tag.clone(),
        // Bounded by clap to 64.
        threads: spec.threads as usize,
    };
    cfg.validate().map_err(FsDaemonError::Daemon)?;
    let (root, blob_addr, dir_addr) = match &spec.source {
        ShareSource::HostDir(dir) => return serve_ro_dir(dir, spec.max_handles, &cfg),
        ShareSource::Castore {
            root,
            blob_service_addr,
            directory_service_addr,
        } => (root, blob_service_addr, directory_service_addr),
    };
    let root = match root {
        RootSource::File(path) => Some(read_listing(std::fs::File::open(path), path)?),
        RootSource::Stdin => None,
    };

    // Before the sandbox: the one file the daemon writes besides its socket.
    let stats = match &spec.stats {
        Some(path) => {
            Arc::new(
                ReadStats::to_file(path).map_err(|source| FsDaemonError::Stats {
                    path: path.clone(),
                    source,
                })?,
            )
        }
        None => Arc::default(),
    };

    // While still single-threaded: capabilities are per thread.
    let fds = spec.max_handles + FD_RESERVE + 2 * spec.threads;
    sandbox::restrict(fds).map_err(FsDaemonError::Sandbox)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("fs-daemon-rt")
        .enable_all()
        .build()
        .map_err(FsDaemonError::Runtime)?;
    let (blobs, directories, local) = {
        let _in_runtime = rt.enter();
        open_services(blob_addr, dir_addr)?
    };
    let mut source = CastoreSource::new(blobs, directories, rt.handle().clone());
    if let Some(local) = local {
        source = source.with_local_files(local);
    }
    let limits = FsLimits {
        // Bounded by clap.
        max_handles: spec.max_handles as usize,
        max_inodes: spec.max_inodes as usize,
    };
    let fs = match root {
        Some(root) => CastoreFs::new(root, Arc::new(source), limits).with_stats(stats),
        None => {
            let (fs, assigner) = CastoreFs::with_pending_root(Arc::new(source), limits);
            assign_from_stdin(assigner).map_err(FsDaemonError::Runtime)?;
            fs.with_stats(stats)
        }
    };
    let listener = daemon::bind(&cfg.socket).map_err(FsDaemonError::Daemon)?;
    let served = daemon::serve(fs, listener, &cfg).map_err(FsDaemonError::Daemon);
    // The services' background tasks have nothing left to do.
    rt.shutdown_background();
    served
}

/// Serves `dir` read-only. The socket is bound first: the confinement may chroot into `dir`,
/// after which the socket's path is out of reach.
fn serve_ro_dir(dir: &Path, max_fds: u64, cfg: &DaemonConfig) -> Result<(), FsDaemonError> {
    // Refuse a bad directory before anything appears at the socket path.
    passthrough::check_shareable(dir).map_err(FsDaemonError::RoDir)?;
    let socket = daemon::bind(&cfg.socket).map_err(FsDaemonError::Daemon)?;
    let fs = passthrough::confine_and_open(dir, max_fds).map_err(FsDaemonError::RoDir)?;
    daemon::serve(fs, socket, cfg).map_err(FsDaemonError::Daemon)
}

/// Where stdin's root comes from, for error messages.
const STDIN: &str = "<stdin>";

/// Reads the root from stdin on a thread of its own and assigns it; a root that cannot be
/// read ends the daemon (the VM then loses its share, and the runner reports the daemon's
/// death with this log).
fn assign_from_stdin(assigner: RootAssigner) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("fs-daemon-root".to_owned())
        .spawn(move || {
            let path = PathBuf::from(STDIN);
            match read_listing(Ok(std::io::stdin().lock()), &path) {
                Ok(root) => {
                    tracing::debug!(entries = root.len(), "root assigned");
                    assigner.assign(root);
                }
                Err(e) => {
                    tracing::error!("fs-daemon: {}", castore::error::error_chain(&e));
                    std::process::exit(i32::from(e.exit_code()));
                }
            }
        })
        .map(drop)
}

/// The root directory read from `file` (named `path` in errors), as the share's root entries.
fn read_listing(
    file: std::io::Result<impl std::io::Read>,
    path: &Path,
) -> Result<Listing, FsDaemonError> {
    let root = read_root(file, path)?;
    Listing::from_directory(&root.digest(), &root).map_err(FsDaemonError::RootListing)
}

fn read_root(
    file: std::io::Result<impl std::io::Read>,
    path: &Path,
) -> Result<Directory, FsDaemonError> {
    use std::io::Read;
    let read_err = |source| FsDaemonError::ReadRoot {
        path: path.to_owned(),
        source,
    };
    let file = file.map_err(read_err)?;
    let mut buf = Vec::new();
    file.take(MAX_ROOT_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(read_err)?;
    if buf.len() as u64 > MAX_ROOT_FILE {
        return Err(FsDaemonError::RootTooLarge {
            path: path.to_owned(),
            len: buf.len() as u64,
        });
    }
    let msg =
        pb::Directory::decode(buf.as_slice()).map_err(|source| FsDaemonError::DecodeRoot {
            path: path.to_owned(),
            source,
        })?;
    Directory::try_from(msg).map_err(|source| FsDaemonError::InvalidRoot {
        path: path.to_owned(),
        source,
    })
}

type Services = (
    Arc<dyn BlobService>,
    Arc<dyn DirectoryService>,
    Option<crate::fs::source::LocalBlobPath>,
);

/// The services at the two addresses; for a local blob store also where its files are, so
/// reads go straight from them into guest memory. Must run inside the runtime (gRPC clients
/// are created there).
fn open_services(blob_addr: &str, dir_addr: &str) -> Result<Services, FsDaemonError> {
    use crate::castore::addr::{blob_service_from_addr, directory_service_from_addr};
    use crate::castore::blob::LocalBlobService;
    let addr_err = |what: &'static str, addr: &str| {
        let addr = addr.to_owned();
        move |source| FsDaemonError::Castore {
            what,
            addr,
            source: Box::new(source),
        }
    };
    let blobs = blob_service_from_addr(blob_addr).map_err(addr_err("blob", blob_addr))?;
    let directories =
        directory_service_from_addr(dir_addr).map_err(addr_err("directory", dir_addr))?;
    // The spelling the address parser takes for our local blob files (a plain path;
    // `objectstore+file:` is snix's bucket layout, whose blobs are not files to hand on).
    let local_root = blob_addr.starts_with('/').then_some(blob_addr);
    let local = match local_root {
        Some(root) => {
            let store = LocalBlobService::open(std::path::Path::new(root)).map_err(|e| {
                FsDaemonError::Castore {
                    what: "blob",
                    addr: blob_addr.to_owned(),
                    source: Box::new(crate::castore::addr::AddrError::Open {
                        addr: blob_addr.to_owned(),
                        source: e,
                    }),
                }
            })?;
            let paths: crate::fs::source::LocalBlobPath =
                Box::new(move |d: &castore::B3Digest| store.blob_path(d));
            Some(paths)
        }
        None => None,
    };
    Ok((blobs, directories, local))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn round_trip(spec: DaemonSpec) {
        let mut argv: Vec<std::ffi::OsString> = vec!["tvix-build-vm".into()];
        argv.extend(spec.to_args());
        let cli = crate::cli::Cli::try_parse_from(argv).expect("the daemon's arguments parse");
        let crate::cli::Command::FsDaemon(args) = cli.command else {
            panic!("not the fs-daemon subcommand");
        };
        assert_eq!(DaemonSpec::try_from(args).expect("complete"), spec);
    }

    #[test]
    fn every_spec_survives_the_command_line() {
        for root in [RootSource::Stdin, RootSource::File("/rt/root.dir".into())] {
            round_trip(DaemonSpec {
                socket: "/rt/fs.sock".into(),
                source: ShareSource::Castore {
                    root,
                    blob_service_addr: "/s/blobs".into(),
                    directory_service_addr: "grpc+unix:///rt/castore.sock".into(),
                },
                tag: Some("inputs".into()),
                max_handles: 77,
                max_inodes: 4096,
                threads: 2,
                stats: Some("/rt/fs.stats".into()),
            });
        }
        round_trip(DaemonSpec {
            socket: "/rt/ro0.sock".into(),
            source: ShareSource::HostDir("/srv/data".into()),
            tag: None,
            max_handles: 1024,
            max_inodes: DEFAULT_MAX_INODES,
            threads: DEFAULT_THREADS,
            stats: None,
        });
    }
}
