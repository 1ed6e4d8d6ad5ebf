//! Rendering helpers of the technician commands: aligned tables, colour (only on a terminal and
//! without `NO_COLOR`), sparklines and the export progress bar.
//!
//! Nothing here escapes: callers pass texts from outside through [`super::esc`] first. Widths
//! count characters, so an escaped id (`\x1b`) is measured as printed.

use std::io::IsTerminal as _;

/// Whether to colour what goes to stdout: stdout is a terminal and `NO_COLOR` is unset or empty
/// (<https://no-color.org>).
pub fn stdout_colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Writes `text` to stdout. A closed pipe (`| head`) is not an error: the reader has what it
/// wanted. Returns false once stdout is gone, so that a loop can stop.
///
/// # Errors
/// Any other write error.
pub fn emit(text: &str) -> std::io::Result<bool> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e),
    }
}

/// A colour for a cell or a word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paint {
    /// Healthy: ONLINE, connected, ACTIVE, ok.
    Good,
    /// Needs a look: PAUSED, BANNED, pending with failures.
    Warn,
    /// Broken: OFFLINE, disconnected, DISABLED_DUE_TO_ERRORS, not running.
    Bad,
    /// Secondary text (headers).
    Dim,
}

impl Paint {
    fn code(self) -> &'static str {
        match self {
            Paint::Good => "32",
            Paint::Warn => "33",
            Paint::Bad => "31",
            Paint::Dim => "2",
        }
    }
}

/// Applies colours, or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    pub colour: bool,
}

impl Style {
    /// Colour when stdout is a terminal and `NO_COLOR` is unset.
    pub fn for_stdout() -> Style {
        Style {
            colour: stdout_colour(),
        }
    }

    /// `text` in `paint` (SGR codes only when colouring).
    pub fn paint(&self, paint: Option<Paint>, text: &str) -> String {
        match paint {
            Some(p) if self.colour => format!("\x1b[{}m{text}\x1b[0m", p.code()),
            _ => text.to_string(),
        }
    }
}

/// The colour of a link, connectivity or sink status word.
pub fn paint_for(word: &str) -> Option<Paint> {
    match word {
        "ONLINE" | "connected" | "ACTIVE" | "running" | "ok" | "synced" | "delivered" => {
            Some(Paint::Good)
        }
        "PAUSED" | "BANNED" | "starting" | "pending" | "unsynced" => Some(Paint::Warn),
        "OFFLINE" | "disconnected" | "DISABLED_DUE_TO_ERRORS" | "not running" | "dead" => {
            Some(Paint::Bad)
        }
        _ => None,
    }
}

/// Column alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table printed with columns as wide as their widest cell, two spaces apart; the last column
/// is not padded (no trailing blanks).
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<(String, Align)>,
    rows: Vec<Vec<(String, Option<Paint>)>>,
}

impl Table {
    /// A table with these headers and alignments.
    pub fn new(headers: &[(&str, Align)]) -> Table {
        Table {
            headers: headers.iter().map(|(h, a)| (h.to_string(), *a)).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row of plain cells.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows
            .push(cells.into_iter().map(|c| (c.into(), None)).collect());
    }

    /// Adds a row whose cells may carry a colour.
    pub fn painted_row(&mut self, cells: Vec<(String, Option<Paint>)>) {
        self.rows.push(cells);
    }

    /// Whether no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as lines, each prefixed by `indent`.
    pub fn render(&self, style: Style, indent: &str) -> String {
        let n = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|(h, _)| width(h)).collect();
        for r in &self.rows {
            for (i, (c, _)) in r.iter().enumerate().take(n) {
                widths[i] = widths[i].max(width(c));
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &[(String, Option<Paint>)], header: bool| {
            let mut l = String::from(indent);
            for (i, (text, paint)) in cells.iter().enumerate().take(n) {
                let last = i + 1 == n;
                let pad = widths[i].saturating_sub(width(text));
                let align = self.headers[i].1;
                if align == Align::Right {
                    l.push_str(&" ".repeat(pad));
                }
                let paint = if header { Some(Paint::Dim) } else { *paint };
                l.push_str(&style.paint(paint, text));
                if align == Align::Left && !last {
                    l.push_str(&" ".repeat(pad));
                }
                if !last {
                    l.push_str("  ");
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        let header: Vec<(String, Option<Paint>)> = self
            .headers
            .iter()
            .map(|(h, _)| (h.clone(), None))
            .collect();
        line(&mut out, &header, true);
        for r in &self.rows {
            line(&mut out, r, false);
        }
        out
    }
}

/// Printed width of `s` in characters.
pub fn width(s: &str) -> usize {
    s.chars().count()
}

/// The eight block characters of a sparkline, lowest first.
pub const BLOCKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
/// What a sparkline shows for a bucket without data.
pub const EMPTY: char = '·';

/// One row of block characters for `values` on the scale `lo..=hi` (shared between rows, so two
/// lines can be compared: a temperature row that stays below its setpoint row is visible at a
/// glance). `None` buckets print [`EMPTY`].
pub fn sparkline(values: &[Option<f64>], lo: f64, hi: f64) -> String {
    values
        .iter()
        .map(|v| match v {
            None => EMPTY,
            Some(v) => {
                let span = hi - lo;
                let i = if span <= f64::EPSILON {
                    3
                } else {
                    (((v - lo) / span) * 7.0).round().clamp(0.0, 7.0) as usize
                };
                BLOCKS[i]
            }
        })
        .collect()
}

/// The time axis under a sparkline of `columns` buckets covering `window_ms` and ending at the
/// window's end: `|` ticks at the start, the middle and the end, labelled with how long before
/// the end they are (`-24h`, `-12h`, `now` or `end`).
pub fn time_axis(columns: usize, window_ms: i64, end_label: &str) -> (String, String) {
    if columns < 3 {
        return (String::new(), String::new());
    }
    let mid = columns / 2;
    let mut ticks: Vec<char> = vec!['─'; columns];
    ticks[0] = '├';
    ticks[mid] = '┼';
    ticks[columns - 1] = '┤';
    let left = format!("-{}", short_duration(window_ms));
    let middle = format!("-{}", short_duration(window_ms / 2));
    let mut labels: Vec<char> = vec![' '; columns];
    let mut put = |at: usize, s: &str| {
        for (i, c) in s.chars().enumerate() {
            if let Some(slot) = labels.get_mut(at + i) {
                *slot = c;
            }
        }
    };
    put(0, &left);
    put(mid.saturating_sub(width(&middle) / 2), &middle);
    put(columns.saturating_sub(width(end_label)), end_label);
    let labels: String = labels.into_iter().collect();
    (ticks.into_iter().collect(), labels.trim_end().to_string())
}

/// `24h`, `12h`, `90m`, `45s`: the largest whole unit.
pub fn short_duration(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    if s >= 3600 && s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s >= 60 && s % 60 == 0 {
        format!("{}m", s / 60)
    } else if s > 0 {
        format!("{s}s")
    } else {
        format!("{}ms", ms.max(0))
    }
}

/// A progress bar on stderr for `total` steps, hidden when stderr is not a terminal (scripts,
/// pipes, tests) or `total` is small enough to finish at once.
pub fn progress(total: u64, what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() || total < 10_000 {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr_with_hz(4),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} {wide_bar} {percent:>3}%  {human_pos}/{human_len} positions  eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_aligns_by_characters_and_leaves_no_trailing_blanks() {
        let mut t = Table::new(&[
            ("device", Align::Left),
            ("seq", Align::Right),
            ("state", Align::Left),
        ]);
        t.row(["trv-bad\\x1b", "7", "ONLINE"]);
        t.row(["wohnzimmer-ü", "1234", ""]);
        assert_eq!(
            t.render(Style { colour: false }, "  "),
            "  device         seq  state\n  trv-bad\\x1b      7  ONLINE\n  wohnzimmer-ü  1234\n"
        );
    }

    #[test]
    fn colour_wraps_the_padded_cell_and_never_shifts_columns() {
        let mut t = Table::new(&[("state", Align::Left), ("n", Align::Right)]);
        t.painted_row(vec![
            ("OFFLINE".into(), Some(Paint::Bad)),
            ("1".into(), None),
        ]);
        t.painted_row(vec![("ON".into(), Some(Paint::Good)), ("22".into(), None)]);
        let s = t.render(Style { colour: true }, "");
        assert_eq!(
            s,
            "\x1b[2mstate\x1b[0m     \x1b[2mn\x1b[0m\n\x1b[31mOFFLINE\x1b[0m   1\n\x1b[32mON\x1b[0m       22\n"
        );
    }

    #[test]
    fn sparklines_share_a_scale_and_show_gaps() {
        let t = [Some(17.0), Some(18.0), None, Some(19.0), Some(21.0)];
        assert_eq!(sparkline(&t, 17.0, 21.0), "▁▃·▅█");
        // A flat line sits in the middle rather than at the floor.
        assert_eq!(sparkline(&[Some(5.0), Some(5.0)], 5.0, 5.0), "▄▄");
        assert_eq!(sparkline(&[None, None], 0.0, 1.0), "··");
    }

    #[test]
    fn the_time_axis_marks_start_middle_and_end() {
        let (ticks, labels) = time_axis(48, 86_400_000, "now");
        assert_eq!(width(&ticks), 48);
        assert!(ticks.starts_with('├') && ticks.ends_with('┤'));
        assert_eq!(ticks.chars().nth(24), Some('┼'));
        assert!(labels.starts_with("-24h"), "{labels}");
        assert!(labels.ends_with("now"), "{labels}");
        assert_eq!(labels.find("-12h"), Some(22));
        assert_eq!(short_duration(96_000), "96s");
        assert_eq!(short_duration(5_400_000), "90m");
    }
}
