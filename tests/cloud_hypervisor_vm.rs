//! The cloud-hypervisor backend.
//!
//! - Against a strict fake of its API (`support/ch_fake/`): the API client in-process, and
//!   the backend's whole lifecycle through a fake `cloud-hypervisor` executable (this test
//!   binary re-run as [`fake_cloud_hypervisor_process`]). These always run.
//! - Against the real cloud-hypervisor (`real_ch_*`): the same VM lifecycle tests the QEMU
//!   backend passes. They need a `cloud-hypervisor` binary on PATH and usable KVM (vmx/svm
//!   and `/dev/kvm`), so they are ignored by default and run on such a host with
//!   `cargo nextest run --test cloud_hypervisor_vm --run-ignored only`; there they fail,
//!   naming what is missing, rather than pass without running.

#[path = "support/ch_fake/mod.rs"]
mod ch_fake;
#[path = "support/ch_fake/exe.rs"]
mod ch_fake_exe;
mod support;

use ch_fake::{FakeVmm, Guest, Options, VmmShutdown, FAKE_VERSION};
use ch_fake_exe::Scenario;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::error_chain;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::time::Instant;
use tvix_build_vm::runner::{Fault, RunError};
use tvix_build_vm::vm::cloud_hypervisor::api::{ApiClient, ApiError, Timeouts, VmState};
use tvix_build_vm::vm::cloud_hypervisor::config::{
    ConsoleConfig, ConsoleMode, CpusConfig, FsConfig, MemoryConfig, PayloadConfig, VmConfig,
    VsockConfig,
};
use tvix_build_vm::vm::cloud_hypervisor::events::EventLog;
use tvix_build_vm::vm::cloud_hypervisor::lifecycle::{Stopped, STOP_GRACE};
use tvix_build_vm::vm::cloud_hypervisor::{
    ChError, CloudHypervisorBackend, CloudHypervisorConfig, EVENTS_FILE, READY_TIMEOUT,
};
use tvix_build_vm::vm::process::ProcessGroup;
use tvix_build_vm::vm::vsock::HostListener;
use tvix_build_vm::vm::{
    Accel, FsShare, HybridVsock, KernelParam, LaunchConfig, LaunchError, LaunchSpec, RunningVm,
    VmStatus, VmmBackend, GRACEFUL_STOP_LIMIT,
};

/// The fake cloud-hypervisor's `main`. Not a test: the other tests run this binary with it as
/// the only test, through the wrapper script `ch_fake_exe::install_executable` writes.
#[test]
#[ignore = "entry point of the fake cloud-hypervisor process that the other tests launch"]
fn fake_cloud_hypervisor_process() {
    ch_fake_exe::process_main_from_env();
}

// ---- the API client against the in-process fake ----

fn short_tempdir() -> tempfile::TempDir {
    // Unix socket paths must stay under 108 bytes.
    tempfile::Builder::new()
        .prefix("tbvm-ch-")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

fn files(dir: &Path) -> (PathBuf, PathBuf) {
    let kernel = dir.join("vmlinux");
    let initrd = dir.join("initrd");
    std::fs::write(&kernel, b"kernel").expect("kernel");
    std::fs::write(&initrd, b"initrd").expect("initrd");
    (kernel, initrd)
}

fn base_config(dir: &Path) -> VmConfig {
    let (kernel, initramfs) = files(dir);
    VmConfig {
        payload: PayloadConfig {
            kernel,
            initramfs,
            cmdline: "console=ttyS0 panic=-1 quiet".into(),
        },
        cpus: CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 1,
            nested: false,
        },
        memory: MemoryConfig {
            size: 256 << 20,
            shared: true,
        },
        fs: vec![],
        vsock: None,
        disks: vec![],
        serial: ConsoleConfig::mode(ConsoleMode::Tty),
        console: ConsoleConfig::mode(ConsoleMode::Off),
    }
}

fn client(socket: &Path) -> ApiClient {
    ApiClient::new(socket, Timeouts::default())
}

fn status_of(e: &ApiError) -> (u16, Vec<String>) {
    match e {
        ApiError::Status { status, chain, .. } => (*status, chain.clone()),
        other => panic!("expected an HTTP status error, got {}", error_chain(other)),
    }
}

#[tokio::test]
async fn api_client_drives_a_whole_lifecycle_with_correct_framing() {
    let dir = short_tempdir();
    let socket = dir.path().join("api.sock");
    let fake = FakeVmm::start(
        &socket,
        Options {
            guest: Guest::Run,
            ..Options::default()
        },
    );
    let api = client(&socket);
    let ping = api.ping().await.expect("ping");
    assert_eq!(ping.version, FAKE_VERSION);
    assert_eq!(ping.major(), Some(53));
    api.create(&base_config(dir.path())).await.expect("create");
    assert_eq!(fake.state(), Some("Created"));
    assert_eq!(api.info().await.expect("info").state, VmState::Created);
    api.boot().await.expect("boot");
    assert_eq!(api.info().await.expect("info").state, VmState::Running);
    api.shutdown_vm().await.expect("vm.shutdown");
    assert_eq!(fake.state(), Some("Shutdown"));
    api.delete_vm().await.expect("vm.delete");
    assert_eq!(fake.state(), None);
    api.shutdown_vmm().await.expect("vmm.shutdown");

    let seen = fake.seen();
    let header = |s: &ch_fake::Seen, name: &str| {
        s.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    for s in &seen {
        assert!(header(s, "transfer-encoding").is_empty(), "{s:?}");
        assert!((200..300).contains(&s.status), "{s:?}");
        match s.method.as_str() {
            "GET" => {
                assert!(
                    s.body.is_empty() && header(s, "content-length").is_empty(),
                    "{s:?}"
                )
            }
            "PUT" => assert_eq!(
                header(s, "content-length"),
                [s.body.len().to_string()],
                "{s:?}"
            ),
            other => panic!("unexpected method {other}"),
        }
    }
    let paths: Vec<_> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/api/v1/vmm.ping",
            "/api/v1/vm.create",
            "/api/v1/vm.info",
            "/api/v1/vm.boot",
            "/api/v1/vm.info",
            "/api/v1/vm.shutdown",
            "/api/v1/vm.delete",
            "/api/v1/vmm.shutdown",
        ]
    );
    assert_eq!(fake.exited().await, 0);
}

/// What is wrong, how to make it so, the status and a message vm.boot must answer with.
type BootCase<'a> = (&'a str, Box<dyn Fn(&mut VmConfig) + 'a>, u16, &'a str);

#[tokio::test]
async fn config_is_validated_at_boot_not_at_create() {
    let dir = short_tempdir();
    let fs_socket = dir.path().join("fs.sock");
    let _fs = std::os::unix::net::UnixListener::bind(&fs_socket).expect("fs listener");
    let vsock_path = dir.path().join("vsock.sock");
    let fs = FsConfig {
        tag: "inputs".into(),
        socket: fs_socket.clone(),
        num_queues: 1,
        queue_size: 1024,
        id: "fs0".into(),
    };
    let vsock = VsockConfig {
        cid: 3,
        socket: vsock_path.clone(),
        id: "vsock0".into(),
    };
    let cases: Vec<BootCase> = vec![
        (
            "fs without shared memory",
            Box::new(|c| c.memory.shared = false),
            400,
            "Using vhost-user requires using shared memory or huge pages",
        ),
        (
            "reserved cid",
            Box::new(|c| c.vsock.as_mut().expect("vsock").cid = 2),
            400,
            "2 is a special VSOCK CID",
        ),
        (
            "u32::MAX cid",
            Box::new(|c| c.vsock.as_mut().expect("vsock").cid = u32::MAX),
            400,
            "is a special VSOCK CID",
        ),
        (
            "duplicate id",
            Box::new(|c| c.vsock.as_mut().expect("vsock").id = "fs0".into()),
            409,
            "Identifier fs0 is not unique",
        ),
        (
            "reserved id",
            Box::new(|c| c.fs[0].id = "__fs".into()),
            400,
            "Identifier __fs is not valid",
        ),
        (
            "vsock socket exists",
            Box::new(|_| std::fs::write(&vsock_path, b"").expect("leftover")),
            500,
            "Cannot create virtio-vsock device",
        ),
    ];
    for (what, change, status, message) in cases {
        let socket = dir.path().join("api.sock");
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&vsock_path);
        let fake = FakeVmm::start(&socket, Options::default());
        let api = client(&socket);
        let mut config = base_config(dir.path());
        config.fs = vec![fs.clone()];
        config.vsock = Some(vsock.clone());
        change(&mut config);
        api.create(&config)
            .await
            .unwrap_or_else(|e| panic!("{what}: create must accept: {}", error_chain(&e)));
        let err = api.boot().await.expect_err(what);
        let (got, chain) = status_of(&err);
        assert_eq!(got, status, "{what}: {chain:?}");
        assert!(
            chain.iter().any(|c| c.contains(message)),
            "{what}: {chain:?}"
        );
        assert_eq!(chain[0], "Error from API", "{what}: the JSON array form");
        api.shutdown_vmm().await.expect("vmm.shutdown");
        fake.exited().await;
    }
}

#[tokio::test]
async fn legacy_plain_text_error_bodies_become_a_chain_too() {
    let dir = short_tempdir();
    let socket = dir.path().join("api.sock");
    let fake = FakeVmm::start(
        &socket,
        Options {
            legacy_errors: true,
            ..Options::default()
        },
    );
    let api = client(&socket);
    let err = api.boot().await.expect_err("no VM yet");
    let (status, chain) = status_of(&err);
    assert_eq!(status, 404);
    assert_eq!(chain, ["Error from API: The VM is not created"]);
    assert!(err.to_string().contains("404"), "{err}");
    api.shutdown_vmm().await.expect("vmm.shutdown");
    fake.exited().await;
}

#[tokio::test]
async fn a_reply_lost_to_the_exit_of_vmm_shutdown_is_success() {
    let dir = short_tempdir();
    let socket = dir.path().join("api.sock");
    let fake = FakeVmm::start(
        &socket,
        Options {
            vmm_shutdown: VmmShutdown::CloseWithoutReply,
            ..Options::default()
        },
    );
    client(&socket)
        .shutdown_vmm()
        .await
        .expect("EOF after vmm.shutdown is success");
    assert_eq!(
        fake.seen().last().map(|s| s.status),
        Some(0),
        "closed without reply"
    );
    assert_eq!(fake.exited().await, 0);
}

#[tokio::test]
async fn oversized_requests_are_refused_before_sending() {
    let dir = short_tempdir();
    let socket = dir.path().join("api.sock");
    let fake = FakeVmm::start(&socket, Options::default());
    let mut config = base_config(dir.path());
    config.payload.cmdline = "x".repeat(5 << 20);
    let err = client(&socket)
        .create(&config)
        .await
        .expect_err("too large");
    assert!(matches!(err, ApiError::RequestTooLarge { .. }), "{err}");
    assert!(fake.seen().is_empty(), "nothing was sent");
    client(&socket).shutdown_vmm().await.expect("vmm.shutdown");
    fake.exited().await;
}

/// One raw HTTP exchange; the status code.
async fn raw(socket: &Path, request: &[u8]) -> u16 {
    let mut stream = UnixStream::connect(socket).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut reply = BufReader::new(stream);
    let mut line = String::new();
    reply.read_line(&mut line).await.expect("status line");
    line.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"))
}

#[tokio::test]
async fn the_fake_is_as_strict_as_the_real_api() {
    let dir = short_tempdir();
    let socket = dir.path().join("api.sock");
    let fake = FakeVmm::start(&socket, Options::default());
    let unknown_field = br#"{"payload":{"initrd":"/x"},"x":1}"#;
    let mut unknown = format!(
        "PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        unknown_field.len()
    )
    .into_bytes();
    unknown.extend_from_slice(unknown_field);
    let cases: [(&str, &[u8], u16); 9] = [
        ("ping", b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n", 200),
        ("body on a no-body PUT", b"PUT /api/v1/vm.boot HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 400),
        ("wrong method", b"GET /api/v1/vm.boot HTTP/1.1\r\n\r\n", 400),
        ("unknown path", b"GET /api/v1/vm.nope HTTP/1.1\r\n\r\n", 404),
        ("outside the API", b"GET /other HTTP/1.1\r\n\r\n", 404),
        ("PUT without Content-Length", b"PUT /api/v1/vm.boot HTTP/1.1\r\n\r\n", 411),
        (
            "chunked body",
            b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            400,
        ),
        ("over 4 MiB", b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 4194305\r\n\r\n", 413),
        ("unknown VmConfig field", &unknown, 400),
    ];
    for (what, request, status) in cases {
        assert_eq!(raw(&socket, request).await, status, "{what}");
    }
    client(&socket).shutdown_vmm().await.expect("vmm.shutdown");
    fake.exited().await;
}

// ---- the backend against the fake executable ----

struct FakeSetup {
    dir: tempfile::TempDir,
    backend: CloudHypervisorBackend,
    config: LaunchConfig,
}

impl FakeSetup {
    fn new(scenario: Scenario) -> Self {
        let dir = short_tempdir();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("bin dir");
        let program = ch_fake_exe::install_executable(&bin, scenario);
        let backend = CloudHypervisorBackend::new(&CloudHypervisorConfig {
            binary: Some(program),
        })
        .unwrap_or_else(|e| panic!("backend: {}", error_chain(&e)));
        let (kernel, initrd) = files(dir.path());
        let config = LaunchConfig {
            kernel,
            initrd,
            cmdline: vec![KernelParam::new("tvix.agent_port=1024").expect("param")],
            memory_mib: 256,
            vcpus: 1,
            shares: vec![],
            vsock: None,
            scratch_disk: None,
            serial_log: dir.path().join("serial.log"),
            nested_virt: false,
            network: false,
            runtime_dir: dir.path().to_owned(),
            accel: Accel::Kvm,
        };
        FakeSetup {
            dir,
            backend,
            config,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Adds a virtio-fs share whose vhost-user socket is listening (the fake connects).
    fn with_share(&mut self) -> std::os::unix::net::UnixListener {
        let socket = self.path().join("fs.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).expect("fs socket");
        self.config.shares.push(FsShare {
            tag: "inputs".into(),
            socket,
        });
        listener
    }

    fn spec(&self) -> LaunchSpec {
        LaunchSpec::new(self.config.clone()).expect("valid spec")
    }

    /// The events the (fake) VMM logged, as `source/event`, read with the crate's reader.
    fn events(&self) -> Vec<String> {
        EventLog::new(&self.path().join(EVENTS_FILE))
            .read_new()
            .unwrap_or_else(|e| panic!("events: {}", error_chain(&e)))
            .into_iter()
            .map(|e| format!("{}/{}", e.source, e.event))
            .collect()
    }
}

const WAIT: Duration = Duration::from_secs(20);

fn gone(pids: &[u32]) -> bool {
    pids.iter().all(|pid| !support::process_exists(*pid))
}

#[tokio::test]
async fn fake_vm_boots_and_powers_off() {
    let mut setup = FakeSetup::new(Scenario::PowerOff);
    let _fs = setup.with_share();
    let mut vm = setup
        .backend
        .launch_vm(&setup.spec())
        .await
        .unwrap_or_else(|e| panic!("launch: {}", error_chain(&e)));
    assert_eq!(vm.version().version, FAKE_VERSION);
    let pids = vm.running().pids();
    let exit = vm.wait_until(Instant::now() + WAIT).await.expect("wait");
    let serial = vm.running().serial_tail(64 << 10);
    assert!(exit.is_clean(), "{exit:?}\nserial:\n{serial}");
    assert!(
        serial.contains("fake guest: cmdline=console=ttyS0 panic=-1 quiet tvix.agent_port=1024\n"),
        "{serial}"
    );
    assert!(
        serial.contains(&format!(
            "vcpus=1 nested=false memory={} shared=true fs=inputs vsock=0 disks=0 net=0",
            256u64 << 20
        )),
        "{serial}"
    );
    assert!(serial.contains("fake guest: powering off"), "{serial}");
    assert!(
        !serial.contains("running 1 test"),
        "harness output stays out of the serial log"
    );
    let events = setup.events();
    assert_eq!(
        events,
        [
            "vmm/starting",
            "vm/booting",
            "vm/booted",
            "vm/shutdown",
            "vm/deleted",
            "vmm/shutdown"
        ]
    );
    assert!(gone(&pids));
}

#[tokio::test]
async fn fake_vm_through_the_backend_trait() {
    let setup = FakeSetup::new(Scenario::PowerOff);
    let backend: &dyn VmmBackend = &setup.backend;
    assert_eq!(backend.name(), "cloud-hypervisor");
    let mut running = backend
        .launch(
            &setup.spec(),
            tvix_build_vm::vm::process::ProcessGroup::new(&setup.spec().config().runtime_dir),
        )
        .await
        .unwrap_or_else(|e| panic!("launch: {}", error_chain(&e)));
    let exit = running
        .wait_until(Instant::now() + WAIT)
        .await
        .expect("wait");
    assert!(exit.is_clean(), "{exit:?}");
    assert!(running.serial_tail(4096).contains("powering off"));
}

#[tokio::test]
async fn a_guest_reboot_ends_the_vm() {
    let setup = FakeSetup::new(Scenario::Reboot);
    // Through the trait: the reboot watch must keep working on a plain RunningVm.
    let mut running = setup
        .backend
        .launch(
            &setup.spec(),
            tvix_build_vm::vm::process::ProcessGroup::new(&setup.spec().config().runtime_dir),
        )
        .await
        .unwrap_or_else(|e| panic!("launch: {}", error_chain(&e)));
    let exit = running
        .wait_until(Instant::now() + WAIT)
        .await
        .expect("wait");
    let serial = running.serial_tail(64 << 10);
    assert_eq!(
        exit.status,
        VmStatus::Exited(0),
        "ended through vmm.shutdown\n{serial}"
    );
    let reboots = serial.matches("fake guest: rebooting").count();
    // The fake reboots every 300 ms; the watch polls every 20 ms.
    assert!((1..=2).contains(&reboots), "{reboots} reboots:\n{serial}");
    let events = setup.events();
    let first_reboot = events
        .iter()
        .position(|e| e == "vm/rebooting")
        .expect("a reboot");
    assert_eq!(
        events.last().map(String::as_str),
        Some("vmm/shutdown"),
        "{events:?}"
    );
    assert!(first_reboot < events.len() - 1, "{events:?}");
}

#[tokio::test]
async fn the_deadline_stops_the_vm_through_the_api() {
    let setup = FakeSetup::new(Scenario::Run);
    let mut vm = setup
        .backend
        .launch_vm(&setup.spec())
        .await
        .unwrap_or_else(|e| panic!("launch: {}", error_chain(&e)));
    let pids = vm.running().pids();
    let started = Instant::now();
    let exit = vm
        .wait_until(Instant::now() + Duration::from_millis(300))
        .await
        .expect("wait");
    assert_eq!(exit.status, VmStatus::DeadlineExceeded);
    // Later calls agree.
    assert_eq!(
        vm.wait().await.expect("wait").status,
        VmStatus::DeadlineExceeded
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "stopped gracefully, not killed after the grace"
    );
    assert!(gone(&pids));
    // vm.shutdown, then vmm.shutdown: the fake logged the events each of them causes.
    assert_eq!(
        setup.events(),
        [
            "vmm/starting",
            "vm/booting",
            "vm/booted",
            "vm/shutdown",
            "vm/deleted",
            "vmm/shutdown"
        ]
    );
}

#[tokio::test]
async fn a_vmm_that_drops_the_shutdown_reply_is_stopped_gracefully() {
    let setup = FakeSetup::new(Scenario::RunEofOnShutdown);
    let mut vm = setup
        .backend
        .launch_vm(&setup.spec())
        .await
        .unwrap_or_else(|e| panic!("launch: {}", error_chain(&e)));
    assert_eq!(vm.control().stop().await, Stopped::Gracefully);
    let exit = vm.wait().await.expect("wait");
    assert_eq!(exit.status, VmStatus::Exited(0));
}

#[tokio::test]
async fn a_vmm_that_ignores_shutdown_is_killed() {
    let setup = FakeSetup::new(Scenario::RunIgnoringShutdown);
    let mut vm = setup
        .backend
        .launch_vm(&setup.spec())
        .await
        .unwrap_or_else(|e| panic!("launch: {}", error_chain(&e)));
    let pids = vm.running().pids();
    assert_eq!(vm.control().stop().await, Stopped::Killed);
    let exit = vm.wait().await.expect("wait");
    assert_eq!(exit.status, VmStatus::Signaled(libc::SIGKILL));
    assert!(gone(&pids));
    let exit = vm.kill().await;
    assert_eq!(
        exit.status,
        VmStatus::Signaled(libc::SIGKILL),
        "kill after the end changes nothing"
    );
}

/// Launches through the backend-neutral trait, as the runner does.
async fn launch_through_the_trait(setup: &FakeSetup) -> Result<RunningVm, LaunchError> {
    let spec = setup.spec();
    let backend: &dyn VmmBackend = &setup.backend;
    backend
        .launch(&spec, ProcessGroup::new(&spec.config().runtime_dir))
        .await
}

#[tokio::test]
async fn a_kill_through_the_trait_stops_the_vm_through_the_api() {
    let setup = FakeSetup::new(Scenario::Run);
    let mut running = launch_through_the_trait(&setup)
        .await
        .unwrap_or_else(|e| panic!("launch: {}", error_chain(&e)));
    let pids = running.pids();
    let started = Instant::now();
    let exit = running.kill().await;
    assert_eq!(exit.status, VmStatus::Killed);
    assert!(
        started.elapsed() < STOP_GRACE,
        "stopped through the API, not killed after the grace: {:?}",
        started.elapsed()
    );
    assert!(gone(&pids));
    assert_eq!(
        setup.events(),
        [
            "vmm/starting",
            "vm/booting",
            "vm/booted",
            "vm/shutdown",
            "vm/deleted",
            "vmm/shutdown"
        ]
    );
}

#[tokio::test]
async fn through_the_trait_a_vmm_that_ignores_shutdown_is_killed_at_the_deadline() {
    let setup = FakeSetup::new(Scenario::RunIgnoringShutdown);
    let mut running = launch_through_the_trait(&setup)
        .await
        .unwrap_or_else(|e| panic!("launch: {}", error_chain(&e)));
    let pids = running.pids();
    let deadline = Instant::now() + Duration::from_millis(300);
    let exit = running.wait_until(deadline).await.expect("wait");
    assert_eq!(exit.status, VmStatus::DeadlineExceeded);
    let late = deadline.elapsed();
    assert!(
        late >= STOP_GRACE,
        "vm.shutdown and vmm.shutdown were tried first: {late:?}"
    );
    assert!(
        late < GRACEFUL_STOP_LIMIT + Duration::from_secs(2),
        "the graceful stop is bounded: {late:?}"
    );
    assert!(gone(&pids));
    // Both calls were made; the fake answered vmm.shutdown but did not exit.
    assert_eq!(
        setup.events(),
        [
            "vmm/starting",
            "vm/booting",
            "vm/booted",
            "vm/shutdown",
            "vm/deleted",
            "vmm/shutdown"
        ]
    );
}

#[tokio::test]
async fn a_boot_refused_through_the_trait_is_an_infrastructure_fault_with_the_typed_error() {
    let mut setup = FakeSetup::new(Scenario::PowerOff);
    setup.config.shares.push(FsShare {
        tag: "inputs".into(),
        socket: setup.path().join("missing-fs.sock"),
    });
    let err = launch_through_the_trait(&setup)
        .await
        .expect_err("boot fails");
    assert!(
        matches!(&err, LaunchError::CloudHypervisor(ch) if matches!(*ch, ChError::Api { step: "vm.boot", .. })),
        "{}",
        error_chain(&err)
    );
    let err = RunError::from(err);
    assert_eq!(err.fault(), Fault::Infrastructure);
    let mut api_error = None;
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        api_error = api_error.or(s.downcast_ref::<ApiError>());
        source = s.source();
    }
    assert!(
        matches!(api_error, Some(ApiError::Status { status: 500, .. })),
        "{}",
        error_chain(&err)
    );
}

#[tokio::test]
async fn the_guest_talks_to_the_host_over_hybrid_vsock() {
    let mut setup = FakeSetup::new(Scenario::DialVsock);
    let uds = setup.path().join("vsock.sock");
    setup.config.vsock = Some(HybridVsock {
        guest_cid: 3,
        uds_path: uds.clone(),
    });
    let listener = HostListener::bind(&uds, 1024).expect("bind before launch");
    let mut vm = setup
        .backend
        .launch_vm(&setup.spec())
        .await
        .unwrap_or_else(|e| panic!("launch: {}", error_chain(&e)));
    let deadline = Instant::now() + WAIT;
    let stream = listener.accept(deadline).await.expect("guest connects");
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    stream.read_line(&mut line).await.expect("read");
    assert_eq!(line, "hello-from-fake-guest\n");
    stream.get_mut().write_all(b"pong\n").await.expect("write");
    let exit = vm.wait_until(deadline).await.expect("wait");
    let serial = vm.running().serial_tail(4096);
    assert!(exit.is_clean(), "{exit:?}\n{serial}");
    assert!(serial.contains("fake guest: reply: pong"), "{serial}");
    assert!(serial.contains("vsock=3"), "{serial}");
}

#[tokio::test]
async fn a_boot_refusal_carries_the_api_error_chain_in_both_forms() {
    for scenario in [Scenario::PowerOff, Scenario::LegacyErrors] {
        let mut setup = FakeSetup::new(scenario);
        // Nobody serves this virtio-fs socket: vm.boot must fail and say so.
        setup.config.shares.push(FsShare {
            tag: "inputs".into(),
            socket: setup.path().join("missing-fs.sock"),
        });
        let err = setup
            .backend
            .launch_vm(&setup.spec())
            .await
            .expect_err("boot fails");
        let text = error_chain(&err);
        match &err {
            ChError::Api {
                step: "vm.boot",
                source:
                    ApiError::Status {
                        status: 500, chain, ..
                    },
                ..
            } => {
                assert!(
                    chain.iter().any(|c| c.contains("missing-fs.sock")),
                    "{scenario:?}: {text}"
                );
                let expected_links = if scenario == Scenario::LegacyErrors {
                    1
                } else {
                    4
                };
                assert_eq!(chain.len(), expected_links, "{scenario:?}: {chain:?}");
            }
            _ => panic!("{scenario:?}: {text}"),
        }
        let pids = std::fs::read_to_string(setup.path().join("pids")).expect("pids file");
        let pid: u32 = pids
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .expect("pid");
        assert!(
            !support::process_exists(pid),
            "the VMM is gone after a failed launch"
        );
    }
}

#[tokio::test]
async fn start_up_failures_are_reported_with_the_log() {
    let setup = FakeSetup::new(Scenario::ExitEarly);
    let err = setup
        .backend
        .launch_vm(&setup.spec())
        .await
        .expect_err("exits early");
    match err {
        ChError::ExitedEarly { log_tail, .. } => {
            assert!(
                log_tail.contains("exiting early as the scenario asks"),
                "{log_tail}"
            )
        }
        other => panic!("{}", error_chain(&other)),
    }
}

#[tokio::test]
async fn an_api_that_never_answers_times_out() {
    let setup = FakeSetup::new(Scenario::NeverReady);
    let started = Instant::now();
    let err = setup
        .backend
        .launch_vm(&setup.spec())
        .await
        .expect_err("never ready");
    assert!(
        matches!(err, ChError::NotReady { .. }),
        "{}",
        error_chain(&err)
    );
    let waited = started.elapsed();
    assert!(
        waited >= READY_TIMEOUT && waited < READY_TIMEOUT + Duration::from_secs(3),
        "{waited:?}"
    );
}

#[tokio::test]
async fn leftovers_in_the_runtime_dir_are_cleared() {
    let setup = FakeSetup::new(Scenario::PowerOff);
    // The fake, like cloud-hypervisor before v53, refuses to start over an existing socket.
    std::fs::write(setup.path().join("ch-api.sock"), b"stale").expect("stale socket");
    std::fs::write(setup.path().join(EVENTS_FILE), b"{\"garbage\"").expect("stale events");
    let mut vm = setup
        .backend
        .launch_vm(&setup.spec())
        .await
        .unwrap_or_else(|e| panic!("launch: {}", error_chain(&e)));
    assert!(vm
        .wait_until(Instant::now() + WAIT)
        .await
        .expect("wait")
        .is_clean());
}

#[tokio::test]
async fn the_version_is_available_for_logs() {
    let setup = FakeSetup::new(Scenario::Run);
    let ping = setup
        .backend
        .version(setup.path())
        .await
        .unwrap_or_else(|e| panic!("version: {}", error_chain(&e)));
    assert_eq!(ping.version, FAKE_VERSION);
}

// ---- the real cloud-hypervisor, when this host can run it ----

/// Why the `real_ch_*` tests do not run by default.
const NEEDS_REAL_CH: &str = "needs cloud-hypervisor and hardware KVM";

/// The backend of a real cloud-hypervisor; a test run on a host that cannot run one fails
/// and says why.
fn real_ch(test: &str) -> CloudHypervisorBackend {
    let backend = match CloudHypervisorBackend::new(&CloudHypervisorConfig::default()) {
        Ok(b) => b,
        Err(e) => panic!("{test} {NEEDS_REAL_CH}: {}", error_chain(&e)),
    };
    match tvix_build_vm::vm::accel::resolve(tvix_build_vm::vm::AccelChoice::Auto) {
        Ok(Accel::Kvm) => backend,
        Ok(other) => panic!(
            "{test} {NEEDS_REAL_CH}: KVM is not usable here (no vmx/svm flag in /proc/cpuinfo, or /dev/kvm does not open); would use {other}"
        ),
        Err(e) => panic!("{test} {NEEDS_REAL_CH}: {}", error_chain(&e)),
    }
}

const BOOT_DEADLINE: Duration = Duration::from_secs(30);
const POWEROFF: &str = "/bin/busybox poweroff -f";

fn real_vm(script: &str) -> support::vm::TestVm {
    let mut vm = support::vm::TestVm::new(support::vm::busybox_initrd(script));
    vm.config.accel = Accel::Kvm;
    vm
}

#[tokio::test]
#[ignore = "needs cloud-hypervisor and hardware KVM"]
async fn real_ch_boots_busybox_and_powers_off() {
    let backend = real_ch("real_ch_boots_busybox_and_powers_off");
    let _slot = support::vm::vm_slot();
    let vm = real_vm(&format!("/bin/busybox echo MARKER-$((6*7))\n{POWEROFF}"));
    let spec = LaunchSpec::new(vm.config.clone()).expect("valid spec");
    let mut running = backend
        .launch_vm(&spec)
        .await
        .unwrap_or_else(|e| panic!("launch: {}", error_chain(&e)));
    let exit = running
        .wait_until(Instant::now() + BOOT_DEADLINE)
        .await
        .expect("wait");
    let serial = running.running().serial_tail(64 << 10);
    assert!(exit.is_clean(), "{exit:?}\nserial:\n{serial}");
    assert!(serial.contains("MARKER-42"), "serial:\n{serial}");
    eprintln!(
        "cloud-hypervisor {}: boot to poweroff {:?}",
        running.version().version,
        exit.elapsed
    );
}

#[tokio::test]
#[ignore = "needs cloud-hypervisor and hardware KVM"]
async fn real_ch_deadline_stops_a_running_guest() {
    let backend = real_ch("real_ch_deadline_stops_a_running_guest");
    let _slot = support::vm::vm_slot();
    let mut vm = real_vm("/bin/busybox echo STARTED\nwhile :; do /bin/busybox sleep 1000; done");
    vm.config.vsock = Some(HybridVsock {
        guest_cid: 3,
        uds_path: vm.path().join("vsock.sock"),
    });
    let spec = LaunchSpec::new(vm.config.clone()).expect("valid spec");
    let mut running = backend
        .launch_vm(&spec)
        .await
        .unwrap_or_else(|e| panic!("launch: {}", error_chain(&e)));
    let pids = running.running().pids();
    let booted = Instant::now() + BOOT_DEADLINE;
    while !running.running().serial_tail(4096).contains("STARTED") {
        assert!(
            Instant::now() < booted,
            "guest never started:\n{}",
            running.running().serial_tail(4096)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exit = running
        .wait_until(Instant::now() + Duration::from_millis(300))
        .await
        .expect("wait");
    assert_eq!(exit.status, VmStatus::DeadlineExceeded);
    assert!(gone(&pids));
}

#[tokio::test]
#[ignore = "needs cloud-hypervisor and hardware KVM"]
async fn real_ch_guest_talks_to_the_host_over_vsock() {
    const PORT: u32 = 1024;
    let backend = real_ch("real_ch_guest_talks_to_the_host_over_vsock");
    let _slot = support::vm::vm_slot();
    let client = support::vm::vsock_client();
    let initrd = support::vm::busybox_initrd_with(
        &format!("/bin/vsock-client {PORT} ping-from-guest\n{POWEROFF}"),
        &[("/bin/vsock-client", &client, 0o755)],
    );
    let mut vm = support::vm::TestVm::new(initrd);
    vm.config.accel = Accel::Kvm;
    let uds = vm.path().join("vsock.sock");
    vm.config.vsock = Some(HybridVsock {
        guest_cid: 3,
        uds_path: uds.clone(),
    });
    let listener = HostListener::bind(&uds, PORT).expect("bind before launch");
    let spec = LaunchSpec::new(vm.config.clone()).expect("valid spec");
    let mut running = backend
        .launch_vm(&spec)
        .await
        .unwrap_or_else(|e| panic!("launch: {}", error_chain(&e)));
    let deadline = Instant::now() + BOOT_DEADLINE;
    let stream = listener.accept(deadline).await.unwrap_or_else(|e| {
        panic!(
            "accept: {}\n{}",
            error_chain(&e),
            running.running().serial_tail(4096)
        )
    });
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    stream.read_line(&mut line).await.expect("read");
    assert_eq!(line, "ping-from-guest\n");
    // No half-close: before v53 cloud-hypervisor turned SHUT_WR into a full close (#8300).
    stream
        .get_mut()
        .write_all(b"pong-from-host")
        .await
        .expect("write");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout_at(deadline, stream.read_to_end(&mut rest)).await;
    let exit = running.wait_until(deadline).await.expect("wait");
    let serial = running.running().serial_tail(4096);
    assert!(exit.is_clean(), "{exit:?}\n{serial}");
    assert!(
        serial.contains("vsock-client: reply: pong-from-host"),
        "serial:\n{serial}"
    );
}

#[tokio::test]
#[ignore = "needs cloud-hypervisor and hardware KVM"]
async fn real_ch_reboot_ends_the_vm() {
    let backend = real_ch("real_ch_reboot_ends_the_vm");
    let _slot = support::vm::vm_slot();
    let vm = real_vm("/bin/busybox echo REBOOTING\n/bin/busybox reboot -f");
    let spec = LaunchSpec::new(vm.config.clone()).expect("valid spec");
    let mut running = backend
        .launch(
            &spec,
            tvix_build_vm::vm::process::ProcessGroup::new(&spec.config().runtime_dir),
        )
        .await
        .unwrap_or_else(|e| panic!("launch: {}", error_chain(&e)));
    let exit = running
        .wait_until(Instant::now() + BOOT_DEADLINE)
        .await
        .expect("wait");
    let serial = running.serial_tail(64 << 10);
    assert_eq!(exit.status, VmStatus::Exited(0), "{exit:?}\n{serial}");
    assert!(serial.contains("REBOOTING"), "{serial}");
}

#[tokio::test]
#[ignore = "needs cloud-hypervisor and hardware KVM"]
async fn real_ch_a_vmm_that_cannot_boot_reports_why() {
    let backend = real_ch("real_ch_a_vmm_that_cannot_boot_reports_why");
    let _slot = support::vm::vm_slot();
    let mut vm = real_vm(POWEROFF);
    vm.config.shares = vec![FsShare {
        tag: "inputs".into(),
        socket: vm.path().join("missing-fs.sock"),
    }];
    let spec = LaunchSpec::new(vm.config.clone()).expect("valid spec");
    // cloud-hypervisor retries a missing vhost-user socket for up to 60 s before failing.
    let err = backend.launch_vm(&spec).await.expect_err("boot fails");
    let text = error_chain(&err);
    assert!(
        matches!(
            err,
            ChError::Api {
                step: "vm.boot",
                ..
            }
        ),
        "{text}"
    );
}

#[tokio::test]
#[ignore = "needs cloud-hypervisor and hardware KVM"]
async fn real_ch_twenty_boots_in_a_row() {
    let backend = real_ch("real_ch_twenty_boots_in_a_row");
    let mut times = Vec::new();
    for i in 0..20 {
        let _slot = support::vm::vm_slot();
        let vm = real_vm(&format!("/bin/busybox echo BOOT-{i}-OK\n{POWEROFF}"));
        let spec = LaunchSpec::new(vm.config.clone()).expect("valid spec");
        let mut running = backend
            .launch_vm(&spec)
            .await
            .unwrap_or_else(|e| panic!("boot {i}: launch: {}", error_chain(&e)));
        let exit = running
            .wait_until(Instant::now() + BOOT_DEADLINE)
            .await
            .expect("wait");
        let serial = running.running().serial_tail(64 << 10);
        assert!(exit.is_clean(), "boot {i}: {exit:?}\n{serial}");
        assert!(
            serial.contains(&format!("BOOT-{i}-OK")),
            "boot {i}:\n{serial}"
        );
        times.push(exit.elapsed);
    }
    times.sort();
    eprintln!(
        "20 boots: min {:?}, median {:?}, max {:?}",
        times[0], times[10], times[19]
    );
}
