//! `--format pretty` is read by a person as a timeline, so its lines go out in time order.
//! The joiner releases a line when its packet has come (or its window has passed), so lines of
//! different connections leave out of order by up to the join window (a JSON consumer sorts
//! by `mono_ns` if it cares; the contract promises no order). The timeline holds each pretty
//! line until no earlier one can still come, then writes them sorted.

use std::{cmp::Reverse, collections::BinaryHeap};

use crate::output::Output;

/// Lines held for ordering: (time, arrival number, text), earliest first.
#[derive(Default)]
pub struct Timeline {
    held: BinaryHeap<Reverse<(u64, u64, String)>>,
    arrivals: u64,
}

impl Timeline {
    /// Holds `text`, a line about an instant at `mono_ns`.
    pub fn hold(&mut self, mono_ns: u64, text: String) {
        self.arrivals += 1;
        self.held.push(Reverse((mono_ns, self.arrivals, text)));
    }

    /// Writes, in time order, the lines about instants before `until_ns` (every line when
    /// `until_ns` is u64::MAX). A line the output has no room for is counted there as lost.
    pub fn release(&mut self, until_ns: u64, out: &Output) {
        while let Some(Reverse((mono_ns, _, _))) = self.held.peek() {
            if *mono_ns >= until_ns {
                break;
            }
            let Some(Reverse((_, _, text))) = self.held.pop() else {
                break;
            };
            out.try_line(text);
        }
    }

    #[cfg(test)]
    fn order(&mut self) -> Vec<String> {
        std::iter::from_fn(|| self.held.pop().map(|Reverse((_, _, t))| t)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_leave_by_time_then_by_arrival() {
        let mut t = Timeline::default();
        t.hold(30, "c".into());
        t.hold(10, "a".into());
        t.hold(30, "d".into());
        t.hold(20, "b".into());
        assert_eq!(t.order(), ["a", "b", "c", "d"]);
    }
}
