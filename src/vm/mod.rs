//! VMM backends and what every VM needs: kernel command line, initrd, host-side vsock.

pub mod cloud_hypervisor;
