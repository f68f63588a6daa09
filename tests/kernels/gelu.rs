//! gelu: to be written.
