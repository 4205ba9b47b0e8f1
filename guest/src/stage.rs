//! The parts of the sandbox that do not depend on the Job, made before the Hello so that a
//! VM waiting for its Job (a pooled one) has already paid for them: the scratch tmpfs with
//! the overlay's directories, the inputs share and the overlay over it, the build's /dev and
//! its /proc. They are mounted at staging places outside the build's root, and
//! `sandbox::build` moves each into place at the moment it would otherwise have mounted it.
//!
//! Everything here is best effort: a part that could not be staged is made the ordinary way
//! after the Job, so that a failure is reported in the same phase with the same message as
//! without staging.
//!
//! Before the Job the host may not yet know what the inputs share will serve. Mounting it
//! sends FUSE INIT, and the overlay over it asks for STATFS (overlayfs resolves the lower
//! directory, which is the share's root, and checks its name length limit); nothing is
//! looked up in, listed or read from the share here.
//!
//! ```text
//! /scratch                 tmpfs, default size (the Job's size is set by a remount)
//! /scratch/overlay/{upper,work}
//! /mnt/inputs              the `inputs` share, read-only
//! /mnt/overlay             overlay(/mnt/inputs, upper), its root still 0755 root:root
//! /mnt/dev                 the build's /dev, complete (tmpfs, nodes, pts, shm)
//! /mnt/proc                the build's /proc (hidepid=2)
//! ```

use std::path::Path;

use tvix_build_vm_agent::INPUTS_TAG;

use crate::paths::{
    INPUTS_LOWER, OVERLAY_UPPER, OVERLAY_WORK, SCRATCH, STAGE_DEV, STAGE_OVERLAY, STAGE_PROC,
};
use crate::sandbox::{self, SandboxError, SHARE_FLAGS};
use crate::staged::Staged;
use crate::sys;
use crate::trace;

/// Stages every part it can.
pub fn stage() -> Staged {
    let scratch = attempt("scratch", Path::new(SCRATCH), || {
        sandbox::mount_scratch_tmpfs()?;
        sys::mkdir_all(Path::new(OVERLAY_UPPER), 0o755)?;
        sys::mkdir_all(Path::new(OVERLAY_WORK), 0o755)?;
        Ok(())
    });
    let inputs = attempt("inputs share", Path::new(INPUTS_LOWER), || {
        let lower = Path::new(INPUTS_LOWER);
        sys::mkdir_all(lower, 0o755)?;
        sys::mount(Some(INPUTS_TAG), lower, "virtiofs", SHARE_FLAGS, None)?;
        Ok(())
    });
    let overlay = scratch
        && inputs
        && attempt("overlay", Path::new(STAGE_OVERLAY), || {
            let target = Path::new(STAGE_OVERLAY);
            sys::mkdir_all(target, 0o755)?;
            sandbox::mount_overlay(target)?;
            Ok(())
        });
    let dev = attempt("dev", Path::new(STAGE_DEV), || {
        let target = Path::new(STAGE_DEV);
        sys::mkdir_all(target, 0o755)?;
        sandbox::make_dev(target)
    });
    let proc = attempt("proc", Path::new(STAGE_PROC), || {
        let target = Path::new(STAGE_PROC);
        sys::mkdir_all(target, 0o755)?;
        sandbox::mount_proc(target)?;
        Ok(())
    });
    Staged {
        scratch,
        inputs,
        overlay,
        dev,
        proc,
    }
}

/// Runs `make`, which mounts something at `at`; on failure detaches whatever it left there,
/// so that the ordinary way after the Job starts from nothing.
fn attempt(what: &'static str, at: &Path, make: impl FnOnce() -> Result<(), SandboxError>) -> bool {
    let result = make();
    trace::mark(what);
    match result {
        Ok(()) => true,
        Err(e) => {
            // Not mounted at all is the usual reason for this to fail, and fine.
            let _ = sys::detach(at);
            trace::note(&format!(
                "staging {what} failed, it is made after the Job: {}",
                crate::error::chain(&e)
            ));
            false
        }
    }
}
