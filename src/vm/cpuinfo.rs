//! The few facts about the host CPU that VM set-up needs, read from `/proc/cpuinfo`.
//!
//! Parsing takes the text so that the decisions built on it (accelerator, kernel command line)
//! are testable with any CPU's cpuinfo.

use std::path::Path;

/// Where the host's CPU description lives.
pub const PROC_CPUINFO: &str = "/proc/cpuinfo";

/// Errors reading the host's CPU description.
#[derive(Debug, thiserror::Error)]
pub enum CpuInfoError {
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file that failed.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What the host CPU offers, as far as VM set-up cares.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CpuInfo {
    /// The first CPU's flags include `vmx` (Intel VT-x) or `svm` (AMD-V): hardware
    /// virtualization is exposed to this kernel, so `/dev/kvm` is real KVM and not an
    /// emulation like PVM.
    pub hardware_virt: bool,
    /// The first CPU's `cpu MHz` times 1000, rounded. On the hosts this runs on that is the
    /// TSC frequency; `None` if the field is missing or not a positive number.
    pub khz: Option<u64>,
}

impl CpuInfo {
    /// Reads and parses `/proc/cpuinfo`.
    pub fn read() -> Result<Self, CpuInfoError> {
        Self::read_from(Path::new(PROC_CPUINFO))
    }

    /// Reads and parses a cpuinfo file at `path`.
    pub fn read_from(path: &Path) -> Result<Self, CpuInfoError> {
        let text = std::fs::read_to_string(path).map_err(|source| CpuInfoError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self::parse(&text))
    }

    /// Parses cpuinfo text. Only the first processor block counts: all CPUs of one host
    /// share flags and nominal frequency, and the first block is what every kernel prints.
    pub fn parse(text: &str) -> Self {
        let mut info = CpuInfo::default();
        let mut seen_flags = false;
        let mut seen_mhz = false;
        for line in text.lines() {
            if line.trim().is_empty() && (seen_flags || seen_mhz) {
                break;
            }
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            match key.trim() {
                "flags" if !seen_flags => {
                    seen_flags = true;
                    info.hardware_virt = value
                        .split_whitespace()
                        .any(|flag| flag == "vmx" || flag == "svm");
                }
                "cpu MHz" if !seen_mhz => {
                    seen_mhz = true;
                    info.khz = parse_mhz_as_khz(value.trim());
                }
                _ => {}
            }
        }
        info
    }
}

/// `"2596.150"` -> `Some(2_596_150)`. Rejects anything that is not a plain positive decimal
/// below 100 GHz, so that a strange file never becomes a strange kernel parameter.
fn parse_mhz_as_khz(value: &str) -> Option<u64> {
    let mhz: f64 = value.parse().ok()?;
    if !mhz.is_finite() || mhz <= 0.0 || mhz >= 100_000.0 {
        return None;
    }
    let khz = (mhz * 1000.0).round();
    // The range check above keeps this cast exact.
    Some(khz as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Abridged from this project's build machine (PVM: no vmx/svm).
    const PVM_HOST: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu MHz\t\t: 2596.150\n\
        flags\t\t: fpu vme de pse tsc msr pae constant_tsc rdtscp hypervisor\n\n\
        processor\t: 1\ncpu MHz\t\t: 1.000\nflags\t\t: fpu svm\n\n";

    #[test]
    fn pvm_host_has_no_hardware_virt_and_its_frequency() {
        let info = CpuInfo::parse(PVM_HOST);
        assert!(!info.hardware_virt, "a later block's svm must not count");
        assert_eq!(info.khz, Some(2_596_150));
    }

    #[test]
    fn vmx_and_svm_are_detected_as_whole_words() {
        let intel = CpuInfo::parse("cpu MHz : 3000.0\nflags : fpu vmx sse\n");
        assert!(intel.hardware_virt);
        assert_eq!(intel.khz, Some(3_000_000));
        assert!(CpuInfo::parse("flags : svm\n").hardware_virt);
        // Words that merely contain the letters do not count.
        assert!(!CpuInfo::parse("flags : vmx_ept svmlock\n").hardware_virt);
    }

    #[test]
    fn bad_or_missing_frequency_is_none() {
        for text in [
            "flags : fpu\n",
            "cpu MHz : \n",
            "cpu MHz : fast\n",
            "cpu MHz : -5\n",
            "cpu MHz : NaN\n",
            "cpu MHz : inf\n",
            "cpu MHz : 1e9\n",
        ] {
            assert_eq!(CpuInfo::parse(text).khz, None, "{text:?}");
        }
    }

    #[test]
    fn reads_the_real_file() {
        // Any Linux host has this file; its content is host-specific, so only the read is
        // asserted.
        CpuInfo::read().expect("reading /proc/cpuinfo");
    }
}
