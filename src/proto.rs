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
            }
        }
    }
}

/// `tvix.build.v1` in the 2024 tvix layout (served with `serve --protocol tvix-2024`). Same
/// package and field numbers as [`build`] with different types, hence a module of its own.
pub mod build_2024 {
    include!(concat!(env!("OUT_DIR"), "/tvix2024/tvix.build.v1.rs"));

    /// The file descriptor set of the 2024 layout (with the castore protos it imports).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/tvix2024/descriptor.bin"));
}

/// `tvix.build.v1` (the seed layout)
pub use tvix::build::v1 as build;
/// `tvix.build.vm.v1`: this project's streaming build service.
pub use tvix::build::vm::v1 as build_vm;
/// `tvix.castore.v1`
pub use tvix::castore::v1 as castore;

/// The file descriptor set of every proto above, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tvix_build_vm_descriptor.bin"));
