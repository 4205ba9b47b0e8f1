//! Generated protobuf types and services, and their proto3 JSON mapping (pbjson).
//!
//! The modules nest like the proto packages, because generated code refers across packages
//! by relative paths; [`castore`] and [`build`] are the short names to use.

#![allow(clippy::all, missing_docs)]

pub mod tvix {
    pub mod castore {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/tvix.castore.v1.rs"));
            include!(concat!(env!("OUT_DIR"), "/tvix.castore.v1.serde.rs"));
        }
    }
    pub mod build {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/tvix.build.v1.rs"));
            include!(concat!(env!("OUT_DIR"), "/tvix.build.v1.serde.rs"));
        }
        pub mod vm {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/tvix.build.vm.v1.rs"));
                include!(concat!(env!("OUT_DIR"), "/tvix.build.vm.v1.serde.rs"));
            }
        }
    }
}

/// snix's packages: `snix.castore.v1` (wire-identical to `tvix.castore.v1`, with `Entry` for
/// `Node`) and `snix.build.v1` (the 2024 request layout, snix's `BuildResponse`).
pub mod snix {
    pub mod castore {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/snix.castore.v1.rs"));
            include!(concat!(env!("OUT_DIR"), "/snix.castore.v1.serde.rs"));
        }
    }
    pub mod build {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/snix.build.v1.rs"));
            include!(concat!(env!("OUT_DIR"), "/snix.build.v1.serde.rs"));
        }
    }
}

/// `tvix.build.v1` in the 2024 tvix layout (served with `serve --protocol tvix-2024`). Same
/// package and field numbers as [`build`] with different types, hence a module of its own.
pub mod build_2024 {
    include!(concat!(env!("OUT_DIR"), "/tvix2024/tvix.build.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/tvix2024/tvix.build.v1.serde.rs"));

    /// The file descriptor set of the 2024 layout (with the castore protos it imports).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/tvix2024/descriptor.bin"));
}

/// This project's own store services (`tvixbuildvm.store.v1`: pins).
pub mod tvixbuildvm {
    pub mod store {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/tvixbuildvm.store.v1.rs"));
        }
    }
}

/// `snix.build.v1`
pub use snix::build::v1 as snix_build;
/// `snix.castore.v1`
pub use snix::castore::v1 as snix_castore;
/// `tvix.build.v1` (the seed layout)
pub use tvix::build::v1 as build;
/// `tvix.build.vm.v1`: this project's streaming build service.
pub use tvix::build::vm::v1 as build_vm;
/// `tvix.castore.v1`
pub use tvix::castore::v1 as castore;
/// `tvixbuildvm.store.v1`: pins on a running serve's embedded store.
pub use tvixbuildvm::store::v1 as pins;

/// The file descriptor set of every proto above, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tvix_build_vm_descriptor.bin"));

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failure should fail the test")]
mod tests {
    use prost::Message;
    use prost_types::{DescriptorProto, FileDescriptorSet, ServiceDescriptorProto};

    /// A type name in snix's castore package, as tvix names the same message.
    fn as_tvix(name: &str) -> String {
        let name = name.replace(".snix.castore.v1.", ".tvix.castore.v1.");
        let (path, last) = name.rsplit_once('.').unwrap_or(("", &name));
        let last = match last {
            "Entry" => "Node",
            "DirectoryEntry" => "DirectoryNode",
            "FileEntry" => "FileNode",
            "SymlinkEntry" => "SymlinkNode",
            other => other,
        };
        if path.is_empty() {
            last.to_owned()
        } else {
            format!("{path}.{last}")
        }
    }

    /// What decides a message's encoding (oneof names do not), with names mapped by `map`.
    fn render(m: &DescriptorProto, map: &dyn Fn(&str) -> String) -> String {
        let fields: Vec<String> = m
            .field
            .iter()
            .map(|f| {
                format!(
                    "{}:{}:{:?}:{:?}:{}:{:?}",
                    f.number(),
                    f.name(),
                    f.label(),
                    f.r#type(),
                    map(f.type_name()),
                    f.oneof_index
                )
            })
            .collect();
        let nested: Vec<String> = m.nested_type.iter().map(|n| render(n, map)).collect();
        format!("{} {fields:?} {nested:?}", map(m.name()))
    }

    fn render_service(s: &ServiceDescriptorProto, map: &dyn Fn(&str) -> String) -> String {
        let methods: Vec<String> = s
            .method
            .iter()
            .map(|m| {
                format!(
                    "{}({}{}) -> {}{}",
                    m.name(),
                    if m.client_streaming() { "stream " } else { "" },
                    map(m.input_type()),
                    if m.server_streaming() { "stream " } else { "" },
                    map(m.output_type())
                )
            })
            .collect();
        format!("{} {methods:?}", s.name())
    }

    fn package(set: &FileDescriptorSet, pkg: &str, map: &dyn Fn(&str) -> String) -> Vec<String> {
        let mut out: Vec<String> = set
            .file
            .iter()
            .filter(|f| f.package() == pkg)
            .flat_map(|f| {
                let messages = f.message_type.iter().map(|m| render(m, map));
                let services = f.service.iter().map(|s| render_service(s, map));
                messages.chain(services).collect::<Vec<_>>()
            })
            .collect();
        out.sort();
        out
    }

    /// The server answers snix.castore.v1 with the tvix.castore.v1 implementation and the
    /// clients speak either package with the same types: that holds only while the two
    /// packages encode alike.
    #[test]
    fn snix_castore_is_wire_identical_to_tvix_castore() {
        let set = FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let tvix = package(&set, "tvix.castore.v1", &|n: &str| n.to_owned());
        let snix = package(&set, "snix.castore.v1", &as_tvix);
        assert_eq!(tvix.len(), 14, "{tvix:#?}");
        assert_eq!(snix, tvix);
    }
}
