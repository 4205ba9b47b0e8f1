//! One BuildRequest -> one microVM -> one Build.
pub mod runtime_dir;
