//! The zenoh key layout used by shardvisor. Every key the crate touches is built here.
//!
//! | what                   | key                                   | kind        |
//! |------------------------|---------------------------------------|-------------|
//! | node is alive          | `shardvisor/node/{id}/{incarnation}`  | liveliness  |
//! | node info (resources)  | `shardvisor/info/{id}`                | put/sub     |
//! | commands to a node     | `shardvisor/node/{id}/cmd`            | queryable   |
//!
//! Node ids must be a single key chunk (see [`is_valid_node_id`]), otherwise they could contain
//! `/` or wildcards and address other keys.

/// Liveliness key expression matching every node's token.
pub const ALL_NODE_TOKENS: &str = "shardvisor/node/*/*";
/// Key expression matching every node's info.
pub const ALL_INFOS: &str = "shardvisor/info/*";

/// Liveliness token of one node incarnation.
pub fn node_token(id: &str, incarnation: u64) -> String {
    format!("shardvisor/node/{id}/{incarnation}")
}

/// Key a node publishes its [`crate::NodeInfo`] on.
pub fn node_info(id: &str) -> String {
    format!("shardvisor/info/{id}")
}

/// Key of a node's command queryable.
pub fn node_command(id: &str) -> String {
    format!("shardvisor/node/{id}/cmd")
}

/// Parses a liveliness token key back into `(id, incarnation)`.
pub fn parse_node_token(key: &str) -> Option<(&str, u64)> {
    let rest = key.strip_prefix("shardvisor/node/")?;
    let (id, incarnation) = rest.split_once('/')?;
    if !is_valid_node_id(id) {
        return None;
    }
    Some((id, incarnation.parse().ok()?))
}

/// Parses an info key back into the node id.
pub fn parse_node_info(key: &str) -> Option<&str> {
    let id = key.strip_prefix("shardvisor/info/")?;
    is_valid_node_id(id).then_some(id)
}

/// A node id is a non-empty single key chunk made of `[A-Za-z0-9._-]`, and not `cmd`.
pub fn is_valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id != "cmd"
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        assert_eq!(
            parse_node_token(&node_token("n-00ff00ff", 7)),
            Some(("n-00ff00ff", 7))
        );
        assert_eq!(parse_node_token(&node_command("n-00ff00ff")), None);
        assert_eq!(parse_node_info(&node_info("n-1")), Some("n-1"));
        assert!(!is_valid_node_id("a/b"));
        assert!(!is_valid_node_id("*"));
        assert!(!is_valid_node_id(""));
    }
}
