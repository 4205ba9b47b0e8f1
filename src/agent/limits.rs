//! The bounds the host puts on everything a guest can make it hold, wait for or store.
//!
//! Every number here is something a hostile guest would like to be unbounded: the defaults
//! are generous for real builds and small enough that one VM cannot exhaust the host.

use std::time::Duration;

/// The longest path component castore accepts (`tvix.castore.v1`).
pub const CASTORE_MAX_NAME_BYTES: usize = 255;

/// Bounds on the conversation before the outputs: hello, logs, exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    /// The largest frame accepted from the guest; the announced length is checked before
    /// anything of the frame is buffered.
    pub max_frame_bytes: usize,
    /// The longest `Hello.agent_version` accepted.
    pub max_agent_version_bytes: usize,
    /// How much of the end of the build log is kept for error messages.
    pub log_tail_bytes: usize,
    /// Total build log (stdout and stderr together) before the build is stopped.
    pub max_log_bytes: u64,
    /// The longest time without a Log frame while the command runs; `None` for no limit.
    pub silence: Option<Duration>,
    /// The longest time from the job's hand-over to the command's exit; `None` for no limit
    /// (which lets a guest hold its VM forever: the default is a day).
    pub wall: Option<Duration>,
    /// `AgentFailure.phase` beyond this is cut (it is diagnostic text, not worth an error).
    pub max_failure_phase_bytes: usize,
    /// `AgentFailure.message` beyond this is cut.
    pub max_failure_message_bytes: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            max_frame_bytes: tvix_build_vm_agent::frame::MAX_FRAME_BYTES,
            max_agent_version_bytes: 128,
            log_tail_bytes: 64 * 1024,
            max_log_bytes: 256 * 1024 * 1024,
            silence: None,
            wall: Some(Duration::from_secs(24 * 60 * 60)),
            max_failure_phase_bytes: 256,
            max_failure_message_bytes: 4096,
        }
    }
}

/// Bounds on the outputs a guest sends back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HarvestLimits {
    /// Sum of all file sizes over all outputs.
    pub max_total_bytes: u64,
    /// Entries (files, directories, symlinks, the roots included) over all outputs.
    pub max_entries: u64,
    /// Directories open at once, the output's root directory counting as 1. Also bounds the
    /// host's directory stack.
    pub max_depth: usize,
    /// Sum of all entry names and symlink targets, in bytes. With `max_entries` this bounds
    /// the memory the host spends on the outputs' directories before they are stored.
    pub max_metadata_bytes: u64,
    /// The longest entry name; castore itself allows no more than
    /// [`CASTORE_MAX_NAME_BYTES`], so a larger value has no effect.
    pub max_name_bytes: usize,
    /// The longest the whole harvest (every output and OutputsDone) may take.
    pub deadline: Duration,
}

impl Default for HarvestLimits {
    fn default() -> Self {
        Self {
            max_total_bytes: 64 * 1024 * 1024 * 1024,
            max_entries: 1_000_000,
            max_metadata_bytes: 64 * 1024 * 1024,
            max_depth: 256,
            max_name_bytes: CASTORE_MAX_NAME_BYTES,
            deadline: Duration::from_secs(30 * 60),
        }
    }
}
