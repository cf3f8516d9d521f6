//! Benchmarks of Ballast. Every figure is measured side by side with a yardstick (fio, the same
//! disk natively, MariaDB on the local disk) in the same run and reported as a ratio; see
//! `docs/benchmarks.md` and `benches/run.sh`.
//!
//! Owns: the benchmark programs (`src/bin/`) and the shared workload definitions below.
//! Must not depend on: server crates (storage node, FUSE driver); only the device engine is
//! driven in-process, everything else is measured from outside through real processes.
//! Invariants: benchmarks measure and print, they never assert on speed.

use std::time::Duration;

/// One device-engine workload, named after the fio job it mirrors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceWorkload {
    /// 4 KiB writes at uniformly random 4 KiB-aligned offsets (fio `--rw=randwrite --bs=4k`).
    RandomWrite,
    /// 4 KiB reads at uniformly random 4 KiB-aligned offsets (fio `--rw=randread --bs=4k`).
    RandomRead,
    /// 1 MiB writes at consecutive offsets, wrapping at the end of the file (fio `--rw=write --bs=1M`).
    SequentialWrite,
}

impl DeviceWorkload {
    /// Bytes per operation.
    pub fn transfer_bytes(self) -> usize {
        match self {
            DeviceWorkload::RandomWrite | DeviceWorkload::RandomRead => 4096,
            DeviceWorkload::SequentialWrite => 1 << 20,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceWorkload::RandomWrite => "random-write",
            DeviceWorkload::RandomRead => "random-read",
            DeviceWorkload::SequentialWrite => "sequential-write",
        }
    }
}

/// What one timed run of a workload achieved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkloadResult {
    pub operation_count: u64,
    pub transferred_bytes: u64,
    pub elapsed: Duration,
}

impl WorkloadResult {
    pub fn operations_per_second(&self) -> f64 {
        self.operation_count as f64 / self.elapsed.as_secs_f64()
    }

    /// Decimal megabytes (10^6 bytes) per second, as fio reports `bw_bytes / 1e6`.
    pub fn megabytes_per_second(&self) -> f64 {
        self.transferred_bytes as f64 / 1e6 / self.elapsed.as_secs_f64()
    }

    /// One JSON object on one line: the format `run.sh` parses.
    pub fn to_json_line(&self, workload: DeviceWorkload, queue_depth: usize) -> String {
        format!(
            "{{\"workload\":\"{}\",\"queue_depth\":{},\"transfer_bytes\":{},\"operation_count\":{},\"transferred_bytes\":{},\"elapsed_seconds\":{:.6},\"operations_per_second\":{:.1},\"megabytes_per_second\":{:.1}}}",
            workload.name(),
            queue_depth,
            workload.transfer_bytes(),
            self.operation_count,
            self.transferred_bytes,
            self.elapsed.as_secs_f64(),
            self.operations_per_second(),
            self.megabytes_per_second(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_carries_the_computed_rates() {
        let result = WorkloadResult {
            operation_count: 1000,
            transferred_bytes: 4_096_000,
            elapsed: Duration::from_secs(2),
        };
        let line = result.to_json_line(DeviceWorkload::RandomWrite, 32);
        assert!(line.contains("\"operations_per_second\":500.0"));
        assert!(line.contains("\"megabytes_per_second\":2.0"));
        assert!(line.starts_with("{\"workload\":\"random-write\""));
    }
}
