//! tvix-build-vm: a `tvix.build.v1.BuildService` that runs every build in its own freshly
//! booted, single-use microVM.
//!
//! Modules, following the data flow of one build (docs/architecture.md has the rooms and
//! what each may import):
//! - [`proto`]: generated tvix castore and build protos (wire-identical to tvix).
//! - [`castore`]: the content-addressed store: digests, validated directories and nodes,
//!   blob and directory services (local, memory, gRPC), import and export.
//! - [`request`]: the validated internal model of a BuildRequest (both wire layouts).
//! - [`vm`]: VMM backends (QEMU), the kernel command line, the initrd, host-side vsock.
//! - [`fs`]: the castore-backed virtio-fs daemon that serves a build's inputs.
//! - [`agent`]: the host side of the conversation with the guest agent, and output harvest.
//! - [`runner`]: one request -> one VM -> one Build, with every deadline and clean-up.
//! - [`provenance`]: signed in-toto/SLSA provenance of a build and NAR hashing.
//! - [`nix`]: Nix's external-builders dialect (build.json, input cache, output placement).
//! - [`cli`]: the command line.

pub mod agent;
pub mod assembly;
pub mod castore;
pub mod cli;
pub mod fs;
pub mod metrics;
pub mod nix;
pub mod proto;
pub mod provenance;
pub mod refscan;
pub mod request;
pub mod runner;
pub mod server;
pub mod units;
pub mod vm;
pub mod wire;
