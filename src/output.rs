//! What commands print: a human form on stdout (aligned columns) and the
//! `--json` form for scripts. Both show the same facts.

use std::io::Write;

use serde::Serialize;

use crate::commands::check::CheckReport;

/// Prints `value` as one JSON document on stdout.
pub fn json<T: Serialize>(value: &T) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)
}

/// Rows as left-aligned columns separated by two spaces.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// The human form of `check`.
pub fn check(report: &CheckReport) -> String {
    let mut rows = vec![
        [
            "TARGET", "ENDPOINT", "BUCKET", "REGION", "REPORTED", "VERDICT", "REASON",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for t in &report.targets {
        rows.push(vec![
            t.target.clone(),
            t.endpoint.clone(),
            t.bucket.clone(),
            t.region.clone(),
            t.reported_region.clone().unwrap_or_else(|| "-".into()),
            t.verdict.to_string(),
            t.reason.clone(),
        ]);
    }
    format!(
        "config ok: core {} in zone {} ({}), {} volume(s), {} target(s)\n{}",
        report.core,
        report.zone,
        report.zone_name,
        report.volumes,
        report.targets.len(),
        table(&rows)
    )
}

#[cfg(test)]
mod tests {
    use super::table;

    #[test]
    fn table_aligns_columns() {
        let rows = vec![
            vec!["A".to_string(), "BB".to_string(), "x".to_string()],
            vec!["ccc".to_string(), "d".to_string(), "y".to_string()],
        ];
        assert_eq!(table(&rows), "A    BB  x\nccc  d   y\n");
    }
}
