//! attention: to be written.
