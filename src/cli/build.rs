//! `tvix-build-vm build`: run one BuildRequest in a VM from the command line.
//!
//! The build log streams to stderr as it comes; the `Build` is printed as proto3 JSON on
//! stdout. Exit codes: 0 the build succeeded; 1 the build failed (exit code, signal, OOM,
//! missing output, wall-clock or silence limit); 2 the request is invalid; 3 it cannot run
//! here (constraints, missing inputs); 4 our infrastructure failed; 5 the guest broke the
//! protocol or a limit.

use super::request_args::RequestArgs;
use super::runner_args::RunnerArgs;
use super::signing_args::SigningArgs;
use super::store_args::StoreArgs;
use crate::agent::{LogChunk, LogSink};
use crate::assembly::assemble;
use crate::castore::import::import_path;
use crate::provenance::attest::{Origin, Record};
use crate::runner::{new_build_id, Fault};
use crate::wire::{seed, Finished};
use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;
use tokio::io::AsyncWriteExt;

#[derive(Debug, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub request: RequestArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub runner: RunnerArgs,
    #[command(flatten)]
    pub signing: SigningArgs,
    /// Also write the signed provenance (the DSSE envelope's JSON) to this file.
    #[arg(long, value_name = "FILE", requires = "signing_key")]
    pub provenance_out: Option<PathBuf>,
}

/// Writes the live build log to our stderr.
struct StderrLog(tokio::io::Stderr);

#[async_trait::async_trait]
impl LogSink for StderrLog {
    async fn send(&mut self, chunk: LogChunk) {
        // A closed stderr must not stop the build; the log tail is kept regardless.
        let _ = self.0.write_all(&chunk.data).await;
        let _ = self.0.flush().await;
    }
}

/// Exit code 2: the request is invalid.
const INVALID: u8 = 2;
/// Exit code 3: the request cannot run here.
const PRECONDITION: u8 = 3;

pub async fn run(args: BuildArgs) -> anyhow::Result<ExitCode> {
    // Everything that needs nothing started or imported comes first: the VM configuration
    // and the request file.
    // `build` offers neither network access nor a shell (the seed layout cannot ask).
    let settings = args.runner.settings(None, false, 0)?;
    let signing = args.signing.load()?;
    let wire = match args.request.load() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: invalid request: {:#}", anyhow::Error::from(e));
            return Ok(ExitCode::from(INVALID));
        }
    };
    let castore = args.store.castore()?;

    let mut imported = Vec::with_capacity(args.request.inputs.len());
    for path in &args.request.inputs {
        let name = path
            .file_name()
            .with_context(|| format!("--input {} has no basename", path.display()))?;
        let node = import_path(castore.blobs.clone(), castore.dirs.clone(), path)
            .await
            .with_context(|| format!("importing --input {}", path.display()))?;
        imported.push(node.to_proto(Bytes::copy_from_slice(name.as_encoded_bytes())));
    }
    let wire = args.request.apply(wire, imported);
    let req = match seed::decode(wire.clone()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: invalid request: {e}");
            return Ok(ExitCode::from(INVALID));
        }
    };

    let decision = match settings.policy.decide(&req) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: the request cannot run on this host: {e}");
            return Ok(ExitCode::from(PRECONDITION));
        }
    };

    let assembled = assemble(settings, castore).await?;
    let attestor = signing.map(|s| s.attestor(&assembled)).transpose()?;
    let id = new_build_id();
    let mut log = StderrLog(tokio::io::stderr());
    let started = SystemTime::now();
    match assembled.runner.build(&id, &req, &decision, &mut log).await {
        Ok(outcome) => {
            let mut finished = Finished::direct(id, outcome);
            if let Some(attestor) = &attestor {
                let origin = Origin::of(seed::DIALECT, &wire);
                let record = Record {
                    id: &finished.id,
                    origin: &origin,
                    request: &req,
                    decision: &decision,
                    outcome: &finished.outcome,
                    started,
                    finished: SystemTime::now(),
                };
                let attested = attestor
                    .attest(&assembled.runner, record)
                    .await
                    .context("signing the build's provenance")?;
                if let Some(path) = &args.provenance_out {
                    write_whole(path, &attested.json)
                        .with_context(|| format!("writing --provenance-out {}", path.display()))?;
                }
                finished.provenance = Some(attested.stored);
            }
            let build = seed::encode(wire, &finished);
            println!("{}", serde_json::to_string(&build)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let code = match e.fault() {
                Fault::Build => 1,
                Fault::Precondition => PRECONDITION,
                Fault::Infrastructure => 4,
                Fault::Guest => 5,
            };
            if let Some(tail) = e.serial_tail().filter(|t| !t.is_empty()) {
                eprintln!("--- serial console (tail) ---\n{tail}");
            }
            if let Some(tail) = e.log_tail().filter(|t| !t.is_empty()) {
                eprintln!("--- build log (last {} bytes) ---\n{tail}", tail.len());
            }
            if let Some(problems) = e.fs_daemon_problems() {
                eprintln!("--- the inputs' fs-daemon ---\n{problems}");
            }
            eprintln!("error: build {id}: {:#}", anyhow::Error::from(e));
            Ok(ExitCode::from(code))
        }
    }
}

/// Writes `bytes` to `path` under a temporary name first: `path` holds the whole of them or
/// is untouched.
fn write_whole(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
