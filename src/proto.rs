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
    }
}

/// `tvix.build.v1` (the seed layout)
pub use tvix::build::v1 as build;
/// `tvix.castore.v1`
pub use tvix::castore::v1 as castore;

/// The file descriptor set of every proto above, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tvix_build_vm_descriptor.bin"));
