//! SMTP wire protocol without I/O: the bottom layer of Mailroom, shared by the inbound server
//! (`mailroom-inbound`) and the outbound client (`mailroom-outbound`).
//!
//! A server session reads its socket into a `BytesMut` and then works only with this crate:
//! [`LineReader`] cuts bounded command lines, [`parse_command`] turns them into [`Command`]s
//! (addresses in [`address`], ESMTP parameters in [`params`], xtext in [`xtext`]), every answer
//! is a [`Reply`], and after `DATA` / `BDAT` the [`DataReceiver`] / [`BdatReceiver`] read the
//! body with strict CRLF handling (no SMTP smuggling) and bounded memory. The client side uses
//! [`ReplyParser`] and the `Display` impls of the address types. Nothing here blocks, allocates
//! without a bound, or panics on any input; the `fuzz/` crate at the repository root exercises
//! the parsers and receivers.

pub mod address;
pub mod command;
pub mod line;
pub mod params;
pub mod receiver;
pub mod reply;
pub mod xtext;

pub use address::{AddressError, ForwardPath, Mailbox, ReversePath};
pub use command::{Command, CommandError, CommandErrorKind, parse_command};
pub use line::{LineError, LineReader, MAX_COMMAND_LINE};
pub use params::{Body, MailParams, Notify, Orcpt, RcptParams, Ret};
pub use receiver::{BdatReceiver, DataError, DataReceiver, MAX_TEXT_LINE};
pub use reply::{EnhancedCode, Reply, ReplyError, ReplyParser};
