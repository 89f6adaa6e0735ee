//! The built-in plugins. Each has a typed spec in `mailroom-config`.

mod access;
mod headers;
mod rspamd;

pub use access::AccessPlugin;
pub use headers::{HeadersPlugin, has_header, header_value};
pub use rspamd::RspamdPlugin;
