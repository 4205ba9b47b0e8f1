//! The `VmConfig` body of `PUT /api/v1/vm.create`, as typed structs with cloud-hypervisor's
//! exact field names and case-sensitive enum values (see docs/architecture.md on cloud-hypervisor's API).
//!
//! Only the fields a direct-kernel, single-use guest needs are modelled; everything else keeps
//! cloud-hypervisor's default. `deny_unknown_fields` makes a round trip through these types
//! reject any field they do not know, so a misspelt name fails a test instead of being
//! silently ignored (cloud-hypervisor itself ignores unknown fields).
//!
//! cloud-hypervisor validates a config only at `vm.boot`; [`VmConfig::validate`] repeats the
//! checks this crate can get wrong, so a mistake is reported before any process starts.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::PathBuf;

/// Context ids a VM must not use: any, hypervisor, local, host, and `u32::MAX`.
pub const RESERVED_CIDS: [u32; 4] = [0, 1, 2, u32::MAX];

/// The whole VM description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel, initramfs and command line.
    pub payload: PayloadConfig,
    /// vCPUs.
    pub cpus: CpusConfig,
    /// Guest RAM.
    pub memory: MemoryConfig,
    /// virtio-fs devices (vhost-user).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fs: Vec<FsConfig>,
    /// The hybrid vsock device (one object, not a list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// Block devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// The legacy serial port (ttyS0).
    pub serial: ConsoleConfig,
    /// The virtio console (hvc0).
    pub console: ConsoleConfig,
}

/// `payload`: a direct kernel boot (never firmware as well).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    /// A PVH ELF `vmlinux` (or a bzImage from v39).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initramfs: PathBuf,
    /// The kernel command line.
    pub cmdline: String,
}

/// `cpus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    /// vCPUs at boot.
    pub boot_vcpus: u32,
    /// vCPUs at most (no hotplug here, so the same).
    pub max_vcpus: u32,
    /// Expose VMX/SVM to the guest (v50+; older versions ignore the field).
    pub nested: bool,
}

/// `memory`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Bytes.
    pub size: u64,
    /// Shared (memfd) mappings: every vhost-user device needs them.
    pub shared: bool,
}

/// One `fs` entry: a virtio-fs device served by a vhost-user daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The mount tag.
    pub tag: String,
    /// The daemon's vhost-user socket.
    pub socket: PathBuf,
    /// Request queues (at most the boot vCPUs).
    pub num_queues: u32,
    /// Queue depth (a power of two).
    pub queue_size: u16,
    /// The device id.
    pub id: String,
}

/// `vsock`: hybrid vsock with its host side on a unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id.
    pub cid: u32,
    /// The unix socket cloud-hypervisor creates at boot (it must not exist before).
    pub socket: PathBuf,
    /// The device id.
    pub id: String,
}

/// One `disks` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The image.
    pub path: PathBuf,
    /// Read-only for the guest.
    pub readonly: bool,
    /// The image format (never probed: a guest-written image must not change meaning).
    pub image_type: ImageType,
    /// The device id.
    pub id: String,
}

/// Disk image formats this crate uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageType {
    /// A raw image.
    Raw,
}

/// `serial` and `console`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Where the output goes.
    pub mode: ConsoleMode,
    /// The file, for [`ConsoleMode::File`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

impl ConsoleConfig {
    /// A console in `mode` without a file.
    pub fn mode(mode: ConsoleMode) -> Self {
        ConsoleConfig { mode, file: None }
    }
}

/// Console output modes (case-sensitive on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    /// No device.
    Off,
    /// A pseudo terminal.
    Pty,
    /// cloud-hypervisor's stdout (input only if stdin is a terminal).
    Tty,
    /// A file.
    File,
    /// A unix socket.
    Socket,
    /// A device whose output is discarded.
    Null,
}

/// A [`VmConfig`] that cloud-hypervisor would refuse at `vm.boot`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// virtio-fs is a vhost-user device and needs shared memory.
    #[error("fs[{index}]: vhost-user devices need memory.shared")]
    SharedMemoryRequired {
        /// The fs entry.
        index: usize,
    },
    /// A reserved vsock context id.
    #[error("vsock.cid {cid} is reserved (0, 1, 2 and u32::MAX are)")]
    ReservedCid {
        /// The id.
        cid: u32,
    },
    /// A device id is used twice or starts with `__` (reserved for cloud-hypervisor).
    #[error("device id {id:?} is not unique or starts with \"__\"")]
    BadDeviceId {
        /// The id.
        id: String,
    },
    /// A number is outside what cloud-hypervisor accepts.
    #[error("{field}: {value} {problem}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// The value.
        value: u64,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A console in file mode without a file, or with a file in another mode.
    #[error("{field}: a file is needed exactly in File mode")]
    ConsoleFile {
        /// `serial` or `console`.
        field: &'static str,
    },
}

impl VmConfig {
    /// Repeats the checks cloud-hypervisor makes at `vm.boot` that concern the fields set here.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, value: u64, problem| ConfigError::Invalid {
            field,
            value,
            problem,
        };
        let cpus = &self.cpus;
        if cpus.boot_vcpus == 0 {
            return Err(invalid("cpus.boot_vcpus", 0, "must be at least 1"));
        }
        if cpus.max_vcpus < cpus.boot_vcpus {
            return Err(invalid(
                "cpus.max_vcpus",
                cpus.max_vcpus.into(),
                "is below boot_vcpus",
            ));
        }
        if self.memory.size == 0 || self.memory.size % (1 << 20) != 0 {
            return Err(invalid(
                "memory.size",
                self.memory.size,
                "must be a positive number of MiB",
            ));
        }
        let mut ids = BTreeSet::new();
        let mut id = |id: &str| {
            if id.starts_with("__") || !ids.insert(id.to_owned()) {
                return Err(ConfigError::BadDeviceId { id: id.to_owned() });
            }
            Ok(())
        };
        for (index, fs) in self.fs.iter().enumerate() {
            if !self.memory.shared {
                return Err(ConfigError::SharedMemoryRequired { index });
            }
            if fs.num_queues == 0 || fs.num_queues > cpus.boot_vcpus {
                return Err(invalid(
                    "fs.num_queues",
                    fs.num_queues.into(),
                    "must be 1..=boot_vcpus",
                ));
            }
            if !fs.queue_size.is_power_of_two() {
                return Err(invalid(
                    "fs.queue_size",
                    fs.queue_size.into(),
                    "must be a power of two",
                ));
            }
            id(&fs.id)?;
        }
        if let Some(vsock) = &self.vsock {
            if RESERVED_CIDS.contains(&vsock.cid) {
                return Err(ConfigError::ReservedCid { cid: vsock.cid });
            }
            id(&vsock.id)?;
        }
        for disk in &self.disks {
            id(&disk.id)?;
        }
        for (field, console) in [("serial", &self.serial), ("console", &self.console)] {
            if (console.mode == ConsoleMode::File) != console.file.is_some() {
                return Err(ConfigError::ConsoleFile { field });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            payload: PayloadConfig {
                kernel: "/k/vmlinux".into(),
                initramfs: "/k/initrd".into(),
                cmdline: "console=ttyS0".into(),
            },
            cpus: CpusConfig {
                boot_vcpus: 2,
                max_vcpus: 2,
                nested: false,
            },
            memory: MemoryConfig {
                size: 512 << 20,
                shared: true,
            },
            fs: vec![FsConfig {
                tag: "inputs".into(),
                socket: "/run/fs.sock".into(),
                num_queues: 1,
                queue_size: 1024,
                id: "fs0".into(),
            }],
            vsock: Some(VsockConfig {
                cid: 3,
                socket: "/run/vsock.sock".into(),
                id: "vsock0".into(),
            }),
            disks: vec![DiskConfig {
                path: "/run/scratch.img".into(),
                readonly: false,
                image_type: ImageType::Raw,
                id: "scratch".into(),
            }],
            serial: ConsoleConfig::mode(ConsoleMode::Tty),
            console: ConsoleConfig::mode(ConsoleMode::Off),
        }
    }

    #[test]
    fn serializes_with_the_exact_wire_names() {
        let json = serde_json::to_value(config()).expect("serialize");
        let expected = serde_json::json!({
            "payload": {"kernel": "/k/vmlinux", "initramfs": "/k/initrd", "cmdline": "console=ttyS0"},
            "cpus": {"boot_vcpus": 2, "max_vcpus": 2, "nested": false},
            "memory": {"size": 536870912u64, "shared": true},
            "fs": [{"tag": "inputs", "socket": "/run/fs.sock", "num_queues": 1, "queue_size": 1024, "id": "fs0"}],
            "vsock": {"cid": 3, "socket": "/run/vsock.sock", "id": "vsock0"},
            "disks": [{"path": "/run/scratch.img", "readonly": false, "image_type": "Raw", "id": "scratch"}],
            "serial": {"mode": "Tty"},
            "console": {"mode": "Off"},
        });
        assert_eq!(json, expected);
    }

    #[test]
    fn empty_device_lists_are_left_out() {
        let mut c = config();
        c.fs.clear();
        c.disks.clear();
        c.vsock = None;
        let json = serde_json::to_value(&c).expect("serialize");
        let keys: Vec<_> = json.as_object().expect("object").keys().cloned().collect();
        assert_eq!(keys, ["console", "cpus", "memory", "payload", "serial"]);
    }

    #[test]
    fn round_trips_and_rejects_unknown_fields() {
        let text = serde_json::to_string(&config()).expect("serialize");
        let back: VmConfig = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, config());
        let typo = text.replace("\"initramfs\"", "\"initrd\"");
        assert!(serde_json::from_str::<VmConfig>(&typo).is_err());
        let lower = text.replace("\"Tty\"", "\"tty\"");
        assert!(
            serde_json::from_str::<VmConfig>(&lower).is_err(),
            "enums are case-sensitive"
        );
    }

    #[test]
    fn validation_mirrors_cloud_hypervisor_boot_checks() {
        assert_eq!(config().validate(), Ok(()));

        let mut c = config();
        c.memory.shared = false;
        assert_eq!(
            c.validate(),
            Err(ConfigError::SharedMemoryRequired { index: 0 })
        );

        for cid in RESERVED_CIDS {
            let mut c = config();
            if let Some(v) = c.vsock.as_mut() {
                v.cid = cid;
            }
            assert_eq!(c.validate(), Err(ConfigError::ReservedCid { cid }));
        }

        let mut c = config();
        c.disks[0].id = "fs0".into();
        assert!(matches!(c.validate(), Err(ConfigError::BadDeviceId { .. })));
        let mut c = config();
        c.disks[0].id = "__scratch".into();
        assert!(matches!(c.validate(), Err(ConfigError::BadDeviceId { .. })));

        let mut c = config();
        c.fs[0].queue_size = 1000;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid {
                field: "fs.queue_size",
                ..
            })
        ));
        let mut c = config();
        c.fs[0].num_queues = 3;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid {
                field: "fs.num_queues",
                ..
            })
        ));

        let mut c = config();
        c.serial = ConsoleConfig::mode(ConsoleMode::File);
        assert_eq!(
            c.validate(),
            Err(ConfigError::ConsoleFile { field: "serial" })
        );
        c.serial.file = Some("/run/serial.log".into());
        assert_eq!(c.validate(), Ok(()));
    }
}
