//! The service side of the trivial build: an embedded store (local blobs + redb) and a
//! [`Runner`] assembled by the library's composition root, as `tvix-build-vm serve` does,
//! except that the daemon program is the `tvix-build-vm` binary (this bench is not it).

use crate::setup::Env;
use anyhow::Context;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tvix_build_vm::agent::{HarvestLimits, LogChunk, LogSink, SessionLimits};
use tvix_build_vm::assembly::{assemble, Assembled, Castore, RunnerSettings, VmmSettings};
use tvix_build_vm::castore::blob::LocalBlobService;
use tvix_build_vm::castore::directory_service::RedbDirectoryService;
use tvix_build_vm::castore::import::import_path;
use tvix_build_vm::castore::{BlobService, DirectoryService};
use tvix_build_vm::proto::{build as pb, castore as castore_pb};
use tvix_build_vm::request::BuildRequest;
use tvix_build_vm::runner::{new_build_id, BuildOutcome, Deadlines, RunError, Runner};
use tvix_build_vm::runner::{Decision, HostPolicy};
use tvix_build_vm::vm::qemu::QemuConfig;
use tvix_build_vm::vm::AccelChoice;

/// Nix's default build environment (without `out`), sorted: what the benches' trivial
/// builds get.
pub const NIX_ENV: [(&str, &str); 7] = [
    ("HOME", "/homeless-shelter"),
    ("NIX_BUILD_CORES", "1"),
    ("NIX_BUILD_TOP", "/build"),
    ("NIX_STORE", "/nix/store"),
    ("PATH", "/path-not-set"),
    ("PWD", "/build"),
    ("TMPDIR", "/build"),
];

/// Discards the build log (the runner keeps its tail for errors).
pub struct NullSink;

#[async_trait::async_trait]
impl LogSink for NullSink {
    async fn send(&mut self, _chunk: LogChunk) {}
}

/// A validated request and what the host policy decided for it.
pub struct Planned {
    /// The request as a client would send it.
    pub wire: pb::BuildRequest,
    pub req: BuildRequest,
    pub decision: Decision,
}

pub struct Service {
    pub runner: Arc<Runner>,
    pub blobs: Arc<dyn BlobService>,
    pub dirs: Arc<dyn DirectoryService>,
    busybox: castore_pb::Node,
    assembled: Assembled,
}

impl Service {
    /// Opens a fresh store under the scratch space, imports busybox and assembles the runner.
    pub async fn start(env: &Env, default_memory_mib: u32) -> anyhow::Result<Service> {
        let store = env.scratch("store")?;
        let blob_dir = store.join("blobs");
        let redb = store.join("directories.redb");
        let blobs: Arc<dyn BlobService> =
            Arc::new(LocalBlobService::open(&blob_dir).context("opening the bench's blob store")?);
        let dirs: Arc<dyn DirectoryService> = Arc::new(
            RedbDirectoryService::open(&redb).context("opening the bench's directory store")?,
        );
        let node = import_path(blobs.clone(), dirs.clone(), &env.busybox)
            .await
            .context("importing busybox")?;
        let busybox = node.to_proto(Bytes::from_static(b"busybox"));

        let settings = RunnerSettings {
            vmm: VmmSettings::Qemu(QemuConfig::default()),
            kernel: env.kernel.clone(),
            agent: env.agent.clone(),
            bin_sh: None,
            accel: AccelChoice::Auto,
            vcpus: env.vcpus,
            policy: HostPolicy {
                default_memory_mib,
                max_memory_mib: 4096,
                ..HostPolicy::default()
            },
            runtime_root: env.scratch("rt")?,
            // Generous: other VMs may share this 2-core machine.
            deadlines: Deadlines {
                boot: Duration::from_secs(120),
                ..Deadlines::default()
            },
            session_limits: SessionLimits::default(),
            harvest_limits: HarvestLimits::default(),
            // The bench is not the `tvix-build-vm` binary: the daemons are that one.
            fs_daemon_program: env.cli.clone(),
            pool_size: 0,
        };
        let castore = Castore {
            blobs: blobs.clone(),
            dirs: dirs.clone(),
            blob_addr: blob_dir.display().to_string(),
            dir_addr: format!("redb://{}", redb.display()),
        };
        let assembled = assemble(settings, castore)
            .await
            .context("assembling the runner")?;
        Ok(Service {
            runner: Arc::clone(&assembled.runner),
            blobs,
            dirs,
            busybox,
            assembled,
        })
    }

    /// A seed-layout request like the CLI's: busybox as the only input, one output `out`
    /// (the basename), Nix's default environment plus `out`.
    pub fn request(&self, script: &str, out: &str, min_memory_mib: u64) -> anyhow::Result<Planned> {
        let env_var = |k: &str, v: &str| pb::build_request::EnvVar {
            key: k.to_owned(),
            value: Bytes::copy_from_slice(v.as_bytes()),
        };
        let mut vars: Vec<_> = NIX_ENV.iter().map(|(k, v)| env_var(k, v)).collect();
        vars.push(env_var("out", &format!("/nix/store/{out}")));
        vars.sort_by(|a, b| a.key.cmp(&b.key));
        let wire = pb::BuildRequest {
            inputs: vec![self.busybox.clone()],
            command_args: vec![
                "/nix/store/busybox".into(),
                "sh".into(),
                "-c".into(),
                script.into(),
            ],
            outputs: vec![out.to_owned()],
            environment_vars: vars,
            constraints: Some(pb::build_request::BuildConstraints {
                system: "x86_64-linux".into(),
                min_memory: min_memory_mib << 20,
                available_ro_paths: vec![],
            }),
        };
        let req = tvix_build_vm::wire::seed::decode(wire.clone())
            .context("the bench's request is invalid")?;
        let decision = self
            .runner
            .policy()
            .decide(&req)
            .context("the bench's request cannot run on this host")?;
        Ok(Planned {
            wire,
            req,
            decision,
        })
    }

    /// Runs one build to its end.
    pub async fn build(&self, p: &Planned) -> Result<BuildOutcome, RunError> {
        self.runner
            .build(&new_build_id(), &p.req, &p.decision, &mut NullSink)
            .await
    }

    /// What provenance says about this service's VMs.
    pub fn host_facts(&self) -> anyhow::Result<tvix_build_vm::provenance::attest::HostFacts> {
        Ok(self.assembled.host_facts()?)
    }

    /// A second runner over the same store and configuration that keeps `size` VMs booted
    /// ahead of requests.
    pub fn pooled_runner(&self, size: usize) -> Runner {
        self.assembled.another_runner(size)
    }
}

/// A failed build as the bench reports it: the error's chain, then the ends of the guest's
/// serial console and of the build log when the error has them (a boot that never reached
/// the agent is only explained by the console).
pub fn failed(what: &str, e: &RunError) -> anyhow::Error {
    let mut msg = format!("{what}: {}", tvix_build_vm::castore::error::error_chain(e));
    for (name, tail) in [
        ("serial console", e.serial_tail()),
        ("build log", e.log_tail()),
    ] {
        if let Some(tail) = tail.filter(|t| !t.is_empty()) {
            msg.push_str(&format!("\n--- {name} (tail) ---\n{tail}"));
        }
    }
    anyhow::anyhow!(msg)
}
