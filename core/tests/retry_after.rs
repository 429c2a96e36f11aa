//! `Retry-After` dates: the core reads HTTP-dates itself (it is `no_std`); here its
//! reading is compared with the `httpdate` crate's on every form RFC 9110 allows,
//! on near-misses of them, and on noise. `check_parsed` (the fuzz harness's reply
//! oracle) does the comparison.

mod fuzz_harness;

use fuzz_harness::check_parsed;
use proptest::prelude::*;
use std::time::{Duration, UNIX_EPOCH};
use tokenfence_core::*;

const LONG: [(&str, &str); 7] = [
    ("Mon", "Monday"),
    ("Tue", "Tuesday"),
    ("Wed", "Wednesday"),
    ("Thu", "Thursday"),
    ("Fri", "Friday"),
    ("Sat", "Saturday"),
    ("Sun", "Sunday"),
];

/// The three forms of the instant `secs` after the epoch, built from `httpdate`'s
/// IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`.
fn forms(secs: u64) -> [String; 3] {
    let imf = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs));
    let (wd, rest) = imf.split_once(", ").unwrap();
    let p: Vec<&str> = rest.split(' ').collect();
    let (day, mon, year, time) = (p[0], p[1], p[2], p[3]);
    let long = LONG.iter().find(|(s, _)| *s == wd).unwrap().1;
    let rfc850 = format!("{long}, {day}-{mon}-{} {time} GMT", &year[2..]);
    let padded = format!("{:>2}", day.trim_start_matches('0'));
    let asctime = format!("{wd} {mon} {padded} {time} {year}");
    [imf, rfc850, asctime]
}

fn reply_with(status: u16, retry_after: &str) -> HttpResponse {
    HttpResponse {
        status,
        headers: vec![("Retry-After".into(), retry_after.into())],
        body: Vec::new(),
    }
}

fn read(status: u16, retry_after: &str) -> Option<RetryAfter> {
    match check_parsed(&ProviderProfile::intuit(), &reply_with(status, retry_after)) {
        Err(ReplyError::RateLimited { retry_after }) => retry_after,
        Err(ReplyError::ServerError { retry_after, .. }) => retry_after,
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_three_forms_of_one_instant_are_read_alike() {
    // RFC 9110's own example, 1994-11-06 08:49:37 UTC.
    let at = RetryAfter::At(Timestamp::from_secs(784_111_777));
    let expected = Some(at);
    for form in [
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
    ] {
        assert_eq!(read(503, form), expected, "{form}");
        assert_eq!(read(429, form), expected, "{form}");
    }
    // And a date a day ahead of a clock is a day's wait from it.
    let t = Timestamp::from_secs(784_111_777 - 86_400);
    assert_eq!(at.delay_from(t), Duration::from_secs(86_400));
    // Capped, and nothing for a date already past.
    let long_ago = Timestamp::from_secs(1);
    assert_eq!(at.delay_from(long_ago), MAX_RETRY_AFTER);
    let later = Timestamp::from_secs(784_111_777 + 5);
    assert_eq!(at.delay_from(later), Duration::ZERO);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4_000))]

    #[test]
    fn every_form_of_any_instant_agrees_with_httpdate(secs in 0u64..253_402_300_800) {
        let [imf, rfc850, asctime] = forms(secs);
        let at = Some(RetryAfter::At(Timestamp::from_secs(secs)));
        prop_assert_eq!(read(503, &imf), at);
        prop_assert_eq!(read(429, &asctime), at);
        // Two-digit years: compared with httpdate's reading (check_parsed does).
        read(503, &rfc850);
    }

    #[test]
    fn a_near_miss_agrees_with_httpdate(
        secs in 0u64..253_402_300_800,
        form in 0usize..3,
        at in any::<prop::sample::Index>(),
        with in prop::sample::select(vec![' ', '0', '9', ':', ',', '-', 'x', 'G', '\u{e9}']),
        delete in any::<bool>(),
    ) {
        let mut s: Vec<char> = forms(secs)[form].chars().collect();
        let i = at.index(s.len());
        if delete { s.remove(i); } else { s[i] = with; }
        let s: String = s.into_iter().collect();
        read(503, &s);
        read(429, &s);
    }

    #[test]
    fn noise_agrees_with_httpdate(s in "[ -~]{0,40}") {
        read(503, &s);
    }
}
