//! Any body, topic and content type: the parser must return, never panic.
//! Run: `cargo +nightly fuzz run parse` (or `scripts/fuzz`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pumpwatch::core::report::{Incoming, parse};
use pumpwatch::core::{HeaderValue, Headers};

fuzz_target!(|data: &[u8]| {
    // First byte picks a topic and content type; an optional nested `report` header
    // table exercises the sr3/sr2 paths.
    let (sel, body) = data.split_first().unwrap_or((&0, &[]));
    let topics = ["v02.report.a", "v03.a.b", "v01.log.src.user.d", "v02.post.x", "v03.report.x"];
    let mut headers = Headers::new();
    if sel & 0x10 != 0 {
        let mut t = Headers::new();
        t.set("code", HeaderValue::Int(i64::from(sel & 0x0f) * 50));
        t.set("message", "m");
        headers.set("report", t);
    }
    if sel & 0x20 != 0 {
        headers.set("parts", String::from_utf8_lossy(&body[..body.len().min(12)]).into_owned());
    }
    let msg = Incoming {
        exchange: "xs_fuzz",
        routing_key: topics[usize::from(sel % 5)],
        body,
        content_type: if sel & 0x40 != 0 { Some("application/json") } else { None },
        user_id: None,
        headers: &headers,
    };
    let _ = parse(&msg);
});
