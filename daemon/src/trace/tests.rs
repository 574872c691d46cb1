//! Request ids and trace contexts from headers, with fixed dice.

use super::*;

fn dice(roll: f64) -> Dice {
    Dice {
        request_id: [7; 16],
        trace_id: 0xabc,
        span_id: 0x1234,
        roll,
    }
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    (pairs.iter())
        .map(|(k, v)| {
            (
                hyper::header::HeaderName::from_static(k),
                v.parse().unwrap(),
            )
        })
        .collect()
}

fn written(c: &Context) -> HeaderMap {
    let mut h = HeaderMap::new();
    c.write(&mut h);
    h
}

#[test]
fn a_request_without_ids_gets_a_uuid_and_a_new_trace_sampled_at_the_percentage() {
    let c = Context::from_request(&HeaderMap::new(), 1.0, dice(0.5));
    let id = uuid::Uuid::parse_str(&c.request_id).unwrap();
    assert_eq!(id.get_version_num(), 4);
    assert_eq!(c.trace_id, format!("{:032x}", 0xabc));
    assert_eq!((c.parent_id.as_deref(), c.sampled), (None, true));
    let h = written(&c);
    assert_eq!(
        h["traceparent"],
        format!("00-{:032x}-0000000000001234-01", 0xabc).as_str()
    );
    assert_eq!(h["x-b3-traceid"], c.trace_id.as_str());
    assert_eq!(h["x-b3-sampled"], "1");
    assert!(!h.contains_key("x-b3-parentspanid"));
    // Above the percentage: not sampled.
    let c = Context::from_request(&HeaderMap::new(), 1.0, dice(1.5));
    assert!(!c.sampled);
    assert!(
        written(&c)["traceparent"]
            .to_str()
            .unwrap()
            .ends_with("-00")
    );
}

#[test]
fn a_client_context_is_continued_with_its_decision_and_a_child_span() {
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let incoming = headers(&[
        ("x-request-id", "req-1"),
        ("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01")),
        ("tracestate", "vendor=x"),
    ]);
    // The roll would not sample: the client's decision wins.
    let c = Context::from_request(&incoming, 1.0, dice(99.0));
    assert_eq!(c.request_id, "req-1");
    assert_eq!(c.trace_id, trace);
    assert_eq!(c.parent_id.as_deref(), Some("00f067aa0ba902b7"));
    assert!(c.sampled);
    let mut h = incoming.clone();
    c.write(&mut h);
    assert_eq!(
        h["traceparent"],
        format!("00-{trace}-0000000000001234-01").as_str()
    );
    assert_eq!(h["tracestate"], "vendor=x");
    // W3C only: no B3 headers are invented.
    assert!(!h.contains_key("x-b3-traceid"));
    // Not sampled upstream stays not sampled.
    let off = headers(&[("traceparent", &format!("00-{trace}-00f067aa0ba902b7-00"))]);
    assert!(!Context::from_request(&off, 100.0, dice(0.0)).sampled);
}

#[test]
fn b3_headers_are_continued_and_64_bit_trace_ids_widened() {
    let incoming = headers(&[
        ("x-b3-traceid", "463ac35c9f6413ad"),
        ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ("x-b3-sampled", "0"),
    ]);
    let c = Context::from_request(&incoming, 100.0, dice(0.0));
    assert_eq!(c.trace_id, "0000000000000000463ac35c9f6413ad");
    assert_eq!(c.parent_id.as_deref(), Some("a2fb4a1d1a96d312"));
    assert!(!c.sampled);
    let h = written(&c);
    assert_eq!(h["x-b3-parentspanid"], "a2fb4a1d1a96d312");
    assert_eq!(h["x-b3-spanid"], "0000000000001234");
    assert_eq!(h["x-b3-sampled"], "0");
    assert!(
        h["traceparent"]
            .to_str()
            .unwrap()
            .starts_with("00-0000000000000000463ac35c9f6413ad-")
    );
    // x-b3-flags: 1 (debug) samples.
    let debug = headers(&[("x-b3-traceid", "463ac35c9f6413ad"), ("x-b3-flags", "1")]);
    assert!(Context::from_request(&debug, 0.0, dice(50.0)).sampled);
}

#[test]
fn malformed_contexts_start_a_new_trace() {
    for bad in [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "garbage",
    ] {
        let c = Context::from_request(&headers(&[("traceparent", bad)]), 0.0, dice(50.0));
        assert_eq!(c.trace_id, format!("{:032x}", 0xabc), "{bad}");
        assert_eq!(c.parent_id, None, "{bad}");
    }
    // A future version with extra fields is read as 00.
    let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
    let c = Context::from_request(&headers(&[("traceparent", future)]), 0.0, dice(50.0));
    assert_eq!(c.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
}
