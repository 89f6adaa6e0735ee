//! The chain's rules: plugins in declaration order, the first verdict other than Continue ends
//! the hook, Accept skips the rest, refusals carry their reply, data edits accumulate.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use mailroom_plugins::{MessageEdits, Plugin, PluginChain, SessionInfo, Transaction, Verdict};
use mailroom_smtp::{MailParams, ReversePath};

struct Fixed {
    name: &'static str,
    verdict: Verdict,
    calls: Arc<AtomicUsize>,
}

#[async_trait]
impl Plugin for Fixed {
    fn name(&self) -> &'static str {
        self.name
    }
    async fn helo(&self, _s: &SessionInfo, _name: &str) -> Verdict {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.verdict.clone()
    }
    async fn data(
        &self,
        _s: &SessionInfo,
        _tx: &Transaction,
        _body: &[u8],
        edits: &mut MessageEdits,
    ) -> Verdict {
        self.calls.fetch_add(1, Ordering::SeqCst);
        edits.add_header(format!("X-{}", self.name), "seen\r\ninjected");
        self.verdict.clone()
    }
}

fn info() -> SessionInfo {
    SessionInfo {
        esmtp: true,
        ..SessionInfo::new(
            "t",
            "mx.test",
            "192.0.2.1:1000".parse().expect("addr"),
            "192.0.2.2:25".parse().expect("addr"),
        )
    }
}

fn chain(verdicts: Vec<(&'static str, Verdict)>) -> (PluginChain, Vec<Arc<AtomicUsize>>) {
    let mut counters = Vec::new();
    let plugins: Vec<Arc<dyn Plugin>> = verdicts
        .into_iter()
        .map(|(name, verdict)| {
            let calls = Arc::new(AtomicUsize::new(0));
            counters.push(Arc::clone(&calls));
            Arc::new(Fixed {
                name,
                verdict,
                calls,
            }) as Arc<dyn Plugin>
        })
        .collect();
    (PluginChain::new(plugins), counters)
}

#[tokio::test]
async fn every_verdict_has_its_effect() {
    let reject = Verdict::reject(550, (5, 7, 1), "no");
    let tempfail = Verdict::tempfail(451, (4, 7, 1), "later");
    let disconnect = Verdict::disconnect(421, (4, 7, 0), "bye");
    for (first, expected, second_called) in [
        (Verdict::Continue, Verdict::Continue, 1),
        (Verdict::Accept, Verdict::Accept, 0),
        (reject.clone(), reject, 0),
        (tempfail.clone(), tempfail, 0),
        (disconnect.clone(), disconnect, 0),
    ] {
        let (c, calls) = chain(vec![("first", first), ("second", Verdict::Continue)]);
        assert_eq!(c.helo(&info(), "client.test").await, expected);
        assert_eq!(calls[0].load(Ordering::SeqCst), 1);
        assert_eq!(
            calls[1].load(Ordering::SeqCst),
            second_called,
            "for {expected:?}"
        );
    }
}

#[test]
fn verdict_constructors_keep_the_reply_class() {
    let Verdict::Reject(r) = Verdict::reject(450, (4, 1, 1), "wrong class") else {
        panic!("reject")
    };
    assert_eq!(r.code, 550, "a reject is always 5xx");
    assert_eq!(r.to_bytes(), b"550 5.1.1 wrong class\r\n");
    let Verdict::TempFail(r) = Verdict::tempfail(550, (5, 1, 1), "wrong class") else {
        panic!("tempfail")
    };
    assert_eq!(r.code, 451, "a tempfail is always 4xx");
    assert!(r.to_bytes().starts_with(b"451 4.1.1 "));
}

#[tokio::test]
async fn data_edits_accumulate_and_are_sanitised() {
    let (c, _) = chain(vec![("a", Verdict::Continue), ("b", Verdict::Continue)]);
    let tx = Transaction::new(ReversePath::Null, MailParams::default());
    let mut edits = MessageEdits::default();
    assert_eq!(
        c.data(&info(), &tx, b"Subject: x\r\n\r\nbody\r\n", &mut edits)
            .await,
        Verdict::Continue
    );
    assert_eq!(edits.add_headers.len(), 2);
    assert_eq!(
        edits.add_headers[0],
        ("X-a".to_string(), "seen  injected".to_string())
    );
}
