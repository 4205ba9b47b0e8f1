//! Choosing the accelerator: hardware KVM when it is really there, TCG otherwise.
//!
//! `/dev/kvm` alone proves little: on this project's build machines it is PVM (`kvm_pvm`, no
//! vmx/svm flag), under which an ordinary guest takes over 25 s to reach memory init and then
//! dies with a KVM emulation failure. So `auto` picks KVM only when the CPU flags show vmx or
//! svm AND `/dev/kvm` opens read-write.

use super::cpuinfo::{CpuInfo, CpuInfoError};
use std::path::Path;

/// The KVM device.
pub const DEV_KVM: &str = "/dev/kvm";

/// What the operator asked for (`--accel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM if the host has hardware virtualization and `/dev/kvm` opens, else TCG.
    #[default]
    Auto,
    /// KVM, even without vmx/svm flags (e.g. to try PVM); fails if `/dev/kvm` does not open.
    Kvm,
    /// QEMU's software emulation: slow but works everywhere.
    Tcg,
}

/// The accelerator a VM actually runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's Tiny Code Generator (software emulation).
    Tcg,
}

impl Accel {
    /// The name QEMU's `-accel` takes.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.qemu_name())
    }
}

/// Errors choosing the accelerator.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    /// `--accel kvm` was asked for but `/dev/kvm` does not open read-write.
    #[error("--accel kvm: cannot open {path} read-write")]
    KvmUnavailable {
        /// The device path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The CPU description could not be read.
    #[error("choosing the accelerator")]
    CpuInfo(#[source] CpuInfoError),
}

/// Resolves `choice` on this host (reads `/proc/cpuinfo`, opens `/dev/kvm`).
pub fn resolve(choice: AccelChoice) -> Result<Accel, AccelError> {
    let cpu = CpuInfo::read().map_err(AccelError::CpuInfo)?;
    decide(choice, &cpu, || open_rw(Path::new(DEV_KVM)))
}

/// The decision, with the host facts injected. `open_kvm` is only called when its answer
/// matters.
pub fn decide(
    choice: AccelChoice,
    cpu: &CpuInfo,
    open_kvm: impl FnOnce() -> std::io::Result<()>,
) -> Result<Accel, AccelError> {
    match choice {
        AccelChoice::Tcg => Ok(Accel::Tcg),
        AccelChoice::Kvm => match open_kvm() {
            Ok(()) => Ok(Accel::Kvm),
            Err(source) => Err(AccelError::KvmUnavailable {
                path: DEV_KVM.to_owned(),
                source,
            }),
        },
        AccelChoice::Auto => {
            if cpu.hardware_virt && open_kvm().is_ok() {
                Ok(Accel::Kvm)
            } else {
                Ok(Accel::Tcg)
            }
        }
    }
}

fn open_rw(path: &Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn cpu(hardware_virt: bool) -> CpuInfo {
        CpuInfo {
            hardware_virt,
            khz: Some(2_000_000),
        }
    }

    fn denied() -> std::io::Result<()> {
        Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
    }

    #[test]
    fn auto_on_a_pvm_host_is_tcg_even_though_dev_kvm_opens() {
        let opened = Cell::new(false);
        let accel = decide(
            AccelChoice::Auto,
            &CpuInfo::parse("flags : fpu tsc hypervisor\n"),
            || {
                opened.set(true);
                Ok(())
            },
        )
        .expect("auto never fails");
        assert_eq!(accel, Accel::Tcg);
        assert!(!opened.get(), "no need to touch /dev/kvm without vmx/svm");
    }

    #[test]
    fn auto_needs_both_the_flag_and_the_device() {
        assert_eq!(
            decide(AccelChoice::Auto, &cpu(true), || Ok(())).expect("auto"),
            Accel::Kvm
        );
        assert_eq!(
            decide(AccelChoice::Auto, &cpu(true), denied).expect("auto"),
            Accel::Tcg
        );
    }

    #[test]
    fn explicit_choices() {
        assert_eq!(
            decide(AccelChoice::Tcg, &cpu(true), || Ok(())).expect("tcg"),
            Accel::Tcg
        );
        assert_eq!(
            decide(AccelChoice::Kvm, &cpu(false), || Ok(())).expect("kvm"),
            Accel::Kvm
        );
        let err = decide(AccelChoice::Kvm, &cpu(true), denied).expect_err("no device");
        assert!(matches!(err, AccelError::KvmUnavailable { .. }), "{err}");
    }

    #[test]
    fn clap_names() {
        use clap::ValueEnum;
        let names: Vec<_> = AccelChoice::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value())
            .map(|v| v.get_name().to_owned())
            .collect();
        assert_eq!(names, ["auto", "kvm", "tcg"]);
    }
}
