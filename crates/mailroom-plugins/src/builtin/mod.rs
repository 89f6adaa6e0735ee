//! The built-in plugins. Each has a typed spec in `mailroom-config`.

mod access;
mod headers;

pub use access::AccessPlugin;
pub use headers::{HeadersPlugin, has_header, header_value};
