//! dropout: to be written.
