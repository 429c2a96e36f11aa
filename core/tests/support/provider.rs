//! The small provider model used by the property tests.
