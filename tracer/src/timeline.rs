//! Output read as a timeline goes out in time order: `--format pretty` (a person reads it) and
//! the `-w` pcapng file (its readers expect packets sorted by time, and some tools warn
//! otherwise). The joiner releases a line when its packet has come (or its window has passed),
//! and a packet with the event it joined, so lines and packets of different connections leave
//! out of order by up to the join window (a JSON consumer sorts by `mono_ns` if it cares; the
//! contract promises no order). A timeline holds each item until no earlier one can still
//! come, then gives them back sorted.

use std::{cmp::Ordering, collections::BinaryHeap};

/// Items held for ordering, earliest first (by time, then by arrival).
pub struct Timeline<T> {
    held: BinaryHeap<Held<T>>,
    arrivals: u64,
}

impl<T> Default for Timeline<T> {
    fn default() -> Self {
        Self {
            held: BinaryHeap::new(),
            arrivals: 0,
        }
    }
}

/// An item and its place: ordered by (time, arrival) only, reversed for the max-heap.
struct Held<T> {
    mono_ns: u64,
    arrival: u64,
    item: T,
}

impl<T> Held<T> {
    fn key(&self) -> (u64, u64) {
        (self.mono_ns, self.arrival)
    }
}

impl<T> PartialEq for Held<T> {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl<T> Eq for Held<T> {}

impl<T> PartialOrd for Held<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Held<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        other.key().cmp(&self.key())
    }
}

impl<T> Timeline<T> {
    /// Holds `item`, about an instant at `mono_ns`.
    pub fn hold(&mut self, mono_ns: u64, item: T) {
        self.arrivals += 1;
        self.held.push(Held {
            mono_ns,
            arrival: self.arrivals,
            item,
        });
    }

    /// The items about instants before `until_ns` (every item with u64::MAX), in time order;
    /// each leaves the timeline as it is taken.
    pub fn release(&mut self, until_ns: u64) -> impl Iterator<Item = T> + '_ {
        std::iter::from_fn(move || {
            if self.held.peek()?.mono_ns >= until_ns {
                return None;
            }
            self.held.pop().map(|held| held.item)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_leave_by_time_then_by_arrival() {
        let mut t = Timeline::default();
        t.hold(30, "c");
        t.hold(10, "a");
        t.hold(30, "d");
        t.hold(20, "b");
        assert_eq!(t.release(25).collect::<Vec<_>>(), ["a", "b"]);
        t.hold(15, "late");
        assert_eq!(t.release(u64::MAX).collect::<Vec<_>>(), ["late", "c", "d"]);
    }
}
