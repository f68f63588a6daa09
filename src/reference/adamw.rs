//! adamw: to be written.
