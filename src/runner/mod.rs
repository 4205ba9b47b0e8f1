//! One BuildRequest -> one microVM -> one Build.
