//! Matching a request's constraints against what this host offers, which decides the shape
//! of its VM. An unsatisfiable constraint is the client's `FAILED_PRECONDITION`.

use crate::request::BuildRequest;

/// The path that asks for nested virtualization.
pub const DEV_KVM: &str = "/dev/kvm";

const MIB: u64 = 1024 * 1024;

/// What the operator lets builds have on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostOffer {
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
}

impl Default for HostOffer {
    fn default() -> Self {
        Self {
            systems: vec!["x86_64-linux".into()],
            default_memory_mib: 512,
            max_memory_mib: 8192,
            nested_virtualization: false,
            allowed_ro_paths: Vec::new(),
        }
    }
}

/// The VM a request gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmShape {
    pub memory_mib: u32,
    pub nested_virtualization: bool,
    /// Host paths to share read-only (at the same path in the guest).
    pub ro_paths: Vec<String>,
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
}

impl HostOffer {
    pub fn shape_for(&self, req: &BuildRequest) -> Result<VmShape, Unsatisfiable> {
        let c = &req.constraints;
        if !self.systems.contains(&c.system) {
            return Err(Unsatisfiable::System {
                system: c.system.clone(),
                offered: self.systems.clone(),
            });
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
        Ok(VmShape {
            memory_mib,
            nested_virtualization,
            ro_paths,
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
        let offer = HostOffer::default();
        assert_eq!(
            offer
                .shape_for(&req("x86_64-linux", 0, &[]))
                .unwrap()
                .memory_mib,
            512
        );
        let s = offer
            .shape_for(&req("x86_64-linux", 1024 * MIB + 1, &[]))
            .unwrap();
        assert_eq!(s.memory_mib, 1025);
        assert!(!s.nested_virtualization);
    }

    #[test]
    fn unknown_system_is_unsatisfiable() {
        let e = HostOffer::default()
            .shape_for(&req("aarch64-linux", 0, &[]))
            .unwrap_err();
        assert!(matches!(e, Unsatisfiable::System { .. }));
        assert!(e.to_string().contains("aarch64-linux"));
    }

    #[test]
    fn too_much_memory_is_unsatisfiable() {
        let offer = HostOffer::default();
        for m in [8193 * MIB, u64::MAX] {
            assert!(matches!(
                offer.shape_for(&req("x86_64-linux", m, &[])),
                Err(Unsatisfiable::Memory { .. })
            ));
        }
    }

    #[test]
    fn dev_kvm_needs_the_operator_to_offer_it() {
        let mut offer = HostOffer::default();
        let r = req("x86_64-linux", 0, &[DEV_KVM]);
        assert_eq!(
            offer.shape_for(&r),
            Err(Unsatisfiable::NestedVirtualization {
                path: DEV_KVM.into()
            })
        );
        offer.nested_virtualization = true;
        assert!(offer.shape_for(&r).unwrap().nested_virtualization);
    }

    #[test]
    fn other_paths_are_denied_unless_allowed() {
        let mut offer = HostOffer::default();
        let r = req("x86_64-linux", 0, &["/etc/ssl/certs"]);
        assert!(matches!(
            offer.shape_for(&r),
            Err(Unsatisfiable::RoPath { .. })
        ));
        offer.allowed_ro_paths.push("/etc/ssl/certs".into());
        assert_eq!(offer.shape_for(&r).unwrap().ro_paths, ["/etc/ssl/certs"]);
    }
}
