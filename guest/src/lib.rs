//! The protocol between the host and the guest agent of tvix-build-vm (see
//! `protos/tvix/build/vm/agent/v1/agent.proto` for the conversation), and its framing.
//!
//! The framing is sans-IO so that the blocking guest and the async host share one
//! implementation, and so that it can be tested and fuzzed without a VM.

pub mod frame;

/// Generated protobuf types of `tvix.build.vm.agent.v1`.
pub mod proto {
    #![allow(clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/tvix.build.vm.agent.v1.rs"));
}

/// The protocol version this build of the agent and host speak. Bumped on any change to the
/// conversation; the host refuses a Hello with another version.
pub const PROTOCOL_VERSION: u32 = 1;

/// Kernel command line key carrying the vsock port the agent dials on the host (CID 2).
pub const CMDLINE_PORT_KEY: &str = "tvix.agent_port";

/// The virtio-fs tag of the inputs share (the host's `Job.inputs_tag`). The agent mounts
/// this share before it says Hello (FUSE INIT and STATFS only, nothing is looked up in it
/// before the Job); a Job naming another tag works too but pays for its mount.
pub const INPUTS_TAG: &str = "inputs";

/// Kernel command line switch that makes the agent print phase stamps on the console
/// (`tvix.agent_trace` or `tvix.agent_trace=1`); for profiling, off by default.
pub const CMDLINE_TRACE_KEY: &str = "tvix.agent_trace";

/// The port the host listens on unless told otherwise.
pub const DEFAULT_AGENT_PORT: u32 = 1024;
