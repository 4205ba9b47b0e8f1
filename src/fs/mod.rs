//! The castore-backed virtio-fs daemon that serves a build's inputs read-only.
