//! Starting the build command, and the one reaper that owns `waitpid(-1)`.
//!
//! The child is forked by hand rather than with `std::process::Command` because the order
//! matters and std's is different: join the cgroup, chroot, chdir, drop privileges, exec. A
//! failing step is reported back over a close-on-exec pipe as (step, errno), so the host
//! learns exactly what went wrong.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// The steps of the child between fork and exec, in order.
const STEPS: [&str; 9] = [
    "setsid",
    "join cgroup",
    "stdio",
    "chroot",
    "chdir",
    "setgroups",
    "setgid",
    "setuid",
    "exec",
];

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{what}")]
    Setup {
        what: &'static str,
        #[source]
        source: Errno,
    },
    #[error("start {program}: {step}")]
    Child {
        step: &'static str,
        program: String,
        #[source]
        source: Errno,
    },
}

/// Everything the child needs, prepared before the fork so the child only makes syscalls.
pub struct Command<'a> {
    pub argv: &'a [CString],
    pub env: &'a [CString],
    pub root: CString,
    pub working_dir: CString,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_procs: BorrowedFd<'a>,
}

/// A started command.
pub struct Child {
    pub pid: Pid,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub started: Instant,
}

fn setup(what: &'static str) -> impl FnOnce(Errno) -> ExecError {
    move |source| ExecError::Setup { what, source }
}

/// Forks and execs `cmd` with stdin = /dev/null and stdout/stderr to fresh pipes.
pub fn spawn(cmd: &Command) -> Result<Child, ExecError> {
    use nix::fcntl::OFlag;
    let devnull = nix::fcntl::open(
        "/dev/null",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(setup("open /dev/null"))?;
    let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(setup("pipe"))?;
    let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(setup("pipe"))?;
    let (report_r, report_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(setup("pipe"))?;

    let mut argv: Vec<*const libc::c_char> = cmd.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = cmd.env.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    let program = cmd.argv.first().map(|a| a.as_c_str()).unwrap_or(c"");
    let fds = ChildFds {
        stdin: devnull.as_raw_fd(),
        stdout: out_w.as_raw_fd(),
        stderr: err_w.as_raw_fd(),
        report: report_w.as_raw_fd(),
        cgroup_procs: cmd.cgroup_procs.as_raw_fd(),
    };

    let started = Instant::now();
    // SAFETY: the agent is single-threaded, so the child is a complete copy of its only
    // thread; the child branch below only makes raw syscalls and ends in exec or _exit.
    match unsafe { nix::unistd::fork() }.map_err(setup("fork"))? {
        nix::unistd::ForkResult::Child => {
            // SAFETY: argv and envp are NULL-terminated arrays of pointers into CStrings that
            // the parent's frame keeps alive; the child's copy of the memory has them too.
            unsafe { child(cmd, program, &argv, &envp, &fds) }
        }
        nix::unistd::ForkResult::Parent { child: pid } => {
            crate::trace::mark("forked");
            drop((devnull, out_w, err_w, report_w));
            match read_report(&report_r) {
                None => Ok(Child {
                    pid,
                    stdout: out_r,
                    stderr: err_r,
                    started,
                }),
                // The child has _exit()ed; the reaper collects it.
                Some((step, errno)) => Err(ExecError::Child {
                    step,
                    program: String::from_utf8_lossy(program.to_bytes()).into_owned(),
                    source: errno,
                }),
            }
        }
    }
}

struct ChildFds {
    stdin: i32,
    stdout: i32,
    stderr: i32,
    report: i32,
    cgroup_procs: i32,
}

/// Reads the child's (step, errno) report; `None` means the pipe closed on a successful exec.
fn read_report(fd: &OwnedFd) -> Option<(&'static str, Errno)> {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(fd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Some(("read the exec report", e)),
        }
    }
    if got == 0 {
        return None;
    }
    let step = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
    Some((
        STEPS.get(step).copied().unwrap_or("unknown step"),
        Errno::from_raw(errno),
    ))
}

/// The forked child. Never returns.
///
/// # Safety
/// Must only be called in a freshly forked child of a single-threaded process; `argv` and
/// `envp` must be NULL-terminated arrays of valid C strings.
unsafe fn child(
    cmd: &Command,
    program: &CStr,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    fds: &ChildFds,
) -> ! {
    let fail = |step: usize| -> ! {
        let errno = Errno::last_raw();
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&(step as u32).to_ne_bytes());
        buf[4..].copy_from_slice(&errno.to_ne_bytes());
        // SAFETY: plain syscalls on descriptors this process owns; _exit never returns.
        unsafe {
            libc::write(fds.report, buf.as_ptr().cast(), buf.len());
            libc::_exit(127)
        }
    };
    // SAFETY: each call is a raw syscall on descriptors and C strings that stay valid until
    // exec; none of them allocates or takes a lock.
    unsafe {
        if libc::setsid() < 0 {
            fail(0);
        }
        if libc::write(fds.cgroup_procs, b"0".as_ptr().cast(), 1) != 1 {
            fail(1);
        }
        if libc::dup2(fds.stdin, 0) < 0
            || libc::dup2(fds.stdout, 1) < 0
            || libc::dup2(fds.stderr, 2) < 0
        {
            fail(2);
        }
        if libc::chroot(cmd.root.as_ptr()) < 0 {
            fail(3);
        }
        if libc::chdir(cmd.working_dir.as_ptr()) < 0 {
            fail(4);
        }
        if libc::setgroups(0, std::ptr::null()) < 0 {
            fail(5);
        }
        if libc::setgid(cmd.gid) < 0 {
            fail(6);
        }
        if libc::setuid(cmd.uid) < 0 {
            fail(7);
        }
        // The agent blocks SIGCHLD for its signalfd and Rust ignores SIGPIPE; both would be
        // inherited across exec.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::umask(0o022);
        libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
        fail(8)
    }
}

/// The only caller of `waitpid`: reaps every child (orphans of the build are re-parented to
/// PID 1) and keeps the status of the one it was asked to watch.
pub struct Reaper {
    sfd: SignalFd,
    watched: Option<Pid>,
    status: Option<(WaitStatus, Instant)>,
}

/// Blocks SIGCHLD so that it only arrives through the signalfd; call before forking.
pub fn block_sigchld() -> Result<SigSet, ExecError> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.thread_block().map_err(setup("block SIGCHLD"))?;
    Ok(set)
}

impl Reaper {
    pub fn new() -> Result<Self, ExecError> {
        let set = block_sigchld()?;
        let sfd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(setup("signalfd"))?;
        Ok(Self {
            sfd,
            watched: None,
            status: None,
        })
    }

    /// Readable when children may have exited.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sfd.as_fd()
    }

    /// Keep the status of `pid` when it exits.
    pub fn watch(&mut self, pid: Pid) {
        self.watched = Some(pid);
    }

    /// The watched child's final status and when it was reaped.
    pub fn status(&self) -> Option<(WaitStatus, Instant)> {
        self.status
    }

    /// Drains the signalfd and reaps every exited child.
    pub fn reap(&mut self) {
        while let Ok(Some(_)) = self.sfd.read_signal() {}
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(st) => {
                    let done = matches!(st, WaitStatus::Exited(..) | WaitStatus::Signaled(..));
                    if done && st.pid().is_some() && st.pid() == self.watched {
                        self.status = Some((st, Instant::now()));
                    }
                }
            }
        }
    }
}
