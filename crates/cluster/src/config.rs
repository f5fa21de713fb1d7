//! Cluster configuration and its translation into a zenoh peer configuration.

use std::time::Duration;

use crate::ClusterError;

/// How this node takes part in the cluster.
///
/// Topology: zenoh peers do **not** relay for each other, so the cluster has to be a full mesh
/// (every node directly connected to every other node). `peers` only has to name *some* node
/// that is already in the cluster: gossip tells both sides about the rest and zenoh connects
/// them ("autoconnect"). Every node should therefore `listen` on an address the other nodes can
/// reach, written the same way everywhere (always `127.0.0.1`, never `localhost`, for example).
///
/// **`lease` must be identical on every node.** With different leases one side declares the
/// link dead before the other, and a reconnect at that moment can leave a permanently half-dead
/// session (zenoh issue #2806).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Endpoints to listen on, each `tcp/HOST:PORT` (port 0 = any free port). Empty = dial only.
    pub listen: Vec<String>,
    /// Endpoints of known nodes, each `tcp/HOST:PORT`. Dialed in the background, retried forever
    /// (200 ms, doubling, at most 2 s apart), and re-dialed whenever the link drops. Never list
    /// this node's own listen endpoint here.
    pub peers: Vec<String>,
    /// Also find nodes by UDP multicast scouting on the local network. Handy on a LAN, but
    /// then two nodes may dial each other at the same time (the precondition of zenoh #2806);
    /// prefer explicit `peers` in production.
    pub discover: bool,
    /// Link lease: a silent peer (stopped, network cut) is declared gone after this long.
    /// Clean exits and killed processes are noticed at once (TCP close). Same value on all nodes.
    pub lease: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            listen: Vec::new(),
            peers: Vec::new(),
            discover: false,
            lease: Duration::from_millis(2000),
        }
    }
}

/// Keep-alive messages sent per lease period (zenoh's `transport/link/tx/keep_alive`).
const KEEP_ALIVES_PER_LEASE: u32 = 4;
const MIN_LEASE: Duration = Duration::from_millis(100);
const MAX_LEASE: Duration = Duration::from_secs(3600);

impl ClusterConfig {
    /// Validates the configuration and builds the zenoh peer configuration.
    pub fn zenoh_config(&self) -> Result<zenoh::Config, ClusterError> {
        for ep in &self.listen {
            validate_endpoint(ep, "listen", true)?;
        }
        for ep in &self.peers {
            validate_endpoint(ep, "peers", false)?;
            if self.listen.contains(ep) {
                return Err(ClusterError::Config(format!(
                    "endpoint {ep:?} is both in listen and in peers; a node must not dial itself"
                )));
            }
        }
        if self.lease < MIN_LEASE || self.lease > MAX_LEASE {
            return Err(ClusterError::Config(format!(
                "lease {:?} is out of range ({MIN_LEASE:?}..={MAX_LEASE:?})",
                self.lease
            )));
        }

        let lease_ms = self.lease.as_millis().to_string();
        let settings: [(&str, String); 13] = [
            ("mode", r#""peer""#.into()),
            ("listen/endpoints", json_list(&self.listen)),
            ("connect/endpoints", json_list(&self.peers)),
            // Dial in the background and never give up; retries log at debug only.
            ("connect/timeout_ms", "-1".into()),
            ("connect/exit_on_failure", "false".into()),
            (
                "connect/retry",
                "{ period_init_ms: 200, period_max_ms: 2000, period_increase_factor: 2 }".into(),
            ),
            ("scouting/multicast/enabled", self.discover.to_string()),
            // Gossip must stay enabled: it builds the full mesh, and disabling it makes every
            // open() log a WARN.
            ("scouting/gossip/enabled", "true".into()),
            ("scouting/gossip/multihop", "false".into()),
            (
                "scouting/gossip/autoconnect",
                r#"{ peer: ["peer"] }"#.into(),
            ),
            // Do not wait in open() for scouted peers (avoids a startup delay and a WARN).
            ("open/return_conditions/connect_scouted", "false".into()),
            ("transport/link/tx/lease", lease_ms),
            (
                "transport/link/tx/keep_alive",
                KEEP_ALIVES_PER_LEASE.to_string(),
            ),
        ];

        let mut config = zenoh::Config::default();
        for (key, value) in settings {
            config.insert_json5(key, &value).map_err(|e| {
                ClusterError::Config(format!("zenoh rejected {key} = {value}: {e}"))
            })?;
        }
        Ok(config)
    }
}

/// `["a","b"]`; the items were validated to contain no characters needing escapes.
fn json_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", quoted.join(","))
}

/// Accepts `tcp/HOST:PORT` where HOST is a name, an IPv4 address or a bracketed IPv6 address.
fn validate_endpoint(ep: &str, field: &str, allow_port_zero: bool) -> Result<(), ClusterError> {
    let bad = |why: &str| {
        ClusterError::Config(format!(
            "invalid endpoint {ep:?} in {field}: {why}; expected tcp/HOST:PORT, e.g. tcp/10.0.0.5:7447"
        ))
    };
    let rest = ep
        .strip_prefix("tcp/")
        .ok_or_else(|| bad("only tcp/ endpoints are supported"))?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("missing :PORT"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| bad("the port is not a number in 0..=65535"))?;
    if port == 0 && !allow_port_zero {
        return Err(bad("port 0 cannot be dialed"));
    }
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        !v6.is_empty()
            && v6
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
    } else {
        !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    };
    if !host_ok {
        return Err(bad("the host is not a name or IP address"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert!(validate_endpoint("tcp/127.0.0.1:7447", "peers", false).is_ok());
        assert!(validate_endpoint("tcp/[::1]:7447", "peers", false).is_ok());
        assert!(validate_endpoint("tcp/node-1.lan:7447", "peers", false).is_ok());
        assert!(validate_endpoint("tcp/0.0.0.0:0", "listen", true).is_ok());
        for bad in [
            "foo",
            "udp/1.2.3.4:5",
            "tcp/1.2.3.4",
            "tcp/:5",
            "tcp/h:99999",
            "tcp/a\"b:1",
        ] {
            assert!(validate_endpoint(bad, "peers", false).is_err(), "{bad}");
        }
        assert!(validate_endpoint("tcp/1.2.3.4:0", "peers", false).is_err());
    }

    #[test]
    fn builds() {
        let cfg = ClusterConfig {
            listen: vec!["tcp/127.0.0.1:7447".into()],
            peers: vec!["tcp/127.0.0.1:7448".into()],
            ..Default::default()
        };
        cfg.zenoh_config().unwrap();
    }
}
