//! Translating a validated request into the Job the guest agent runs.

use super::policy::{BootShape, Decision};
use crate::request::BuildRequest;
use std::time::{SystemTime, UNIX_EPOCH};
use tvix_build_vm_agent::proto::{AdditionalFile, EnvVar, Job, Limits, Mount};

/// The build user, as in Nix's sandbox.
pub const BUILD_UID: u32 = 1000;
pub const BUILD_GID: u32 = 100;
/// The virtio-fs tag of the inputs share: the agent stages that share before its job
/// arrives, so both sides take the tag from the agent's crate.
pub use tvix_build_vm_agent::INPUTS_TAG;
/// Where the operator's static shell (`serve --bin-sh`) sits in the initrd; the agent
/// exposes it as the build's `/bin/sh` when a request asks for `provide_bin_sh`.
pub const BIN_SH_INITRD_PATH: &str = "/tvix-build-vm/sh";

/// Guest memory kept out of the build's cgroup so that the agent survives a build's OOM and
/// can report it.
const AGENT_RESERVE_MIB: u32 = 48;
/// Processes in one build's cgroup: generous for parallel builds, fatal to a fork bomb.
pub const MAX_PROCESSES: u64 = 4096;

/// The memory limit of the build's cgroup in a VM of this shape.
pub fn build_memory_bytes(shape: &BootShape) -> u64 {
    u64::from(shape.memory_mib.saturating_sub(AGENT_RESERVE_MIB)) * 1024 * 1024
}

/// The virtio-fs tag of the `index`th read-only host path of a VM (`ro0`, `ro1`, ...): short
/// (a tag has at most 36 bytes) and never the inputs' tag.
pub fn ro_share_tag(index: usize) -> String {
    format!("ro{index}")
}

/// The Job for `req` as the host policy decided it: in a VM of the decided memory, whose
/// read-only host paths are shared under [`ro_share_tag`]s in their order, each mounted at
/// its own path; /bin/sh and the network as granted.
pub fn job_for(req: &BuildRequest, decision: &Decision) -> Job {
    let shape = decision.shape();
    let clock_unix_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Job {
        argv: req
            .command_args
            .iter()
            .map(|a| a.as_bytes().to_vec())
            .collect(),
        env: req
            .environment_vars
            .iter()
            .map(|(k, v)| EnvVar {
                key: k.as_bytes().to_vec(),
                value: v.to_vec(),
            })
            .collect(),
        working_dir: req.working_dir.guest_path(),
        inputs_dir: req.inputs_dir.guest_path(),
        scratch_paths: req.scratch_paths.iter().map(|p| p.guest_path()).collect(),
        outputs: req.outputs.iter().map(|p| p.guest_path()).collect(),
        uid: BUILD_UID,
        gid: BUILD_GID,
        additional_files: req
            .additional_files
            .iter()
            .map(|(p, c)| AdditionalFile {
                path: p.guest_path(),
                contents: c.to_vec(),
            })
            .collect(),
        bin_sh: if decision.bin_sh() {
            BIN_SH_INITRD_PATH.into()
        } else {
            String::new()
        },
        clock_unix_ns,
        inputs_tag: INPUTS_TAG.into(),
        scratch_device: String::new(),
        network: shape.network,
        limits: Some(Limits {
            memory_bytes: build_memory_bytes(shape),
            max_processes: MAX_PROCESSES,
            tmpfs_bytes: 0,
        }),
        extra_mounts: shape
            .ro_paths
            .iter()
            .enumerate()
            .map(|(i, path)| Mount {
                tag: ro_share_tag(i),
                path: path.clone(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{Constraints, RawRequest};
    use crate::runner::policy::HostPolicy;
    use bytes::Bytes;

    fn x86_64() -> Constraints {
        Constraints {
            system: "x86_64-linux".into(),
            ..Default::default()
        }
    }

    #[test]
    fn paths_become_absolute_and_env_is_exact() {
        let req = RawRequest {
            command_args: vec!["/bin/sh".into(), "-c".into(), "x".into()],
            working_dir: "build".into(),
            scratch_paths: vec!["build".into(), "nix/store".into()],
            inputs_dir: "nix/store".into(),
            outputs: vec!["nix/store/abc-out".into()],
            environment_vars: vec![("A".into(), Bytes::from_static(b"1"))],
            constraints: x86_64(),
            ..Default::default()
        }
        .validate()
        .unwrap();
        let job = job_for(&req, &HostPolicy::default().decide(&req).unwrap());
        assert_eq!(
            job.argv,
            [b"/bin/sh".to_vec(), b"-c".to_vec(), b"x".to_vec()]
        );
        assert_eq!(job.working_dir, "/build");
        assert_eq!(job.inputs_dir, "/nix/store");
        assert_eq!(job.scratch_paths, ["/build", "/nix/store"]);
        assert_eq!(job.outputs, ["/nix/store/abc-out"]);
        assert_eq!(job.env.len(), 1);
        assert_eq!((job.uid, job.gid), (1000, 100));
        assert_eq!(job.limits.unwrap().memory_bytes, (512 - 48) * 1024 * 1024);
        assert!(job.clock_unix_ns > 1_700_000_000_000_000_000);
        assert_eq!(job.bin_sh, "");
        assert!(!job.network);
        assert!(job.extra_mounts.is_empty());
    }

    #[test]
    fn ro_paths_are_mounted_at_their_own_paths_under_distinct_tags() {
        let paths = ["/etc/ssl/certs".to_owned(), "/opt/data".to_owned()];
        let req = RawRequest {
            command_args: vec!["/bin/sh".into()],
            working_dir: "build".into(),
            scratch_paths: vec!["build".into()],
            inputs_dir: "nix/store".into(),
            constraints: Constraints {
                available_ro_paths: paths.to_vec(),
                ..x86_64()
            },
            ..Default::default()
        }
        .validate()
        .unwrap();
        let policy = HostPolicy {
            allowed_ro_paths: paths.to_vec(),
            ..HostPolicy::default()
        };
        let job = job_for(&req, &policy.decide(&req).unwrap());
        let mounts: Vec<_> = job
            .extra_mounts
            .iter()
            .map(|m| (m.tag.as_str(), m.path.as_str()))
            .collect();
        assert_eq!(mounts, [("ro0", "/etc/ssl/certs"), ("ro1", "/opt/data")]);
        assert!(mounts.iter().all(|(t, _)| *t != INPUTS_TAG));
    }

    #[test]
    fn bin_sh_and_network_follow_the_constraints() {
        let mut raw = RawRequest {
            command_args: vec!["/bin/sh".into()],
            working_dir: "build".into(),
            scratch_paths: vec!["build".into()],
            inputs_dir: "nix/store".into(),
            constraints: x86_64(),
            ..Default::default()
        };
        raw.constraints.provide_bin_sh = true;
        raw.constraints.network_access = true;
        let req = raw.validate().unwrap();
        let policy = HostPolicy {
            network: true,
            bin_sh: true,
            ..HostPolicy::default()
        };
        let job = job_for(&req, &policy.decide(&req).unwrap());
        assert_eq!(job.bin_sh, BIN_SH_INITRD_PATH);
        assert!(job.network);
    }
}
