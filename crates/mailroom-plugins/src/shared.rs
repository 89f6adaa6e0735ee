//! State shared by every inbound process (rate-limit counters, greylist triplets): JetStream KV
//! when the queue is JetStream ([`crate::SharedBackend`]), else memory in this process.
//! (To be written with the `rateLimit` and `greylist` plugins.)
