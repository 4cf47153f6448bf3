//! Closes the kernel programs hold for the RST they send (tracer-ebpf `held`): released there
//! within microseconds, by the RST's program or the socket's destruction. One held far longer
//! took a path the programs did not foresee; it is taken out here and goes out as a close
//! whose RST is not known with it, so that no close is ever lost in the map.

use std::time::Duration;

use aya::maps::{HashMap, MapData};
use tracer_common::SockEvent;

use crate::kernel::KernelEvent;

/// How long a close may wait in the map before the daemon takes it out: thousands of times
/// what tcp_close() takes from the move to CLOSE to the RST.
pub const RESCUE_AFTER: Duration = Duration::from_millis(500);

pub struct HeldCloses {
    map: HashMap<MapData, u64, SockEvent>,
}

impl HeldCloses {
    pub fn new(map: HashMap<MapData, u64, SockEvent>) -> Self {
        Self { map }
    }

    /// Takes out the closes held since before `older_than_ns` (CLOCK_MONOTONIC), decoded.
    pub fn take_stale(&mut self, older_than_ns: u64) -> Vec<KernelEvent> {
        let stale: Vec<(u64, SockEvent)> = self
            .map
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, ev)| ev.ts_ns < older_than_ns)
            .collect();
        let mut taken = Vec::with_capacity(stale.len());
        for (sk, ev) in stale {
            // Gone meanwhile: its program released it after all (then it is in the ring).
            if self.map.remove(&sk).is_ok()
                && let Some(ev) = KernelEvent::from_raw(&ev)
            {
                taken.push(ev);
            }
        }
        taken
    }
}
