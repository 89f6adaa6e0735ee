//! `mailroom inbound` on the cluster queue reports its listeners' totals to JetStream KV, where
//! the operator reads them for MailListener status.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use mailroom_inbound::report::{self, ListenerCounts};
use mailroom_testkit::{NatsServer, eventually};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One SMTP transaction; returns the reply to the end of data.
fn send(port: u16, body: &str) -> String {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    let reply = |reader: &mut BufReader<TcpStream>| {
        let mut line = String::new();
        loop {
            line.clear();
            reader.read_line(&mut line).expect("read");
            if line.as_bytes().get(3) != Some(&b'-') {
                return line;
            }
        }
    };
    reply(&mut reader);
    for cmd in [
        "EHLO client.test",
        "MAIL FROM:<a@client.test>",
        "RCPT TO:<b@example.test>",
        "DATA",
    ] {
        write!(writer, "{cmd}\r\n").expect("write");
        reply(&mut reader);
    }
    write!(writer, "{body}\r\n.\r\n").expect("write");
    let end = reply(&mut reader);
    let _ = write!(writer, "QUIT\r\n");
    end
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_reports_listener_totals_to_kv() {
    let nats = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("dir");
    let smtp = free_port();
    let http = free_port();
    let config = dir.path().join("inbound.yaml");
    std::fs::write(
        &config,
        format!(
            "listeners:\n  - name: mx\n    address: 127.0.0.1:{smtp}\n    acceptedDomains: [example.test]\n    limits: {{ maxMessageSize: 1KiB }}\n\
             queue:\n  jetstream: {{ urls: [\"{}\"], stream: MAILROOM-mail }}\nhttp: {{ address: 127.0.0.1:{http} }}\n",
            nats.url()
        ),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args(["inbound", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .spawn()
        .expect("mailroom inbound");
    eventually("the listener", Duration::from_secs(30), || async {
        TcpStream::connect(("127.0.0.1", smtp)).ok().map(|_| ())
    })
    .await;
    assert!(send(smtp, "Subject: hi\r\n\r\nhello").starts_with("250"));
    assert!(
        send(smtp, &"x".repeat(2000)).starts_with("552"),
        "over maxMessageSize"
    );
    let client = async_nats::connect(nats.url()).await.expect("nats client");
    let js = async_nats::jetstream::new(client);
    let store = report::open(&js, "MAILROOM-mail", 1).await.expect("bucket");
    // Reported at start and every 15 s; stopping writes the final totals too.
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(i32::try_from(child.id()).expect("pid")).expect("pid"),
        rustix::process::Signal::TERM,
    );
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
    let readings = report::read(&store, "mx").await.expect("read");
    assert_eq!(readings.len(), 1, "{readings:?}");
    assert_eq!(
        readings[0].1,
        ListenerCounts {
            accepted: 1,
            rejected: 1
        }
    );
}
