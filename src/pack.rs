//! Packs: many small units in one object.
//!
//! Why: an object costs a PUT per target, two audit records, a listing
//! entry and later a DELETE, whatever its size, and most units of a Pryv
//! core are a few kB. A run of 100,000 users spent its time on requests,
//! not bytes. So a unit whose whole stored object is at most `pack_size`
//! (`[transfer]`, default 8 MiB, one part) is appended to the run's open
//! pack instead of being written alone; the pack is written (one PUT per
//! target) when the next unit would not fit, and at the end of the read
//! phase.
//!
//! Each unit stays a complete `age(zstd(tar))` of its own: its byte range of
//! the pack, which the manifest records (`offset`, `stored_size`). So the
//! reference tools still restore one user (a ranged GET, then `age -d`), a
//! restore reads only the unit's range, and a key of one user's own still
//! covers exactly that user's bytes. A pack's audit records name every user
//! it holds, so `audit where` finds it.
//!
//! A unit in a pack is stored once its pack is written: the run commits
//! only after [`Packer::finish`], so no snapshot references a pack that is
//! not on every target. A pack is deleted when no snapshot references any of
//! its units (no repacking: a pack of units that changed since stays whole
//! while one of them is referenced).
//!
//! Reading: [`spans`] groups the units a restore wants by pack, so that
//! neighbours are read with one ranged GET and cut apart from the stream.
//! Only units that touch: a read never fetches bytes of a unit that was
//! not asked for (another user's, or an older snapshot's), so its audit
//! record names everyone whose bytes it fetched. A
//! GET per unit made the server read (and check) its storage blocks once per
//! unit, and cost a request each: on loopback that work shares the client's
//! CPUs, at a distance every request is a round trip.

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::Result;
use bytes::{Bytes, BytesMut};

use crate::audit::{ObjectKind, UserRange};
use crate::budget::{Budget, Held};
use crate::pipeline::Digest;
use crate::repository::layout::{self, Key};
use crate::repository::snapshot::UnitRecord;
use crate::residency::{Contents, Writable};
use crate::storage::WriteBackend;

/// The open pack of a run, and the packs it wrote.
pub struct Packer<'a, S> {
    targets: &'a [Writable<S>],
    core: &'a str,
    snapshot: &'a str,
    budget: &'a Budget,
    size: usize,
    open: Mutex<Open>,
    /// The size of each pack written, by key (relative).
    written: Mutex<HashMap<String, u64>>,
}

/// A pack being filled: its units' bytes end to end, the budget they hold,
/// and whose data they are.
struct Open {
    key: Key,
    body: BytesMut,
    held: Vec<Held>,
    /// Where each user's unit is (the shared units are no one's).
    ranges: Vec<UserRange>,
}

impl Open {
    fn new(core: &str) -> Open {
        Open {
            key: layout::new_pack_key(core),
            body: BytesMut::new(),
            held: Vec::new(),
            ranges: Vec::new(),
        }
    }
}

/// Where a unit went: its pack and where in it it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub key: Key,
    pub offset: u64,
}

impl<'a, S: WriteBackend> Packer<'a, S> {
    /// Packs of up to `size` bytes for `snapshot`, written to `targets`
    /// (`size` 0: [`Packer::takes`] nothing).
    pub fn new(
        targets: &'a [Writable<S>],
        core: &'a str,
        snapshot: &'a str,
        budget: &'a Budget,
        size: usize,
    ) -> Self {
        Packer {
            targets,
            core,
            snapshot,
            budget,
            size,
            open: Mutex::new(Open::new(core)),
            written: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a whole object of `len` bytes goes to a pack.
    pub fn takes(&self, len: usize) -> bool {
        self.size > 0 && len <= self.size
    }

    /// Appends one unit's whole stored object (still holding its budget
    /// bytes until the pack is written) and returns where it is. When the
    /// unit does not fit in the open pack, that pack is written first, by
    /// this call.
    pub async fn add(&self, body: Bytes, held: Held, users: &[String]) -> Result<Placement> {
        let (full, placement) = {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            let full = (!open.body.is_empty() && open.body.len() + body.len() > self.size)
                .then(|| std::mem::replace(&mut *open, Open::new(self.core)));
            if open.body.is_empty() {
                // the pack's one allocation: never grown by doubling
                open.body.reserve(self.size.max(body.len()));
            }
            let placement = Placement {
                key: open.key.clone(),
                offset: open.body.len() as u64,
            };
            open.body.extend_from_slice(&body);
            open.held.push(held);
            open.ranges.extend(users.iter().map(|user| UserRange {
                user: user.clone(),
                at: placement.offset,
                len: body.len() as u64,
            }));
            (full, placement)
        };
        if let Some(full) = full {
            self.write(full).await?;
        }
        Ok(placement)
    }

    /// Writes the last pack; returns the size of every pack written, for the
    /// records of the units in them.
    pub async fn finish(&self) -> Result<HashMap<String, u64>> {
        let last = std::mem::replace(
            &mut *self.open.lock().unwrap_or_else(|e| e.into_inner()),
            Open::new(self.core),
        );
        if !last.body.is_empty() {
            self.write(last).await?;
        }
        Ok(std::mem::take(
            &mut *self.written.lock().unwrap_or_else(|e| e.into_inner()),
        ))
    }

    /// One PUT of the pack per target, on the record with every user it holds.
    async fn write(&self, pack: Open) -> Result<()> {
        let Open {
            key,
            body,
            held,
            ranges,
        } = pack;
        let users: Vec<String> = ranges.iter().map(|r| r.user.clone()).collect();
        let body = body.freeze();
        let digest = Digest::of(&body);
        let contents = Contents {
            kind: ObjectKind::Unit,
            snapshot: Some(self.snapshot),
            users: &users,
            ranges: &ranges,
            packed: held.len() as u64,
        };
        tracing::debug!(%key, bytes = digest.bytes, units = held.len(), "writing a pack");
        crate::upload::put_whole(self.targets, &key, body, &contents, &digest, self.budget).await?;
        drop(held);
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), digest.bytes);
        Ok(())
    }
}

/// The most bytes one read covers: a larger pack is read in several spans,
/// in parallel.
pub const MAX_SPAN: u64 = 16 << 20;

/// Units read with one GET: one object, whole or a byte range of it, that
/// holds them all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// The object's key, relative to the target prefix.
    pub object: std::sync::Arc<str>,
    /// `None`: the whole object, which is one unit stored alone.
    pub range: Option<std::ops::Range<u64>>,
    /// The units, in the order of their offsets; for a range, each lies
    /// within it.
    pub units: Vec<UnitRecord>,
}

impl Span {
    /// The bytes the read fetches.
    pub fn bytes(&self) -> u64 {
        match &self.range {
            Some(r) => r.end - r.start,
            None => self.units.iter().map(|u| u.stored_size).sum(),
        }
    }
}

/// The reads that fetch `units`: a unit stored alone is its own span; the
/// units of one pack are grouped into spans of units that touch (one
/// ends where the next starts), of at most [`MAX_SPAN`] bytes (a single
/// unit may be larger). Largest spans first, so that the longest reads start early.
pub fn spans(units: &[UnitRecord]) -> Vec<Span> {
    let mut sorted: Vec<&UnitRecord> = units.iter().collect();
    sorted.sort_by(|a, b| (&a.object, a.offset).cmp(&(&b.object, b.offset)));
    let mut spans: Vec<Span> = Vec::new();
    for unit in sorted {
        let Some(range) = unit.range() else {
            spans.push(Span {
                object: unit.object.clone(),
                range: None,
                units: vec![unit.clone()],
            });
            continue;
        };
        if let Some(Span {
            object,
            range: Some(open),
            units,
        }) = spans.last_mut()
            && *object == unit.object
            && range.start == open.end
            && range.end - open.start <= MAX_SPAN
        {
            open.end = range.end;
            units.push(unit.clone());
            continue;
        }
        spans.push(Span {
            object: unit.object.clone(),
            range: Some(range),
            units: vec![unit.clone()],
        });
    }
    spans.sort_by_key(|s| std::cmp::Reverse(s.bytes()));
    spans
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::Limits;
    use crate::testing::{World, unit_record as rec};

    fn unit(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[tokio::test]
    async fn units_fill_a_pack_end_to_end_and_the_next_one_starts_a_new_pack() {
        let w = World::new().await;
        let budget = Budget::new(Limits::default());
        let packer = Packer::new(&w.targets, "core-ch-1", "snap", &budget, 10);
        let users = |u: &str| vec![u.to_string()];
        let a = packer
            .add(unit("aaaa"), Held::nothing(), &users("ua"))
            .await
            .unwrap();
        let b = packer
            .add(unit("bbbbbb"), Held::nothing(), &users("ub"))
            .await
            .unwrap();
        // 4 + 6 = 10 fits; 10 + 3 does not: the first pack is written now
        let c = packer
            .add(unit("ccc"), Held::nothing(), &users("uc"))
            .await
            .unwrap();
        assert_eq!((a.key == b.key, a.offset, b.offset), (true, 0, 4));
        assert_ne!(c.key, a.key);
        assert_eq!(c.offset, 0);
        let name = a.key.as_str();
        assert!(
            name.starts_with("core-ch-1/objects/") && name.ends_with(".pack"),
            "{name}"
        );
        assert!(w.targets.len() > 1);
        for t in &w.targets {
            assert_eq!(t.store().object(&t.key(&a.key)).unwrap(), "aaaabbbbbb");
            assert!(
                t.store().object(&t.key(&c.key)).is_none(),
                "the open pack waits"
            );
        }
        let written = packer.finish().await.unwrap();
        assert_eq!(
            written,
            HashMap::from([(a.key.to_string(), 10), (c.key.to_string(), 3)])
        );
        for t in &w.targets {
            assert_eq!(t.store().object(&t.key(&c.key)).unwrap(), "ccc");
        }
        // the pack's records name every user it holds
        let log = std::fs::read_to_string(w.audit.path()).unwrap();
        let put = log
            .lines()
            .find(|l| l.contains("\"object_put\"") && l.contains(a.key.as_str()))
            .unwrap();
        assert!(put.contains("\"users\":[\"ua\",\"ub\"]"), "{put}");
        // nothing left open: a second finish writes nothing
        assert!(packer.finish().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_unit_larger_than_the_pack_is_not_taken() {
        let w = World::new().await;
        let budget = Budget::new(Limits::default());
        let packer = Packer::new(&w.targets, "c", "s", &budget, 10);
        assert!(packer.takes(10) && !packer.takes(11));
        let off = Packer::new(&w.targets, "c", "s", &budget, 0);
        assert!(!off.takes(1));
    }

    /// Spans as (object, range, offsets of its units).
    type Plan<S> = Vec<(S, Option<(u64, u64)>, Vec<u64>)>;

    fn plan(units: &[UnitRecord]) -> Plan<String> {
        spans(units)
            .into_iter()
            .map(|s| {
                (
                    s.object.to_string(),
                    s.range.map(|r| (r.start, r.end)),
                    s.units.iter().map(|u| u.offset.unwrap_or(0)).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn reads_are_planned_by_pack_neighbours_gaps_and_size() {
        const MIB: u64 = 1 << 20;
        let table: Vec<(&str, Vec<UnitRecord>, Plan<&str>)> = vec![
            (
                "neighbours in any order: one read",
                vec![
                    rec("p", Some(10), 10),
                    rec("p", Some(0), 10),
                    rec("p", Some(20), 5),
                ],
                vec![("p", Some((0, 25)), vec![0, 10, 20])],
            ),
            (
                "a unit not asked for between two: two reads, it is not fetched",
                vec![rec("p", Some(0), 10), rec("p", Some(11), 10)],
                vec![
                    ("p", Some((0, 10)), vec![0]),
                    ("p", Some((11, 21)), vec![11]),
                ],
            ),
            (
                "two packs are never one read",
                vec![rec("p", Some(0), 10), rec("q", Some(10), 10)],
                vec![
                    ("p", Some((0, 10)), vec![0]),
                    ("q", Some((10, 20)), vec![10]),
                ],
            ),
            (
                "a read stops at MAX_SPAN; one larger unit is read alone",
                vec![
                    rec("p", Some(0), 10 * MIB),
                    rec("p", Some(10 * MIB), 6 * MIB),
                    rec("p", Some(16 * MIB), MIB),
                    rec("p", Some(17 * MIB), 20 * MIB),
                ],
                vec![
                    ("p", Some((17 * MIB, 37 * MIB)), vec![17 * MIB]),
                    ("p", Some((0, 16 * MIB)), vec![0, 10 * MIB]),
                    ("p", Some((16 * MIB, 17 * MIB)), vec![16 * MIB]),
                ],
            ),
            (
                "units stored alone: whole objects, one each, largest first",
                vec![rec("a", None, 5), rec("b", None, 7), rec("p", Some(0), 6)],
                vec![
                    ("b", None, vec![0]),
                    ("p", Some((0, 6)), vec![0]),
                    ("a", None, vec![0]),
                ],
            ),
            ("nothing: no reads", vec![], vec![]),
        ];
        for (case, units, want) in table {
            let want: Vec<_> = want
                .into_iter()
                .map(|(o, r, u)| (o.to_string(), r, u))
                .collect();
            assert_eq!(plan(&units), want, "{case}");
        }
    }
}
