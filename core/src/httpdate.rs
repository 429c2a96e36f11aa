//! `HTTP-date` (RFC 9110 §5.6.7) for `Retry-After`, without `std`: the `httpdate`
//! crate needs `SystemTime`, which a `no_std` core does not have. The core's tests
//! check this parser against that crate.

use crate::time::Timestamp;

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];
const WEEKDAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const LONG_WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Reads an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), an obsolete RFC 850
/// date (`Sunday, 06-Nov-94 08:49:37 GMT`, two-digit years 70–99 are 19xx, the
/// rest 20xx) or an asctime date (`Sun Nov  6 08:49:37 1994`). A date before 1970
/// or with the wrong weekday is `None`, as is anything else.
pub(crate) fn parse(s: &str) -> Option<Timestamp> {
    let (weekday, day, month, year, time) = if let Some((weekday, rest)) = s.split_once(", ") {
        if let Some(w) = WEEKDAYS.iter().position(|d| *d == weekday) {
            // IMF-fixdate: "06 Nov 1994 08:49:37 GMT"
            let mut f = rest.split(' ');
            let parts = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
            if f.next().is_some() || parts.4 != "GMT" || parts.0.len() != 2 || parts.2.len() != 4 {
                return None;
            }
            (w, parts.0, parts.1, number(parts.2)?, parts.3)
        } else if let Some(w) = LONG_WEEKDAYS.iter().position(|d| *d == weekday) {
            // RFC 850: "06-Nov-94 08:49:37 GMT"
            let (date, rest) = rest.split_once(' ')?;
            let (time, zone) = rest.split_once(' ')?;
            let mut d = date.split('-');
            let parts = (d.next()?, d.next()?, d.next()?);
            if d.next().is_some() || zone != "GMT" || parts.0.len() != 2 || parts.2.len() != 2 {
                return None;
            }
            let yy = number(parts.2)?;
            let year = if yy < 70 { 2000 + yy } else { 1900 + yy };
            (w, parts.0, parts.1, year, time)
        } else {
            return None;
        }
    } else {
        // asctime: "Sun Nov  6 08:49:37 1994" (day padded with a space)
        let (weekday, rest) = s.split_once(' ')?;
        let (month, rest) = rest.split_once(' ')?;
        let w = WEEKDAYS.iter().position(|d| *d == weekday)?;
        if rest.len() != 16 || !rest.is_char_boundary(2) {
            return None;
        }
        let (day, rest) = rest.split_at(2);
        let day = day.strip_prefix(' ').unwrap_or(day);
        let rest = rest.strip_prefix(' ')?;
        let (time, year) = rest.split_once(' ')?;
        if year.len() != 4 {
            return None;
        }
        (w, day, month, number(year)?, time)
    };
    let month = MONTHS.iter().position(|m| *m == month)? as u64 + 1;
    let day = number(day)?;
    let mut t = time.split(':');
    let (h, m, sec) = (t.next()?, t.next()?, t.next()?);
    if t.next().is_some() || [h, m, sec].iter().any(|p| p.len() != 2) {
        return None;
    }
    let (h, m, sec) = (number(h)?, number(m)?, number(sec)?);
    if day == 0 || day > days_in_month(year, month) || h > 23 || m > 59 || sec > 59 {
        return None;
    }
    let days = days_from_civil(year, month, day)?;
    // The weekday must be the date's (1970-01-01 was a Thursday).
    if (days + 3) % 7 != weekday as u64 {
        return None;
    }
    Some(Timestamp::from_secs(
        days * 86_400 + h * 3_600 + m * 60 + sec,
    ))
}

/// Digits only (no sign, no space), as a number.
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn is_leap(y: u64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: u64, m: u64) -> u64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the given proleptic Gregorian date, `None` before it
/// (H. Hinnant's `days_from_civil`, with the year starting in March).
fn days_from_civil(y: u64, m: u64, d: u64) -> Option<u64> {
    let y = if m <= 2 { y.checked_sub(1)? } else { y };
    let era = y / 400;
    let yoe = y % 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    // 719_468 days from 0000-03-01 to 1970-01-01.
    (era * 146_097 + doe).checked_sub(719_468)
}
