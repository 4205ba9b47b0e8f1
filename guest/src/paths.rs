//! Where the agent mounts things: the scratch filesystem, the build's root and the staging
//! places of the parts made before the Job (see `stage`). One module owns them so that the
//! stage and the sandbox both depend on it and not on each other.

/// Where the scratch filesystem is mounted in the agent's root.
pub const SCRATCH: &str = "/scratch";
/// The build's root directory, as the agent sees it.
pub const ROOT: &str = "/scratch/root";
pub const OVERLAY_UPPER: &str = "/scratch/overlay/upper";
pub const OVERLAY_WORK: &str = "/scratch/overlay/work";
/// Where the inputs share is mounted when it is the lower layer of an overlay.
pub const INPUTS_LOWER: &str = "/mnt/inputs";

/// Where the overlay of the inputs waits for the Job's `inputs_dir`.
pub const STAGE_OVERLAY: &str = "/mnt/overlay";
/// Where the build's /dev waits.
pub const STAGE_DEV: &str = "/mnt/dev";
/// Where the build's /proc waits.
pub const STAGE_PROC: &str = "/mnt/proc";
