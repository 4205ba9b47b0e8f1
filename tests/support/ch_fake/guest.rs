//! The fake guest behind a booted VM: its serial output, what it does (power off, reboot,
//! run, dial the host over vsock), and the event monitor's records of it.

use super::config::{Cpus, Memory, Mode, VmConfig};
use super::{Guest, Options, Shared};
use std::io::Write;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Where the fake guest's serial output goes.
pub(super) enum Serial {
    Discard,
    File(std::fs::File),
}

impl Serial {
    pub(super) fn open(config: &VmConfig, options: &Options) -> Serial {
        let serial = config.serial.as_ref().map_or(Mode::Null, |s| s.mode);
        let file = match serial {
            // Truncated at boot, as the real one does.
            Mode::File => config
                .serial
                .as_ref()
                .and_then(|s| s.file.as_ref())
                .and_then(|f| std::fs::File::create(f).ok()),
            Mode::Tty => options.stdout.as_ref().and_then(|p| {
                std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(p)
                    .ok()
            }),
            _ => None,
        };
        file.map_or(Serial::Discard, Serial::File)
    }

    pub(super) fn line(&mut self, text: &str) {
        if let Serial::File(f) = self {
            let _ = writeln!(f, "{text}");
        }
    }
}

pub(super) async fn run_guest(shared: Arc<Shared>, config: VmConfig, mut serial: Serial) {
    let cmdline = config.payload.cmdline.clone().unwrap_or_default();
    serial.line(&format!("fake guest: cmdline={cmdline}"));
    let cpus = config.cpus.clone().unwrap_or(Cpus {
        boot_vcpus: 1,
        max_vcpus: 1,
        nested: true,
    });
    let memory = config.memory.clone().unwrap_or(Memory {
        size: 512 << 20,
        shared: false,
        hugepages: false,
    });
    let tags: Vec<_> = config.fs.iter().flatten().map(|f| f.tag.clone()).collect();
    serial.line(&format!(
        "fake guest: vcpus={} nested={} memory={} shared={} fs={} vsock={} disks={} net={}",
        cpus.boot_vcpus,
        cpus.nested,
        memory.size,
        memory.shared,
        tags.join(","),
        config.vsock.as_ref().map_or(0, |v| v.cid),
        config.disks.as_ref().map_or(0, Vec::len),
        config.net.as_ref().map_or(0, Vec::len),
    ));
    if !cmdline.contains("console=ttyS0") {
        // Without it a real kernel prints nothing to the serial port.
        return;
    }
    match shared.options.guest.clone() {
        Guest::PowerOff(after) => {
            tokio::time::sleep(after).await;
            serial.line("fake guest: powering off");
            power_off(&shared);
        }
        Guest::Reboot(after) => loop {
            tokio::time::sleep(after).await;
            serial.line("fake guest: rebooting");
            emit(&shared, "vm", "rebooting");
            emit(&shared, "vm", "rebooted");
        },
        Guest::Run => std::future::pending().await,
        Guest::DialVsock(port) => {
            let Some(vsock) = &config.vsock else {
                serial.line("fake guest: no vsock device");
                return power_off(&shared);
            };
            let mut path = vsock.socket.clone().into_os_string();
            path.push(format!("_{port}"));
            match UnixStream::connect(&path).await {
                Ok(stream) => {
                    let mut stream = BufReader::new(stream);
                    let _ = stream.get_mut().write_all(b"hello-from-fake-guest\n").await;
                    let mut reply = String::new();
                    let _ = stream.read_line(&mut reply).await;
                    serial.line(&format!("fake guest: reply: {}", reply.trim_end()));
                }
                Err(e) => serial.line(&format!("fake guest: vsock connect failed: {e}")),
            }
            power_off(&shared);
        }
    }
}

pub(super) fn power_off(shared: &Shared) {
    emit(shared, "vm", "shutdown");
    emit(shared, "vm", "deleted");
    emit(shared, "vmm", "shutdown");
    shared.exit.send_replace(Some(0));
}

/// Appends an event as cloud-hypervisor does: pretty JSON, then a blank line, in two writes.
pub(super) fn emit(shared: &Shared, source: &str, event: &str) {
    let Some(path) = &shared.options.events else {
        return;
    };
    let since = START.get_or_init(std::time::Instant::now).elapsed();
    let value = serde_json::json!({
        "timestamp": {"secs": since.as_secs(), "nanos": since.subsec_nanos()},
        "source": source,
        "event": event,
        "properties": null,
    });
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
    {
        let _ = f.write_all(
            serde_json::to_string_pretty(&value)
                .unwrap_or_default()
                .as_bytes(),
        );
        let _ = f.write_all(b"\n\n");
    }
}

static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
