//! Fuzzes `BdatReceiver`: the first bytes choose the limits and the binary flag, then each
//! chunk is a length byte followed by that many bytes. Checks that chunks are consumed exactly,
//! that the stored body never exceeds `max_size`, and that whole and byte-wise feeding agree.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mailroom_smtp::{BdatReceiver, DataError};

#[derive(Debug, PartialEq)]
struct Outcome {
    body: Vec<u8>,
    result: Result<u64, DataError>,
    total: u64,
}

fn feed(chunks: &[&[u8]], max_size: u64, max_line: usize, binary: bool, piece: usize) -> Outcome {
    let mut rx = BdatReceiver::new(max_size, max_line, binary);
    let mut body = Vec::new();
    let mut buf = BytesMut::new();
    for chunk in chunks {
        rx.start_chunk(chunk.len() as u64);
        // A trailing pipelined command must never be consumed as chunk data.
        let mut wire = chunk.to_vec();
        wire.extend_from_slice(b"RSET\r\n");
        let mut done = rx.ingest(&mut buf, &mut body);
        for p in wire.chunks(piece) {
            buf.extend_from_slice(p);
            if !done {
                done = rx.ingest(&mut buf, &mut body);
            }
        }
        assert!(done);
        assert_eq!(&buf[..], b"RSET\r\n");
        buf.clear();
        assert!(
            body.len() as u64 <= max_size,
            "stored body exceeds max_size"
        );
        // Usable between chunks.
        let _ = rx.finish();
    }
    Outcome {
        body,
        result: rx.finish(),
        total: rx.total(),
    }
}

fuzz_target!(|data: &[u8]| {
    let (params, mut rest) = data.split_at(data.len().min(4));
    let params = [params, &[0, 0, 0, 0]].concat();
    let max_size = u64::from(u16::from_le_bytes([params[0], params[1]]));
    let max_line = usize::from(params[2]).max(2);
    let binary = params[3] & 1 == 1;

    let mut chunks = Vec::new();
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        chunks.push(&tail[..len]);
        rest = &tail[len..];
    }

    let whole = feed(&chunks, max_size, max_line, binary, usize::MAX);
    let expected_total: usize = chunks.iter().map(|c| c.len()).sum();
    assert_eq!(whole.total, expected_total as u64);
    assert_eq!(
        feed(&chunks, max_size, max_line, binary, 1),
        whole,
        "byte by byte"
    );
    assert_eq!(
        feed(&chunks, max_size, max_line, binary, 5),
        whole,
        "pieces of 5"
    );
    if let Ok(size) = whole.result {
        assert_eq!(size, whole.total);
        assert_eq!(whole.body, chunks.concat());
    }
});
