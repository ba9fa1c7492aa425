//! Times and durations as operators type and read them: RFC 3339 timestamps (UTC) and
//! durations such as `90s`, `5m`, `2h`, `1d`, `250ms`.

use std::time::Duration;

/// A Unix-millisecond time as RFC 3339 in UTC, to the second: `2026-12-02T16:00:00Z`.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 of a civil date (the inverse of the algorithm above).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A duration: a whole number and a unit, `ms`, `s`, `m`, `h` or `d` (`90s`, `5m`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit: write 90s, 5m, 2h, 1d or 250ms"))?;
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (ms, s, m, h or d)"
            ));
        }
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// A point in time, in Unix milliseconds: RFC 3339 (`2026-12-02T16:00:00Z`, fractions and
/// `+01:00`-style offsets allowed, `T` or a space), a date (`2026-12-02`, midnight UTC), or
/// a duration meaning that long before `now_ms` (`30m`).
pub fn parse_time(text: &str, now_ms: u64) -> Result<u64, String> {
    let t = text.trim();
    if let Ok(d) = parse_duration(t) {
        return Ok(now_ms.saturating_sub(d.as_millis() as u64));
    }
    let bad = || {
        format!(
            "{text:?} is not a time: write RFC 3339 (2026-12-02T16:00:00Z), a date (2026-12-02) or a duration ago (30m)"
        )
    };
    let num = |s: &str| -> Result<i64, String> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    let (date, rest) = match t.find(['T', 't', ' ']) {
        Some(i) => (&t[..i], Some(&t[i + 1..])),
        None => (t, None),
    };
    let mut d = date.split('-');
    let (year, month, day) = match (d.next(), d.next(), d.next(), d.next()) {
        (Some(y), Some(m), Some(dd), None) if y.len() == 4 && m.len() == 2 && dd.len() == 2 => {
            (num(y)?, num(m)?, num(dd)?)
        }
        _ => return Err(bad()),
    };
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return Err(bad());
    }
    let mut ms = days_from_civil(year, month, day) * 86_400_000;
    if let Some(rest) = rest {
        // hh:mm:ss[.fff](Z|±hh:mm)
        let (clock, offset) = match rest.find(['Z', 'z', '+', '-']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => return Err(bad()),
        };
        let (hms, frac) = match clock.split_once('.') {
            Some((a, b)) => (a, Some(b)),
            None => (clock, None),
        };
        let mut c = hms.split(':');
        let (h, m, s) = match (c.next(), c.next(), c.next(), c.next()) {
            (Some(h), Some(m), Some(s), None) => (num(h)?, num(m)?, num(s)?),
            _ => return Err(bad()),
        };
        if h > 23 || m > 59 || s > 60 {
            return Err(bad());
        }
        ms += (h * 3600 + m * 60 + s) * 1000;
        if let Some(f) = frac {
            let digits: String = f.chars().take(3).collect();
            let scale = 10i64.pow(3 - digits.len() as u32);
            ms += num(&digits)? * scale;
        }
        match offset {
            "Z" | "z" => {}
            o => {
                let sign = if o.starts_with('-') { -1 } else { 1 };
                let (oh, om) = o[1..].split_once(':').ok_or_else(bad)?;
                ms -= sign * (num(oh)? * 3600 + num(om)? * 60) * 1000;
            }
        }
    }
    u64::try_from(ms).map_err(|_| bad())
}

/// A duration for people: `850ms`, `12.3s`, `4m05s`, `2h10m`, `3d4h`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{}m{:02}s", ms / 60_000, ms % 60_000 / 1000),
        3_600_000..=86_399_999 => format!("{}h{:02}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
        _ => format!("{}d{}h", ms / 86_400_000, ms % 86_400_000 / 3_600_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_format_and_parse_back() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_999), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(1_796_169_000_123), "2026-12-01T23:50:00Z");
        for ms in [
            0,
            951_782_400_000,
            1_700_000_000_000,
            1_796_169_000_000,
            4_102_444_800_000,
        ] {
            assert_eq!(parse_time(&rfc3339(ms), 0), Ok(ms), "{}", rfc3339(ms));
        }
    }

    #[test]
    fn times_in_every_accepted_form() {
        let at = 1_796_169_000_000; // 2026-12-01T23:50:00Z
        assert_eq!(parse_time("2026-12-01T23:50:00Z", 0), Ok(at));
        assert_eq!(parse_time("2026-12-01 23:50:00z", 0), Ok(at));
        assert_eq!(parse_time("2026-12-01T23:50:00.250Z", 0), Ok(at + 250));
        assert_eq!(parse_time("2026-12-01T23:50:00.5Z", 0), Ok(at + 500));
        assert_eq!(parse_time("2026-12-02T00:50:00+01:00", 0), Ok(at));
        assert_eq!(parse_time("2026-12-01T20:50:00-03:00", 0), Ok(at));
        assert_eq!(parse_time("2026-12-02", 0), Ok(at + 10 * 60_000));
        assert_eq!(parse_time("30m", at), Ok(at - 30 * 60_000));
        for bad in [
            "",
            "yesterday",
            "2026-13-01",
            "2026-12-01T25:00:00Z",
            "2026-12-01T23:50:00",
            "26-12-01",
            "2026-12-01T23:50Z",
        ] {
            let e = parse_time(bad, at).unwrap_err();
            assert!(e.contains("is not a time"), "{bad}: {e}");
        }
    }

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("5").unwrap_err().contains("no unit"));
        assert!(parse_duration("5w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
        assert_eq!(human(Duration::from_millis(850)), "850ms");
        assert_eq!(human(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(human(Duration::from_secs(245)), "4m05s");
        assert_eq!(human(Duration::from_secs(7_800)), "2h10m");
        assert_eq!(human(Duration::from_secs(3 * 86_400 + 4 * 3600)), "3d4h");
    }
}
