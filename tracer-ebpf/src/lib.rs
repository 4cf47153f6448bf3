#![no_std]
// Present so that `tracer` can declare this crate as a build dependency (cargo then rebuilds
// the eBPF object when these sources change). The programs live in main.rs.
