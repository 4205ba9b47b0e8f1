//! The API's routes and the VM's state machine: `vmm.ping`, `vm.create`, `vm.boot`,
//! `vm.info`, `vm.shutdown`, `vm.delete`, `vmm.shutdown`, each with the real one's method,
//! body rules, status codes and error chains.

use super::config::{validate, VmConfig};
use super::guest::{emit, run_guest, Serial};
use super::http::{bad, chain, Head, Reply};
use super::{lock, Shared, VmmShutdown, FAKE_VERSION};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::UnixListener;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum VmState {
    Created,
    Running,
    Shutdown,
}

pub(super) struct Vm {
    pub(super) raw: serde_json::Value,
    pub(super) config: VmConfig,
    pub(super) state: VmState,
    pub(super) guest: Option<tokio::task::JoinHandle<()>>,
    pub(super) vsock: Option<(UnixListener, PathBuf)>,
}

pub(super) fn api_error(status: u16, parts: &[&str]) -> Reply {
    let mut all = vec!["Error from API"];
    all.extend_from_slice(parts);
    Reply::Status(status, Some(chain(&all, false)))
}

pub(super) fn route(shared: &Arc<Shared>, head: &Head, body: &[u8]) -> Reply {
    let Some(endpoint) = head.path.strip_prefix("/api/v1/") else {
        return Reply::Status(404, Some(chain(&["Not Found"], false)));
    };
    let get = match endpoint {
        "vmm.ping" | "vm.info" | "vm.counters" => true,
        "vm.create" | "vm.boot" | "vm.shutdown" | "vm.delete" | "vm.power-button" | "vm.reboot"
        | "vmm.shutdown" => false,
        _ => return Reply::Status(404, Some(chain(&["Not Found"], false))),
    };
    let method_ok = if get {
        head.method == "GET"
    } else {
        head.method == "PUT"
    };
    if !method_ok {
        return bad("wrong method");
    }
    if get && !body.is_empty() {
        return bad("a GET has no body");
    }
    if endpoint != "vm.create" && !body.is_empty() {
        return bad("this endpoint takes no body");
    }
    match endpoint {
        "vmm.ping" => Reply::Status(
            200,
            Some(
                serde_json::json!({
                    "build_version": FAKE_VERSION,
                    "version": FAKE_VERSION,
                    "pid": std::process::id(),
                    "features": ["kvm"],
                })
                .to_string(),
            ),
        ),
        "vm.create" => create(shared, body),
        "vm.boot" => boot(shared),
        "vm.shutdown" => shutdown_vm(shared),
        "vm.delete" => {
            let mut vm = lock(&shared.vm);
            match vm.take() {
                Some(mut old) => {
                    if let Some(task) = old.guest.take() {
                        task.abort();
                    }
                    if let Some((_, path)) = old.vsock.take() {
                        let _ = std::fs::remove_file(path);
                    }
                    drop(vm);
                    emit(shared, "vm", "deleted");
                    Reply::Status(204, None)
                }
                None => api_error(404, &["The VM is not created"]),
            }
        }
        "vm.info" => match lock(&shared.vm).as_ref() {
            Some(vm) => Reply::Status(
                200,
                Some(
                    serde_json::json!({
                        "config": vm.raw,
                        "state": match vm.state {
                            VmState::Created => "Created",
                            VmState::Running => "Running",
                            VmState::Shutdown => "Shutdown",
                        },
                        "memory_actual_size": vm.config.memory.as_ref().map_or(512 << 20, |m| m.size),
                    })
                    .to_string(),
                ),
            ),
            None => api_error(404, &["The VM is not created"]),
        },
        "vmm.shutdown" => {
            if lock(&shared.vm).as_ref().is_some_and(|vm| vm.state == VmState::Running) {
                emit(shared, "vm", "shutdown");
            }
            emit(shared, "vm", "deleted");
            emit(shared, "vmm", "shutdown");
            match shared.options.vmm_shutdown {
                VmmShutdown::Reply => {
                    shared.exit.send_replace(Some(0));
                    Reply::Status(200, None)
                }
                VmmShutdown::CloseWithoutReply => {
                    shared.exit.send_replace(Some(0));
                    Reply::Close
                }
                VmmShutdown::Ignore => Reply::Status(200, None),
            }
        }
        _ => api_error(500, &["not implemented by the fake"]),
    }
}

pub(super) fn create(shared: &Arc<Shared>, body: &[u8]) -> Reply {
    if body.is_empty() {
        return bad("vm.create needs a body");
    }
    let raw: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return Reply::Status(
                400,
                Some(chain(
                    &["Failed to deserialize JSON", &e.to_string()],
                    false,
                )),
            )
        }
    };
    let config: VmConfig = match serde_json::from_value(raw.clone()) {
        Ok(c) => c,
        Err(e) => {
            return Reply::Status(
                400,
                Some(chain(
                    &["Failed to deserialize JSON", &e.to_string()],
                    false,
                )),
            )
        }
    };
    let mut vm = lock(&shared.vm);
    if vm.is_some() {
        return api_error(500, &["The VM is already created"]);
    }
    *vm = Some(Vm {
        raw,
        config,
        state: VmState::Created,
        guest: None,
        vsock: None,
    });
    Reply::Status(204, None)
}

pub(super) fn boot(shared: &Arc<Shared>) -> Reply {
    let mut guard = lock(&shared.vm);
    let Some(vm) = guard.as_mut() else {
        return api_error(404, &["The VM is not created"]);
    };
    if vm.state == VmState::Running {
        return api_error(500, &["Error booting VM", "VM is already running"]);
    }
    if let Err(reply) = validate(&vm.config) {
        return reply;
    }
    for fs in vm.config.fs.iter().flatten() {
        if let Err(e) = std::os::unix::net::UnixStream::connect(&fs.socket) {
            return api_error(
                500,
                &[
                    "Error booting VM",
                    "Error creating device manager",
                    &format!(
                        "Failed connecting the vhost-user backend at {}: {e}",
                        fs.socket.display()
                    ),
                ],
            );
        }
    }
    for disk in vm.config.disks.iter().flatten() {
        if !disk.path.is_file() {
            return api_error(
                500,
                &[
                    "Error booting VM",
                    "Cannot open disk",
                    &disk.path.display().to_string(),
                ],
            );
        }
    }
    if let Some(vsock) = &vm.config.vsock {
        // The real one binds this path at boot and fails if anything is there.
        match std::os::unix::net::UnixListener::bind(&vsock.socket) {
            Ok(l) => {
                let _ = l.set_nonblocking(true);
                match UnixListener::from_std(l) {
                    Ok(l) => vm.vsock = Some((l, vsock.socket.clone())),
                    Err(e) => return api_error(500, &["Error booting VM", &e.to_string()]),
                }
            }
            Err(e) => {
                return api_error(
                    500,
                    &[
                        "Error booting VM",
                        "Cannot create virtio-vsock device",
                        &e.to_string(),
                    ],
                )
            }
        }
    }
    vm.state = VmState::Running;
    let serial = Serial::open(&vm.config, &shared.options);
    let config = vm.config.clone();
    drop(guard);
    emit(shared, "vm", "booting");
    emit(shared, "vm", "booted");
    let task = tokio::spawn(run_guest(shared.clone(), config, serial));
    if let Some(vm) = lock(&shared.vm).as_mut() {
        vm.guest = Some(task);
    }
    Reply::Status(204, None)
}

pub(super) fn shutdown_vm(shared: &Arc<Shared>) -> Reply {
    let mut guard = lock(&shared.vm);
    let Some(vm) = guard.as_mut() else {
        return api_error(404, &["The VM is not created"]);
    };
    if vm.state != VmState::Running {
        return api_error(500, &["Error shutting down VM", "VM is not running"]);
    }
    if let Some(task) = vm.guest.take() {
        task.abort();
    }
    vm.state = VmState::Shutdown;
    drop(guard);
    emit(shared, "vm", "shutdown");
    Reply::Status(204, None)
}
