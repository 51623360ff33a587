//! Summaries of repeated measurements and the plain-text tables they print in.

/// Minimum, median and maximum of repeated measurements.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub max: f64,
    /// First and third quartiles (linear interpolation): half the
    /// measurements lie between them.
    pub q1: f64,
    pub q3: f64,
}

impl Summary {
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        // The mean of the two middle values for an even count, so that two
        // pairs do not report the worse one as "the median".
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        let quantile = |q: f64| {
            let at = q * (n - 1) as f64;
            let (low, high) = (at.floor() as usize, at.ceil() as usize);
            sorted[low] + (sorted[high] - sorted[low]) * (at - low as f64)
        };
        Some(Self {
            n,
            min: sorted[0],
            median,
            max: sorted[n - 1],
            q1: quantile(0.25),
            q3: quantile(0.75),
        })
    }

    /// Whether `value` lies between the quartiles: the measurements cannot
    /// tell it apart from the median then.
    pub fn straddles(&self, value: f64) -> bool {
        self.q1 <= value && value <= self.q3
    }
}

/// Left-aligned first column, right-aligned numbers, widths fitted to the
/// content: readable in a terminal and in a CI log alike.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// A row of `label`, n, min, median, max (formatted by `format`), then
    /// `extra` cells.
    pub fn summary_row(
        &mut self,
        label: &str,
        summary: Option<Summary>,
        format: impl Fn(f64) -> String,
        extra: &[String],
    ) {
        let mut cells = vec![label.to_owned()];
        match summary {
            Some(s) => cells.extend([
                s.n.to_string(),
                format(s.min),
                format(s.median),
                format(s.max),
            ]),
            None => cells.extend(["0", "-", "-", "-"].map(str::to_owned)),
        }
        cells.extend(extra.iter().cloned());
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.header.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0; columns];
        for row in self.rows.iter().chain([&self.header]) {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |row: &[String]| {
            let mut text = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = row.get(i).map_or("", String::as_str);
                if i == 0 {
                    text.push_str(&format!("{cell:<width$}"));
                } else {
                    text.push_str(&format!("  {cell:>width$}"));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(&self.header);
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        line(&rule);
        for row in &self.rows {
            line(row);
        }
        out
    }
}

/// One target of the issue, and whether this run met it.
#[derive(Debug, Clone)]
pub struct Check {
    pub what: String,
    pub measured: String,
    pub target: String,
    /// None when the measurement could not be made.
    pub met: Option<bool>,
    /// A figure to report, with no target to meet.
    pub informational: bool,
    /// The noise of the measurement covers the target.
    pub inconclusive: bool,
}

impl Check {
    pub fn new(what: &str, measured: String, target: &str, met: Option<bool>) -> Self {
        Self {
            what: what.to_owned(),
            measured,
            target: target.to_owned(),
            met,
            informational: false,
            inconclusive: false,
        }
    }

    pub fn info(what: &str, measured: String) -> Self {
        Self {
            informational: true,
            ..Self::new(what, measured, "-", None)
        }
    }

    pub fn verdict(&self) -> &'static str {
        if self.informational {
            return "reported";
        }
        if self.inconclusive {
            return "inconclusive";
        }
        match self.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        }
    }
}

pub fn checks_table(checks: &[Check]) -> String {
    let mut table = Table::new(&["target", "measured", "goal", "verdict"]);
    for check in checks {
        table.row([
            check.what.clone(),
            check.measured.clone(),
            check.target.clone(),
            check.verdict().to_owned(),
        ]);
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_even_count_is_the_middle_mean() {
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((s.min, s.median, s.max, s.n), (1.0, 2.5, 4.0, 4));
        assert_eq!((s.q1, s.q3), (1.75, 3.25));
        assert!(s.straddles(2.0) && !s.straddles(3.5));
    }

    #[test]
    fn median_of_odd_count_ignores_non_finite() {
        let s = Summary::of(&[5.0, f64::NAN, 1.0, 3.0]).unwrap();
        assert_eq!((s.min, s.median, s.max, s.n), (1.0, 3.0, 5.0, 3));
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn table_aligns_columns() {
        let mut table = Table::new(&["what", "value"]);
        table.row(["a", "1"]);
        table.row(["longer", "100"]);
        assert_eq!(
            table.render(),
            "what    value\n------  -----\na           1\nlonger    100\n"
        );
    }
}
