//! One BuildRequest -> one microVM -> one Build.

pub mod admission;
pub mod constraints;
pub mod job;
pub mod runtime_dir;
