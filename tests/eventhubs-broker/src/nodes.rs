//! The two request/response nodes: `$cbs` (token upload) and `$management` (entity properties).
//!
//! Both follow the AMQP management draft: the request's application properties carry
//! `operation`, `type` and `name`; the response carries `status-code` and `status-description`
//! and correlates by `correlation-id` = the request's `message-id`. The SDK's decoders decide the
//! exact value types (`azure_messaging_eventhubs/src/common/management.rs` panics on a wrong
//! variant, so each attribute below has the service's type, not merely a compatible one).

use fe2o3_amqp::types::{
    messaging::{AmqpValue, ApplicationProperties, Body, Message, Properties},
    primitives::{Array, OrderedMap, SimpleValue, Timestamp, Value},
};
use tracing::debug;

use crate::store::{AmqpMessage, Store};

/// The node a request/response link pair serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Node {
    Cbs,
    Management,
}

/// The timestamp the service sends for "never" (year 1 CE); the SDK turns it into `None`.
const NEVER_MS: i64 = -62_135_596_800_000;

/// Entity types of `$management` READ.
const EVENTHUB_ENTITY: &str = "com.microsoft:eventhub";
const PARTITION_ENTITY: &str = "com.microsoft:partition";

/// Observations the broker keeps about node traffic, for tests.
#[derive(Debug, Default)]
pub(crate) struct NodeLog {
    /// Every CBS audience (`name`) a client uploaded a token for, in order.
    pub(crate) audiences: Vec<String>,
}

fn app_property<'a>(message: &'a AmqpMessage, key: &str) -> Option<&'a str> {
    match message.application_properties.as_ref()?.0.get(key)? {
        SimpleValue::String(value)
        | SimpleValue::Symbol(fe2o3_amqp::types::primitives::Symbol(value)) => Some(value),
        _ => None,
    }
}

/// Builds a response to `request`.
fn response(request: &AmqpMessage, status: i32, description: &str, body: Value) -> AmqpMessage {
    let request_properties = request.properties.as_ref();
    let properties = Properties {
        correlation_id: request_properties.and_then(|p| p.message_id.clone()),
        to: request_properties.and_then(|p| p.reply_to.clone()),
        ..Default::default()
    };
    let application_properties = ApplicationProperties::builder()
        .insert("status-code", SimpleValue::Int(status))
        .insert(
            "status-description",
            SimpleValue::String(description.to_owned()),
        )
        .build();
    Message::builder()
        .properties(properties)
        .application_properties(application_properties)
        .body(Body::Value(AmqpValue(body)))
        .build()
}

/// Answers one request to `node`.
pub(crate) fn respond(
    store: &Store,
    log: &mut NodeLog,
    node: Node,
    request: &AmqpMessage,
) -> AmqpMessage {
    match node {
        Node::Cbs => respond_cbs(log, request),
        Node::Management => respond_management(store, request),
    }
}

/// Accepts every token: the broker authorizes nothing, but clients refuse to attach links
/// until `put-token` answers exactly 202.
fn respond_cbs(log: &mut NodeLog, request: &AmqpMessage) -> AmqpMessage {
    let operation = app_property(request, "operation").unwrap_or_default();
    if operation != "put-token" {
        return response(
            request,
            400,
            &format!("unsupported $cbs operation {operation:?}"),
            Value::Null,
        );
    }
    let audience = app_property(request, "name").unwrap_or_default().to_owned();
    debug!(%audience, "token accepted");
    log.audiences.push(audience);
    response(request, 202, "Accepted", Value::Null)
}

fn respond_management(store: &Store, request: &AmqpMessage) -> AmqpMessage {
    let operation = app_property(request, "operation").unwrap_or_default();
    if !operation.eq_ignore_ascii_case("READ") {
        return response(
            request,
            400,
            &format!("unsupported $management operation {operation:?}"),
            Value::Null,
        );
    }
    let entity_type = app_property(request, "type").unwrap_or_default();
    let name = app_property(request, "name").unwrap_or_default();
    let Some(hub) = store.hub(name) else {
        return response(
            request,
            404,
            &format!("the messaging entity {name:?} could not be found"),
            Value::Null,
        );
    };
    let mut map: OrderedMap<Value, Value> = OrderedMap::new();
    let mut put = |key: &str, value: Value| {
        map.insert(Value::String(key.to_owned()), value);
    };
    match entity_type {
        EVENTHUB_ENTITY => {
            put("name", Value::String(hub.name.clone()));
            put("type", Value::String(EVENTHUB_ENTITY.to_owned()));
            put(
                "created_at",
                Value::Timestamp(Timestamp::from_milliseconds(store.created_at_ms)),
            );
            put("partition_count", Value::Int(hub.partitions.len() as i32));
            put(
                "partition_ids",
                Value::Array(Array(
                    hub.partitions
                        .iter()
                        .map(|p| Value::String(p.id.clone()))
                        .collect(),
                )),
            );
        }
        PARTITION_ENTITY => {
            let id = app_property(request, "partition").unwrap_or_default();
            let Some(partition) = hub.partition(id) else {
                return response(
                    request,
                    404,
                    &format!("event hub {:?} has no partition {id:?}", hub.name),
                    Value::Null,
                );
            };
            let state = partition.state();
            let last_time_ms = state
                .last_enqueued_time
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(NEVER_MS, |d| d.as_millis() as i64);
            put("name", Value::String(hub.name.clone()));
            put("type", Value::String(PARTITION_ENTITY.to_owned()));
            put("partition", Value::String(partition.id.clone()));
            put(
                "begin_sequence_number",
                Value::Long(state.begin_sequence_number),
            );
            put(
                "last_enqueued_sequence_number",
                Value::Long(state.last_enqueued_sequence_number),
            );
            // The epoch of the sequence numbering; it changes only on geo-failover.
            put("last_enqueued_sequence_number_epoch", Value::Long(0));
            put(
                "last_enqueued_offset",
                Value::String(state.last_enqueued_offset.clone()),
            );
            put(
                "last_enqueued_time_utc",
                Value::Timestamp(Timestamp::from_milliseconds(last_time_ms)),
            );
            put("is_partition_empty", Value::Bool(state.is_empty()));
        }
        other => {
            return response(
                request,
                400,
                &format!("unsupported entity type {other:?}"),
                Value::Null,
            );
        }
    }
    response(request, 200, "OK", Value::Map(map))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::HubConfig;

    fn request(properties: &[(&str, &str)]) -> AmqpMessage {
        let mut builder = ApplicationProperties::builder();
        for (key, value) in properties {
            builder = builder.insert(*key, SimpleValue::String((*value).to_owned()));
        }
        Message::builder()
            .properties(Properties {
                message_id: Some(7u64.into()),
                reply_to: Some("client".into()),
                ..Default::default()
            })
            .application_properties(builder.build())
            .body(Body::Value(AmqpValue(Value::Null)))
            .build()
    }

    fn status(message: &AmqpMessage) -> Option<&SimpleValue> {
        message
            .application_properties
            .as_ref()?
            .0
            .get("status-code")
    }

    fn attributes(message: &AmqpMessage) -> &OrderedMap<Value, Value> {
        match &message.body {
            Body::Value(AmqpValue(Value::Map(map))) => map,
            other => panic!("expected a map body, got {other:?}"),
        }
    }

    fn attribute<'a>(message: &'a AmqpMessage, key: &str) -> &'a Value {
        attributes(message)
            .get(&Value::String(key.to_owned()))
            .unwrap()
    }

    #[test]
    fn put_token_answers_202_and_records_the_audience() {
        let mut log = NodeLog::default();
        let store = Store::new(&[]).unwrap();
        let reply = respond(
            &store,
            &mut log,
            Node::Cbs,
            &request(&[
                ("operation", "put-token"),
                ("name", "amqps://localhost/eh1/Partitions/0"),
            ]),
        );
        assert_eq!(status(&reply), Some(&SimpleValue::Int(202)));
        assert_eq!(reply.properties.unwrap().correlation_id, Some(7u64.into()));
        assert_eq!(log.audiences, ["amqps://localhost/eh1/Partitions/0"]);
    }

    #[test]
    fn reads_hub_and_partition_properties_with_the_service_types() {
        let store = Store::new(&[HubConfig::new("eh1", 2).unwrap()]).unwrap();
        let mut log = NodeLog::default();
        let hub = respond(
            &store,
            &mut log,
            Node::Management,
            &request(&[
                ("operation", "READ"),
                ("type", EVENTHUB_ENTITY),
                ("name", "EH1"),
            ]),
        );
        assert_eq!(status(&hub), Some(&SimpleValue::Int(200)));
        assert_eq!(attribute(&hub, "name"), &Value::String("eh1".into()));
        assert_eq!(
            attribute(&hub, "partition_ids"),
            &Value::Array(Array(vec![
                Value::String("0".into()),
                Value::String("1".into())
            ]))
        );
        let partition = respond(
            &store,
            &mut log,
            Node::Management,
            &request(&[
                ("operation", "READ"),
                ("type", PARTITION_ENTITY),
                ("name", "eh1"),
                ("partition", "1"),
            ]),
        );
        assert_eq!(
            attribute(&partition, "last_enqueued_sequence_number"),
            &Value::Long(-1)
        );
        assert_eq!(
            attribute(&partition, "is_partition_empty"),
            &Value::Bool(true)
        );
        assert_eq!(
            attribute(&partition, "last_enqueued_time_utc"),
            &Value::Timestamp(Timestamp::from_milliseconds(NEVER_MS))
        );
    }

    #[test]
    fn unknown_entities_answer_404_with_a_decodable_body() {
        let store = Store::new(&[HubConfig::new("eh1", 2).unwrap()]).unwrap();
        let mut log = NodeLog::default();
        for properties in [
            &[
                ("operation", "READ"),
                ("type", EVENTHUB_ENTITY),
                ("name", "nope"),
            ][..],
            &[
                ("operation", "READ"),
                ("type", PARTITION_ENTITY),
                ("name", "eh1"),
                ("partition", "9"),
            ][..],
        ] {
            let reply = respond(&store, &mut log, Node::Management, &request(properties));
            assert_eq!(status(&reply), Some(&SimpleValue::Int(404)));
            assert_eq!(reply.body, Body::Value(AmqpValue(Value::Null)));
        }
    }
}
