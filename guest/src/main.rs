//! The guest agent: PID 1 of every build VM. Implemented in the agent modules.

fn main() {
    eprintln!("tvix-build-vm-agent: not implemented yet");
    std::process::exit(1);
}
