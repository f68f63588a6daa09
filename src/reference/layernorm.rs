//! layernorm: to be written.
