//! The cloud-hypervisor backend, driven through its REST API.

pub mod api;
pub mod config;
pub mod events;
