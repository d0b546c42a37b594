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
/// The one line on stderr that says why `check` did not pass.
pub fn check_verdict(report: &CheckReport) -> Option<String> {
    let count = |exit| report.targets.iter().filter(|t| t.exit() == exit).count();
    match report.exit() {
        crate::Exit::Refused => Some(format!(
            "residency refused for {} target(s); nothing will be written there",
            count(crate::Exit::Refused)
        )),
        crate::Exit::Failure => Some(format!(
            "{} target(s) could not be checked",
            count(crate::Exit::Failure)
        )),
        _ => None,
    }
}

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
    let mut s = format!(
        "config ok: core {} in zone {} ({}), {} volume(s), {} target(s)\n{}",
        report.core,
        report.zone,
        report.zone_name,
        report.volumes,
        report.targets.len(),
        table(&rows)
    );
    if let Some(key) = &report.signing {
        s.push_str(&format!(
            "snapshots are signed with {key} (listed in the zone map)\n"
        ));
    }
    for w in &report.warnings {
        s.push_str(&format!("warning: {w}\n"));
    }
    s
}

/// Bytes as "12.3 MB".
pub fn bytes(n: u64) -> String {
    let n = n as f64;
    match n {
        n if n >= 1e9 => format!("{:.2} GB", n / 1e9),
        n if n >= 1e6 => format!("{:.1} MB", n / 1e6),
        n if n >= 1e3 => format!("{:.1} kB", n / 1e3),
        n => format!("{n} B"),
    }
}

/// The second line of the backup and restore summaries.
fn totals(units: usize, files: u64, plain: u64, stored: u64, seconds: f64) -> String {
    format!(
        "{units} units, {files} files, {} plain, {} stored, {seconds:.1} s, {:.1} MB/s",
        bytes(plain),
        bytes(stored),
        plain as f64 / 1e6 / seconds.max(1e-6)
    )
}

/// The human form of `backup`.
pub fn backup(r: &crate::commands::backup::Report) -> String {
    let mut s = format!(
        "snapshot {} committed: core {}, zone {}, targets {}\n{}\n",
        r.snapshot,
        r.core,
        r.zone,
        r.targets.join(", "),
        totals(r.units, r.files, r.plain_bytes, r.stored_bytes, r.seconds)
    );
    s.push_str(&format!(
        "{} unit(s) uploaded ({}), {} unchanged (objects of earlier snapshots referenced again)\n",
        r.uploaded,
        bytes(r.uploaded_bytes),
        r.reused
    ));
    if r.cleaned > 0 {
        s.push_str(&format!(
            "removed {} leftover(s) of uncommitted runs\n",
            r.cleaned
        ));
    }
    list_some(&mut s, "changed while read (stored as read)", &r.changed);
    list_some(&mut s, "vanished during the walk (skipped)", &r.vanished);
    list_some(
        &mut s,
        "changed during the walk (skipped, not followed)",
        &r.changed_during_walk,
    );
    list_some(
        &mut s,
        "hard-linked from outside its unit (stored; the same file may live elsewhere)",
        &r.hard_links,
    );
    list_some(
        &mut s,
        "misplaced user directory (backed up in the shared unit)",
        &r.misplaced,
    );
    list_some(
        &mut s,
        "symlink out of its volume (stored; restore recreates the link, never follows it)",
        &r.escaping_links,
    );
    s
}

/// "what: path" for the first 20 paths, then how many more (`--json` has all).
fn list_some(s: &mut String, what: &str, paths: &[String]) {
    const SHOWN: usize = 20;
    for p in paths.iter().take(SHOWN) {
        s.push_str(&format!("{what}: {p}\n"));
    }
    if paths.len() > SHOWN {
        s.push_str(&format!(
            "{what}: ... and {} more (--json lists all)\n",
            paths.len() - SHOWN
        ));
    }
}

/// The human form of `snapshots`.
pub fn snapshots(indexes: &[crate::repository::snapshot::Index]) -> String {
    let mut rows = vec![
        ["ID", "TIME", "CORE", "UNITS", "PLAIN", "STORED"]
            .map(String::from)
            .to_vec(),
    ];
    for i in indexes {
        rows.push(vec![
            i.id.clone(),
            i.time.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
            i.core.clone(),
            i.units.to_string(),
            bytes(i.plain_bytes),
            bytes(i.stored_bytes),
        ]);
    }
    table(&rows)
}

/// The human form of `restore`.
pub fn restore(r: &crate::commands::restore::Report) -> String {
    let mut s = format!(
        "restored snapshot {} of core {} (zone {}) into {}{}\n{}; every restored unit's BLAKE3 verified\n",
        r.snapshot,
        r.core,
        r.zone,
        r.to.display(),
        if r.signed {
            ", signatures verified"
        } else {
            " (unsigned snapshot)"
        },
        totals(
            r.units - r.failed.len(),
            r.files,
            r.plain_bytes,
            r.stored_bytes,
            r.seconds
        )
    );
    for f in &r.failed {
        s.push_str(&format!("NOT restored: unit {}: {}\n", f.unit, f.error));
    }
    for e in &r.refused {
        s.push_str(&format!("NOT restored: {}: {}\n", e.path, e.reason));
    }
    if !r.erased.is_empty() {
        s.push_str(&format!(
            "skipped {} erased user(s), as the erasure ledger requires:\n",
            r.erased.len()
        ));
        for e in &r.erased {
            s.push_str(&format!(
                "  {} (erased {})\n",
                e.user,
                e.erased.format("%Y-%m-%d %H:%M:%S UTC")
            ));
        }
    }
    s
}

/// The human form of `erase`.
pub fn erase(r: &crate::commands::erase::Report) -> String {
    let mut s = String::new();
    for u in &r.users {
        if !u.held {
            s.push_str(&format!(
                "user {}: no backup of core {} holds this user (nothing on record in its audit log nor in its keys): nothing to erase\n",
                u.user, r.core
            ));
            continue;
        }
        if r.dry_run {
            s.push_str(&format!(
                "user {}: would do, on the targets of zone {}:\n",
                u.user, r.zone
            ));
            for step in &u.plan {
                s.push_str(&format!(
                    "  {}  {}  {}\n",
                    step.target, step.key, step.action
                ));
            }
            continue;
        }
        s.push_str(&format!(
            "user {}: {} key object(s) shredded, {} unit object(s) deleted, {} pack range(s) overwritten with zeros, each confirmed by reading back\n",
            u.user,
            u.shredded.len(),
            u.deleted.len(),
            u.scrubbed.len()
        ));
        for p in &u.pending {
            s.push_str(&format!(
                "  NOT done: {} on target {}: {}\n",
                p.key, p.target, p.reason
            ));
        }
        if u.pending.is_empty() {
            s.push_str("  erased: no backup of this core can bring the user back; recorded in the erasure ledger\n");
        }
    }
    s
}

/// The human form of `rewrap`.
pub fn rewrap(r: &crate::commands::rewrap::Report) -> String {
    let mut s = format!(
        "zone {}: {} key object(s) and ledger entries wrapped to the zone's current recipients, each read back\n",
        r.zone, r.rewrapped
    );
    if !r.not_opened.is_empty() {
        s.push_str(&format!(
            "{} not opened by this identity (already rewrapped, or never wrapped to it), left as they are\n",
            r.not_opened.len()
        ));
    }
    for f in &r.failed {
        s.push_str(&format!("NOT rewrapped: {f}\n"));
    }
    s
}

/// The human form of `audit verify`.
pub fn audit_verify(r: &crate::commands::audit::VerifyReport) -> String {
    let mut s = format!(
        "audit log {}: {} records, the chain holds\n",
        r.log.display(),
        r.records
    );
    if let Some(copied) = &r.copied {
        for (target, last) in copied {
            s.push_str(&format!(
                "target {target}: copies of records 1 to {last} agree with the log\n"
            ));
        }
        let lowest = copied.values().copied().min().unwrap_or(0);
        if lowest < r.records {
            s.push_str(&format!(
                "{} record(s) not yet copied to every target (the next run copies them)\n",
                r.records - lowest
            ));
        }
    }
    s
}

/// The human form of `audit where`.
pub fn audit_where(user: &str, locations: &[crate::audit::query::Location]) -> String {
    if locations.is_empty() {
        return format!("no object holds data of user {user} (none written, or all deleted)\n");
    }
    let mut rows = vec![
        [
            "ZONE", "TARGET", "ENDPOINT", "BUCKET", "REGION", "KEY", "SNAPSHOT", "TIME", "STATUS",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for l in locations {
        rows.push(vec![
            l.zone.clone(),
            l.place.target.clone(),
            l.place.endpoint.clone(),
            l.place.bucket.clone(),
            l.place.region.clone(),
            l.key.clone(),
            l.snapshot.clone().unwrap_or_else(|| "-".into()),
            l.time.clone(),
            match &l.note {
                Some(note) => format!("{} ({note})", l.status.as_str()),
                None => l.status.as_str().to_string(),
            },
        ]);
    }
    table(&rows)
}

/// The human form of `audit show`: one line per record, `seq time event`
/// then the event's fields.
pub fn audit_show(records: &[serde_json::Map<String, serde_json::Value>]) -> String {
    const HEAD: [&str; 7] = ["seq", "time", "event", "core", "zone", "prev", "hash"];
    let mut s = String::new();
    for r in records {
        let field = |k: &str| match r.get(k) {
            Some(serde_json::Value::String(v)) => v.clone(),
            Some(v) => v.to_string(),
            None => "-".into(),
        };
        s.push_str(&format!(
            "{:>6}  {}  {:<18}",
            field("seq"),
            field("time"),
            field("event")
        ));
        // what an operator looks for first, then the rest in name order
        const FIRST: [&str; 8] = [
            "target",
            "key",
            "kind",
            "multipart",
            "upload_id",
            "snapshot",
            "users",
            "reason",
        ];
        let mut fields: Vec<(&String, &serde_json::Value)> = r
            .iter()
            .filter(|(k, _)| !HEAD.contains(&k.as_str()))
            .collect();
        fields.sort_by_key(|(k, _)| FIRST.iter().position(|f| f == k).unwrap_or(FIRST.len()));
        for (k, v) in fields {
            let v = match v {
                serde_json::Value::String(v) => v.clone(),
                other => other.to_string(),
            };
            s.push_str(&format!("  {k}={v}"));
        }
        s.push('\n');
    }
    s
}

/// The human form of `forget`.
pub fn forget(r: &crate::commands::forget::Report) -> String {
    let tz: chrono_tz::Tz = r.timezone.parse().unwrap_or(chrono_tz::Tz::UTC);
    let mut rows = vec![
        ["SNAPSHOT", "TIME", "DECISION", "WHY"]
            .map(String::from)
            .to_vec(),
    ];
    for d in &r.snapshots {
        rows.push(vec![
            d.id.clone(),
            crate::retention::local(d.time, tz),
            if d.keep { "keep" } else { "forget" }.to_string(),
            d.reasons.join(", "),
        ]);
    }
    let mut s = if r.snapshots.is_empty() {
        format!("core {} has no snapshot in zone {}\n", r.core, r.zone)
    } else {
        table(&rows)
    };
    for w in &r.warnings {
        s.push_str(&format!("warning: {w}\n"));
    }
    if r.dry_run {
        s.push_str(&format!(
            "dry run: would keep {} and forget {} snapshot(s) of core {}; nothing changed\n",
            r.kept, r.forgotten, r.core
        ));
    } else {
        s.push_str(&format!(
            "kept {}, forgot {} snapshot(s) of core {}; deleted {} object(s) on the zone's targets\n",
            r.kept, r.forgotten, r.core, r.deleted
        ));
    }
    s
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
