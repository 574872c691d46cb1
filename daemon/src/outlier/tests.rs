//! The detector's arithmetic, one rule per test, on tokio's paused clock: thresholds, gateway vs
//! 5xx counters, split local-origin errors, strict `maxEjectionPercent`, ejection timeline with
//! backoff and decay, panic mode (catalogue items 6–10 of the semantics reference).

use std::time::Duration;

use tokio::time::{Instant, advance};

use super::*;

fn policy(f: impl FnOnce(&mut OutlierDetection)) -> OutlierDetection {
    let mut p = OutlierDetection::default();
    f(&mut p);
    p
}

/// Sweeps every `interval` until endpoint `i` is back (at most 1000 ticks); returns how long
/// that took.
async fn sweep_until_back(d: &mut Detector, i: usize) -> Duration {
    let start = Instant::now();
    for _ in 0..1000 {
        advance(d.interval()).await;
        if d.sweep(Instant::now()).contains(&i) {
            return start.elapsed();
        }
    }
    panic!("endpoint {i} never came back");
}

/// Runs the sweep every `interval` for `total`, returning when each endpoint came back.
async fn sweep_for(d: &mut Detector, total: Duration) -> Vec<(usize, Duration)> {
    let start = Instant::now();
    let mut back = Vec::new();
    while start.elapsed() < total {
        advance(d.interval()).await;
        for i in d.sweep(Instant::now()) {
            back.push((i, start.elapsed()));
        }
    }
    back
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn ejects_exactly_at_the_threshold() {
    let mut d = Detector::new(policy(|p| p.max_ejection_percent = 100), 3);
    let now = Instant::now();
    for n in 1..5 {
        assert_eq!(
            d.observe(0, Outcome::Http(500), now),
            Verdict::Counted,
            "error {n}"
        );
    }
    // A success resets the run.
    d.observe(0, Outcome::Http(200), now);
    for _ in 0..4 {
        d.observe(0, Outcome::Http(503), now);
    }
    assert!(!d.is_ejected(0));
    assert_eq!(
        d.observe(0, Outcome::Http(503), now),
        Verdict::Ejected(Duration::from_secs(30)),
        "Istio's default: 5 consecutive 5xx, base 30 s"
    );
    assert!(d.is_ejected(0) && !d.eligible(0) && d.eligible(1));
    // 4xx is not an error.
    for _ in 0..10 {
        assert_eq!(d.observe(1, Outcome::Http(404), now), Verdict::Counted);
    }
    assert!(!d.is_ejected(1));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn gateway_counter_is_reset_by_other_5xx() {
    // consecutive5xxErrors: 0 disables that counter; gateway errors eject after 3.
    let p = policy(|p| {
        p.consecutive_5xx = 0;
        p.consecutive_gateway = 3;
        p.max_ejection_percent = 100;
    });
    let mut d = Detector::new(p, 3);
    let now = Instant::now();
    for _ in 0..20 {
        d.observe(0, Outcome::Http(500), now);
    }
    assert!(!d.is_ejected(0), "500 forever is never a gateway error");
    for s in [503, 503, 500, 503] {
        d.observe(1, Outcome::Http(s), now);
    }
    assert!(!d.is_ejected(1), "the 500 reset the gateway run");
    for s in [502, 503] {
        assert_eq!(d.observe(2, Outcome::Http(s), now), Verdict::Counted);
    }
    assert!(matches!(
        d.observe(2, Outcome::Http(504), now),
        Verdict::Ejected(_)
    ));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn local_origin_failures_count_separately_when_split() {
    let p = policy(|p| {
        p.split_local_origin = true;
        p.consecutive_local_origin = 2;
        p.consecutive_5xx = 0;
        p.max_ejection_percent = 100;
    });
    let mut d = Detector::new(p, 3);
    let now = Instant::now();
    assert_eq!(d.observe(0, Outcome::LocalFailure, now), Verdict::Counted);
    assert!(matches!(
        d.observe(0, Outcome::LocalFailure, now),
        Verdict::Ejected(_)
    ));
    for _ in 0..10 {
        d.observe(1, Outcome::Http(503), now);
    }
    assert!(
        !d.is_ejected(1),
        "503s never eject with consecutive5xxErrors 0"
    );
    // A successful connect resets the local-origin run.
    d.observe(2, Outcome::LocalFailure, now);
    d.observe(2, Outcome::Connected, now);
    assert_eq!(d.observe(2, Outcome::LocalFailure, now), Verdict::Counted);

    // Without the split, local failures are 503s: five of them eject (the TCP signal).
    let mut d = Detector::new(policy(|p| p.max_ejection_percent = 100), 2);
    for _ in 0..4 {
        d.observe(0, Outcome::LocalFailure, now);
    }
    assert!(matches!(
        d.observe(0, Outcome::LocalFailure, now),
        Verdict::Ejected(_)
    ));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn max_ejection_percent_is_strict() {
    let now = Instant::now();
    // Default 10 %: with 3 endpoints, ejecting one would be 33 % → never ejected.
    let mut d = Detector::new(policy(|p| p.consecutive_5xx = 1), 3);
    assert_eq!(d.observe(0, Outcome::Http(503), now), Verdict::Overflow);
    assert!(!d.is_ejected(0));
    assert_eq!(d.overflows, 1);
    // 34 %: the first bad endpoint goes, a second would make 67 %.
    let mut d = Detector::new(
        policy(|p| {
            p.consecutive_5xx = 1;
            p.max_ejection_percent = 34;
        }),
        3,
    );
    assert!(matches!(
        d.observe(0, Outcome::Http(503), now),
        Verdict::Ejected(_)
    ));
    assert_eq!(d.observe(1, Outcome::Http(503), now), Verdict::Overflow);
    // 4 bad of 5 with 60 %: three go, the fourth stays.
    let mut d = Detector::new(
        policy(|p| {
            p.consecutive_5xx = 1;
            p.max_ejection_percent = 60;
        }),
        5,
    );
    let verdicts: Vec<_> = (0..4)
        .map(|i| d.observe(i, Outcome::Http(500), now))
        .collect();
    assert_eq!(d.ejected(), 3, "{verdicts:?}");
    assert_eq!(verdicts[3], Verdict::Overflow);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn ejection_time_grows_with_repeat_ejections_and_decays() {
    let p = policy(|p| {
        p.consecutive_5xx = 1;
        p.max_ejection_percent = 100;
        p.base_ejection_time = Duration::from_secs(10);
        p.interval = Duration::from_secs(1);
    });
    let mut d = Detector::new(p, 2);
    for (round, want) in [(1, 10), (2, 20), (3, 30)] {
        assert_eq!(
            d.observe(0, Outcome::Http(500), Instant::now()),
            Verdict::Ejected(Duration::from_secs(want)),
            "ejection {round}"
        );
        // Back on the first sweep at or after the ejection time (ticks are 1 s), and it fails
        // again immediately.
        assert_eq!(
            sweep_until_back(&mut d, 0).await,
            Duration::from_secs(want),
            "ejection {round}"
        );
        assert_eq!(d.times_ejected(0), round);
    }
    // Healthy for two intervals: the multiplier decays from 3 to 1, so the next ejection is 10 s.
    sweep_for(&mut d, Duration::from_secs(2)).await;
    assert_eq!(
        d.observe(0, Outcome::Http(500), Instant::now()),
        Verdict::Ejected(Duration::from_secs(20)),
        "decayed by two steps, then one step up"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn ejection_time_is_capped_at_max_of_300s_and_base() {
    let p = policy(|p| {
        p.consecutive_5xx = 1;
        p.max_ejection_percent = 100;
        p.base_ejection_time = Duration::from_secs(120);
        p.interval = Duration::from_secs(10);
    });
    let mut d = Detector::new(p, 1);
    let mut last = Duration::ZERO;
    for _ in 0..5 {
        let Verdict::Ejected(t) = d.observe(0, Outcome::Http(500), Instant::now()) else {
            panic!("not ejected");
        };
        last = t;
        let took = sweep_until_back(&mut d, 0).await;
        assert!(
            took >= t && took < t + Duration::from_secs(10),
            "{took:?} for {t:?}"
        );
    }
    assert_eq!(last, Duration::from_secs(300));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn panic_mode_ignores_health_below_min_health_percent() {
    let now = Instant::now();
    let all_bad = |min_health| {
        let mut d = Detector::new(
            policy(|p| {
                p.consecutive_5xx = 1;
                p.max_ejection_percent = 100;
                p.min_health_percent = min_health;
            }),
            3,
        );
        for i in 0..3 {
            d.observe(i, Outcome::Http(503), now);
        }
        d
    };
    // Istio's default 0: everything ejected, nothing eligible ("no healthy upstream").
    let d = all_bad(0);
    assert_eq!(d.ejected(), 3);
    assert!(!d.panic() && (0..3).all(|i| !d.eligible(i)));
    // 50 %: fewer than half healthy → panic, every endpoint eligible again.
    let d = all_bad(50);
    assert!(d.panic() && (0..3).all(|i| d.eligible(i)));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn listed_error_codes_replace_the_5xx_rule() {
    let p = policy(|p| {
        p.consecutive_5xx = 2;
        p.max_ejection_percent = 100;
        p.http_error_codes = vec![429];
    });
    let mut d = Detector::new(p, 2);
    let now = Instant::now();
    for _ in 0..5 {
        d.observe(0, Outcome::Http(500), now);
    }
    assert!(!d.is_ejected(0), "500 is not listed");
    d.observe(1, Outcome::Http(429), now);
    assert!(matches!(
        d.observe(1, Outcome::Http(429), now),
        Verdict::Ejected(_)
    ));
}
