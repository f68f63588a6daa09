//! The subcommands.

pub mod bench;
pub mod kernels;
pub mod merge;
pub mod plot;
pub mod score;
pub mod train;
pub mod tune_ahead;
