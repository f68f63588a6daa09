//! The subcommands.

pub mod kernels;
pub mod train;
