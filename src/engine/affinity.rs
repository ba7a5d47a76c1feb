//! Worker placement: which CPU each worker thread is pinned to.

/// Pin the calling thread to the `worker`-th online CPU (round-robin if there are more
/// workers than CPUs). Returns the CPU id, or None if pinning is not possible here.
pub fn pin(worker: usize) -> Option<usize> {
    let cores = core_affinity::get_core_ids()?;
    if cores.is_empty() {
        return None;
    }
    let core = cores[worker % cores.len()];
    core_affinity::set_for_current(core).then_some(core.id)
}
