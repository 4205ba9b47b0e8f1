//! The wire dialects: one module per build protocol a client may speak, each with its
//! decoder (the wire request onto [`RawRequest`](crate::request::RawRequest), validated
//! into the one [`BuildRequest`](crate::request::BuildRequest)) and its encoder (the wire
//! answer from the one [`Finished`] build). Nothing else knows a wire shape: the server and
//! the CLI call these, the runner never sees them.
//!
//! - [`seed`]: the original `tvix.build.v1` layout, this project's primary contract (and
//!   the `build --request` file format).
//! - [`tvix2024`]: `tvix.build.v1` as tvix clients of 2024 send it.
//! - [`paths`]: the same request shape on the streaming `BuildVmService/BuildPaths`.
//! - [`snix`]: `snix.build.v1`, the 2024 request layout with snix's `BuildResponse`.
//!
//! A new dialect is a module here: its decoder uses [`env_vars!`] and [`constraints!`] (or
//! maps a dialect of the full shape with [`full_request!`]), its encoder reads the outcome's
//! outputs (path, node, refscan needles) and, where it has them, fills the extension fields
//! with [`extensions_in!`].

pub mod paths;
pub mod seed;
pub mod snix;
pub mod tvix2024;

use crate::agent::LogRef;
use crate::provenance::EnvelopeRef;
use crate::runner::BuildOutcome;
use std::time::Duration;

/// A build that succeeded, and what the service measured around it: everything an encoder
/// may put into a reply.
#[derive(Debug)]
pub struct Finished {
    pub id: String,
    pub outcome: BuildOutcome,
    /// Waiting for a VM slot.
    pub queued: Duration,
    /// From accepting the request to the end of the build.
    pub total: Duration,
    /// The whole build log, where it was stored.
    pub log: Option<LogRef>,
    /// The host's signed provenance of the build, where it was stored (`None` when the
    /// host does not sign).
    pub provenance: Option<EnvelopeRef>,
    /// The tenant the host ran it for (empty when run directly).
    pub tenant: String,
}

impl Finished {
    /// A build run directly (the CLI): nothing queued, no stored log.
    pub fn direct(id: String, outcome: BuildOutcome) -> Self {
        let total = outcome.timings.total;
        Self {
            id,
            outcome,
            queued: Duration::ZERO,
            total,
            log: None,
            provenance: None,
            tenant: String::new(),
        }
    }
}

/// The outputs of a finished build as the dialects that name their own paths answer them:
/// one anonymous node each (the client knows the path it asked for), in request order, and
/// the indices of the refscan needles each holds.
pub(crate) fn anonymous_outputs(
    f: &Finished,
) -> impl Iterator<Item = (crate::proto::castore::Node, Vec<u64>)> + '_ {
    f.outcome
        .outputs
        .iter()
        .map(|o| (o.node.to_proto(bytes::Bytes::new()), o.needles.clone()))
}

/// Whole microseconds, saturating.
pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A dialect's `environment_vars` (every dialect's EnvVar has `key` and `value`) as the
/// model's pairs.
macro_rules! env_vars {
    ($vars:expr) => {
        $vars
            .into_iter()
            .map(|e| (e.key, e.value))
            .collect::<Vec<(String, bytes::Bytes)>>()
    };
}

/// A dialect's optional `BuildConstraints` as the model's. Every dialect has `system`,
/// `min_memory` and `available_ro_paths`; the fields named after `;` (e.g.
/// `network_access, provide_bin_sh`) are taken where the dialect has them, the rest stay
/// off.
macro_rules! constraints {
    ($c:expr) => {
        constraints!($c;)
    };
    ($c:expr; $($extra:ident),*) => {{
        let c = $c.unwrap_or_default();
        #[allow(clippy::needless_update)]
        $crate::request::Constraints {
            system: c.system,
            min_memory: c.min_memory,
            available_ro_paths: c.available_ro_paths,
            $($extra: c.$extra,)*
            ..Default::default()
        }
    }};
}

/// A request of a dialect with the full shape (every field of
/// [`RawRequest`](crate::request::RawRequest) under the same name, as the 2024 tvix layout
/// and snix have) onto the model, unvalidated. `inputs: f` maps each input onto the tvix
/// castore `Node` where the dialect has another Rust type for it (snix's `Entry`).
macro_rules! full_request {
    ($wire:expr) => {
        $crate::wire::full_request!($wire; inputs: std::convert::identity)
    };
    ($wire:expr; inputs: $input:expr) => {{
        let w = $wire;
        $crate::request::RawRequest {
            inputs: w.inputs.into_iter().map($input).collect(),
            command_args: w.command_args,
            working_dir: w.working_dir,
            scratch_paths: w.scratch_paths,
            inputs_dir: w.inputs_dir,
            outputs: w.outputs,
            environment_vars: $crate::wire::env_vars!(w.environment_vars),
            constraints: $crate::wire::constraints!(w.constraints; network_access, provide_bin_sh),
            additional_files: w
                .additional_files
                .into_iter()
                .map(|f| (f.path, f.contents))
                .collect(),
            refscan_needles: w.refscan_needles,
        }
    }};
}

/// The extension fields of `Build` (exit status, timings, log, usage, provenance) of a
/// finished build, in the types of one dialect's `build` module (the tvix layouts share the
/// shape, not the Rust types): `(exit_status, timings, log, usage, provenance)`.
macro_rules! extensions_in {
    ($f:expr, $($m:ident)::+) => {{
        let f: &$crate::wire::Finished = $f;
        let exit = &f.outcome.exit;
        let kind = match exit.kind {
            $crate::agent::error::ExitKind::Code(c) => {
                $($m)::+::exit_status::Kind::Code(u32::from(c))
            }
            $crate::agent::error::ExitKind::Signal(s) => {
                $($m)::+::exit_status::Kind::Signal(u32::from(s))
            }
        };
        let t = &f.outcome.timings;
        let a = &f.outcome.accounting;
        let micros = $crate::wire::micros;
        (
            Some($($m)::+::ExitStatus {
                kind: Some(kind),
                oom_killed: exit.oom_killed,
            }),
            Some($($m)::+::Timings {
                queued_us: micros(f.queued),
                boot_us: micros(t.boot),
                exec_us: micros(t.exec),
                harvest_us: micros(t.harvest),
                total_us: micros(f.total),
            }),
            f.log.as_ref().map(|l| $($m)::+::Log {
                digest: bytes::Bytes::copy_from_slice(l.digest.as_bytes()),
                size: l.size,
                truncated: l.truncated,
            }),
            Some($($m)::+::Usage {
                guest_cpu_user_us: a.guest.cpu_user.map(micros),
                guest_cpu_system_us: a.guest.cpu_system.map(micros),
                guest_memory_peak_bytes: a.guest.memory_peak_bytes,
                guest_pids_peak: a.guest.pids_peak,
                guest_clamped: a.guest.clamped.iter().map(|c| (*c).to_owned()).collect(),
                host_cpu_us: micros(a.host_cpu),
                input_bytes_read: a.input_reads.map(|r| r.bytes),
                input_files_opened: a.input_reads.map(|r| r.files),
                output_bytes: a.output_bytes,
            }),
            f.provenance.as_ref().map(|p| $($m)::+::Provenance {
                envelope_digest: bytes::Bytes::copy_from_slice(p.digest.as_bytes()),
                envelope_size: p.size,
                key_id: p.key_id.clone(),
            }),
            f.tenant.clone(),
        )
    }};
}

pub(crate) use {constraints, env_vars, extensions_in, full_request};

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::agent::error::ExitKind;
    use crate::agent::GuestUsage;
    use crate::agent::{AgentHello, ExitStatus};
    use crate::castore::directory::{Node, SymlinkTarget};
    use crate::castore::B3Digest;
    use crate::request::RelativePath;
    use crate::runner::{Accounting, Output, Timings};

    /// A 2024-layout request using every field but inputs (the snix and BuildPaths layouts
    /// are checked against it byte for byte).
    pub(crate) fn full_2024_request() -> crate::proto::build_2024::BuildRequest {
        use crate::proto::build_2024::build_request as r;
        use bytes::Bytes;
        crate::proto::build_2024::BuildRequest {
            command_args: vec!["/bin/sh".into(), "-c".into(), "echo hi > $out".into()],
            working_dir: "build".into(),
            scratch_paths: vec!["build".into(), "nix/store".into()],
            inputs_dir: "nix/store".into(),
            outputs: vec!["nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello".into()],
            environment_vars: vec![r::EnvVar {
                key: "out".into(),
                value: Bytes::from_static(b"/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello"),
            }],
            constraints: Some(r::BuildConstraints {
                system: "x86_64-linux".into(),
                min_memory: 1 << 30,
                available_ro_paths: vec!["/etc/ssl".into()],
                network_access: true,
                provide_bin_sh: true,
            }),
            additional_files: vec![r::AdditionalFile {
                path: "build/.attrs.json".into(),
                contents: Bytes::from_static(b"{}"),
            }],
            refscan_needles: vec!["mjs27ix6ig2bkbi3s3sm470vrv4lf7ic".into()],
            inputs: vec![],
        }
    }

    /// A finished build with three outputs, in request order: `nix/store/b-out` (a file
    /// holding needle 1), `nix/store/a-out` (a symlink holding none), `nix/store/c-out`.
    pub(crate) fn finished() -> Finished {
        let output = |path: &str, node: Node, needles: Vec<u64>| Output {
            path: RelativePath::parse(path).unwrap(),
            node,
            needles,
            bytes: 1,
        };
        let file = Node::File {
            digest: B3Digest::of(b"b"),
            size: 1,
            executable: true,
        };
        let link = Node::Symlink {
            target: SymlinkTarget::try_from("b-out").unwrap(),
        };
        Finished {
            id: "b1".into(),
            outcome: BuildOutcome {
                outputs: vec![
                    output("nix/store/b-out", file.clone(), vec![1]),
                    output("nix/store/a-out", link, vec![]),
                    output("nix/store/c-out", file, vec![0, 1]),
                ],
                exit: ExitStatus {
                    kind: ExitKind::Code(0),
                    oom_killed: false,
                    duration: Duration::from_secs(1),
                    usage: Default::default(),
                },
                hello: AgentHello {
                    agent_version: "test".into(),
                    timings: None,
                },
                timings: Timings {
                    boot: Duration::from_millis(2),
                    exec: Duration::from_millis(3),
                    harvest: Duration::from_millis(4),
                    total: Duration::from_millis(10),
                },
                accounting: Accounting {
                    guest: GuestUsage {
                        cpu_user: Some(Duration::from_millis(5)),
                        cpu_system: None,
                        memory_peak_bytes: Some(1 << 20),
                        pids_peak: Some(3),
                        clamped: vec!["pids.peak"],
                    },
                    host_cpu: Duration::from_millis(7),
                    input_reads: None,
                    output_bytes: 2,
                },
                log_tail: String::new(),
            },
            queued: Duration::from_millis(1),
            total: Duration::from_millis(11),
            log: Some(LogRef {
                digest: B3Digest::of(b"log"),
                size: 3,
                truncated: true,
            }),
            provenance: Some(EnvelopeRef {
                digest: B3Digest::of(b"envelope"),
                size: 8,
                key_id: "k1".into(),
            }),
            tenant: "alice".into(),
        }
    }

    #[test]
    fn a_direct_build_has_no_queue_and_no_stored_log() {
        let f = finished();
        let direct = Finished::direct("b2".into(), f.outcome);
        assert_eq!(direct.queued, Duration::ZERO);
        assert_eq!(direct.total, Duration::from_millis(10));
        assert!(direct.log.is_none());
    }
}
