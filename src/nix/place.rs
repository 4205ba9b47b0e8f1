//! Outputs from the castore into Nix's store: each harvested output node becomes
//! `realStoreDir/<basename of its store path>`.
//!
//! The program runs as Nix's build user, so what it writes is owned by that user, which is
//! what Nix expects of a build's outputs before it canonicalises them (0444/0555, mtime 1,
//! owner root). Nix refuses an output that is group- or world-writable, so files are written
//! 0644/0755 and directories have their group/other write bits cleared whatever the umask.
//! Each output is written under a temporary name and renamed into place
//! ([`export_node`]); if any output fails, the ones already placed are removed again, so a
//! failed build leaves nothing in the store.

use super::build_json::NixBuild;
use super::NixError;
use crate::castore::export::export_node;
use crate::castore::{BlobService, DirectoryService, Node};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Clears group/other write bits on every directory under `path` (files are written
/// 0644/0755 already; symlinks have no mode of their own).
fn clear_dir_write_bits(path: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Ok(());
    }
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & !0o022))?;
    }
    for entry in std::fs::read_dir(path)? {
        clear_dir_write_bits(&entry?.path())?;
    }
    Ok(())
}

fn remove_placed(placed: &[PathBuf]) {
    for p in placed {
        // Best effort: the error being returned is the one that matters.
        let _ = std::fs::remove_dir_all(p).or_else(|_| std::fs::remove_file(p));
    }
}

/// Writes every output of `build` from `nodes` (output name -> harvested node) into the
/// real store dir. All or nothing.
pub async fn place_outputs(
    blobs: &dyn BlobService,
    directories: &dyn DirectoryService,
    build: &NixBuild,
    nodes: &[(String, Node)],
) -> Result<Vec<PathBuf>, NixError> {
    let mut placed = Vec::with_capacity(build.outputs.len());
    for (name, base) in &build.outputs {
        let Some((_, node)) = nodes.iter().find(|(n, _)| n == name) else {
            remove_placed(&placed);
            return Err(NixError::MissingOutput(name.clone()));
        };
        let dest = build.real_output_path(base);
        if let Err(source) = export_node(blobs, directories, node, &dest).await {
            remove_placed(&placed);
            return Err(NixError::Export {
                name: name.clone(),
                path: dest,
                source: Box::new(source),
            });
        }
        placed.push(dest.clone());
        if let Err(source) = clear_dir_write_bits(&dest) {
            remove_placed(&placed);
            return Err(NixError::Io { path: dest, source });
        }
    }
    Ok(placed)
}
