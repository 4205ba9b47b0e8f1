//! The record of what `stage` mounted before the Job, which `sandbox::build` moves into
//! place or discards.

use std::path::Path;

use crate::paths::{INPUTS_LOWER, SCRATCH, STAGE_OVERLAY};
use crate::sys::{self, SysError};

/// What was staged. `sandbox::build` clears each part it moves into place or discards.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Staged {
    /// The scratch tmpfs at [`SCRATCH`] with the overlay's upper and work directories.
    pub scratch: bool,
    /// The `inputs` share at [`INPUTS_LOWER`].
    pub inputs: bool,
    /// The overlay at [`STAGE_OVERLAY`], over the staged share and on the staged scratch.
    pub overlay: bool,
    /// The build's /dev at `paths::STAGE_DEV`.
    pub dev: bool,
    /// The build's /proc at `paths::STAGE_PROC`.
    pub proc: bool,
}

impl Staged {
    /// Detaches the staged scratch filesystem, and the overlay that has its upper layer there.
    pub fn discard_scratch(&mut self) -> Result<(), SysError> {
        self.discard_overlay()?;
        if std::mem::take(&mut self.scratch) {
            sys::detach(Path::new(SCRATCH))?;
        }
        Ok(())
    }

    /// Detaches the staged share, and the overlay over it.
    pub fn discard_inputs(&mut self) -> Result<(), SysError> {
        self.discard_overlay()?;
        if std::mem::take(&mut self.inputs) {
            sys::detach(Path::new(INPUTS_LOWER))?;
        }
        Ok(())
    }

    /// Detaches the staged overlay.
    pub fn discard_overlay(&mut self) -> Result<(), SysError> {
        if std::mem::take(&mut self.overlay) {
            sys::detach(Path::new(STAGE_OVERLAY))?;
        }
        Ok(())
    }
}
