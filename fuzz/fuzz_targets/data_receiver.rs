//! Fuzzes `DataReceiver`: the first three bytes choose the size and line limits, the rest is
//! the DATA stream. Checks that the stored body never exceeds `max_size`, that feeding the
//! stream whole, byte by byte and in uneven pieces gives identical results, and that an
//! accepted body, dot-stuffed again, is read back unchanged.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mailroom_smtp::{DataError, DataReceiver};

#[derive(Debug, PartialEq)]
struct Outcome {
    done: bool,
    body: Vec<u8>,
    result: Result<u64, DataError>,
    rest: Vec<u8>,
}

fn feed(input: &[u8], max_size: u64, max_line: usize, pieces: &[usize]) -> Outcome {
    let mut rx = DataReceiver::new(max_size, max_line);
    let mut buf = BytesMut::new();
    let mut body = Vec::new();
    let mut pos = 0;
    let mut done = false;
    let mut k = 0;
    while pos < input.len() && !done {
        let n = pieces[k % pieces.len()].clamp(1, input.len() - pos);
        k += 1;
        buf.extend_from_slice(&input[pos..pos + n]);
        pos += n;
        done = rx.ingest(&mut buf, &mut body);
        assert!(
            body.len() as u64 <= max_size,
            "stored body exceeds max_size"
        );
        if !done {
            assert!(buf.is_empty());
        }
    }
    buf.extend_from_slice(&input[pos..]);
    Outcome {
        done,
        body,
        result: rx.finish(),
        rest: buf.to_vec(),
    }
}

fn stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    let mut line_start = true;
    for &b in body {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    out.extend_from_slice(b".\r\n");
    out
}

fuzz_target!(|data: &[u8]| {
    let (params, input) = data.split_at(data.len().min(3));
    let params = [params, &[0, 0, 0]].concat();
    let max_size = u64::from(u16::from_le_bytes([params[0], params[1]]));
    let max_line = usize::from(params[2]).max(2);

    let whole = feed(input, max_size, max_line, &[usize::MAX]);
    assert_eq!(feed(input, max_size, max_line, &[1]), whole, "byte by byte");
    assert_eq!(
        feed(input, max_size, max_line, &[3, 1, 7, 2, 64]),
        whole,
        "pieces"
    );

    if whole.done
        && let Ok(size) = whole.result
    {
        assert_eq!(size, whole.body.len() as u64);
        assert!(whole.body.is_empty() || whole.body.ends_with(b"\r\n"));
        let again = stuff(&whole.body);
        let replay = feed(&again, max_size, max_line, &[usize::MAX]);
        assert!(replay.done);
        assert!(replay.rest.is_empty());
        assert_eq!(replay.body, whole.body);
        assert_eq!(replay.result, Ok(size));
    }
});
