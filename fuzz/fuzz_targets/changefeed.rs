//! The change feed's history reader and tailing algorithm: any JSON is a history page that is
//! read or refused, and whatever it names goes through a cycle whose state round-trips.
#![no_main]

use std::time::Duration;

use iomt_core::Timestamp;
use iomt_events::changefeed::{Tail, TailSettings, TailState, read_history_page};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(bundle) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let Ok(page) = read_history_page(&bundle) else {
        return;
    };
    let settings = TailSettings {
        settle: Duration::from_secs(5),
        overlap: Duration::from_secs(60),
    };
    let mut tail = Tail::new(settings, &TailState::default()).unwrap();
    let now = Timestamp::parse("2026-06-01T00:00:00Z").unwrap();
    let cycle = tail.cycle(now, page.entries.clone());
    // Published once, in order, all older than the upper bound.
    assert!(cycle.entries.iter().all(|e| e.last_updated < cycle.upper));
    assert!(cycle.entries.windows(2).all(|w| w[0].last_updated <= w[1].last_updated));
    tail.commit(&cycle);
    let again = tail.cycle(now, page.entries);
    assert!(again.entries.is_empty(), "published twice: {:?}", again.entries);
    let state = tail.state();
    let restored = Tail::new(settings, &state).expect("a saved state reads back");
    assert_eq!(restored.state(), state);
});
