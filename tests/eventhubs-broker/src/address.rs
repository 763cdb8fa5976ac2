//! What a link address names.
//!
//! The SDK puts the full URL in link targets and sources (`amqps://<host>/<hub>/...`), keeping the
//! real namespace host even when it dials a custom endpoint, while the two request/response nodes
//! are bare names. The host is ignored: one broker serves whatever namespace the client thinks it
//! talks to.

/// A parsed link address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Address {
    /// `$cbs`: claims-based security (token upload).
    Cbs,
    /// `$management`: entity properties.
    Management,
    /// `<hub>`: send, with the partition chosen by the broker.
    Hub { hub: String },
    /// `<hub>/Partitions/<id>`: send to one partition.
    Partition { hub: String, partition: String },
    /// `<hub>/ConsumerGroups/<cg>/Partitions/<id>`: receive from one partition.
    ConsumerPartition {
        hub: String,
        consumer_group: String,
        partition: String,
    },
    /// Anything else.
    Unknown(String),
}

impl Address {
    /// Parses a link source or target address.
    pub(crate) fn parse(address: &str) -> Self {
        let path = match address.split_once("://") {
            Some((_scheme, rest)) => rest.split_once('/').map_or("", |(_host, path)| path),
            None => address,
        };
        let path = path.split(['?', '#']).next().unwrap_or_default();
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        match segments.as_slice() {
            [node] if node.eq_ignore_ascii_case("$cbs") => Self::Cbs,
            [node] if node.eq_ignore_ascii_case("$management") => Self::Management,
            [hub] => Self::Hub {
                hub: (*hub).to_owned(),
            },
            [hub, partitions, partition] if partitions.eq_ignore_ascii_case("Partitions") => {
                Self::Partition {
                    hub: (*hub).to_owned(),
                    partition: (*partition).to_owned(),
                }
            }
            [hub, groups, consumer_group, partitions, partition]
                if groups.eq_ignore_ascii_case("ConsumerGroups")
                    && partitions.eq_ignore_ascii_case("Partitions") =>
            {
                Self::ConsumerPartition {
                    hub: (*hub).to_owned(),
                    consumer_group: (*consumer_group).to_owned(),
                    partition: (*partition).to_owned(),
                }
            }
            _ => Self::Unknown(address.to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_addresses_the_sdk_uses() {
        assert_eq!(Address::parse("$cbs"), Address::Cbs);
        assert_eq!(Address::parse("$management"), Address::Management);
        assert_eq!(
            Address::parse("amqps://localhost/eh1"),
            Address::Hub { hub: "eh1".into() }
        );
        assert_eq!(
            Address::parse("amqps://localhost/eh1/Partitions/3"),
            Address::Partition {
                hub: "eh1".into(),
                partition: "3".into()
            }
        );
        assert_eq!(
            Address::parse(
                "amqps://ns.servicebus.windows.net/eh1/ConsumerGroups/$Default/Partitions/0"
            ),
            Address::ConsumerPartition {
                hub: "eh1".into(),
                consumer_group: "$Default".into(),
                partition: "0".into()
            }
        );
        assert_eq!(
            Address::parse("eh1/consumergroups/cg/partitions/1"),
            Address::ConsumerPartition {
                hub: "eh1".into(),
                consumer_group: "cg".into(),
                partition: "1".into()
            }
        );
    }

    #[test]
    fn anything_else_is_unknown() {
        for address in [
            "",
            "amqps://localhost",
            "amqps://h/eh1/Partitions",
            "a/b/c/d",
        ] {
            assert!(
                matches!(Address::parse(address), Address::Unknown(_)),
                "{address:?}"
            );
        }
    }
}
