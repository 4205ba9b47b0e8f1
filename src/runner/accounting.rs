//! What one build cost, measured: the guest's own figures (bounded, see
//! [`crate::agent::usage`]) beside the host's (the VM's processes' CPU time, what the
//! inputs' daemon served, what the outputs held).

use crate::agent::GuestUsage;
use crate::fs::stats::InputReads;
use std::time::Duration;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Accounting {
    /// The guest's word on its build cgroup.
    pub guest: GuestUsage,
    /// CPU time of the VM's processes on the host (VMM and helpers), boot included.
    pub host_cpu: Duration,
    /// What the inputs' virtio-fs daemon served (`None` if its counters could not be read).
    pub input_reads: Option<InputReads>,
    /// The sum of the outputs' file sizes, as the host received them.
    pub output_bytes: u64,
}
