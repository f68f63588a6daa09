//! The subcommands.

pub mod bench;
pub mod kernels;
pub mod train;
