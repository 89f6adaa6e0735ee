//! SMTP transcripts against a real listener over TCP: the protocol, its limits and the
//! adversarial cases (smuggling, over-long lines, NUL bytes, bad sequences, abrupt disconnects).

mod common;

use std::time::Duration;

use common::{Client, TestServer, spec};
use mailroom_config::HumanDuration;
use mailroom_queue::{Queue, QueueId};

const BODY: &[u8] =
    b"Subject: hello\r\nFrom: <sender@client.test>\r\n\r\nHello there.\r\n..dot-stuffed line\r\n";

#[tokio::test]
async fn a_message_is_queued_byte_for_byte_with_a_received_header() {
    let server = TestServer::start(spec()).await;
    let mut c = server.session().await;
    let ehlo = c.cmd("EHLO client.test", "250-mx.test").await;
    for ext in [
        "PIPELINING",
        "SIZE 26214400",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "DSN",
    ] {
        assert!(ehlo.contains(ext), "EHLO lacks {ext}: {ehlo}");
    }
    assert!(
        !ehlo.contains("AUTH"),
        "AUTH must not be offered without TLS"
    );
    assert!(!ehlo.contains("STARTTLS"), "no TLS configured");
    c.cmd(
        "MAIL FROM:<sender@client.test> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=abc+2Bd",
        "250 2.1.0",
    )
    .await;
    c.cmd(
        "RCPT TO:<rcpt@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;rcpt@example.test",
        "250 2.1.5",
    )
    .await;
    c.cmd("DATA", "354").await;
    c.send(BODY).await;
    c.send(b".\r\n").await;
    let r = c.expect("250 2.0.0 Ok: queued as ").await;
    let id: QueueId = r
        .trim_start_matches("250 2.0.0 Ok: queued as ")
        .parse()
        .expect("ulid in reply");
    c.cmd("QUIT", "221 2.0.0").await;

    let stored = server
        .queue
        .get(id)
        .await
        .expect("get")
        .expect("message is in the spool");
    let unstuffed = b"Subject: hello\r\nFrom: <sender@client.test>\r\n\r\nHello there.\r\n.dot-stuffed line\r\n";
    assert!(stored.body.starts_with(
        b"Received: from client.test ([127.0.0.1])\r\n\tby mx.test (Mailroom) with ESMTP id "
    ));
    assert!(
        stored.body.ends_with(unstuffed),
        "body differs: {:?}",
        String::from_utf8_lossy(&stored.body)
    );
    let e = stored.envelope;
    assert_eq!(e.sender, "sender@client.test");
    assert_eq!(e.recipients.len(), 1);
    assert_eq!(e.recipients[0].address, "rcpt@example.test");
    assert_eq!(e.recipients[0].domain, "example.test");
    let notify = e.recipients[0].notify.expect("NOTIFY stored");
    assert!(notify.success && notify.failure && !notify.delay && !notify.never);
    assert_eq!(
        e.recipients[0].orcpt.as_ref().map(|o| o.addr.as_str()),
        Some("rcpt@example.test")
    );
    assert_eq!(e.envid.as_deref(), Some("abc+d"));
    assert_eq!(e.ret, Some(mailroom_smtp::Ret::Hdrs));
}

#[tokio::test]
async fn pipelined_commands_get_their_replies_in_order() {
    let server = TestServer::start(spec()).await;
    let mut c = server.session().await;
    c.send(b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<x@example.test>\r\nRCPT TO:<y@elsewhere.test>\r\nRCPT TO:<z@example.test>\r\nDATA\r\n").await;
    c.expect("250-mx.test").await;
    c.expect("250 2.1.0").await;
    c.expect("250 2.1.5").await;
    c.expect("550 5.7.1").await;
    c.expect("250 2.1.5").await;
    c.expect("354").await;
    c.send(b"Subject: p\r\n\r\nbody\r\n.\r\nNOOP\r\n").await;
    c.expect("250 2.0.0 Ok: queued as").await;
    c.expect("250 2.0.0").await;
    assert_eq!(server.queued().await, 1);
}

#[tokio::test]
async fn never_an_open_relay() {
    let server = TestServer::start(spec()).await;
    let mut c = server.session().await;
    c.cmd("EHLO client.test", "250").await;
    c.cmd("MAIL FROM:<a@client.test>", "250 2.1.0").await;
    c.cmd("RCPT TO:<victim@gmail.test>", "550 5.7.1").await;
    c.cmd("RCPT TO:<victim@sub.example.test>", "550 5.7.1")
        .await;
    c.cmd("RCPT TO:<victim@[192.0.2.1]>", "550 5.7.1").await;
    c.cmd("RCPT TO:<victim@EXAMPLE.test>", "250 2.1.5").await;
    c.cmd("RCPT TO:<Postmaster>", "250 2.1.5").await;
    c.cmd("DATA", "354").await;

    let mut relay = spec();
    relay.relay_networks = vec!["127.0.0.0/8".parse().expect("net")];
    let server = TestServer::start(relay).await;
    let mut c = server.session().await;
    c.cmd("EHLO client.test", "250").await;
    c.cmd("MAIL FROM:<a@client.test>", "250 2.1.0").await;
    c.cmd("RCPT TO:<victim@gmail.test>", "250 2.1.5").await;
}

/// SMTP smuggling: none of these sequences may end the data; the whole thing is one rejected
/// message and the smuggled transaction never runs.
#[tokio::test]
async fn smuggling_variants_never_end_the_data() {
    let server = TestServer::start(spec()).await;
    for ending in [
        &b"\n.\n"[..],
        b"\r.\r\n",
        b"\n.\r\n",
        b"\r\n.\n",
        b"\r.\r",
        b"\r\n.\r",
        b"\n.\r",
    ] {
        let mut c = server.session().await;
        c.start_data("rcpt@example.test").await;
        let mut payload = b"Subject: innocent\r\n\r\nhello".to_vec();
        payload.extend_from_slice(ending);
        payload.extend_from_slice(b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n");
        c.send(&payload).await;
        c.expect("550 5.5.2").await;
        c.cmd("NOOP", "250 2.0.0").await;
        c.cmd("QUIT", "221").await;
    }
    assert_eq!(server.queued().await, 0, "nothing may be queued");
}

#[tokio::test]
async fn overlong_lines_are_refused_without_losing_the_session() {
    let server = TestServer::start(spec()).await;
    let mut c = server.session().await;
    c.line(&format!("NOOP {}", "x".repeat(600))).await;
    c.expect("500 5.5.2").await;
    c.cmd("NOOP", "250 2.0.0").await;
    // One megabyte without a line ending, then the end of the line.
    let big = vec![b'A'; 1 << 20];
    c.send(&big).await;
    c.send(b"\r\n").await;
    c.expect("500 5.5.2").await;
    c.cmd("NOOP", "250 2.0.0").await;
    // A text line over 1000 octets inside DATA rejects the message, not the session.
    c.start_data("rcpt@example.test").await;
    c.send(format!("Subject: long\r\n\r\n{}\r\n.\r\n", "y".repeat(1200)).as_bytes())
        .await;
    c.expect("550 5.5.2").await;
    c.cmd("RSET", "250 2.0.0").await;
}

#[tokio::test]
async fn a_megabyte_without_crlf_then_eof_does_not_hurt_the_server() {
    let server = TestServer::start(spec()).await;
    {
        let mut c = server.session().await;
        c.send(&vec![b'B'; 1 << 20]).await;
    }
    let mut c = server.session().await;
    c.cmd("NOOP", "250 2.0.0").await;
}

#[tokio::test]
async fn nul_bytes_are_refused() {
    let server = TestServer::start(spec()).await;
    let mut c = server.session().await;
    c.send(b"NO\0OP\r\n").await;
    c.expect("500 5.5.2").await;
    c.start_data("rcpt@example.test").await;
    c.send(b"Subject: nul\r\n\r\na\0b\r\n.\r\n").await;
    c.expect("550 5.6.0").await;
    assert_eq!(server.queued().await, 0);
}

#[tokio::test]
async fn commands_out_of_sequence_get_503() {
    let server = TestServer::start(spec()).await;
    let mut c = server.session().await;
    c.cmd("MAIL FROM:<a@client.test>", "503 5.5.1").await;
    c.cmd("EHLO client.test", "250").await;
    c.cmd("RCPT TO:<x@example.test>", "503 5.5.1").await;
    c.cmd("DATA", "503 5.5.1").await;
    c.cmd("MAIL FROM:<a@client.test>", "250 2.1.0").await;
    c.cmd("MAIL FROM:<a@client.test>", "503 5.5.1").await;
    c.cmd("DATA", "554 5.5.1").await;
    c.cmd("BOGUS", "500 5.5.2").await;
    c.cmd("VRFY someone", "252 2.5.0").await;
    c.cmd("STARTTLS", "502 5.5.1").await;
    c.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==", "538 5.7.11").await;
}

#[tokio::test]
async fn recipient_limit_gives_452() {
    let mut s = spec();
    s.limits.max_recipients = 3;
    let server = TestServer::start(s).await;
    let mut c = server.session().await;
    c.cmd("EHLO client.test", "250").await;
    c.cmd("MAIL FROM:<a@client.test>", "250").await;
    for i in 0..3 {
        c.cmd(&format!("RCPT TO:<r{i}@example.test>"), "250 2.1.5")
            .await;
    }
    c.cmd("RCPT TO:<r4@example.test>", "452 4.5.3").await;
    c.cmd("DATA", "354").await;
    c.send(b"Subject: x\r\n\r\nx\r\n.\r\n").await;
    c.expect("250 2.0.0").await;
}

#[tokio::test]
async fn size_limit_as_parameter_and_while_receiving() {
    let mut s = spec();
    s.limits.max_message_size = "10KiB".parse().expect("size");
    let server = TestServer::start(s).await;
    let mut c = server.session().await;
    let ehlo = c.cmd("EHLO client.test", "250").await;
    assert!(ehlo.contains("SIZE 10240"), "{ehlo}");
    c.cmd("MAIL FROM:<a@client.test> SIZE=20000", "552 5.3.4")
        .await;
    c.cmd("MAIL FROM:<a@client.test>", "250").await;
    c.cmd("RCPT TO:<r@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    for _ in 0..400 {
        big.extend_from_slice(b"0123456789012345678901234567890123456789012345678\r\n");
    }
    big.extend_from_slice(b".\r\n");
    c.send(&big).await;
    c.expect("552 5.3.4").await;
    // The connection stays usable.
    c.cmd("MAIL FROM:<a@client.test>", "250").await;
    c.cmd("RCPT TO:<r@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(b"Subject: small\r\n\r\nok\r\n.\r\n").await;
    c.expect("250 2.0.0 Ok: queued").await;
    assert_eq!(server.queued().await, 1);
}

#[tokio::test]
async fn idle_client_hits_the_command_timeout() {
    let mut s = spec();
    s.timeouts.command = HumanDuration::from_secs(1);
    let server = TestServer::start(s).await;
    let mut c = server.session().await;
    let started = std::time::Instant::now();
    c.expect("421 4.4.2").await;
    assert!(c.closed().await);
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn slow_data_hits_the_data_timeout_and_nothing_is_queued() {
    let mut s = spec();
    s.timeouts.data_block = HumanDuration::from_secs(1);
    let server = TestServer::start(s).await;
    let mut c = server.session().await;
    c.start_data("rcpt@example.test").await;
    c.send(b"Subject: slow\r\n\r\npart").await;
    c.expect("421 4.4.2").await;
    assert_eq!(server.queued().await, 0);
}

#[tokio::test]
async fn abrupt_disconnect_mid_data_queues_nothing() {
    let server = TestServer::start(spec()).await;
    {
        let mut c = server.session().await;
        c.start_data("rcpt@example.test").await;
        c.send(b"Subject: cut\r\n\r\nhalf a message").await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = server.session().await;
    c.cmd("NOOP", "250").await;
    assert_eq!(server.queued().await, 0);
}

#[tokio::test]
async fn too_many_errors_disconnects() {
    let mut s = spec();
    s.limits.max_errors = 3;
    let server = TestServer::start(s).await;
    let mut c = server.session().await;
    for _ in 0..4 {
        c.cmd("BOGUS", "500 5.5.2").await;
    }
    c.expect("421 4.7.0").await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn bare_lf_command_lines_are_refused() {
    let server = TestServer::start(spec()).await;
    let mut c = server.session().await;
    c.send(b"NOOP\n").await;
    c.expect("500 5.5.2").await;
    c.cmd("NOOP", "250").await;
}

#[tokio::test]
async fn bdat_chunks_are_assembled() {
    let server = TestServer::start(spec()).await;
    let mut c = server.session().await;
    c.cmd("EHLO client.test", "250").await;
    c.cmd("MAIL FROM:<a@client.test>", "250").await;
    c.cmd("RCPT TO:<r@example.test>", "250").await;
    let part1 = b"Subject: chunks\r\n\r\nfirst ";
    let part2 = b"second\r\n.not stuffed\r\n";
    c.send(format!("BDAT {}\r\n", part1.len()).as_bytes()).await;
    c.send(part1).await;
    c.expect(&format!("250 2.0.0 {} octets", part1.len())).await;
    c.send(format!("BDAT {} LAST\r\n", part2.len()).as_bytes())
        .await;
    c.send(part2).await;
    let r = c.expect("250 2.0.0 Ok: queued as ").await;
    let id: QueueId = r
        .trim_start_matches("250 2.0.0 Ok: queued as ")
        .parse()
        .expect("id");
    let m = server.queue.get(id).await.expect("get").expect("stored");
    assert!(
        m.body
            .ends_with(b"Subject: chunks\r\n\r\nfirst second\r\n.not stuffed\r\n")
    );
    // BDAT without a transaction: the chunk is consumed, 503, and the stream stays in step.
    c.send(b"BDAT 6\r\nNOOP\r\n").await;
    c.expect("503 5.5.1").await;
    c.cmd("NOOP", "250").await;
}

#[tokio::test]
async fn five_hundred_concurrent_connections() {
    let mut s = spec();
    s.limits.max_connections_per_ip = 1000;
    let server = TestServer::start(s).await;
    let mut clients = Vec::new();
    for _ in 0..500 {
        clients.push(server.session().await);
    }
    let mut tasks = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            if i % 10 == 0 {
                c.send_message("r@example.test", b"Subject: c\r\n\r\nx\r\n")
                    .await;
            }
            c.cmd("QUIT", "221").await;
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    assert_eq!(server.queued().await, 50);
}

#[tokio::test]
async fn per_ip_connection_limit() {
    let mut s = spec();
    s.limits.max_connections_per_ip = 2;
    let server = TestServer::start(s).await;
    let _a = server.session().await;
    let _b = server.session().await;
    let mut c = server.connect().await;
    c.expect("421 4.7.0").await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn graceful_shutdown_lets_a_transaction_finish() {
    let mut s = spec();
    s.timeouts.shutdown_grace = HumanDuration::from_secs(5);
    let server = TestServer::start(s).await;
    let mut idle = server.session().await;
    let mut busy = server.session().await;
    busy.start_data("rcpt@example.test").await;
    busy.send(b"Subject: during shutdown\r\n\r\n").await;
    server.shutdown.stop.cancel();
    idle.expect("421 4.3.2").await;
    assert!(idle.closed().await);
    busy.send(b"still here\r\n.\r\n").await;
    busy.expect("250 2.0.0 Ok: queued").await;
    busy.line("QUIT").await;
    let _ = busy.reply().await;
    tokio::time::timeout(Duration::from_secs(5), server.task)
        .await
        .expect("server stops")
        .expect("join");
    assert!(
        tokio::net::TcpStream::connect(server.addr).await.is_err(),
        "no longer accepting"
    );
    assert_eq!(server.queue.stats().await.expect("stats").messages, 1);
}

#[tokio::test]
async fn proxy_protocol_sets_the_client_address() {
    let mut s = spec();
    s.proxy_protocol = true;
    let server = TestServer::start(s).await;
    let mut c = server.connect().await;
    c.send(b"PROXY TCP4 192.0.2.55 127.0.0.1 40000 25\r\n")
        .await;
    c.expect("220").await;
    let id = c
        .send_message("r@example.test", b"Subject: proxied\r\n\r\nx\r\n")
        .await;
    let m = server
        .queue
        .get(id.parse().expect("id"))
        .await
        .expect("get")
        .expect("stored");
    assert!(
        m.body
            .starts_with(b"Received: from client.test ([192.0.2.55])")
    );
    assert_eq!(
        m.envelope.client_ip,
        Some("192.0.2.55".parse().expect("ip"))
    );

    let mut bad = server.connect().await;
    bad.send(b"EHLO not-a-proxy\r\n").await;
    assert!(bad.closed().await);
}

#[tokio::test]
async fn smtputf8_addresses_need_the_parameter() {
    let server = TestServer::start(spec()).await;
    let mut c = server.session().await;
    c.cmd("EHLO client.test", "250").await;
    c.cmd("MAIL FROM:<jöran@client.test>", "553 5.6.7").await;
    c.cmd("MAIL FROM:<jöran@client.test> SMTPUTF8", "250").await;
    c.cmd("RCPT TO:<tómas@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send("Subject: ünïcode\r\n\r\nhej\r\n.\r\n".as_bytes())
        .await;
    c.expect("250 2.0.0").await;
}

#[tokio::test]
async fn access_plugin_refuses_denied_clients_and_senders() {
    let mut s = spec();
    s.plugins = common::plugins(
        "  - access:\n      denySenders: ['@spam.test']\n      denyRecipients: ['blocked@example.test']\n      denyHelo: ['*.bad.test']\n",
    );
    let server = TestServer::start(s).await;
    let mut c = server.session().await;
    c.cmd("EHLO host.bad.test", "550 5.7.1").await;
    c.cmd("EHLO client.test", "250").await;
    c.cmd("MAIL FROM:<x@spam.test>", "550 5.7.1").await;
    c.cmd("MAIL FROM:<x@ham.test>", "250").await;
    c.cmd("RCPT TO:<blocked@example.test>", "550 5.7.1").await;
    c.cmd("RCPT TO:<fine@example.test>", "250").await;

    let mut deny = spec();
    deny.plugins = common::plugins("  - access:\n      denyClients: ['127.0.0.0/8']\n");
    let server = TestServer::start(deny).await;
    let mut c = server.connect().await;
    c.expect("554 5.7.1").await;
    c.cmd("EHLO client.test", "503 5.7.1").await;
    c.cmd("QUIT", "221").await;
}

fn _assert_client_is_generic(_: Client<tokio::io::DuplexStream>) {}

#[tokio::test]
async fn total_connection_limit() {
    let mut s = spec();
    s.limits.max_connections = 2;
    let server = TestServer::start(s).await;
    let _a = server.session().await;
    let b = server.session().await;
    let mut c = server.connect().await;
    c.expect("421 4.7.0").await;
    assert!(c.closed().await);
    // A freed slot is usable again.
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut d = server.session().await;
    d.cmd("NOOP", "250").await;
}
