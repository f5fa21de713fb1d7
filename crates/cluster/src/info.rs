//! [`NodeInfo`]: what a node tells the cluster about itself.

use serde::{Deserialize, Serialize};

/// Published by every node on `shardvisor/info/{id}` (postcard encoded) and shown in
/// [`crate::Member::info`]. An info only counts for the incarnation it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id of the publisher.
    pub id: String,
    /// Incarnation of the publisher.
    pub incarnation: u64,
    /// Where the node's API listens (opaque to this crate).
    pub api_addr: String,
    /// Usable CPU cores.
    pub cores: u32,
    /// Physical memory, bytes.
    pub mem_total_bytes: u64,
    /// Memory available for new work (`MemAvailable`), bytes.
    pub mem_free_bytes: u64,
    /// Runners currently hosted.
    pub runners: u32,
    /// The instances this node coordinates.
    pub instances: Vec<InstanceBrief>,
}

/// One instance as its coordinating node announces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceBrief {
    pub instance_id: String,
    /// What the instance was created from (a path, or `scripted`).
    pub model: String,
    /// The name clients call its model by.
    pub model_name: String,
    /// `starting`, `ready`, `failed`, ...
    pub state: String,
    /// The node of each rank.
    pub nodes: Vec<String>,
}

/// Reads `(MemTotal, MemAvailable)` in bytes from `/proc/meminfo`; zeros when unavailable.
pub(crate) fn read_meminfo() -> (u64, u64) {
    std::fs::read_to_string("/proc/meminfo")
        .map(|text| parse_meminfo(&text))
        .unwrap_or((0, 0))
}

fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map_or(0, |kb| kb.saturating_mul(1024))
    };
    (field("MemTotal"), field("MemAvailable"))
}

/// Usable CPU cores (cgroup/affinity aware), at least 1.
pub(crate) fn available_cores() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo() {
        let text = "MemTotal:       16318532 kB\nMemFree:  100 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(parse_meminfo(text), (16318532 * 1024, 12000000 * 1024));
        assert_eq!(parse_meminfo("garbage"), (0, 0));
    }
}
