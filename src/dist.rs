//! The job a process belongs to, for data-parallel training: its rank, the number of ranks, the
//! host it runs on, and the few collectives training needs. A run started without a launcher is
//! the one-rank job (`Comm::single`, always compiled); a rank of an `mpirun`/`srun` job talks to
//! the others through MPI (the `mpi` cargo feature). The trainer sees only `Comm`.
//!
//! Every collective is deterministic: its result is the same bits on every rank and on every
//! rerun with the same number of ranks (sums are taken in rank order, never in arrival order).

use crate::error::{Error, Result};

/// The number of ranks, as launchers tell each rank: OpenMPI's mpirun, PMI (MPICH's hydra, srun
/// --mpi=pmi2), Slurm's srun. MPI itself is then asked; these only say that a launcher is there.
const LAUNCHER_SIZE_VARS: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"];

/// The number of ranks the launcher says this process belongs to, if it was started by one.
pub fn launcher_ranks() -> Option<usize> {
    LAUNCHER_SIZE_VARS
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// A process's place in its job and the collectives between the job's ranks.
pub struct Comm {
    inner: Inner,
}

enum Inner {
    Single,
    #[cfg(feature = "mpi")]
    Mpi(mpi_comm::MpiComm),
}

impl Comm {
    /// The one-rank job.
    pub fn single() -> Comm {
        Comm {
            inner: Inner::Single,
        }
    }

    /// This process's job: an MPI job when a launcher started it (and the build has MPI), else
    /// the one-rank job. A launcher asking for several ranks of a build without MPI is an error:
    /// the ranks would train alone, each writing the same checkpoint.
    pub fn from_env() -> Result<Comm> {
        #[cfg(feature = "mpi")]
        if launcher_ranks().is_some() {
            return Ok(Comm {
                inner: Inner::Mpi(mpi_comm::MpiComm::init()?),
            });
        }
        match launcher_ranks() {
            Some(n) if n > 1 => Err(Error::invalid(
                "mpirun",
                format!(
                    "started as one of {n} ranks, but this build has no MPI: rebuild with \
                     `cargo build --release --features mpi`"
                ),
            )),
            _ => Ok(Comm::single()),
        }
    }

    /// Whether this build can run on MPI.
    pub const HAS_MPI: bool = cfg!(feature = "mpi");

    pub fn rank(&self) -> usize {
        match &self.inner {
            Inner::Single => 0,
            #[cfg(feature = "mpi")]
            Inner::Mpi(c) => c.rank,
        }
    }

    pub fn size(&self) -> usize {
        match &self.inner {
            Inner::Single => 1,
            #[cfg(feature = "mpi")]
            Inner::Mpi(c) => c.size,
        }
    }

    /// This rank's index among the ranks of its host.
    pub fn local_rank(&self) -> usize {
        match &self.inner {
            Inner::Single => 0,
            #[cfg(feature = "mpi")]
            Inner::Mpi(c) => c.local_rank,
        }
    }

    /// The name of the host this rank runs on.
    pub fn host(&self) -> String {
        match &self.inner {
            Inner::Single => std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
            #[cfg(feature = "mpi")]
            Inner::Mpi(c) => c.host.clone(),
        }
    }

    pub fn is_root(&self) -> bool {
        self.rank() == 0
    }

    /// Every rank's `mine`, in rank order (lengths may differ).
    pub fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        match &self.inner {
            Inner::Single => Ok(vec![mine.to_vec()]),
            #[cfg(feature = "mpi")]
            Inner::Mpi(c) => Ok(c.all_gather_bytes(mine)),
        }
    }

    /// Every rank's `mine`, in rank order.
    pub fn all_gather_u64(&self, mine: u64) -> Result<Vec<u64>> {
        match &self.inner {
            Inner::Single => Ok(vec![mine]),
            #[cfg(feature = "mpi")]
            Inner::Mpi(c) => Ok(c.all_gather_u64(mine)),
        }
    }

    /// Every rank's values, in rank order (each rank gives the same number).
    pub fn all_gather_f32(&self, mine: &[f32]) -> Result<Vec<f32>> {
        match &self.inner {
            Inner::Single => Ok(mine.to_vec()),
            #[cfg(feature = "mpi")]
            Inner::Mpi(c) => Ok(c.all_gather_f32(mine)),
        }
    }

    /// Returns when every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        match &self.inner {
            Inner::Single => Ok(()),
            #[cfg(feature = "mpi")]
            Inner::Mpi(c) => {
                c.barrier();
                Ok(())
            }
        }
    }

    /// Whether any rank says yes (the stop decision every rank must share).
    pub fn any(&self, mine: bool) -> Result<bool> {
        Ok(self.all_gather_u64(mine as u64)?.iter().any(|&x| x != 0))
    }

    /// `data` := Σ over ranks of every rank's `data`, element by element, summed in rank order
    /// ((x₀ + x₁) + x₂ …), the same bits on every rank. Each rank gives the same length.
    ///
    /// Reduce-scatter then all-gather, as a ring all-reduce moves data (each rank sends and
    /// receives 2·(N−1)/N of the buffer), but with a fixed summation order: an all-to-all hands
    /// rank j the j-th slice of every rank, rank j sums its slice in rank order, an all-gather
    /// hands every rank every summed slice.
    pub fn sum_f32(&self, data: &mut [f32]) -> Result<()> {
        match &self.inner {
            // One rank: the sum is its own values.
            Inner::Single => {
                let _ = data;
                Ok(())
            }
            #[cfg(feature = "mpi")]
            Inner::Mpi(c) => {
                c.sum_f32(data);
                Ok(())
            }
        }
    }

    /// Ends the whole job at once (every rank), after an error on this one: the others may be
    /// waiting in a collective this rank will never join.
    pub fn abort(&self, code: i32) -> ! {
        match &self.inner {
            Inner::Single => std::process::exit(code),
            #[cfg(feature = "mpi")]
            Inner::Mpi(c) => c.abort(code),
        }
    }
}

/// Sums rank-ordered slices: `parts` holds `n` slices of `len` values each (slice r from rank
/// r); returns their element-wise sum, taken in rank order.
pub fn sum_in_rank_order(parts: &[f32], n: usize) -> Vec<f32> {
    let len = parts.len() / n.max(1);
    let mut acc = parts[..len].to_vec();
    for r in 1..n {
        for (a, x) in acc.iter_mut().zip(&parts[r * len..(r + 1) * len]) {
            *a += x;
        }
    }
    acc
}

#[cfg(feature = "mpi")]
mod mpi_comm {
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::*;

    use crate::error::{Error, Result};

    pub struct MpiComm {
        pub rank: usize,
        pub size: usize,
        pub local_rank: usize,
        pub host: String,
        world: SimpleCommunicator,
        // Last: finalizes MPI when dropped, after the communicators above.
        _universe: mpi::environment::Universe,
    }

    impl MpiComm {
        pub fn init() -> Result<MpiComm> {
            let universe = mpi::initialize().ok_or_else(|| {
                Error::invalid("mpi", "MPI could not be initialized (or was already)")
            })?;
            let world = universe.world();
            let local = world.split_shared(world.rank());
            Ok(MpiComm {
                rank: world.rank() as usize,
                size: world.size() as usize,
                local_rank: local.rank() as usize,
                host: mpi::environment::processor_name().unwrap_or_else(|_| "?".into()),
                world,
                _universe: universe,
            })
        }

        pub fn all_gather_u64(&self, mine: u64) -> Vec<u64> {
            let mut all = vec![0u64; self.size];
            self.world.all_gather_into(&mine, &mut all[..]);
            all
        }

        pub fn all_gather_f32(&self, mine: &[f32]) -> Vec<f32> {
            let mut all = vec![0f32; mine.len() * self.size];
            self.world.all_gather_into(mine, &mut all[..]);
            all
        }

        pub fn all_gather_bytes(&self, mine: &[u8]) -> Vec<Vec<u8>> {
            let lens = self.all_gather_u64(mine.len() as u64);
            let max = lens.iter().copied().max().unwrap_or(0) as usize;
            let mut padded = mine.to_vec();
            padded.resize(max, 0);
            let mut all = vec![0u8; max * self.size];
            self.world.all_gather_into(&padded[..], &mut all[..]);
            lens.iter()
                .enumerate()
                .map(|(r, &len)| all[r * max..r * max + len as usize].to_vec())
                .collect()
        }

        pub fn sum_f32(&self, data: &mut [f32]) {
            let n = self.size;
            let slice = data.len().div_ceil(n);
            let mut send = data.to_vec();
            send.resize(slice * n, 0.0);
            // Rank j receives slice j of every rank, in rank order.
            let mut mine = vec![0f32; slice * n];
            self.world.all_to_all_into(&send[..], &mut mine[..]);
            let summed = super::sum_in_rank_order(&mine, n);
            self.world.all_gather_into(&summed[..], &mut send[..]);
            data.copy_from_slice(&send[..data.len()]);
        }

        pub fn barrier(&self) {
            self.world.barrier();
        }

        pub fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_rank_collectives_are_identities() {
        let c = Comm::single();
        assert_eq!((c.rank(), c.size(), c.local_rank()), (0, 1, 0));
        let mut x = vec![1.5f32, -2.0, 3.25];
        c.sum_f32(&mut x).unwrap();
        assert_eq!(x, vec![1.5, -2.0, 3.25]);
        assert_eq!(c.all_gather_bytes(b"abc").unwrap(), vec![b"abc".to_vec()]);
        assert!(c.any(true).unwrap() && !c.any(false).unwrap());
    }

    #[test]
    fn rank_order_sum_is_left_to_right() {
        // 1e8 + 1 − 1e8 is 0 in f32 taken left to right, 1 taken the other way round.
        let parts = [1e8f32, 1.0, 1.0, 2.0, -1e8, 3.0];
        assert_eq!(sum_in_rank_order(&parts, 3), vec![0.0, 6.0]);
    }
}
