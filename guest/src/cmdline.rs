//! The agent's configuration from the kernel command line.

use tvix_build_vm_agent::{CMDLINE_PORT_KEY, CMDLINE_TRACE_KEY, DEFAULT_AGENT_PORT};

/// The longest command line we read; the kernel's own limit on x86_64 is 2048 bytes.
const MAX_CMDLINE_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    #[error("reading /proc/cmdline")]
    Read(#[source] std::io::Error),
    #[error("{CMDLINE_PORT_KEY}={value:?} is not a vsock port (1 to 4294967294)")]
    BadPort { value: String },
}

/// What the agent takes from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// The host's vsock port (CID 2) to dial.
    pub agent_port: u32,
    /// Whether to print phase stamps on the console (`tvix.agent_trace`, see `trace`).
    pub trace: bool,
}

impl BootConfig {
    /// Reads `/proc/cmdline` (procfs must be mounted).
    pub fn from_proc() -> Result<Self, CmdlineError> {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::open("/proc/cmdline")
            .and_then(|f| f.take(MAX_CMDLINE_BYTES).read_to_string(&mut text))
            .map_err(CmdlineError::Read)?;
        Self::parse(&text)
    }

    /// Parses a kernel command line. The last occurrence of a key wins, as in the kernel;
    /// without `tvix.agent_port` the default port is used.
    pub fn parse(cmdline: &str) -> Result<Self, CmdlineError> {
        let mut port = None;
        let mut trace = false;
        for word in words(cmdline) {
            let (key, value) = word.split_once('=').unwrap_or((word.as_str(), ""));
            if key == CMDLINE_PORT_KEY && word.contains('=') {
                port = Some(value.to_owned());
            } else if key == CMDLINE_TRACE_KEY {
                trace = !matches!(value, "0" | "off" | "no");
            }
        }
        let agent_port = match port {
            None => DEFAULT_AGENT_PORT,
            Some(value) => match value.parse::<u32>() {
                // 0 is reserved and u32::MAX is VMADDR_PORT_ANY.
                Ok(p) if p != 0 && p != u32::MAX => p,
                _ => return Err(CmdlineError::BadPort { value }),
            },
        };
        Ok(Self { agent_port, trace })
    }
}

/// Splits a command line into words the way the kernel does: on whitespace, except inside
/// double quotes, which are removed.
fn words(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_port() {
        let c = BootConfig::parse(
            "console=ttyS0 panic=-1 quiet tsc_early_khz=2000000 tvix.agent_port=5000\n",
        )
        .unwrap();
        assert_eq!(c.agent_port, 5000);
        assert!(!c.trace);
    }

    #[test]
    fn trace_switch() {
        assert!(BootConfig::parse("quiet tvix.agent_trace").unwrap().trace);
        assert!(BootConfig::parse("tvix.agent_trace=1").unwrap().trace);
        assert!(!BootConfig::parse("tvix.agent_trace=0").unwrap().trace);
        assert!(!BootConfig::parse("tvix.agent_tracex").unwrap().trace);
    }

    #[test]
    fn default_port_without_key() {
        let c = BootConfig::parse("console=ttyS0 quiet").unwrap();
        assert_eq!(c.agent_port, DEFAULT_AGENT_PORT);
    }

    #[test]
    fn last_occurrence_wins_and_prefix_keys_do_not_match() {
        let c = BootConfig::parse(
            "tvix.agent_port=1 xtvix.agent_port=7 tvix.agent_port_x=8 tvix.agent_port=2",
        )
        .unwrap();
        assert_eq!(c.agent_port, 2);
    }

    #[test]
    fn quotes_group_words() {
        let c = BootConfig::parse(r#"foo="a b tvix.agent_port=9" "tvix.agent_port=3""#).unwrap();
        assert_eq!(c.agent_port, 3);
    }

    #[test]
    fn bad_ports_are_rejected() {
        for bad in ["", "0", "-1", "4294967295", "4294967296", "12a", " 5"] {
            let line = format!("tvix.agent_port={bad}");
            assert!(
                matches!(BootConfig::parse(&line), Err(CmdlineError::BadPort { .. })),
                "{line:?} accepted"
            );
        }
    }
}
