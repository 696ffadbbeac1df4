//! Formatting helpers for human and JSON output.

use std::fmt::Write;

pub use ckstream_format::escape_controls;

/// The error and its causes on one line, without repeating a cause that the
/// message above it already includes. Control characters (of a path in the message,
/// say) are escaped: a hostile archive's names cannot drive the terminal or forge lines.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let s = cause.to_string();
        if out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    escape_controls(&out.replace('\n', " ")).into_owned()
}

/// 1536 -> "1.5 KiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `rwxr-xr-x`-style permission string (with setuid/setgid/sticky).
pub fn mode_string(type_char: char, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(type_char);
    let bits = [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o40, 'r'),
        (0o20, 'w'),
        (0o10, 'x'),
        (0o4, 'r'),
        (0o2, 'w'),
        (0o1, 'x'),
    ];
    for (i, (bit, c)) in bits.iter().enumerate() {
        let set = mode & bit != 0;
        let special = match i {
            2 => mode & 0o4000 != 0,
            5 => mode & 0o2000 != 0,
            8 => mode & 0o1000 != 0,
            _ => false,
        };
        s.push(match (set, special, i) {
            (true, true, 8) => 't',
            (false, true, 8) => 'T',
            (true, true, _) => 's',
            (false, true, _) => 'S',
            (true, false, _) => *c,
            (false, false, _) => '-',
        });
    }
    s
}

/// UTC "YYYY-MM-DD HH:MM:SS" from nanoseconds since the epoch.
pub fn utc_time(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    let mut s = String::new();
    let _ = write!(
        s,
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    s
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// CPU seconds (user + system) and peak RSS in KiB of this process (`self`) and of its
/// waited-for children, for `--json` reports.
pub fn rusage_json() -> serde_json::Value {
    fn get(who: libc::c_int) -> (f64, i64) {
        // SAFETY: an all-zero rusage is a valid value of this plain C struct.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage fills the struct it is given, which outlives the call.
        unsafe { libc::getrusage(who, &mut u) };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        (secs(u.ru_utime) + secs(u.ru_stime), u.ru_maxrss)
    }
    let (self_cpu, self_rss) = get(libc::RUSAGE_SELF);
    let (child_cpu, child_rss) = get(libc::RUSAGE_CHILDREN);
    serde_json::json!({
        "self_cpu_seconds": self_cpu,
        "self_max_rss_kib": self_rss,
        "children_cpu_seconds": child_cpu,
        "children_max_rss_kib": child_rss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_lines_escape_control_characters() {
        let err = anyhow::Error::msg("cannot create \"evil\u{1b}[2J\u{7}name\"")
            .context("unpacking\nsomething");
        assert_eq!(
            one_line(&err),
            "unpacking something: cannot create \"evil\\u{1b}[2J\\u{7}name\""
        );
    }

    #[test]
    fn formats() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00");
        assert_eq!(utc_time(1_700_000_000_123_000_000), "2023-11-14 22:13:20");
        assert_eq!(mode_string('d', 0o755), "drwxr-xr-x");
        assert_eq!(mode_string('-', 0o4755), "-rwsr-xr-x");
        assert_eq!(mode_string('d', 0o1777), "drwxrwxrwt");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
