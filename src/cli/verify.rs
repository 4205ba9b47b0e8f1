//! `tvix-build-vm verify`: checks a provenance envelope's signature, and that its subjects
//! are the outputs of a `Build` (as `build` prints it, or a server answered it) and/or the
//! trees on disk (by NAR hash). Every difference is printed on its own line.
//!
//! Exit codes: 0 the signature verifies and everything given matches; 1 the signature does
//! not verify (changed payload or signature, another key); 2 the signature verifies but a
//! subject does not match (each difference named); 3 the check could not be made (a file is
//! unreadable, or is not a key, an envelope, a statement or a Build).

use crate::castore::directory::Node;
use crate::proto::castore as castore_pb;
use crate::provenance::check::{self, OpenError};
use crate::provenance::dsse::{Envelope, MAX_ENVELOPE_BYTES};
use crate::provenance::keys;
use anyhow::Context;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit code 1: the signature does not verify.
const BAD_SIGNATURE: u8 = 1;
/// Exit code 2: a subject does not match.
const MISMATCH: u8 = 2;
/// Exit code 3: the check could not be made.
const UNUSABLE: u8 = 3;

/// Check a signed provenance envelope against a Build and/or output trees.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Exit codes: 0 the signature verifies and everything given matches; \
1 the signature does not verify (changed payload or signature, or another key); 2 the \
signature verifies but a subject does not match (each difference is printed); 3 the check \
could not be made (an unreadable file, or not a key, envelope, statement or Build)."
)]
pub struct VerifyArgs {
    /// The host's public key (SubjectPublicKeyInfo PEM, as `keygen` writes FILE.pub).
    #[arg(long, value_name = "FILE.pub")]
    pub public_key: PathBuf,
    /// The DSSE envelope (JSON).
    #[arg(long, value_name = "ENVELOPE.json")]
    pub envelope: PathBuf,
    /// A Build as proto3 JSON: its outputs must be exactly the statement's subjects.
    #[arg(long, value_name = "BUILD.json")]
    pub build: Option<PathBuf>,
    /// An output tree (file, directory or symlink) on disk: its NAR hash must be a
    /// subject's (the subject of the same basename, if there is one). Repeatable.
    #[arg(long = "path", value_name = "DIR")]
    pub paths: Vec<PathBuf>,
}

fn read_bounded(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| format!("{what} {}", path.display()))?;
    let mut out = Vec::new();
    file.take(MAX_ENVELOPE_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .with_context(|| format!("{what} {}", path.display()))?;
    anyhow::ensure!(
        out.len() <= MAX_ENVELOPE_BYTES,
        "{what} {}: more than {MAX_ENVELOPE_BYTES} bytes",
        path.display()
    );
    Ok(out)
}

/// The outputs of a Build's proto3 JSON, named as the Build names them: by basename (the
/// seed layout) or, for anonymous nodes (the 2024 layout), by the request's output path of
/// the same index.
fn build_outputs(json: &[u8]) -> anyhow::Result<Vec<(String, Node)>> {
    let build: serde_json::Value = serde_json::from_slice(json).context("not JSON")?;
    let outputs = build
        .get("outputs")
        .and_then(|o| o.as_array())
        .context("no \"outputs\" list")?;
    let requested = build
        .get("buildRequest")
        .and_then(|r| r.get("outputs"))
        .and_then(|o| o.as_array());
    let mut out = Vec::with_capacity(outputs.len());
    for (i, raw) in outputs.iter().enumerate() {
        let pb: castore_pb::Node = serde_json::from_value(raw.clone())
            .with_context(|| format!("outputs[{i}]: not a castore node"))?;
        let (name, node) =
            Node::from_proto_anonymous(pb).with_context(|| format!("outputs[{i}]"))?;
        let name = match name {
            Some(n) => String::from_utf8_lossy(n.as_bytes()).into_owned(),
            None => requested
                .and_then(|r| r.get(i))
                .and_then(|p| p.as_str())
                .with_context(|| {
                    format!("outputs[{i}] has no name and the request no outputs[{i}]")
                })?
                .to_owned(),
        };
        out.push((name, node));
    }
    Ok(out)
}

pub fn run(args: VerifyArgs) -> ExitCode {
    match verify(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(UNUSABLE)
        }
    }
}

fn verify(args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let key = keys::load_verifying_key(&args.public_key)?;
    let envelope = Envelope::parse(&read_bounded(&args.envelope, "envelope")?)
        .with_context(|| format!("envelope {}", args.envelope.display()))?;
    // Everything given is read before the verdict, so an unusable input is never reported
    // as a bad signature.
    let outputs = match &args.build {
        Some(p) => Some(
            build_outputs(&read_bounded(p, "build")?)
                .with_context(|| format!("build {}", p.display()))?,
        ),
        None => None,
    };
    let statement = match check::open(&envelope, &key) {
        Ok(s) => s,
        Err(OpenError::Signature(e)) => {
            println!("FAIL signature: {e}");
            return Ok(ExitCode::from(BAD_SIGNATURE));
        }
        Err(e) => return Err(e).context("the envelope's signature verifies, but"),
    };
    println!(
        "ok   signature: by key {} over {} subject(s)",
        keys::key_id(&key),
        statement.subject.len()
    );
    let mut mismatches = Vec::new();
    if let Some(outputs) = &outputs {
        mismatches.extend(check::against_outputs(&statement, outputs));
    }
    mismatches.extend(check::against_paths(&statement, &args.paths)?);
    for m in &mismatches {
        println!("FAIL {m}");
    }
    if !mismatches.is_empty() {
        return Ok(ExitCode::from(MISMATCH));
    }
    if let Some(outputs) = &outputs {
        println!("ok   build: {} output(s) match the subjects", outputs.len());
    }
    for p in &args.paths {
        println!("ok   path {}: NAR hash matches", p.display());
    }
    Ok(ExitCode::SUCCESS)
}
