//! `tvix-build-vm nix-builder BUILD_JSON`: the program Nix's `external-builders` runs for
//! each derivation build (docs/nix.md).
//!
//! Per build: check build.json (refused with a message and exit 2 before anything is
//! imported or written); find the server (a running `serve` given by `--builder-addr`, or the
//! local one started on first use); import the inputs missing from its castore through the
//! input cache; print the handshake; send the request on the streaming `BuildPaths` RPC and
//! copy its log to our stdout/stderr as it comes; place the outputs in the real store.
//!
//! Exit codes (Nix shows any non-zero one as "builder failed with exit code N"): 0 built
//! and placed; 1 the build failed (its log was streamed); 2 build.json was refused; 3 the
//! server refused or could not run the build, or the outputs could not be placed.

use crate::castore::addr::{blob_service_from_addr, directory_service_from_addr};
use crate::castore::channel::channel_from_addr;
use crate::castore::Node;
use crate::nix::build_json::{self, NixBuild};
use crate::nix::cache::{import_inputs, ImportStats, InputCache};
use crate::nix::local_serve::LocalServe;
use crate::nix::place::place_outputs;
use crate::nix::request::{read_tmp_dir, to_paths_request, to_raw_request};
use crate::proto::build_vm::build_vm_service_client::BuildVmServiceClient;
use crate::proto::build_vm::{paths_build_event::Event, PathsBuild, Stream};
use anyhow::Context;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;
use tokio::io::AsyncWriteExt;

/// Exit code: the build ran and failed.
const FAILED: u8 = 1;
/// Exit code: build.json was refused; nothing was imported or written.
const REFUSED: u8 = 2;
/// Exit code: the server or the store could not take or finish the build.
const INFRASTRUCTURE: u8 = 3;

/// The line Nix waits for before it treats our output as the build log.
const HANDSHAKE: &[u8] = b"\x02\n";

/// The most a `BuildPaths` event may be: the log chunks are small, the final `PathsBuild`
/// holds one node per output.
const MAX_EVENT_BYTES: usize = 16 << 20;

/// The file in the state dir that gets one JSON line per finished build (what was
/// imported, how long it took): for operators and for the tests and benchmarks.
pub const BUILDS_LOG: &str = "builds.jsonl";

#[derive(Debug, clap::Args)]
pub struct NixBuilderArgs {
    /// Send the build to this running `tvix-build-vm serve` (its castore and build service:
    /// e.g. grpc+unix:///run/tvix-build-vm.sock or grpc+http://host:port) instead of the
    /// local one this program starts on first use. Required under Nix's multi-user daemon.
    #[arg(long, env = "TVIX_BUILD_VM_BUILDER_ADDR", value_name = "ADDR")]
    pub builder_addr: Option<String>,
    /// Where the local server's castore, initrd cache and socket live, and the input cache
    /// (store path -> castore node). Must be writable by the user Nix builds as. Default:
    /// /var/lib/tvix-build-vm/nix as root, else $XDG_DATA_HOME/tvix-build-vm/nix or
    /// ~/.local/share/tvix-build-vm/nix.
    #[arg(long, env = "TVIX_BUILD_VM_NIX_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// An argument for the local `serve` when this program starts it (repeat for more),
    /// e.g. `--serve-arg=--allow-kvm`. The server also reads the usual TVIX_BUILD_VM_*
    /// variables (kernel, agent, config file) from the environment Nix gives us.
    #[arg(long = "serve-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub serve_args: Vec<OsString>,
    /// Nix's build-users-group: running as one of its users means a multi-user daemon runs
    /// us, where a server we started would be killed with the build user's processes.
    #[arg(long, default_value = "nixbld", value_name = "GROUP")]
    pub build_users_group: String,
    /// The build.json Nix wrote (Nix passes it last).
    pub build_json: PathBuf,
}

/// Closes every file descriptor above 2: Nix does not close its own before running us, and
/// the servers we start or the VMs behind them must not hold Nix's pipes, locks or
/// database open.
fn close_inherited_fds() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    // Collected first: the directory being read is itself an open fd.
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: nothing in this process owns a descriptor yet (this runs before the
        // runtime or any file is opened), so none is closed under its owner's feet; the one
        // that read /proc/self/fd is already closed and returns EBADF, ignored.
        unsafe {
            libc::close(fd);
        }
    }
}

/// Entry point from the CLI: fds closed before anything else is opened.
pub fn main(args: NixBuilderArgs) -> ExitCode {
    close_inherited_fds();
    super::run_async(run(args)).unwrap_or(ExitCode::from(INFRASTRUCTURE))
}

/// The state dir: the flag, or the default next to the default store.
fn state_dir(args: &NixBuilderArgs) -> anyhow::Result<PathBuf> {
    match &args.state_dir {
        Some(d) => Ok(d.clone()),
        None => Ok(super::store_args::default_store_dir()?.join("nix")),
    }
}

/// Whether we run as a member of Nix's build users group (a multi-user daemon's build
/// user) rather than as the user who runs Nix.
fn is_build_user(group: &str) -> bool {
    use nix::unistd::{getuid, Group, User};
    let uid = getuid();
    if uid.is_root() {
        return false;
    }
    let (Ok(Some(group)), Ok(Some(user))) = (Group::from_name(group), User::from_uid(uid)) else {
        return false;
    };
    user.gid == group.gid || group.mem.contains(&user.name)
}

/// A file name for the input cache of one server address: the cache maps store paths to
/// nodes of that server's castore, so two servers never share one.
fn addr_key(addr: &str) -> String {
    let hash = blake3::hash(addr.as_bytes()).to_hex();
    format!("addr-{}", &hash.as_str()[..32])
}

fn refuse(e: impl Into<anyhow::Error>) -> anyhow::Result<ExitCode> {
    eprintln!("error: tvix-build-vm: {:#}", e.into());
    Ok(ExitCode::from(REFUSED))
}

pub async fn run(args: NixBuilderArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    // Everything about the request is checked before a server is started or an input read.
    let build = match build_json::read(&args.build_json) {
        Ok(b) => b,
        Err(e) => return refuse(e),
    };
    let features = match build.required_system_features() {
        Ok(f) => f,
        Err(e) => return refuse(e),
    };
    let tmp_files = match read_tmp_dir(&build) {
        Ok(f) => f,
        Err(e) => return refuse(e),
    };
    let state = state_dir(&args)?;
    // `blob_addr`: where input blobs go. A remote server takes them over gRPC; the local
    // server's blob directory is written directly (see below).
    let (addr, blob_addr, cache_dir) = match &args.builder_addr {
        Some(addr) => (
            addr.clone(),
            addr.clone(),
            state.join("remote-inputs").join(addr_key(addr)),
        ),
        None => {
            if is_build_user(&args.build_users_group) {
                return refuse(anyhow::anyhow!(
                    "running as a member of the build users group {:?} (Nix's multi-user \
                     daemon): a server started here would die with this build; run \
                     `tvix-build-vm serve` as a service and pass --builder-addr",
                    args.build_users_group
                ));
            }
            let local = LocalServe::new(&state);
            let program = std::env::current_exe().context("finding our own executable")?;
            let serve_args = args.serve_args.clone();
            let ensured = local.clone();
            let socket = tokio::task::spawn_blocking(move || ensured.ensure(&program, &serve_args))
                .await
                .context("starting the local server")??;
            // The local server's blobs are files in a directory that several processes
            // may write (temp file + rename): written here they cost one batched fsync
            // round per input instead of the gRPC Put path's two fsyncs per blob, which
            // dominate a tree of many small files. Directories still go to the server
            // (its directory database is single-process).
            let blobs_dir = local.store_dir().join(super::store_args::BLOBS_DIR);
            (
                format!("grpc+unix://{}", socket.display()),
                blobs_dir.display().to_string(),
                local.input_cache_dir(),
            )
        }
    };

    let blobs = blob_service_from_addr(&blob_addr).context("the server's blob service")?;
    let dirs = directory_service_from_addr(&addr).context("the server's directory service")?;
    let cache = InputCache::open(&cache_dir)?;
    // A remote server may hold inputs this state dir has not recorded (other clients):
    // hashing before sending costs a second read, sending what it has costs the network.
    let cache = if args.builder_addr.is_some() {
        cache.asking_first()
    } else {
        cache
    };
    let import_started = Instant::now();
    let (inputs, stats) = import_inputs(&cache, blobs.clone(), dirs.clone(), &build)
        .await
        .context("importing the inputs")?;
    let import_time = import_started.elapsed();

    let raw = to_raw_request(&build, inputs, tmp_files, &features);
    if let Err(e) = raw.clone().validate() {
        return refuse(crate::nix::NixError::Request(e));
    }
    let request = to_paths_request(raw);

    let mut stderr = tokio::io::stderr();
    stderr.write_all(HANDSHAKE).await?;
    stderr.flush().await?;

    let channel = channel_from_addr(&addr)?;
    let mut client = BuildVmServiceClient::new(channel).max_decoding_message_size(MAX_EVENT_BYTES);
    let result = match stream_build(&mut client, request).await {
        Ok(r) => r,
        Err(status) => {
            // The log already streamed; the status repeats its tail after this line.
            let message = status.message();
            let first = message.split("\n--- build log").next().unwrap_or(message);
            eprintln!("error: tvix-build-vm: the build failed: {first}");
            let code = match status.code() {
                tonic::Code::Aborted | tonic::Code::DeadlineExceeded => FAILED,
                _ => INFRASTRUCTURE,
            };
            return Ok(ExitCode::from(code));
        }
    };
    if let Some(failure) = exit_failure(&result) {
        eprintln!("error: tvix-build-vm: the builder {failure}");
        return Ok(ExitCode::from(FAILED));
    }
    let nodes = match output_nodes(&build, &result) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: tvix-build-vm: {e:#}");
            return Ok(ExitCode::from(INFRASTRUCTURE));
        }
    };
    if let Err(e) = place_outputs(blobs.as_ref(), dirs.as_ref(), &build, &nodes).await {
        eprintln!("error: tvix-build-vm: {:#}", anyhow::Error::from(e));
        return Ok(ExitCode::from(INFRASTRUCTURE));
    }
    record(&state, &build, &stats, import_time, started.elapsed());
    Ok(ExitCode::SUCCESS)
}

/// Sends the request and copies its live log to our stdout/stderr (the pty Nix reads the
/// build log from); returns the final `PathsBuild`.
async fn stream_build(
    client: &mut BuildVmServiceClient<crate::castore::package::PackageChannel>,
    request: crate::proto::build_vm::PathsBuildRequest,
) -> Result<PathsBuild, tonic::Status> {
    let mut stream = client.build_paths(request).await?.into_inner();
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut last = None;
    while let Some(event) = stream.message().await? {
        match event.event {
            Some(Event::Log(chunk)) => {
                // A closed stdout/stderr must not stop the build: Nix keeps its own log.
                let out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send) =
                    if chunk.stream == Stream::Stdout as i32 {
                        &mut stdout
                    } else {
                        &mut stderr
                    };
                let _ = out.write_all(&chunk.data).await;
                let _ = out.flush().await;
            }
            Some(Event::Build(b)) => last = Some(b),
            Some(Event::Started(_)) | None => {}
        }
    }
    last.ok_or_else(|| tonic::Status::internal("the server ended the build without a result"))
}

/// Why a finished build is a failure, if it is one.
fn exit_failure(b: &PathsBuild) -> Option<String> {
    use crate::proto::build::build::exit_status::Kind;
    match b.exit_status.as_ref().and_then(|s| s.kind) {
        Some(Kind::Code(0)) | None => None,
        Some(Kind::Code(c)) => Some(format!("exited with code {c}")),
        Some(Kind::Signal(s)) => Some(format!("was killed by signal {s}")),
    }
}

/// The outputs by name: the server answers one node per requested output, in the order of
/// the request's (sorted) output paths.
fn output_nodes(build: &NixBuild, result: &PathsBuild) -> anyhow::Result<Vec<(String, Node)>> {
    let mut by_path: Vec<(String, &String)> = build
        .outputs
        .iter()
        .map(|(name, base)| (format!("{}/{base}", build.store_rel), name))
        .collect();
    by_path.sort();
    anyhow::ensure!(
        result.outputs.len() == by_path.len(),
        "the server answered {} outputs for {} requested",
        result.outputs.len(),
        by_path.len()
    );
    by_path
        .into_iter()
        .zip(&result.outputs)
        .map(|((_, name), proto)| {
            let (_, node) = Node::from_proto_anonymous(proto.clone())
                .with_context(|| format!("the server's node for output {name}"))?;
            Ok((name.clone(), node))
        })
        .collect()
}

/// Appends one JSON line about a finished build to the state dir's [`BUILDS_LOG`]. One
/// `write` of a short line with O_APPEND, so concurrent builders do not interleave lines;
/// a failure to write it does not fail the build.
fn record(
    state: &Path,
    build: &NixBuild,
    stats: &ImportStats,
    import: std::time::Duration,
    total: std::time::Duration,
) {
    let line = serde_json::json!({
        "outputs": build.json.outputs,
        "inputs_reused": stats.reused,
        "inputs_imported": stats.imported,
        "inputs_present": stats.present,
        "input_bytes_read": stats.bytes_read,
        "import_ms": import.as_millis() as u64,
        "total_ms": total.as_millis() as u64,
    });
    let mut text = line.to_string();
    text.push('\n');
    let path = state.join(BUILDS_LOG);
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "could not record the build");
    }
}
