//! embedding: to be written.
