//! Checking the hash chain of a log, and naming the first line that breaks it.
//!
//! Each record's `hash` must match its content, its `seq` must follow the
//! previous one and its `prev` must be the previous record's `hash`. Where the
//! chain breaks, the neighbouring lines tell what happened: a line that
//! chains to the one two lines up means the line between was inserted; two
//! consecutive seqs the wrong way round mean a swap; a jump in `seq` means
//! removed lines.

use std::path::Path;

use anyhow::Result;

use super::log::{self, Line};
use super::record::{GENESIS, Stored};

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// 1-based line number of the first bad line.
    pub line: u64,
    /// What is wrong, in one sentence.
    pub what: String,
}

/// A chain that holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holds {
    pub records: u64,
    /// `hash` of the last record ([`GENESIS`] for an empty log).
    pub last_hash: String,
}

/// Checks the log at `path`, streaming. `Err` is an I/O error; `Ok(Err(_))`
/// a broken chain.
pub fn verify_file(path: &Path) -> Result<Result<Holds, Break>> {
    verify(log::lines(path)?)
}

/// Checks a sequence of lines, as read from a log.
pub fn verify(lines: impl Iterator<Item = Result<Line>>) -> Result<Result<Holds, Break>> {
    let mut records = lines
        .map(|l| l.map(|l| (l.number, l.complete, Stored::parse(&l.text))))
        .peekable();
    let mut hashes: Vec<String> = vec![GENESIS.to_string()];
    let mut count = 0u64;
    while let Some(item) = records.next() {
        let (number, complete, record) = item?;
        let i = count;
        count += 1;
        let bad = |what: String| Break { line: number, what };
        let Some(record) = record else {
            return Ok(Err(bad(if complete {
                "not a JSON record (edited or damaged)".into()
            } else {
                "cut short: the log was truncated inside this record".into()
            })));
        };
        let (Some(seq), Some(prev), Some(hash)) = (record.seq(), record.prev(), record.hash())
        else {
            return Ok(Err(
                bad("lacks its seq, prev or hash field (edited)".into()),
            ));
        };
        if !record.hash_holds() {
            return Ok(Err(bad(
                "edited: its hash does not match its content".into()
            )));
        }
        let expected = count;
        let previous = &hashes[hashes.len() - 1];
        if prev != previous && hashes.len() >= 2 && prev == hashes[hashes.len() - 2] {
            return Ok(Err(Break {
                line: number - 1,
                what: format!(
                    "inserted: line {number} chains to line {}, past this one",
                    number.saturating_sub(2)
                ),
            }));
        }
        if seq != expected {
            let next_seq = match records.peek() {
                Some(Ok((_, _, Some(next)))) => next.seq(),
                _ => None,
            };
            return Ok(Err(bad(
                if seq == expected + 1 && next_seq == Some(expected) {
                    format!(
                        "reordered: seq {seq} comes before seq {expected} (lines {number} and {} are swapped)",
                        number + 1
                    )
                } else if seq > expected {
                    let missing = if seq == expected + 1 {
                        format!("record {expected} is")
                    } else {
                        format!("records {expected} to {} are", seq - 1)
                    };
                    format!("{missing} missing before this line (removed)")
                } else {
                    format!(
                        "seq {seq} where {expected} belongs: this line repeats an earlier record (inserted or copied)"
                    )
                },
            )));
        }
        if prev != previous {
            return Ok(Err(bad(if i == 0 {
                "the first record does not start the chain: its prev is not the genesis value (edited and re-hashed)".into()
            } else {
                format!(
                    "does not chain to line {}: that line was edited and re-hashed, or replaced",
                    number - 1
                )
            })));
        }
        if !complete {
            return Ok(Err(bad(
                "cut short: the last line has no newline (the log was truncated, or a write was interrupted)".into(),
            )));
        }
        hashes.push(hash.to_string());
        if hashes.len() > 2 {
            hashes.remove(0);
        }
    }
    Ok(Ok(Holds {
        records: count,
        last_hash: hashes.pop().expect("at least genesis"),
    }))
}
