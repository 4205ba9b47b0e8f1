//! The fake `cloud-hypervisor` executable around [`crate::ch_fake`]: a wrapper script that
//! re-runs the test binary with [`ENTRY_TEST`] as its only test, and that test's `main`,
//! which parses cloud-hypervisor's arguments strictly and serves the fake API.
//! Include with `#[path = "support/ch_fake/exe.rs"] mod ch_fake_exe;` next to `ch_fake`.
#![allow(
    dead_code,
    reason = "each test crate uses a different subset of the helpers"
)]

use crate::ch_fake::{FakeVmm, Guest, Options, VmmShutdown};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Environment variable carrying the fake's arguments (separated by 0x1f).
pub const ARGS_ENV: &str = "CH_FAKE_ARGS";
/// Environment variable naming the scenario.
pub const SCENARIO_ENV: &str = "CH_FAKE_SCENARIO";
/// The test function (in the test crate's root) that is the fake's `main`.
pub const ENTRY_TEST: &str = "fake_cloud_hypervisor_process";

/// Scenarios of the fake executable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// The guest powers off 100 ms after boot.
    PowerOff,
    /// The guest reboots every 300 ms.
    Reboot,
    /// The guest runs forever.
    Run,
    /// Like [`Scenario::Run`], but `vmm.shutdown` closes the connection without a reply.
    RunEofOnShutdown,
    /// Like [`Scenario::Run`], but the VMM ignores `vmm.shutdown`.
    RunIgnoringShutdown,
    /// The guest dials host port 1024 over vsock.
    DialVsock,
    /// Error bodies in the old plain-text form.
    LegacyErrors,
    /// Exits with 1 and a message before serving the API.
    ExitEarly,
    /// Never serves the API.
    NeverReady,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::PowerOff => "poweroff",
            Scenario::Reboot => "reboot",
            Scenario::Run => "run",
            Scenario::RunEofOnShutdown => "run-eof",
            Scenario::RunIgnoringShutdown => "run-ignore",
            Scenario::DialVsock => "dial-vsock",
            Scenario::LegacyErrors => "legacy-errors",
            Scenario::ExitEarly => "exit-early",
            Scenario::NeverReady => "never-ready",
        }
    }

    fn from_name(name: &str) -> Option<Scenario> {
        [
            Scenario::PowerOff,
            Scenario::Reboot,
            Scenario::Run,
            Scenario::RunEofOnShutdown,
            Scenario::RunIgnoringShutdown,
            Scenario::DialVsock,
            Scenario::LegacyErrors,
            Scenario::ExitEarly,
            Scenario::NeverReady,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }
}

/// Writes a `cloud-hypervisor` executable into `dir` that runs this test binary's
/// [`ENTRY_TEST`] as the fake, in `scenario`. The original stdout (the serial console in
/// `Tty` mode) is passed on as fd 3; the test harness's own chatter goes to stderr.
pub fn install_executable(dir: &Path, scenario: Scenario) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let exe = std::env::current_exe().expect("current_exe");
    let path = dir.join("cloud-hypervisor");
    let script = format!(
        "#!/bin/sh\nexec 3>&1 1>&2\nexport {ARGS_ENV}=\"$(printf '%s\\037' \"$@\")\"\nexport {SCENARIO_ENV}={}\nexec '{}' --exact {ENTRY_TEST} --ignored --nocapture --test-threads=1 -q\n",
        scenario.name(),
        exe.display()
    );
    std::fs::write(&path, script).expect("writing the fake");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// The fake process's `main`: parses cloud-hypervisor's arguments strictly (only what the
/// backend is meant to pass), serves the API and exits like cloud-hypervisor would.
pub fn process_main_from_env() {
    let (Some(args), Some(scenario)) =
        (std::env::var_os(ARGS_ENV), std::env::var(SCENARIO_ENV).ok())
    else {
        panic!("{ENTRY_TEST} is the fake cloud-hypervisor's entry point; other tests run it");
    };
    let args: Vec<String> = args
        .to_string_lossy()
        .split('\u{1f}')
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect();
    let code = process_main(&args, &scenario);
    std::process::exit(code);
}

fn fail(why: &str) -> i32 {
    eprintln!("Error: fake cloud-hypervisor: {why}");
    1
}

fn process_main(args: &[String], scenario: &str) -> i32 {
    let Some(scenario) = Scenario::from_name(scenario) else {
        return fail(&format!("unknown scenario {scenario}"));
    };
    let mut api = None;
    let mut events = None;
    let mut seccomp = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let parsed = match arg.as_str() {
            "--api-socket" => value(arg).map(|v| api = Some(v)),
            "--event-monitor" => value(arg).map(|v| events = Some(v)),
            "--seccomp" => value(arg).map(|v| seccomp = Some(v)),
            "-v" => Ok(()),
            other => Err(format!("unexpected argument {other:?}")),
        };
        if let Err(why) = parsed {
            return fail(&why);
        }
    }
    let Some(api) = api.as_deref().and_then(|a| a.strip_prefix("path=")) else {
        return fail("--api-socket path=<socket> is required");
    };
    let Some(events) = events.as_deref().and_then(|a| a.strip_prefix("path=")) else {
        return fail("--event-monitor path=<file> is required");
    };
    if seccomp.as_deref() != Some("true") {
        return fail("--seccomp true is required");
    }
    match scenario {
        Scenario::ExitEarly => return fail("exiting early as the scenario asks"),
        Scenario::NeverReady => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        _ => {}
    }
    // The real one opens (and truncates) the event file at start.
    if let Err(e) = std::fs::File::create(events) {
        return fail(&format!("event monitor {events}: {e}"));
    }
    // Before v53 a leftover socket file makes start-up fail.
    if Path::new(api).exists() {
        return fail(&format!("api socket {api}: Address in use"));
    }
    let guest = match scenario {
        Scenario::PowerOff | Scenario::LegacyErrors => Guest::PowerOff(Duration::from_millis(100)),
        Scenario::Reboot => Guest::Reboot(Duration::from_millis(300)),
        Scenario::DialVsock => Guest::DialVsock(1024),
        _ => Guest::Run,
    };
    let options = Options {
        legacy_errors: scenario == Scenario::LegacyErrors,
        vmm_shutdown: match scenario {
            Scenario::RunEofOnShutdown => VmmShutdown::CloseWithoutReply,
            Scenario::RunIgnoringShutdown => VmmShutdown::Ignore,
            _ => VmmShutdown::Reply,
        },
        guest,
        events: Some(PathBuf::from(events)),
        stdout: Some(PathBuf::from("/proc/self/fd/3")),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&format!("runtime: {e}")),
    };
    let api = PathBuf::from(api);
    let code = runtime.block_on(async {
        let fake = FakeVmm::start(&api, options);
        fake.exited().await
    });
    let _ = std::fs::remove_file(&api);
    code
}
