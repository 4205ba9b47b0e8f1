//! One host policy: what a request may have on this host (its system, memory, /dev/kvm,
//! read-only host paths, network, /bin/sh), decided once per request, before it waits for
//! a VM slot. The runner is handed the [`Decision`] and boots the VM it describes; an
//! unsatisfiable constraint is the client's `FAILED_PRECONDITION`.

use crate::request::BuildRequest;

/// The path that asks for nested virtualization.
pub const DEV_KVM: &str = "/dev/kvm";

const MIB: u64 = 1024 * 1024;

/// What the operator lets builds have on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPolicy {
    /// Systems this host builds, e.g. `x86_64-linux`.
    pub systems: Vec<String>,
    /// Guest memory when the request asks for less, in MiB.
    pub default_memory_mib: u32,
    /// The most guest memory one build may have, in MiB.
    pub max_memory_mib: u32,
    /// Whether `/dev/kvm` may be requested (nested virtualization is possible and allowed).
    pub nested_virtualization: bool,
    /// Host paths other than /dev/kvm a request may ask for, shared read-only. Deny by default.
    pub allowed_ro_paths: Vec<String>,
    /// Whether `constraints.network_access` may be granted.
    pub network: bool,
    /// Whether a static shell is in the initrd, so `constraints.provide_bin_sh` may be
    /// granted (the assembly sets it from the shell it packs).
    pub bin_sh: bool,
}

impl Default for HostPolicy {
    fn default() -> Self {
        Self {
            systems: vec!["x86_64-linux".into()],
            default_memory_mib: 512,
            max_memory_mib: 8192,
            nested_virtualization: false,
            allowed_ro_paths: Vec::new(),
            network: false,
            bin_sh: false,
        }
    }
}

/// What a VM is booted with. A pooled VM serves only requests that need exactly this.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootShape {
    pub memory_mib: u32,
    pub nested_virtualization: bool,
    pub network: bool,
    /// Host directories shared read-only, each at its own path, in this order (their tags
    /// are `ro_share_tag`s of their positions).
    pub ro_paths: Vec<String>,
}

/// What one request gets on this host. Only [`HostPolicy::decide`] makes one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    shape: BootShape,
    bin_sh: bool,
}

impl Decision {
    /// The VM the request runs in.
    pub fn shape(&self) -> &BootShape {
        &self.shape
    }

    /// Whether the build gets /bin/sh.
    pub fn bin_sh(&self) -> bool {
        self.bin_sh
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Unsatisfiable {
    #[error("constraints.system {system:?} is not built on this host (it builds {offered:?})")]
    System {
        system: String,
        offered: Vec<String>,
    },
    #[error("constraints.min_memory {requested} bytes exceeds this host's limit of {max_mib} MiB")]
    Memory { requested: u64, max_mib: u32 },
    #[error("constraints.available_ro_paths {path:?}: nested virtualization is not offered on this host")]
    NestedVirtualization { path: String },
    #[error("constraints.available_ro_paths {path:?} is not allowed on this host")]
    RoPath { path: String },
    #[error("constraints.network_access: this host gives builds no network")]
    Network,
    #[error("constraints.provide_bin_sh: this host has no static shell configured (--bin-sh)")]
    BinSh,
}

impl HostPolicy {
    /// The shape of the VMs booted before their request (the pool's): the default memory,
    /// nothing else.
    pub fn default_shape(&self) -> BootShape {
        BootShape {
            memory_mib: self.default_memory_mib,
            nested_virtualization: false,
            network: false,
            ro_paths: Vec::new(),
        }
    }

    /// Everything `req` asks of this host, granted or refused at once.
    pub fn decide(&self, req: &BuildRequest) -> Result<Decision, Unsatisfiable> {
        let c = &req.constraints;
        if !self.systems.contains(&c.system) {
            return Err(Unsatisfiable::System {
                system: c.system.clone(),
                offered: self.systems.clone(),
            });
        }
        if c.network_access && !self.network {
            return Err(Unsatisfiable::Network);
        }
        if c.provide_bin_sh && !self.bin_sh {
            return Err(Unsatisfiable::BinSh);
        }

        let too_much = || Unsatisfiable::Memory {
            requested: c.min_memory,
            max_mib: self.max_memory_mib,
        };
        // Round up to whole MiB; anything that does not fit u32 MiB is over any limit.
        let requested_mib = u32::try_from(c.min_memory.div_ceil(MIB)).map_err(|_| too_much())?;
        if requested_mib > self.max_memory_mib {
            return Err(too_much());
        }
        let memory_mib = requested_mib.max(self.default_memory_mib);

        let mut nested_virtualization = false;
        let mut ro_paths = Vec::new();
        for path in &c.available_ro_paths {
            if path == DEV_KVM {
                if !self.nested_virtualization {
                    return Err(Unsatisfiable::NestedVirtualization { path: path.clone() });
                }
                nested_virtualization = true;
            } else if self.allowed_ro_paths.contains(path) {
                ro_paths.push(path.clone());
            } else {
                return Err(Unsatisfiable::RoPath { path: path.clone() });
            }
        }
        Ok(Decision {
            shape: BootShape {
                memory_mib,
                nested_virtualization,
                network: c.network_access,
                ro_paths,
            },
            bin_sh: c.provide_bin_sh,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::RawRequest;

    fn req(system: &str, min_memory: u64, ro: &[&str]) -> BuildRequest {
        let mut raw = RawRequest {
            command_args: vec!["/bin/true".into()],
            working_dir: "build".into(),
            scratch_paths: vec!["build".into(), "nix/store".into()],
            inputs_dir: "nix/store".into(),
            ..Default::default()
        };
        raw.constraints.system = system.into();
        raw.constraints.min_memory = min_memory;
        raw.constraints.available_ro_paths = ro.iter().map(|s| s.to_string()).collect();
        raw.validate().unwrap()
    }

    #[test]
    fn default_memory_and_rounding() {
        let offer = HostPolicy::default();
        assert_eq!(
            offer
                .decide(&req("x86_64-linux", 0, &[]))
                .unwrap()
                .shape()
                .memory_mib,
            512
        );
        let d = offer
            .decide(&req("x86_64-linux", 1024 * MIB + 1, &[]))
            .unwrap();
        assert_eq!(d.shape().memory_mib, 1025);
        assert!(!d.shape().nested_virtualization);
        assert!(!d.shape().network && !d.bin_sh());
    }

    #[test]
    fn unknown_system_is_unsatisfiable() {
        let e = HostPolicy::default()
            .decide(&req("aarch64-linux", 0, &[]))
            .unwrap_err();
        assert!(matches!(e, Unsatisfiable::System { .. }));
        assert!(e.to_string().contains("aarch64-linux"));
    }

    #[test]
    fn too_much_memory_is_unsatisfiable() {
        let offer = HostPolicy::default();
        for m in [8193 * MIB, u64::MAX] {
            assert!(matches!(
                offer.decide(&req("x86_64-linux", m, &[])),
                Err(Unsatisfiable::Memory { .. })
            ));
        }
    }

    #[test]
    fn dev_kvm_needs_the_operator_to_offer_it() {
        let mut offer = HostPolicy::default();
        let r = req("x86_64-linux", 0, &[DEV_KVM]);
        assert_eq!(
            offer.decide(&r),
            Err(Unsatisfiable::NestedVirtualization {
                path: DEV_KVM.into()
            })
        );
        offer.nested_virtualization = true;
        assert!(offer.decide(&r).unwrap().shape().nested_virtualization);
    }

    #[test]
    fn other_paths_are_denied_unless_allowed() {
        let mut offer = HostPolicy::default();
        let r = req("x86_64-linux", 0, &["/etc/ssl/certs"]);
        assert!(matches!(
            offer.decide(&r),
            Err(Unsatisfiable::RoPath { .. })
        ));
        offer.allowed_ro_paths.push("/etc/ssl/certs".into());
        assert_eq!(
            offer.decide(&r).unwrap().shape().ro_paths,
            ["/etc/ssl/certs"]
        );
    }

    #[test]
    fn network_and_bin_sh_need_the_operator_to_offer_them() {
        let mut offer = HostPolicy::default();
        let mut r = req("x86_64-linux", 0, &[]);
        r.constraints.network_access = true;
        assert_eq!(offer.decide(&r), Err(Unsatisfiable::Network));
        offer.network = true;
        assert!(offer.decide(&r).unwrap().shape().network);
        r.constraints.provide_bin_sh = true;
        assert_eq!(offer.decide(&r), Err(Unsatisfiable::BinSh));
        offer.bin_sh = true;
        assert!(offer.decide(&r).unwrap().bin_sh());
    }

    #[test]
    fn the_default_shape_is_what_a_plain_request_gets() {
        let offer = HostPolicy::default();
        let d = offer.decide(&req("x86_64-linux", 0, &[])).unwrap();
        assert_eq!(*d.shape(), offer.default_shape());
    }
}
