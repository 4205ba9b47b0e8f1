//! The guest kernel command line.
//!
//! Every VM gets `console=ttyS0 panic=-1 quiet`: the serial port is the only console, and a
//! kernel panic reboots at once, which QEMU's `-no-reboot` turns into an exit (a guest never
//! gets a second life). Under TCG it also gets `tsc_early_khz=<host kHz>`: without it about one
//! boot in four hung after "tsc: Unable to calibrate against PIT" (microvm has no HPET or
//! PM timer to calibrate against). Under KVM the parameter is left out on purpose: the kernel
//! then takes the exact TSC frequency from KVM, whereas `tsc_early_khz` would override it with
//! `cpu MHz`, which on hosts with frequency scaling is the current clock, not the TSC's.
//!
//! Callers add their own parameters (such as [`agent_port`]) as validated [`KernelParam`]s.

use super::accel::Accel;
use super::cpuinfo::CpuInfo;

/// The most bytes of command line this crate composes. x86's limit is 2048 bytes
/// (`COMMAND_LINE_SIZE`) and QEMU's microvm appends a `virtio_mmio.device=...` entry per
/// device, so half is left to it.
pub const MAX_CMDLINE_BYTES: usize = 1024;

/// Errors composing the command line.
#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    /// A parameter is empty or contains something the kernel would split or misread.
    #[error(
        "kernel parameter {param:?}: must be non-empty printable ASCII without spaces or quotes"
    )]
    BadParam {
        /// The rejected parameter.
        param: String,
    },
    /// The whole command line is too long.
    #[error("kernel command line is {len} bytes, more than the {max} allowed")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// One kernel parameter (`key` or `key=value`), checked so that it stays exactly one word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelParam(String);

impl KernelParam {
    /// Checks `param`: non-empty, printable ASCII, no whitespace and no `"` (the kernel's
    /// quoting would merge words).
    pub fn new(param: impl Into<String>) -> Result<Self, CmdlineError> {
        let param = param.into();
        let ok = !param.is_empty() && param.bytes().all(|b| b.is_ascii_graphic() && b != b'"');
        if ok {
            Ok(KernelParam(param))
        } else {
            Err(CmdlineError::BadParam { param })
        }
    }

    /// The parameter as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for KernelParam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `tvix.agent_port=<port>`: the vsock port the guest agent dials on the host (CID 2).
pub fn agent_port(port: u32) -> KernelParam {
    KernelParam(format!("{}={port}", tvix_build_vm_agent::CMDLINE_PORT_KEY))
}

/// The parameters every VM gets on this host with this accelerator.
pub fn base(accel: Accel, cpu: &CpuInfo) -> Vec<KernelParam> {
    let mut params: Vec<KernelParam> = ["console=ttyS0", "panic=-1", "quiet"]
        .into_iter()
        .map(|p| KernelParam(p.to_owned()))
        .collect();
    if accel == Accel::Tcg {
        match cpu.khz {
            Some(khz) => params.push(KernelParam(format!("tsc_early_khz={khz}"))),
            None => tracing::warn!(
                "no `cpu MHz` in /proc/cpuinfo: booting without tsc_early_khz, which may hang \
                 TSC calibration until the boot deadline"
            ),
        }
    }
    params
}

/// Joins `base` and the caller's `extra` parameters into one command line, bounded by
/// [`MAX_CMDLINE_BYTES`].
pub fn render(base: &[KernelParam], extra: &[KernelParam]) -> Result<String, CmdlineError> {
    let line = base
        .iter()
        .chain(extra)
        .map(KernelParam::as_str)
        .collect::<Vec<_>>()
        .join(" ");
    if line.len() > MAX_CMDLINE_BYTES {
        return Err(CmdlineError::TooLong {
            len: line.len(),
            max: MAX_CMDLINE_BYTES,
        });
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(khz: Option<u64>) -> CpuInfo {
        CpuInfo {
            hardware_virt: false,
            khz,
        }
    }

    #[test]
    fn tcg_gets_the_host_tsc_frequency() {
        let cpu = CpuInfo::parse("cpu MHz\t\t: 2596.150\nflags : fpu\n");
        let line = render(&base(Accel::Tcg, &cpu), &[agent_port(1024)]).expect("render");
        assert_eq!(
            line,
            "console=ttyS0 panic=-1 quiet tsc_early_khz=2596150 tvix.agent_port=1024"
        );
    }

    #[test]
    fn kvm_keeps_the_kernel_own_tsc_calibration() {
        let line = render(&base(Accel::Kvm, &cpu(Some(3_000_000))), &[]).expect("render");
        assert_eq!(line, "console=ttyS0 panic=-1 quiet");
    }

    #[test]
    fn tcg_without_a_frequency_still_boots() {
        let line = render(&base(Accel::Tcg, &cpu(None)), &[]).expect("render");
        assert_eq!(line, "console=ttyS0 panic=-1 quiet");
    }

    #[test]
    fn params_stay_one_word() {
        for bad in ["", "a b", "a\tb", "init=\"/x y\"", "a\nb", "caf\u{e9}"] {
            assert!(KernelParam::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            KernelParam::new("init=/init").expect("ok").as_str(),
            "init=/init"
        );
    }

    #[test]
    fn the_length_is_bounded() {
        let long = KernelParam::new("x".repeat(MAX_CMDLINE_BYTES)).expect("one word");
        let err = render(&base(Accel::Kvm, &cpu(None)), &[long]).expect_err("too long");
        assert!(matches!(err, CmdlineError::TooLong { .. }), "{err}");
    }
}
