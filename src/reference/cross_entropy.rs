//! cross_entropy: to be written.
