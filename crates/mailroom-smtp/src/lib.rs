//! SMTP wire protocol without I/O (placeholder being filled in).
pub mod address;
pub mod params;
pub use address::{ForwardPath, Mailbox, ReversePath};
pub use params::{Body, MailParams, Notify, Orcpt, RcptParams, Ret};
