//! Ending a cloud-hypervisor VM, whichever way it ends.
//!
//! - Guest power-off: cloud-hypervisor exits 0 by itself; nothing to do.
//! - Guest reboot (or panic with `panic=-1`): cloud-hypervisor would boot the guest again in
//!   the same process. The supervisor task sees `vm/rebooting` in the event monitor and
//!   ends the VMM with `vmm.shutdown`.
//! - Deadline or caller kill: [`Control::stop`]: `vm.shutdown`, then `vmm.shutdown` (a
//!   connection closed instead of a reply counts as success), then SIGKILL if the process
//!   is still there after [`STOP_GRACE`].
//!
//! The VMM is tracked through a pidfd, opened before anyone could reap it: waiting on it
//! does not reap (the [`crate::vm::RunningVm`] owns that), and signalling it cannot hit a
//! recycled pid.

use super::api::ApiClient;
use super::events::EventLog;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;

/// How long the VMM may take to exit after `vmm.shutdown` before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(2);
/// How often the event monitor file is read.
pub const EVENT_POLL: Duration = Duration::from_millis(20);
/// Time limit for the API calls made while stopping.
const STOP_CALL_LIMIT: Duration = Duration::from_secs(2);

/// The VMM process, through a pidfd.
#[derive(Debug)]
pub struct VmmProcess {
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
}

impl VmmProcess {
    /// Opens a pidfd for `pid`, which must be an unreaped child of this process.
    pub fn open(pid: u32) -> std::io::Result<Self> {
        let raw = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let fd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty())?;
        // SAFETY: `fd` is an open pidfd that the AsyncFd takes ownership of: it stays open
        // and refers to the same process until the AsyncFd (and with it the OwnedFd) drops,
        // and OwnedFd::as_raw_fd always returns that same descriptor.
        let pidfd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?;
        Ok(VmmProcess { pid, pidfd })
    }

    /// The pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Resolves once the process has exited (zombie or reaped).
    pub async fn exited(&self) {
        // A pidfd turns readable when its process exits and stays so; readiness is never
        // cleared here, so every later call returns at once. An error cannot undo an exit
        // either: treat it as one rather than wait forever.
        let _ = self.pidfd.readable().await;
    }

    /// Whether it exited within `limit`.
    pub async fn exited_within(&self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.exited()).await.is_ok()
    }

    /// SIGKILL, race-free against pid reuse.
    pub fn kill(&self) -> std::io::Result<()> {
        match rustix::process::pidfd_send_signal(&self.pidfd, rustix::process::Signal::KILL) {
            // Exited already (a zombie cannot be signalled): the goal is reached.
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// How [`Control::stop`] ended the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It had already exited.
    AlreadyGone,
    /// It exited through the API.
    Gracefully,
    /// It had to be killed.
    Killed,
}

/// Stops one VMM. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Control {
    api: ApiClient,
    vmm: Arc<VmmProcess>,
}

impl Control {
    /// Control over `vmm` through `api`.
    pub fn new(api: ApiClient, vmm: VmmProcess) -> Self {
        Control {
            api,
            vmm: Arc::new(vmm),
        }
    }

    /// The API client.
    pub fn api(&self) -> &ApiClient {
        &self.api
    }

    /// The VMM process.
    pub fn vmm(&self) -> &VmmProcess {
        &self.vmm
    }

    /// Ends the VM and the VMM: `vm.shutdown`, `vmm.shutdown`, SIGKILL after [`STOP_GRACE`].
    pub async fn stop(&self) -> Stopped {
        if self.vmm.exited_within(Duration::ZERO).await {
            return Stopped::AlreadyGone;
        }
        // A failure here (the guest is not running any more, say) does not matter:
        // vmm.shutdown follows either way.
        if let Err(e) = with_limit(self.api.shutdown_vm()).await {
            tracing::debug!(pid = self.vmm.pid, error = %e, "vm.shutdown");
        }
        self.shutdown_vmm().await
    }

    /// `vmm.shutdown`, then SIGKILL if the process lingers.
    pub async fn shutdown_vmm(&self) -> Stopped {
        if let Err(e) = with_limit(self.api.shutdown_vmm()).await {
            tracing::debug!(pid = self.vmm.pid, error = %e, "vmm.shutdown");
        }
        if self.vmm.exited_within(STOP_GRACE).await {
            return Stopped::Gracefully;
        }
        tracing::warn!(
            pid = self.vmm.pid,
            "cloud-hypervisor did not exit within {STOP_GRACE:?} of vmm.shutdown: killing it"
        );
        if let Err(e) = self.vmm.kill() {
            tracing::warn!(pid = self.vmm.pid, error = %e, "killing cloud-hypervisor");
        }
        self.vmm.exited_within(STOP_GRACE).await;
        Stopped::Killed
    }
}

async fn with_limit<T>(
    call: impl std::future::Future<Output = Result<T, super::api::ApiError>>,
) -> Result<T, String> {
    match tokio::time::timeout(STOP_CALL_LIMIT, call).await {
        Ok(result) => result.map_err(|e| chain(&e)),
        Err(_) => Err(format!("no answer within {STOP_CALL_LIMIT:?}")),
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Follows the event monitor until the VMM exits; ends the VMM at the guest's first reboot.
pub async fn supervise(control: Control, mut events: EventLog) {
    let mut tick = tokio::time::interval(EVENT_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = control.vmm.exited() => return,
            _ = tick.tick() => {}
        }
        match events.read_new() {
            Ok(list) => {
                if let Some(event) = list.iter().find(|e| e.ends_the_guest()) {
                    tracing::info!(
                        pid = control.vmm.pid,
                        event = %format!("{}/{}", event.source, event.event),
                        "the guest rebooted: ending its single-use VM"
                    );
                    control.shutdown_vmm().await;
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(
                    pid = control.vmm.pid,
                    error = %chain(&e),
                    "cloud-hypervisor's event monitor is unreadable: a guest reboot now ends only at the deadline"
                );
                control.vmm.exited().await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pidfd_sees_the_exit_without_reaping_and_kills_only_its_process() {
        let mut child = tokio::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn");
        let pid = child.id().expect("pid");
        let vmm = VmmProcess::open(pid).expect("pidfd");
        assert!(!vmm.exited_within(Duration::from_millis(50)).await);
        vmm.kill().expect("kill");
        assert!(vmm.exited_within(Duration::from_secs(5)).await);
        // Not reaped by the pidfd: the owner still gets the status.
        let status = child.wait().await.expect("wait");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        // Signalling a reaped process through its pidfd is harmless.
        vmm.kill().expect("kill after exit");
        assert!(vmm.exited_within(Duration::ZERO).await);
    }

    #[tokio::test]
    async fn stop_kills_a_vmm_without_an_api() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = tokio::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn");
        let vmm = VmmProcess::open(child.id().expect("pid")).expect("pidfd");
        let api = ApiClient::new(&dir.path().join("none.sock"), Default::default());
        let control = Control::new(api, vmm);
        assert_eq!(control.stop().await, Stopped::Killed);
        child.wait().await.expect("wait");
        assert_eq!(control.stop().await, Stopped::AlreadyGone);
    }
}
