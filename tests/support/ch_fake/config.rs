//! `vm.create` bodies as the contract defines them (own structs, not the crate's, so a wrong
//! field name or enum case in the crate fails here), and the validation cloud-hypervisor does
//! at `vm.boot`.

use super::api::api_error;
use super::http::Reply;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct VmConfig {
    pub(super) payload: Payload,
    #[serde(default)]
    pub(super) cpus: Option<Cpus>,
    #[serde(default)]
    pub(super) memory: Option<Memory>,
    #[serde(default)]
    pub(super) fs: Option<Vec<Fs>>,
    #[serde(default)]
    pub(super) vsock: Option<Vsock>,
    #[serde(default)]
    pub(super) disks: Option<Vec<Disk>>,
    #[serde(default)]
    pub(super) net: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub(super) serial: Option<Console>,
    #[serde(default)]
    pub(super) console: Option<Console>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Payload {
    #[serde(default)]
    pub(super) kernel: Option<PathBuf>,
    #[serde(default)]
    pub(super) firmware: Option<PathBuf>,
    #[serde(default)]
    pub(super) initramfs: Option<PathBuf>,
    #[serde(default)]
    pub(super) cmdline: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Cpus {
    pub(super) boot_vcpus: u32,
    pub(super) max_vcpus: u32,
    #[serde(default = "yes")]
    pub(super) nested: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Memory {
    pub(super) size: u64,
    #[serde(default)]
    pub(super) shared: bool,
    #[serde(default)]
    pub(super) hugepages: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Fs {
    pub(super) tag: String,
    pub(super) socket: PathBuf,
    #[serde(default = "one")]
    pub(super) num_queues: u32,
    #[serde(default = "queue_1024")]
    pub(super) queue_size: u16,
    #[serde(default)]
    pub(super) id: Option<String>,
}

fn one() -> u32 {
    1
}

fn queue_1024() -> u16 {
    1024
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Vsock {
    pub(super) cid: u32,
    pub(super) socket: PathBuf,
    #[serde(default)]
    pub(super) id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Disk {
    pub(super) path: PathBuf,
    #[serde(default)]
    pub(super) readonly: bool,
    #[serde(default)]
    pub(super) image_type: Option<ImageType>,
    #[serde(default)]
    pub(super) id: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub(super) enum ImageType {
    Raw,
    Qcow2,
    FixedVhd,
    Vhdx,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Console {
    pub(super) mode: Mode,
    #[serde(default)]
    pub(super) file: Option<PathBuf>,
    #[serde(default)]
    pub(super) socket: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(super) enum Mode {
    Off,
    Pty,
    Tty,
    File,
    Socket,
    Null,
}

/// cloud-hypervisor's boot-time validation, for the fields the contract names.
pub(super) fn validate(config: &VmConfig) -> Result<(), Reply> {
    let invalid =
        |why: &str| api_error(400, &["Error booting VM", "Invalid VM configuration", why]);
    let p = &config.payload;
    match (&p.kernel, &p.firmware) {
        (Some(_), Some(_)) => return Err(invalid("Both kernel and firmware given")),
        (None, None) => return Err(invalid("No kernel or firmware given")),
        _ => {}
    }
    for path in p.kernel.iter().chain(&p.initramfs) {
        if !path.is_file() {
            return Err(api_error(
                500,
                &[
                    "Error booting VM",
                    &format!("Cannot open {}", path.display()),
                ],
            ));
        }
    }
    let boot_vcpus = config.cpus.as_ref().map_or(1, |c| c.boot_vcpus);
    if let Some(cpus) = &config.cpus {
        if cpus.boot_vcpus == 0 || cpus.max_vcpus < cpus.boot_vcpus {
            return Err(invalid("Max vCPUs lower than boot vCPUs"));
        }
    }
    let shared_memory = config
        .memory
        .as_ref()
        .is_some_and(|m| m.shared || m.hugepages);
    let mut ids = BTreeSet::new();
    let mut id = |id: &Option<String>| -> Result<(), Reply> {
        if let Some(id) = id {
            if id.starts_with("__") {
                return Err(invalid(&format!("Identifier {id} is not valid")));
            }
            if !ids.insert(id.clone()) {
                return Err(api_error(
                    409,
                    &[
                        "Error booting VM",
                        "Invalid VM configuration",
                        &format!("Identifier {id} is not unique"),
                    ],
                ));
            }
        }
        Ok(())
    };
    for fs in config.fs.iter().flatten() {
        if !shared_memory {
            return Err(invalid(
                "Using vhost-user requires using shared memory or huge pages",
            ));
        }
        if fs.num_queues == 0 || fs.num_queues > boot_vcpus {
            return Err(invalid(
                "Number of queues to virtio_fs greater than number of vCPUs",
            ));
        }
        if !fs.queue_size.is_power_of_two() {
            return Err(invalid("Queue size is not a power of two"));
        }
        id(&fs.id)?;
    }
    if let Some(vsock) = &config.vsock {
        if [0, 1, 2, u32::MAX].contains(&vsock.cid) {
            return Err(invalid(&format!("{} is a special VSOCK CID", vsock.cid)));
        }
        id(&vsock.id)?;
    }
    for disk in config.disks.iter().flatten() {
        id(&disk.id)?;
    }
    for console in config.serial.iter().chain(&config.console) {
        if console.mode == Mode::File && console.file.is_none() {
            return Err(invalid("Path missing when using file console mode"));
        }
        if console.mode == Mode::Socket && console.socket.is_none() {
            return Err(invalid("Path missing when using socket console mode"));
        }
    }
    Ok(())
}
