//! The `build.json` Nix writes for an external builder (version 1), parsed and checked.
//!
//! Nix runs the program with the absolute path of this file as its last argument; the fields
//! and their meaning are described in docs/nix.md. Everything here is checked before anything
//! is imported or built: an unknown version, a path outside the store, a builder that is not
//! in the inputs or an output that already exists is refused with a message naming the field
//! (Nix shows the program's stderr to the user).

use super::NixError;
use crate::castore::PathComponent;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The only version this program understands.
pub const VERSION: u64 = 1;
/// Upper bound on the size of build.json itself (the environment is the largest part; the
/// kernel limits one execve to a few MiB anyway).
pub const MAX_BUILD_JSON_BYTES: u64 = 64 << 20;

/// build.json as Nix writes it, field for field.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildJson {
    pub version: u64,
    /// The derivation's builder, e.g. `/nix/store/…-bash/bin/bash`.
    pub builder: String,
    pub args: Vec<String>,
    /// The builder's exact environment (derivation attributes and Nix's own variables).
    pub env: BTreeMap<String, String>,
    /// The host directory holding build.json.
    pub top_tmp_dir: PathBuf,
    /// The host directory that must appear as `tmp_dir_in_sandbox` in the build; it may
    /// already hold files (passAsFile, structured attrs).
    pub tmp_dir: PathBuf,
    /// `/build`.
    pub tmp_dir_in_sandbox: String,
    /// The logical store directory, `/nix/store`.
    pub store_dir: String,
    /// Where the store really is on this host (differs with `--store /other/root`).
    pub real_store_dir: PathBuf,
    pub system: String,
    /// The whole input closure, as logical store paths.
    pub input_paths: Vec<String>,
    /// Output name -> the store path the build must produce.
    pub outputs: BTreeMap<String, String>,
}

/// A checked build.json: every path is a direct child of the store dir.
#[derive(Debug, Clone)]
pub struct NixBuild {
    pub json: BuildJson,
    /// `store_dir` without its leading slash, e.g. `nix/store` (the guest's inputs dir).
    pub store_rel: String,
    /// `tmp_dir_in_sandbox` without its leading slash, e.g. `build`.
    pub build_rel: String,
    /// Basenames of `input_paths`, sorted and unique.
    pub inputs: Vec<PathComponent>,
    /// (output name, basename of its store path), by output name.
    pub outputs: Vec<(String, PathComponent)>,
}

fn field(name: impl Into<String>, reason: impl Into<String>) -> NixError {
    NixError::Field {
        field: name.into(),
        reason: reason.into(),
    }
}

/// Reads and checks `path`.
pub fn read(path: &Path) -> Result<NixBuild, NixError> {
    let io = |source| NixError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.len() > MAX_BUILD_JSON_BYTES {
        return Err(field(
            "build.json",
            format!(
                "{} bytes, at most {MAX_BUILD_JSON_BYTES} accepted",
                meta.len()
            ),
        ));
    }
    let bytes = std::fs::read(path).map_err(io)?;
    let build = parse(&bytes)?;
    check_outputs_absent(&build)?;
    Ok(build)
}

/// Parses and checks the JSON text (everything but the state of the host's store).
pub fn parse(bytes: &[u8]) -> Result<NixBuild, NixError> {
    // The version first, so that a future layout is refused as such and not as a confusing
    // complaint about some field.
    #[derive(Deserialize)]
    struct Versioned {
        version: Option<serde_json::Value>,
    }
    let v: Versioned = serde_json::from_slice(bytes).map_err(NixError::Json)?;
    match v.version {
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(VERSION) => {}
        Some(other) => {
            return Err(field(
                "version",
                format!("{other} is not supported: this program understands version {VERSION} of Nix's external-builders build.json"),
            ))
        }
        None => return Err(field("version", "missing")),
    }
    let json: BuildJson = serde_json::from_slice(bytes).map_err(NixError::Json)?;
    check(json)
}

/// The basename of `path` if it is a direct child of `store_dir`.
fn store_basename(store_dir: &str, name: &str, path: &str) -> Result<PathComponent, NixError> {
    let rest = path
        .strip_prefix(store_dir)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| {
            field(
                name,
                format!("{path:?} is not inside the store dir {store_dir:?}"),
            )
        })?;
    PathComponent::try_from(rest.as_bytes())
        .map_err(|e| field(name, format!("{path:?} is not a store path: {e}")))
}

/// A clean absolute directory (`/nix/store`, `/build`) without its leading slash.
fn absolute_dir(name: &str, path: &str) -> Result<String, NixError> {
    let rel = path
        .strip_prefix('/')
        .ok_or_else(|| field(name, format!("{path:?} is not absolute")))?;
    crate::request::RelativePath::parse(rel).map_err(|reason| field(name, reason))?;
    Ok(rel.to_owned())
}

fn check(json: BuildJson) -> Result<NixBuild, NixError> {
    let store_rel = absolute_dir("storeDir", &json.store_dir)?;
    let build_rel = absolute_dir("tmpDirInSandbox", &json.tmp_dir_in_sandbox)?;
    if build_rel == store_rel
        || build_rel.starts_with(&format!("{store_rel}/"))
        || store_rel.starts_with(&format!("{build_rel}/"))
    {
        return Err(field(
            "tmpDirInSandbox",
            format!(
                "{:?} overlaps the store dir {:?}",
                json.tmp_dir_in_sandbox, json.store_dir
            ),
        ));
    }
    for (name, p) in [
        ("realStoreDir", &json.real_store_dir),
        ("tmpDir", &json.tmp_dir),
        ("topTmpDir", &json.top_tmp_dir),
    ] {
        if !p.is_absolute() {
            return Err(field(name, format!("{} is not absolute", p.display())));
        }
    }
    if json.system.is_empty() {
        return Err(field("system", "empty"));
    }

    let mut inputs = Vec::with_capacity(json.input_paths.len());
    for (i, p) in json.input_paths.iter().enumerate() {
        inputs.push(store_basename(
            &json.store_dir,
            &format!("inputPaths[{i}]"),
            p,
        )?);
    }
    inputs.sort();
    inputs.dedup();

    if json.outputs.is_empty() {
        return Err(field("outputs", "empty: the build has nothing to produce"));
    }
    let mut outputs = Vec::with_capacity(json.outputs.len());
    for (name, p) in &json.outputs {
        let base = store_basename(&json.store_dir, &format!("outputs.{name}"), p)?;
        if inputs.binary_search(&base).is_ok() {
            return Err(field(
                format!("outputs.{name}"),
                format!("{p:?} is also an input"),
            ));
        }
        if outputs.iter().any(|(_, b)| *b == base) {
            return Err(field(
                format!("outputs.{name}"),
                format!("{p:?} is named by two outputs"),
            ));
        }
        outputs.push((name.clone(), base));
    }

    // The builder runs inside the VM, where only the inputs exist: it must be one of them
    // or lie inside one.
    let builder_root = json
        .builder
        .strip_prefix(&json.store_dir)
        .and_then(|r| r.strip_prefix('/'))
        .map(|r| r.split('/').next().unwrap_or(r));
    let in_inputs = builder_root.is_some_and(|root| {
        PathComponent::try_from(root.as_bytes()).is_ok_and(|c| inputs.binary_search(&c).is_ok())
    });
    if !in_inputs {
        return Err(field(
            "builder",
            format!(
                "{:?} is not inside any of the input paths (a VM has nothing else)",
                json.builder
            ),
        ));
    }

    Ok(NixBuild {
        json,
        store_rel,
        build_rel,
        inputs,
        outputs,
    })
}

/// Refuses a build whose output already exists in the real store: Nix removes stale
/// outputs before it starts a build, so one there now is not ours to replace.
pub fn check_outputs_absent(build: &NixBuild) -> Result<(), NixError> {
    for (name, base) in &build.outputs {
        let dest = build.real_output_path(base);
        if std::fs::symlink_metadata(&dest).is_ok() {
            return Err(field(
                format!("outputs.{name}"),
                format!("{} already exists", dest.display()),
            ));
        }
    }
    Ok(())
}

impl NixBuild {
    /// Where an input or output with this basename really is on the host.
    pub fn real_output_path(&self, base: &PathComponent) -> PathBuf {
        self.json
            .real_store_dir
            .join(std::ffi::OsStr::from_bytes(base.as_ref()))
    }

    /// The features the derivation requires (`requiredSystemFeatures`), from the
    /// environment or, with structured attrs, from `.attrs.json` in the tmp dir.
    pub fn required_system_features(&self) -> Result<Vec<String>, NixError> {
        if let Some(v) = self.json.env.get("requiredSystemFeatures") {
            return Ok(v.split_whitespace().map(str::to_owned).collect());
        }
        let Some(attrs) = self.json.env.get("NIX_ATTRS_JSON_FILE") else {
            return Ok(Vec::new());
        };
        let in_sandbox = format!("{}/", self.json.tmp_dir_in_sandbox);
        let Some(rel) = attrs.strip_prefix(&in_sandbox) else {
            return Ok(Vec::new());
        };
        let host = self.json.tmp_dir.join(rel);
        let bytes = match std::fs::read(&host) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(NixError::Io { path: host, source }),
        };
        #[derive(Deserialize)]
        struct Attrs {
            #[serde(rename = "requiredSystemFeatures", default)]
            features: Vec<String>,
        }
        let attrs: Attrs = serde_json::from_slice(&bytes)
            .map_err(|e| field("NIX_ATTRS_JSON_FILE", format!("{}: {e}", host.display())))?;
        Ok(attrs.features)
    }
}
