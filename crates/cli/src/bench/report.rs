//! Turning timings into the table and the JSON of `dynprobe bench`.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::host::Host;
use super::measure::Timing;
use super::rows::{Measure, Row, KERNEL_UPROBE, SIGTRAP_FLOOR};

/// The reference rows that get a column of their own in the table; ratios to others are
/// in the note (and all of them in the JSON).
const TABLE_RATIOS: [&str; 2] = [SIGTRAP_FLOOR, KERNEL_UPROBE];

/// The results of one run, one entry per row that ran, and the machine they ran on.
#[derive(Serialize)]
pub struct Report {
    host: Host,
    rows: Vec<ReportRow>,
}

/// One row of the report; its JSON form is part of the command's interface.
#[derive(Serialize)]
struct ReportRow {
    name: &'static str,
    /// Nanoseconds the instrumentation adds to each call; `null` when the row failed.
    ns_per_hit: Option<f64>,
    /// Nanoseconds added per hit between the row's fastest batch and its baseline's
    /// fastest: the figure of the host's steady phases, which the median misses when the
    /// host slows down in phases (see the host's `steadiness`); `null` when the row failed.
    best_ns_per_hit: Option<f64>,
    /// Median nanoseconds per call, instrumentation included.
    #[serde(skip_serializing_if = "Option::is_none")]
    ns_per_call: Option<f64>,
    /// Milliseconds, for a row whose figure is one operation's duration (`attach-ms`,
    /// `detach-ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    ms: Option<f64>,
    /// Why the row has no number.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// `x_<reference>`: this row's added cost divided by the reference row's, `null` when
    /// the reference has no positive number.
    #[serde(flatten)]
    ratios: BTreeMap<String, Option<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    calls_per_batch: Option<u64>,
    /// Nanoseconds per call of each batch; the median of them is `ns_per_call`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    batches_ns_per_call: Vec<f64>,
    /// What the row measures, and what the measurement found that makes its number doubtful.
    note: String,
}

impl Report {
    /// Computes added costs and ratios. A row whose baseline is missing gets an error
    /// rather than an absolute number posing as an added one.
    pub fn new(host: Host, outcomes: &[(&Row, Result<Timing, String>)]) -> Self {
        let outcome = |name: &str| outcomes.iter().find(|(row, _)| row.name == name);
        let figure_of = |name: &str, figure: fn(&Timing) -> f64| outcome(name)?.1.as_ref().ok().map(figure);
        let per_call = |name: &str| figure_of(name, Timing::ns_per_call);
        // A row without a baseline subtracts nothing.
        let baseline_by = |row: &Row, figure: fn(&Timing) -> f64| match row.baseline() {
            Some(name) => figure_of(name, figure),
            None => Some(0.0),
        };
        let baseline_of = |row: &Row| baseline_by(row, Timing::ns_per_call);
        let added = |name: &str| Some(per_call(name)? - baseline_of(outcome(name)?.0)?);

        let rows = outcomes
            .iter()
            .map(|(row, outcome)| {
                let mut report = ReportRow {
                    name: row.name,
                    ns_per_hit: None,
                    best_ns_per_hit: None,
                    ns_per_call: None,
                    ms: None,
                    error: None,
                    ratios: BTreeMap::new(),
                    calls_per_batch: None,
                    batches_ns_per_call: Vec::new(),
                    note: row.about.to_owned(),
                };
                match (outcome, baseline_of(row)) {
                    (Err(err), _) => report.error = Some(err.clone()),
                    (Ok(_), None) => {
                        report.error = Some(format!("no {} to subtract", row.baseline().unwrap_or_default()))
                    }
                    (Ok(timing), Some(baseline)) => {
                        let ns_added = timing.ns_per_call() - baseline;
                        report.ns_per_hit = Some(round(ns_added, 100.0));
                        report.best_ns_per_hit = baseline_by(row, Timing::best_ns_per_call)
                            .map(|baseline| round(timing.best_ns_per_call() - baseline, 100.0));
                        report.ns_per_call = Some(round(timing.ns_per_call(), 100.0));
                        if matches!(
                            row.measure,
                            Measure::Attach
                                | Measure::Detach
                                | Measure::RecordAttach
                                | Measure::Startup(_)
                                | Measure::Resolve
                        ) {
                            report.ms = Some(round(timing.ns_per_call() / 1e6, 100.0));
                        }
                        report.calls_per_batch = Some(timing.calls_per_batch);
                        report.batches_ns_per_call = timing.batches.iter().map(|&ns| round(ns, 100.0)).collect();
                        if let Some(remark) = &timing.remark {
                            let _ = write!(report.note, "; {remark}");
                        }
                        for &reference in row.compare_to {
                            let ratio = added(reference)
                                .filter(|&reference| reference > 0.0)
                                .map(|reference| significant(ns_added / reference, 3));
                            report.ratios.insert(ratio_key(reference), ratio);
                        }
                    }
                }
                report
            })
            .collect();
        Report { host, rows }
    }

    /// The report as `{"host":{…},"rows":[…]}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a report is plain data and always serializes")
    }

    /// The report as its host's line and an aligned text table.
    pub fn table(&self) -> String {
        let mut out = format!("{}\n", self.host);
        let _ = writeln!(
            out,
            "{:<18} {:>10} {:>14} {:>10} {:>15} {:>15}  note",
            "row", "ns/call", "ns added/hit", "best added", "×sigtrap-floor", "×kernel-uprobe"
        );
        for row in &self.rows {
            let number = |value: Option<f64>, precision: usize| {
                value.map_or_else(|| "-".to_owned(), |v| format!("{v:.precision$}"))
            };
            let ratio = |reference: &str| ratio_text(row.ratios.get(&ratio_key(reference)).copied().flatten());
            let mut note = match &row.error {
                Some(err) => format!("error: {err}"),
                None => row.note.clone(),
            };
            for (key, value) in &row.ratios {
                if !TABLE_RATIOS.iter().any(|reference| ratio_key(reference) == *key) {
                    let _ = write!(note, "; {key} {}", ratio_text(*value));
                }
            }
            let _ = writeln!(
                out,
                "{:<18} {:>10} {:>14} {:>10} {:>15} {:>15}  {note}",
                row.name,
                number(row.ns_per_call, 1),
                number(row.ns_per_hit, 1),
                number(row.best_ns_per_hit, 1),
                ratio(TABLE_RATIOS[0]),
                ratio(TABLE_RATIOS[1]),
            );
        }
        out
    }
}

/// JSON key of the ratio to `reference`: `x_kernel_uprobe` for `kernel-uprobe`.
fn ratio_key(reference: &str) -> String {
    format!("x_{}", reference.replace('-', "_"))
}

/// A ratio with at least two decimals and three significant digits: a nanosecond probe is
/// a few thousandths of a kernel uprobe, which two decimals would show as 0.00.
fn ratio_text(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.*}", decimals(v, 3).max(2)))
}

/// Decimals that show `value` with `digits` significant digits.
fn decimals(value: f64, digits: i32) -> usize {
    if value == 0.0 || !value.is_finite() {
        return 0;
    }
    (digits - 1 - value.abs().log10().floor() as i32).max(0) as usize
}

/// Rounds `value` to `digits` significant digits.
fn significant(value: f64, digits: i32) -> f64 {
    round(value, 10f64.powi(decimals(value, digits) as i32))
}

/// Rounds to `1/scale`: more digits than that are noise and only clutter the output.
fn round(value: f64, scale: f64) -> f64 {
    (value * scale).round() / scale
}
