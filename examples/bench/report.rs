//! Turning runs into the printed tables: medians over the repeats, each figure's ratio
//! to direct, and notes on runs that were disturbed or failed.

use std::fmt::Write as _;

use crate::{
    measure::{Percentiles, Spread, Usage},
    targets::Kind,
    workloads::{Outcome, Workload},
};

/// A run whose figure's range over the repeats is wider than this share of its median
/// is marked as disturbed.
pub const DISTURBED_RANGE: f64 = 0.20;
/// So is one during which other processes used more than this share of the machine.
pub const DISTURBED_OTHERS: f64 = 0.10;

/// One run's figures.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Gbit/s (bulk), requests/s or connections/s.
    pub rate: f64,
    pub latency: Option<Percentiles>,
    /// CPU seconds per GB (bulk) or per 10k requests or connections: the proxy's
    /// processes (None without a proxy) and the machine's.
    pub proxy_cpu: Option<f64>,
    pub machine_cpu: f64,
    /// MiB: the largest fall of the machine's MemAvailable during the run (bulk only).
    pub peak_memory: Option<f64>,
    pub others_share: f64,
}

impl Sample {
    /// `peak_memory` in bytes.
    pub fn new(
        workload: Workload,
        outcome: Outcome,
        usage: Usage,
        peak_memory: Option<u64>,
        has_proxy: bool,
    ) -> Sample {
        let seconds = outcome.elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
        let units = outcome.units as f64;
        let (rate, per) = match workload {
            Workload::Bulk { .. } => (units * 8.0 / seconds / 1e9, units / 1e9),
            _ => (units / seconds, units / 1e4),
        };
        Sample {
            rate,
            latency: Percentiles::of(outcome.latencies),
            proxy_cpu: has_proxy.then_some(usage.proxy / per),
            machine_cpu: usage.machine / per,
            peak_memory: peak_memory.map(|bytes| bytes as f64 / (1024.0 * 1024.0)),
            others_share: usage.others_share,
        }
    }
}

/// Every run of one workload against one target.
pub struct Cell {
    pub kind: Kind,
    pub samples: Vec<Sample>,
    /// Why runs failed; damaged bytes are counted in `damaged` as well.
    pub failures: Vec<String>,
    pub damaged: usize,
}

impl Cell {
    pub fn new(kind: Kind) -> Cell {
        Cell {
            kind,
            samples: Vec::new(),
            failures: Vec::new(),
            damaged: 0,
        }
    }

    fn spread(&self, figure: impl Fn(&Sample) -> Option<f64>) -> Option<Spread> {
        Spread::of(self.samples.iter().filter_map(figure))
    }

    pub fn rate(&self) -> Option<Spread> {
        self.spread(|s| Some(s.rate))
    }

    /// Whether this cell's runs were disturbed, and how, for the notes column.
    fn notes(&self) -> String {
        let mut notes = Vec::new();
        if self.damaged > 0 {
            notes.push(format!("BYTES DAMAGED in {} run(s)", self.damaged));
        }
        if let Some(first) = self.failures.first() {
            notes.push(format!("FAILED {} run(s): {first}", self.failures.len()));
        }
        if let Some(rate) = self.rate()
            && rate.relative_range() > DISTURBED_RANGE
        {
            notes.push(format!("range {:.0}%", rate.relative_range() * 100.0));
        }
        let busiest = self
            .samples
            .iter()
            .map(|s| s.others_share)
            .fold(0.0, f64::max);
        if busiest > DISTURBED_OTHERS {
            notes.push(format!("others {:.0}%", busiest * 100.0));
        }
        notes.join("; ")
    }

    pub fn disturbed(&self) -> bool {
        self.rate()
            .is_some_and(|rate| rate.relative_range() > DISTURBED_RANGE)
            || self
                .samples
                .iter()
                .any(|s| s.others_share > DISTURBED_OTHERS)
    }
}

/// A figure's column: its header, how to read it from a sample, its precision, and
/// whether a ratio to direct follows it.
struct Column {
    header: &'static str,
    figure: fn(&Sample) -> Option<f64>,
    decimals: usize,
    ratio: bool,
}

fn columns(workload: Workload) -> Vec<Column> {
    let p50 = Column {
        header: "p50 us",
        figure: |s| s.latency.map(|l| l.p50),
        decimals: 1,
        ratio: true,
    };
    let p99 = Column {
        header: "p99 us",
        figure: |s| s.latency.map(|l| l.p99),
        decimals: 1,
        ratio: true,
    };
    let p999 = Column {
        header: "p99.9 us",
        figure: |s| s.latency.map(|l| l.p999),
        decimals: 1,
        ratio: true,
    };
    let proxy_cpu = |header| Column {
        header,
        figure: |s| s.proxy_cpu,
        decimals: 3,
        ratio: false,
    };
    let machine_cpu = |header| Column {
        header,
        figure: |s| Some(s.machine_cpu),
        decimals: 3,
        ratio: true,
    };
    // No ratio: direct's figure, its socket buffers alone, is often near zero or lost in
    // other processes' noise.
    let peak_memory = Column {
        header: "peak mem MiB",
        figure: |s| s.peak_memory,
        decimals: 1,
        ratio: false,
    };
    match workload {
        Workload::Bulk { .. } => vec![
            proxy_cpu("proxy s/GB"),
            machine_cpu("machine s/GB"),
            peak_memory,
        ],
        Workload::PingPong { .. } => vec![
            p50,
            p99,
            p999,
            proxy_cpu("proxy s/10k"),
            machine_cpu("machine s/10k"),
        ],
        Workload::ConnectionRate => vec![
            p50,
            p99,
            proxy_cpu("proxy s/10k"),
            machine_cpu("machine s/10k"),
        ],
    }
}

fn rate_unit(workload: Workload) -> &'static str {
    match workload {
        Workload::Bulk { .. } => "Gbit/s",
        Workload::PingPong { .. } => "req/s",
        Workload::ConnectionRate => "conn/s",
    }
}

/// The table of one workload: a row per target.
pub fn workload_table(workload: Workload, cells: &[Cell]) -> String {
    let direct = cells.iter().find(|cell| cell.kind == Kind::Direct);
    let columns = columns(workload);
    let rate_decimals = if matches!(workload, Workload::Bulk { .. }) {
        2
    } else {
        0
    };

    let mut headers = vec![
        "target".to_owned(),
        rate_unit(workload).to_owned(),
        "x".to_owned(),
        "min-max".to_owned(),
    ];
    for column in &columns {
        headers.push(column.header.to_owned());
        if column.ratio {
            headers.push("x".to_owned());
        }
    }
    headers.push("notes".to_owned());

    let ratio = |value: Option<f64>, base: Option<f64>| match (value, base) {
        (Some(value), Some(base)) if base > 0.0 => format!("{:.2}", value / base),
        _ => "-".to_owned(),
    };
    let number = |value: Option<f64>, decimals: usize| {
        value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
    };

    let mut rows = Vec::new();
    for cell in cells {
        let rate = cell.rate();
        let mut row = vec![
            cell.kind.name().to_owned(),
            number(rate.map(|r| r.median), rate_decimals),
            ratio(
                rate.map(|r| r.median),
                direct.and_then(|d| d.rate()).map(|r| r.median),
            ),
            rate.map_or_else(
                || "-".to_owned(),
                |r| format!("{:.rate_decimals$}-{:.rate_decimals$}", r.min, r.max),
            ),
        ];
        for column in &columns {
            let median = cell.spread(column.figure).map(|s| s.median);
            row.push(number(median, column.decimals));
            if column.ratio {
                let base = direct
                    .and_then(|d| d.spread(column.figure))
                    .map(|s| s.median);
                row.push(ratio(median, base));
            }
        }
        row.push(cell.notes());
        rows.push(row);
    }
    render(&headers, &rows)
}

/// Left-aligned first and last columns, right-aligned figures.
fn render(headers: &[String], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| {
            rows.iter()
                .map(|row| row[i].len())
                .chain([headers[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let last = headers.len() - 1;
    let mut out = String::new();
    for line in std::iter::once(headers).chain(rows.iter().map(Vec::as_slice)) {
        let mut text = String::new();
        for (i, field) in line.iter().enumerate() {
            let width = widths[i];
            let _ = match i {
                0 => write!(text, "  {field:<width$}"),
                i if i == last => write!(text, "  {field}"),
                _ => write!(text, "  {field:>width$}"),
            };
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}
