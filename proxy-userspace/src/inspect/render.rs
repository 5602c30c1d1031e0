//! Human units and aligned tables (pure). Every human view of `inspect` goes through these, so
//! the snapshot tests pin the exact text.

use std::fmt::Write as _;

/// How a column is aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// An aligned text table: columns separated by two spaces, each as wide as its widest cell,
/// trailing spaces trimmed.
#[derive(Clone, Debug, Default)]
pub struct Table {
    headers: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    #[must_use]
    pub fn new(headers: &[(&'static str, Align)]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Add a row (missing cells are empty, extra cells are ignored).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, one line per row, each ending in `\n`.
    #[must_use]
    pub fn render(&self) -> String {
        let cell = |row: &Vec<String>, i: usize| row.get(i).map_or("", String::as_str).to_owned();
        let widths: Vec<usize> = self
            .headers
            .iter()
            .enumerate()
            .map(|(i, (h, _))| {
                self.rows
                    .iter()
                    .map(|r| cell(r, i).chars().count())
                    .max()
                    .unwrap_or(0)
                    .max(h.chars().count())
            })
            .collect();
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|(h, _)| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, (_, align)) in self.headers.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let text = cell(row, i);
                let pad = widths[i].saturating_sub(text.chars().count());
                match align {
                    Align::Left => {
                        line.push_str(&text);
                        line.push_str(&" ".repeat(pad));
                    }
                    Align::Right => {
                        line.push_str(&" ".repeat(pad));
                        line.push_str(&text);
                    }
                }
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
        out
    }
}

#[expect(clippy::cast_precision_loss, reason = "display with one decimal")]
fn scaled(n: u64, base: u64, units: &[&str]) -> (f64, usize) {
    let mut v = n as f64;
    let mut i = 0;
    while v >= base as f64 && i + 1 < units.len() {
        v /= base as f64;
        i += 1;
    }
    (v, i)
}

/// A count with SI suffixes: `999`, `1.2K`, `3.4M`, `5.6G`, `7.8T`.
#[must_use]
pub fn count(n: u64) -> String {
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    if n < 1000 {
        return n.to_string();
    }
    let (v, i) = scaled(n, 1000, &UNITS);
    format!("{v:.1}{}", UNITS[i])
}

/// Bytes with binary suffixes: `512 B`, `1.5 KiB`, `3.0 MiB`, `2.2 GiB`, `1.0 TiB`.
#[must_use]
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let (v, i) = scaled(n, 1024, &UNITS);
    format!("{v:.1} {}", UNITS[i])
}

/// A duration in seconds: `0.4s`, `12s`, `4m05s`, `2h03m`, `3d04h`.
#[must_use]
pub fn duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".to_owned();
    }
    if secs < 10.0 {
        return format!("{secs:.1}s");
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "finite, non-negative, whole seconds for display"
    )]
    let s = secs as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn si(v: f64) -> (f64, &'static str) {
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    let mut v = v;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < UNITS.len() {
        v /= 1000.0;
        i += 1;
    }
    (v, UNITS[i])
}

/// A per-second rate with SI suffixes: `0`, `0.5`, `12.0`, `1.2K`, `3.4M`.
#[must_use]
pub fn rate(per_s: f64) -> String {
    if !per_s.is_finite() || per_s <= 0.0 {
        return "0".to_owned();
    }
    let (v, unit) = si(per_s);
    format!("{v:.1}{unit}")
}

/// Bits per second: `0 bit/s`, `800 bit/s`, `1.2 Kbit/s`, `9.4 Gbit/s`.
#[must_use]
pub fn bits_rate(bits_per_s: f64) -> String {
    if !bits_per_s.is_finite() || bits_per_s <= 0.0 {
        return "0 bit/s".to_owned();
    }
    if bits_per_s < 1000.0 {
        return format!("{bits_per_s:.0} bit/s");
    }
    let (v, unit) = si(bits_per_s);
    format!("{v:.1} {unit}bit/s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_bytes_durations_rates() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1.0K");
        assert_eq!(count(1234), "1.2K");
        assert_eq!(count(12_345_678), "12.3M");
        assert_eq!(count(5_600_000_000), "5.6G");
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
        assert_eq!(bytes(u64::MAX), "16777216.0 TiB");
        assert_eq!(duration(0.42), "0.4s");
        assert_eq!(duration(12.9), "12s");
        assert_eq!(duration(245.0), "4m05s");
        assert_eq!(duration(7380.0), "2h03m");
        assert_eq!(duration(3.0 * 86_400.0 + 4.0 * 3600.0 + 5.0), "3d04h");
        assert_eq!(duration(-1.0), "-");
        assert_eq!(rate(0.0), "0");
        assert_eq!(rate(0.5), "0.5");
        assert_eq!(rate(1234.0), "1.2K");
        assert_eq!(bits_rate(0.0), "0 bit/s");
        assert_eq!(bits_rate(800.0), "800 bit/s");
        assert_eq!(bits_rate(1200.0), "1.2 Kbit/s");
        assert_eq!(bits_rate(9.4e9), "9.4 Gbit/s");
    }

    #[test]
    fn table_aligns_and_trims() {
        let mut t = Table::new(&[
            ("ID", Align::Right),
            ("NAME", Align::Left),
            ("N", Align::Right),
        ]);
        t.row(vec!["1".into(), "web".into(), "12".into()]);
        t.row(vec!["10".into(), "a-long-name".into(), "3".into()]);
        t.row(vec!["2".into()]);
        assert_eq!(
            t.render(),
            "ID  NAME          N\n 1  web          12\n10  a-long-name   3\n 2\n"
        );
    }
}
