//! The subcommands.

pub mod bench;
pub mod kernels;
pub mod score;
pub mod train;
pub mod tune;
