//! Integration tests that span several stages live in the `[[test]]` targets of this crate.
