//! Flight recorder: always on, a ring of the last N ops of this rank, dumped as JSON lines.
//!
//! Contract: every collective, point-to-point op, envelope header wait and teardown step is an
//! entry whose state moves enqueued → started → completed; the ring keeps the last `capacity`
//! entries; `dump` writes `rank-<r>.jsonl` (first line: the rank record with the reason and
//! exit code, then one line per op, oldest first) and never panics. Completing an op (or calling
//! [`Recorder::progress`]) is what the watchdog counts as progress.
//! Tripwire: an op that stays `started` is what `lockstep fr analyze` and the watchdog name.
use crate::ids::{CacheEpoch, CallId, ChunkIndex};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Microseconds since the Unix epoch (comparable across processes on one host).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpState {
    Enqueued,
    Started,
    Completed,
    Failed,
}

/// A recorded name: a static string on the hot path (group, op, dtype, action and phase names;
/// no allocation per op), an owned one where it is formatted.
pub type Label = Cow<'static, str>;

/// A `'static` copy of `name`, made once per distinct name (group names: a handful per process),
/// so recording an op on that group allocates nothing.
pub fn intern(name: &str) -> &'static str {
    static NAMES: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = names.iter().find(|n| **n == name) {
        return n;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.push(leaked);
    leaked
}

/// The protocol context ops are recorded under (set by the pipeline per envelope and phase).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpContext {
    pub call_id: CallId,
    pub chunk_index: ChunkIndex,
    pub cache_epoch: CacheEpoch,
    pub action: Label,
    pub phase: Label,
}

/// One recorded op.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpRecord {
    pub id: u64,
    pub group: Label,
    /// Collectives: the group's sequence number (numbered identically on every member).
    /// Send/recv: the sequence number per direction and peer (the k-th send A→B matches the k-th
    /// recv at B from A), see `Group::issue`.
    pub seq: u64,
    pub op: Label,
    /// Peer (p2p) or root (broadcast) as a global rank, if any.
    pub peer: Option<u32>,
    pub root: Option<u32>,
    pub dtype: Option<Label>,
    pub shape: Vec<u64>,
    pub bytes: u64,
    #[serde(flatten)]
    pub ctx: OpContext,
    pub state: OpState,
    pub t_enqueued_us: u64,
    pub t_started_us: Option<u64>,
    pub t_completed_us: Option<u64>,
    pub note: Option<String>,
}

impl OpRecord {
    /// Short human description: `mesh all_reduce seq 3 (f32 [4, 8])`.
    pub fn describe(&self) -> String {
        let mut s = format!("{} {} seq {}", self.group, self.op, self.seq);
        if let Some(d) = &self.dtype {
            s.push_str(&format!(" ({d} {:?})", self.shape));
        }
        if let Some(p) = self.peer {
            s.push_str(&format!(" peer global-rank {p}"));
        }
        if let Some(r) = self.root {
            s.push_str(&format!(" root global-rank {r}"));
        }
        s
    }
}

/// What an op looks like when it is recorded.
#[derive(Clone, Debug, Default)]
pub struct OpDesc {
    pub group: Label,
    pub seq: u64,
    pub op: Label,
    pub peer: Option<u32>,
    pub root: Option<u32>,
    pub dtype: Option<Label>,
    pub shape: Vec<u64>,
    pub bytes: u64,
}

/// The first line of a dump.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RankRecord {
    pub kind: String,
    pub global_rank: u32,
    pub world_size: u32,
    pub reason: String,
    pub exit_code: Option<i32>,
    pub exit_name: Option<String>,
    /// Group name → members (global ranks), in creation order.
    pub groups: Vec<(String, Vec<u32>)>,
    pub time_us: u64,
}

struct Ring {
    ops: VecDeque<OpRecord>,
    next_id: u64,
    ctx: OpContext,
}

/// The per-rank flight recorder.
pub struct Recorder {
    capacity: usize,
    ring: Mutex<Ring>,
    last_progress_us: AtomicU64,
    global_rank: u32,
    world_size: u32,
    groups: Mutex<Vec<(String, Vec<u32>)>>,
    dump_dir: PathBuf,
}

impl Recorder {
    pub fn new(global_rank: u32, world_size: u32, capacity: usize, dump_dir: PathBuf) -> Self {
        Recorder {
            capacity: capacity.max(16),
            ring: Mutex::new(Ring {
                ops: VecDeque::new(),
                next_id: 1,
                ctx: OpContext::default(),
            }),
            last_progress_us: AtomicU64::new(now_us()),
            global_rank,
            world_size,
            groups: Mutex::new(Vec::new()),
            dump_dir,
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        // A panic while holding the lock must not stop the dump path.
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn dump_dir(&self) -> &Path {
        &self.dump_dir
    }
    pub fn dump_path(&self) -> PathBuf {
        self.dump_dir
            .join(format!("rank-{}.jsonl", self.global_rank))
    }

    pub fn set_groups(&self, groups: Vec<(String, Vec<u32>)>) {
        *self.groups.lock().unwrap_or_else(|p| p.into_inner()) = groups;
    }

    /// Sets the context recorded with every following op.
    pub fn set_context(&self, ctx: OpContext) {
        self.ring().ctx = ctx;
    }
    pub fn set_phase(&self, phase: impl Into<Label>) {
        self.ring().ctx.phase = phase.into();
    }
    pub fn context(&self) -> OpContext {
        self.ring().ctx.clone()
    }

    /// Records a new op as enqueued; returns its id.
    pub fn enqueue(&self, d: OpDesc) -> u64 {
        self.record(d, false)
    }

    /// Records a new op already started (`enqueue` + `start` in one step: one lock and one
    /// timestamp instead of two on the hot path).
    pub fn enqueue_started(&self, d: OpDesc) -> u64 {
        self.record(d, true)
    }

    fn record(&self, d: OpDesc, started: bool) -> u64 {
        let now = now_us();
        let mut r = self.ring();
        let id = r.next_id;
        r.next_id += 1;
        let ctx = r.ctx.clone();
        if r.ops.len() >= self.capacity {
            r.ops.pop_front();
        }
        r.ops.push_back(OpRecord {
            id,
            group: d.group,
            seq: d.seq,
            op: d.op,
            peer: d.peer,
            root: d.root,
            dtype: d.dtype,
            shape: d.shape,
            bytes: d.bytes,
            ctx,
            state: if started {
                OpState::Started
            } else {
                OpState::Enqueued
            },
            t_enqueued_us: now,
            t_started_us: started.then_some(now),
            t_completed_us: None,
            note: None,
        });
        id
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut OpRecord)) {
        let mut r = self.ring();
        if let Some(op) = r.ops.iter_mut().rev().find(|o| o.id == id) {
            f(op);
        }
    }

    pub fn start(&self, id: u64) {
        self.update(id, |o| {
            o.state = OpState::Started;
            o.t_started_us = Some(now_us());
        });
    }
    pub fn complete(&self, id: u64) {
        self.update(id, |o| {
            o.state = OpState::Completed;
            o.t_completed_us = Some(now_us());
        });
        self.progress();
    }
    pub fn fail(&self, id: u64, note: &str) {
        self.update(id, |o| {
            o.state = OpState::Failed;
            o.note = Some(note.to_owned());
        });
    }
    pub fn note(&self, id: u64, note: &str) {
        self.update(id, |o| o.note = Some(note.to_owned()));
    }

    /// Marks progress without an op (a compute step finished).
    pub fn progress(&self) {
        self.last_progress_us.store(now_us(), Ordering::SeqCst);
    }
    pub fn last_progress_us(&self) -> u64 {
        self.last_progress_us.load(Ordering::SeqCst)
    }

    /// The description of op `id` ([`OpRecord::describe`]) while it is still in the ring.
    pub fn describe(&self, id: u64) -> Option<String> {
        self.ring()
            .ops
            .iter()
            .rev()
            .find(|o| o.id == id)
            .map(OpRecord::describe)
    }

    /// The oldest op that has not completed, if any.
    pub fn oldest_in_flight(&self) -> Option<OpRecord> {
        self.ring()
            .ops
            .iter()
            .find(|o| matches!(o.state, OpState::Enqueued | OpState::Started))
            .cloned()
    }
    pub fn last_op(&self) -> Option<OpRecord> {
        self.ring().ops.back().cloned()
    }
    pub fn snapshot(&self) -> Vec<OpRecord> {
        self.ring().ops.iter().cloned().collect()
    }

    /// Writes the ring as JSON lines; returns the file path. Never panics.
    pub fn dump(
        &self,
        reason: &str,
        exit: Option<crate::exit::ExitCode>,
    ) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dump_dir)?;
        let head = RankRecord {
            kind: "rank".into(),
            global_rank: self.global_rank,
            world_size: self.world_size,
            reason: reason.to_owned(),
            exit_code: exit.map(|e| e.code()),
            exit_name: exit.map(|e| e.name().to_owned()),
            groups: self
                .groups
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            time_us: now_us(),
        };
        let mut out = serde_json::to_string(&head).map_err(std::io::Error::other)?;
        out.push('\n');
        for op in self.snapshot() {
            let mut v = serde_json::to_value(&op).map_err(std::io::Error::other)?;
            if let Some(m) = v.as_object_mut() {
                m.insert("kind".into(), "op".into());
            }
            out.push_str(&v.to_string());
            out.push('\n');
        }
        let path = self.dump_path();
        let tmp = path.with_extension("jsonl.tmp");
        std::fs::write(&tmp, out)?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_ring_keeps_last_n_and_dumps_json_lines() {
        let dir = std::env::temp_dir().join(format!("lockstep-rec-{}", std::process::id()));
        let rec = Recorder::new(3, 4, 16, dir.clone());
        for i in 0..20 {
            let id = rec.enqueue(OpDesc {
                group: "mesh".into(),
                seq: i,
                op: "all_reduce".into(),
                ..Default::default()
            });
            rec.start(id);
            if i < 19 {
                rec.complete(id);
            }
        }
        assert_eq!(rec.snapshot().len(), 16);
        assert_eq!(rec.oldest_in_flight().unwrap().seq, 19);
        let path = rec.dump("test", None).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 17);
        assert!(lines[0].contains("\"global_rank\":3"));
        assert!(lines[16].contains("\"state\":\"started\""));
        let _ = std::fs::remove_dir_all(dir);
    }
}
