//! The validated internal model of a BuildRequest.
