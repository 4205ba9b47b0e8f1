//! The guest agent: PID 1 of every build VM. It mounts the basics, dials the host over vsock,
//! runs one build in a Nix-like sandbox, streams its logs and outputs, and powers off.

mod agent;
mod cgroup;
mod cmdline;
mod conn;
mod error;
mod exec;
mod job;
mod logs;
mod net;
mod outputs;
mod paths;
mod sandbox;
mod stage;
mod staged;
mod sys;
mod trace;
mod users;
mod vsock;

fn main() {
    let agent_start_us = sys::boottime_us();
    // Powering off is only right for the init of a build VM, never for a host that ran this
    // binary by mistake.
    if std::process::id() != 1 {
        eprintln!("tvix-build-vm-agent: this is the init of a build VM and must run as PID 1");
        std::process::exit(2);
    }
    agent::install_panic_hook();
    // Modes given to mkdir/mknod/open are meant exactly; the build gets 022 back.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    agent::run(agent_start_us)
}
