//! Timers as data: a hashed wheel over caller-supplied `u64` ticks.
//! Invariant: nothing here reads the clock.
pub mod wheel;
