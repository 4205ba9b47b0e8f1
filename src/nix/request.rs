//! A checked build.json onto the one validated build request.
//!
//! The mapping (docs/nix.md has the user-facing version):
//! - argv: the builder, then its args; the environment exactly as Nix wrote it;
//! - the store dir (`nix/store`) is the inputs dir, every input path imported as a root node
//!   named by its basename; the outputs are `<store dir>/<basename>` of their store paths;
//! - `tmpDirInSandbox` (`/build`) is the working dir, and both it and the store dir are
//!   scratch space (the outputs are written into the store dir);
//! - the files Nix already put into `tmpDir` (passAsFile's `.attr-*`, structured attrs'
//!   `.attrs.json`/`.attrs.sh`, exportReferencesGraph files) are carried into `/build` as
//!   additional files. They are small in practice; the request's bound on additional files
//!   (16 MiB in all) applies and a larger tmp dir is refused with a clear message rather than
//!   imported as a second input tree (the guest has one inputs dir, the store);
//! - `requiredSystemFeatures` containing `kvm` asks for `/dev/kvm` (granted only if the
//!   operator allows nested virtualisation); a fixed-output derivation (`outputHash` set)
//!   asks for network access, as Nix's own sandbox gives it one.

use super::build_json::NixBuild;
use super::NixError;
use crate::castore::{Node, PathComponent};
use crate::request::{Constraints, RawRequest};
use bytes::Bytes;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;

/// The most the tmp dir's files may hold together; the same bound the request puts on its
/// additional files, checked here first to name the tmp dir in the message.
pub const MAX_TMP_DIR_BYTES: u64 = 16 * 1024 * 1024;

/// The `requiredSystemFeatures` entry that asks for `/dev/kvm` in the build.
pub const KVM_FEATURE: &str = "kvm";

/// Reads the regular files directly in `tmpDir` (Nix puts nothing else there), sorted by
/// name, as `(path inside the guest's root, contents)`.
pub fn read_tmp_dir(build: &NixBuild) -> Result<Vec<(String, Bytes)>, NixError> {
    let dir = &build.json.tmp_dir;
    let io = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| NixError::Io { path, source }
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let ft = entry.file_type().map_err(io(&path))?;
        if !ft.is_file() {
            return Err(NixError::TmpDirEntry { path });
        }
        names.push(entry.file_name());
    }
    names.sort();
    let mut total: u64 = 0;
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        let path = dir.join(&name);
        let file = std::fs::File::open(&path).map_err(io(&path))?;
        // Read at most one byte past the remaining budget: a file that grows meanwhile
        // cannot make us hold more than the bound.
        let budget = MAX_TMP_DIR_BYTES - total;
        let mut buf = Vec::new();
        file.take(budget + 1)
            .read_to_end(&mut buf)
            .map_err(io(&path))?;
        total += buf.len() as u64;
        if total > MAX_TMP_DIR_BYTES {
            return Err(NixError::TmpDirTooLarge {
                bytes: total,
                limit: MAX_TMP_DIR_BYTES,
                build_dir: build.json.tmp_dir_in_sandbox.clone(),
            });
        }
        let name = String::from_utf8(name.as_bytes().to_vec()).map_err(|_| NixError::Field {
            field: "tmpDir".into(),
            reason: format!("{}: the file name is not UTF-8", path.display()),
        })?;
        files.push((format!("{}/{name}", build.build_rel), Bytes::from(buf)));
    }
    Ok(files)
}

/// The request for `build`, given its imported inputs (one node per input basename, in
/// any order), the tmp dir's files and the required system features.
pub fn to_raw_request(
    build: &NixBuild,
    mut inputs: Vec<(PathComponent, Node)>,
    tmp_files: Vec<(String, Bytes)>,
    features: &[String],
) -> RawRequest {
    inputs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut command_args = Vec::with_capacity(build.json.args.len() + 1);
    command_args.push(build.json.builder.clone());
    command_args.extend(build.json.args.iter().cloned());

    let mut outputs: Vec<String> = build
        .outputs
        .iter()
        .map(|(_, base)| format!("{}/{base}", build.store_rel))
        .collect();
    outputs.sort();
    let mut scratch_paths = vec![build.build_rel.clone(), build.store_rel.clone()];
    scratch_paths.sort();

    let available_ro_paths = if features.iter().any(|f| f == KVM_FEATURE) {
        vec![crate::runner::policy::DEV_KVM.to_owned()]
    } else {
        Vec::new()
    };
    RawRequest {
        inputs: inputs
            .into_iter()
            .map(|(name, node)| node.to_proto(name.into()))
            .collect(),
        command_args,
        working_dir: build.build_rel.clone(),
        scratch_paths,
        inputs_dir: build.store_rel.clone(),
        outputs,
        environment_vars: build
            .json
            .env
            .iter()
            .map(|(k, v)| (k.clone(), Bytes::from(v.clone().into_bytes())))
            .collect(),
        constraints: Constraints {
            system: build.json.system.clone(),
            min_memory: 0,
            available_ro_paths,
            network_access: build.json.env.contains_key("outputHash"),
            provide_bin_sh: false,
        },
        additional_files: tmp_files,
        // Nix scans the outputs for references itself once they are in its store.
        refscan_needles: Vec::new(),
    }
}

/// The wire form of a Nix build for `BuildVmService/BuildPaths`, the RPC whose request names
/// its own paths (inputs dir, working dir, additional files: what a Nix build needs). The
/// caller validates `raw` first; this only re-encodes it field for field, so the server's
/// `paths::decode` gives back the same validated request.
pub fn to_paths_request(raw: RawRequest) -> crate::proto::build_vm::PathsBuildRequest {
    use crate::proto::build_vm::paths_build_request as pb;
    let c = raw.constraints;
    crate::proto::build_vm::PathsBuildRequest {
        inputs: raw.inputs,
        command_args: raw.command_args,
        working_dir: raw.working_dir,
        scratch_paths: raw.scratch_paths,
        inputs_dir: raw.inputs_dir,
        outputs: raw.outputs,
        environment_vars: raw
            .environment_vars
            .into_iter()
            .map(|(key, value)| pb::EnvVar { key, value })
            .collect(),
        constraints: Some(pb::BuildConstraints {
            system: c.system,
            min_memory: c.min_memory,
            available_ro_paths: c.available_ro_paths,
            network_access: c.network_access,
            provide_bin_sh: c.provide_bin_sh,
        }),
        additional_files: raw
            .additional_files
            .into_iter()
            .map(|(path, contents)| pb::AdditionalFile { path, contents })
            .collect(),
        refscan_needles: raw.refscan_needles,
    }
}
