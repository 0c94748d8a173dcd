//! Plain-text tables and ages, the way kubectl prints them.

use k8s_openapi::jiff::Timestamp;

/// Rows under upper-case headers, columns padded to their widest cell and three
/// spaces apart, each line indented by `indent` spaces; the last column is not
/// padded.
pub fn table(indent: usize, headers: &[&str], rows: &[Vec<String>]) -> String {
    let columns = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(columns) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = " ".repeat(indent);
        for (i, cell) in row.iter().enumerate().take(columns) {
            line.push_str(cell);
            if i + 1 < columns {
                let pad = widths[i] - cell.chars().count() + 3;
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// How long ago `since` was, as kubectl's AGE column says it (`45s`, `3m20s`,
/// `2h15m`, `5d`); `0s` for a time in the future.
pub fn age(since: Timestamp, now: Timestamp) -> String {
    let seconds = now.as_second().saturating_sub(since.as_second()).max(0);
    let (minutes, hours, days) = (seconds / 60, seconds / 3600, seconds / 86_400);
    if seconds < 120 {
        format!("{seconds}s")
    } else if minutes < 10 {
        match seconds % 60 {
            0 => format!("{minutes}m"),
            s => format!("{minutes}m{s}s"),
        }
    } else if hours < 3 {
        format!("{minutes}m")
    } else if hours < 8 {
        match minutes % 60 {
            0 => format!("{hours}h"),
            m => format!("{hours}h{m}m"),
        }
    } else if hours < 48 {
        format!("{hours}h")
    } else if days < 8 {
        match hours % 24 {
            0 => format!("{days}d"),
            h => format!("{days}d{h}h"),
        }
    } else if days < 365 * 2 {
        format!("{days}d")
    } else {
        format!("{}y", days / 365)
    }
}

/// An RFC 3339 time with its age (`2026-03-01T10:00:00Z (5d ago)`); the text as
/// it is when it does not parse.
pub fn time_and_age(rfc3339: &str, now: Timestamp) -> String {
    match rfc3339.parse::<Timestamp>() {
        Ok(t) if t > now => format!("{rfc3339} (in {})", age(now, t)),
        Ok(t) => format!("{rfc3339} ({} ago)", age(t, now)),
        Err(_) => rfc3339.to_string(),
    }
}

/// A byte count in binary units (`0 B`, `512 B`, `1.5 KiB`, `16.0 MiB`).
pub fn bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n.abs() < 1024 {
        return format!("{n} B");
    }
    // Display only: the precision lost converting to f64 does not show at one decimal.
    #[allow(clippy::cast_precision_loss)]
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().expect("time")
    }

    #[test]
    fn columns_line_up_and_the_last_is_not_padded() {
        let rows = vec![
            vec!["Ready".into(), "True".into(), "all good".into()],
            vec!["KeysReady".into(), "False".into(), "".into()],
        ];
        assert_eq!(
            table(2, &["TYPE", "STATUS", "MESSAGE"], &rows),
            "  TYPE        STATUS   MESSAGE\n  \
               Ready       True     all good\n  \
               KeysReady   False\n"
        );
    }

    #[test]
    fn ages_read_like_kubectl() {
        let now = at("2026-03-10T12:00:00Z");
        for (since, expected) in [
            ("2026-03-10T11:59:15Z", "45s"),
            ("2026-03-10T11:56:40Z", "3m20s"),
            ("2026-03-10T11:15:00Z", "45m"),
            ("2026-03-10T07:45:00Z", "4h15m"),
            ("2026-03-09T02:00:00Z", "34h"),
            ("2026-03-05T09:00:00Z", "5d3h"),
            ("2026-01-01T12:00:00Z", "68d"),
            ("2023-03-10T12:00:00Z", "3y"),
            ("2026-03-10T12:00:05Z", "0s"),
        ] {
            assert_eq!(age(at(since), now), expected, "{since}");
        }
        assert_eq!(
            time_and_age("2026-03-05T12:00:00Z", now),
            "2026-03-05T12:00:00Z (5d ago)"
        );
        assert_eq!(
            time_and_age("2026-03-11T12:00:00Z", now),
            "2026-03-11T12:00:00Z (in 24h)"
        );
    }

    #[test]
    fn bytes_in_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(16 * 1024 * 1024), "16.0 MiB");
    }
}
