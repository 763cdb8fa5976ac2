//! Dead-letter records in Event Grid's format: the event as the subscription would have
//! received it, with why and how its delivery ended.

use serde_json::Value;

use crate::event::{ChangeEvent, Publisher};
use crate::format::{Format, to_json};

/// How an event's delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undelivered {
    /// `deadLetterReason`: `MaxDeliveryAttemptsExceeded`, `TimeToLiveExceeded`,
    /// `UndeliverableDueToHttpBadRequest`, …
    pub reason: String,
    /// Attempts made.
    pub attempts: u32,
    /// Event Grid's outcome of the last attempt (`Busy`, `TimedOut`, `NotFound`, …).
    pub last_outcome: String,
    /// The HTTP status of the last attempt, when there was an answer.
    pub last_status: Option<u16>,
    /// When the event was first handed to the destination (RFC 3339).
    pub publish_time: String,
    /// When it was last tried (RFC 3339).
    pub last_attempt_time: String,
}

/// The record: the Event Grid event with `deadLetterReason`, `deliveryAttempts`,
/// `lastDeliveryOutcome`, `lastHttpStatusCode`, `publishTime` and `lastDeliveryAttemptTime`;
/// for the other formats the CloudEvents event with the same fields in lower case, as Event
/// Grid writes dead letters of CloudEvents subscriptions.
pub fn record(
    event: &ChangeEvent,
    publisher: &Publisher,
    format: Format,
    undelivered: &Undelivered,
) -> Value {
    let event_grid = format == Format::EventGrid;
    let shape = if event_grid {
        Format::EventGrid
    } else {
        Format::Cloudevents
    };
    let mut value = to_json(event, publisher, shape, None);
    let Some(object) = value.as_object_mut() else {
        return value;
    };
    let mut put = |camel: &str, v: Value| {
        let key = if event_grid {
            camel.to_owned()
        } else {
            camel.to_ascii_lowercase()
        };
        object.insert(key, v);
    };
    put("deadLetterReason", Value::from(undelivered.reason.clone()));
    put("deliveryAttempts", Value::from(undelivered.attempts));
    put(
        "lastDeliveryOutcome",
        Value::from(undelivered.last_outcome.clone()),
    );
    if let Some(code) = undelivered.last_status {
        put("lastHttpStatusCode", Value::from(code));
    }
    put("publishTime", Value::from(undelivered.publish_time.clone()));
    put(
        "lastDeliveryAttemptTime",
        Value::from(undelivered.last_attempt_time.clone()),
    );
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ChangeKind;

    #[test]
    fn event_grid_and_cloudevents_records() {
        let p = Publisher {
            source: "iomt".into(),
            fhir_account: "fhir.local".into(),
        };
        let e = ChangeEvent::new("iomt", ChangeKind::Created, "Device", "d", "1", "t");
        let u = Undelivered {
            reason: "MaxDeliveryAttemptsExceeded".into(),
            attempts: 30,
            last_outcome: "Busy".into(),
            last_status: Some(503),
            publish_time: "a".into(),
            last_attempt_time: "b".into(),
        };
        let eg = record(&e, &p, Format::EventGrid, &u);
        assert_eq!(
            eg["eventType"],
            "Microsoft.HealthcareApis.FhirResourceCreated"
        );
        assert_eq!(eg["deadLetterReason"], "MaxDeliveryAttemptsExceeded");
        assert_eq!(eg["deliveryAttempts"], 30);
        assert_eq!(eg["lastHttpStatusCode"], 503);
        let ce = record(&e, &p, Format::IdOnly, &u);
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["deadletterreason"], "MaxDeliveryAttemptsExceeded");
        assert_eq!(ce["lastdeliveryoutcome"], "Busy");
    }
}
