//! Starting the build command, and the one reaper that owns `waitpid(-1)`.
//!
//! The child is started by hand rather than with `std::process::Command` because the order
//! matters and std's is different: join the cgroup, chroot, chdir, drop privileges, exec. A
//! failing step is reported back over a close-on-exec pipe as (step, errno), so the host
//! learns exactly what went wrong.
//!
//! The child shares the agent's memory until it execs (`CLONE_VM | CLONE_VFORK`, as
//! `posix_spawn` does) instead of getting a copy of it: under TCG, copying the page tables
//! and then taking the copy-on-write faults on both sides costs milliseconds.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
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

/// The stack the child runs on until it execs; it only makes syscalls.
const CHILD_STACK_BYTES: usize = 64 * 1024;

/// What the child needs, passed through `clone`'s argument pointer.
struct ChildArgs<'a> {
    cmd: &'a Command<'a>,
    program: &'a CStr,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    fds: &'a ChildFds,
}

extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` in `spawn`'s frame, which stays alive while the
    // parent is suspended (CLONE_VFORK), i.e. until this child has exec'd or exited.
    let args = unsafe { &*(arg as *const ChildArgs) };
    // SAFETY: a fresh child of a single-threaded process that shares its memory while the
    // parent waits; argv and envp are NULL-terminated arrays of pointers into CStrings that
    // the parent's frame keeps alive.
    unsafe { child(args.cmd, args.program, args.argv, args.envp, args.fds) }
}

/// Starts `cmd` with stdin = /dev/null and stdout/stderr to fresh pipes.
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

    let args = ChildArgs {
        cmd,
        program,
        argv: &argv,
        envp: &envp,
        fds: &fds,
    };
    // Never read before the child writes it, so it needs no initialising.
    let mut stack: Vec<u8> = Vec::with_capacity(CHILD_STACK_BYTES);
    // The stack grows down from its 16-byte aligned top.
    let top = stack.as_mut_ptr().wrapping_add(CHILD_STACK_BYTES);
    let top = top.wrapping_sub(top as usize % 16);

    // No handler of the agent's may run in the child, which shares its memory: everything is
    // blocked across the clone, and the child unblocks only right before it execs.
    let all = SigSet::all();
    let mut before = SigSet::empty();
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&all), Some(&mut before))
        .map_err(setup("block signals"))?;
    let started = Instant::now();
    // SAFETY: `child_entry` runs on its own stack `stack` with a pointer to `args`; both
    // outlive the child's use of them because CLONE_VFORK suspends this thread until the
    // child has exec'd or exited. The child only makes syscalls (no allocation, no locks).
    let pid = unsafe {
        libc::clone(
            child_entry,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&args as *const ChildArgs).cast_mut().cast(),
        )
    };
    let clone_errno = Errno::last();
    let restored = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&before), None);
    drop(stack);
    if pid < 0 {
        return Err(ExecError::Setup {
            what: "clone",
            source: clone_errno,
        });
    }
    let pid = Pid::from_raw(pid);
    drop((devnull, out_w, err_w, report_w));
    let report = read_report(&report_r);
    restored.map_err(setup("restore the signal mask"))?;
    match report {
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

/// The child. Never returns.
///
/// # Safety
/// Must only be called in a fresh child of a single-threaded process, which may share the
/// parent's memory while the parent waits; `argv` and `envp` must be NULL-terminated arrays
/// of valid C strings.
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
        // The bare syscalls: glibc's wrappers may coordinate with other threads of the
        // process, and this child shares the agent's memory.
        let no_groups: *const libc::gid_t = std::ptr::null();
        if libc::syscall(libc::SYS_setgroups, 0 as libc::c_long, no_groups) < 0 {
            fail(5);
        }
        if libc::syscall(libc::SYS_setgid, libc::c_long::from(cmd.gid)) < 0 {
            fail(6);
        }
        if libc::syscall(libc::SYS_setuid, libc::c_long::from(cmd.uid)) < 0 {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A command the way the agent starts one, as root in "/" (chroot needs CAP_SYS_CHROOT),
    /// joining a "cgroup" that is a pipe, so that the test needs no cgroup of its own.
    fn run(argv: &[&CStr]) -> (Result<Child, ExecError>, OwnedFd) {
        let argv: Vec<CString> = argv.iter().map(|a| (*a).to_owned()).collect();
        let (procs_r, procs_w) = nix::unistd::pipe().unwrap();
        let cmd = Command {
            argv: &argv,
            env: &[c"A=b".to_owned()],
            root: c"/".to_owned(),
            working_dir: c"/tmp".to_owned(),
            uid: 0,
            gid: 0,
            cgroup_procs: procs_w.as_fd(),
        };
        (spawn(&cmd), procs_r)
    }

    /// A test that cannot run must fail, not pass having tested nothing.
    fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "chroot in the child needs root: run the tests as root (CI does)"
        );
    }

    #[test]
    fn the_child_joins_the_cgroup_gets_its_env_and_cwd_and_exits() {
        require_root();
        let (child, procs) = run(&[c"/bin/sh", c"-c", c"echo \"$A $(pwd)\"; exit 3"]);
        let child = child.unwrap();
        let status = waitpid(child.pid, None).unwrap();
        assert_eq!(status, WaitStatus::Exited(child.pid, 3));
        let mut out = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(child.stdout), &mut out).unwrap();
        assert_eq!(out, "b /tmp\n");
        let mut joined = [0u8; 8];
        assert_eq!(nix::unistd::read(&procs, &mut joined), Ok(1));
        assert_eq!(joined[0], b'0');
    }

    #[test]
    fn a_failed_exec_is_reported_with_its_step_and_errno() {
        require_root();
        let (child, _procs) = run(&[c"/nonexistent/program"]);
        match child {
            Err(ExecError::Child {
                step: "exec",
                program,
                source: Errno::ENOENT,
            }) => assert_eq!(program, "/nonexistent/program"),
            Err(e) => panic!("{e:?}"),
            Ok(c) => panic!("started as {}", c.pid),
        }
    }
}
