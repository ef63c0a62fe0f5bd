//! The history of a run: every operation's invocation and completion, in
//! real-time order, as Jepsen records it (written as JSONL while the run
//! goes, so a crashed run still leaves its history).

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// invoke, then one of ok (it happened), fail (it did not), info
/// (unknown: timed out or the connection dropped; it may yet happen).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Invoke,
    Ok,
    Fail,
    Info,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    pub index: usize,
    pub process: u64,
    #[serde(rename = "type")]
    pub kind: Kind,
    pub f: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub value: Value,
    /// Nanoseconds since the start of the run.
    pub time: u64,
}

pub struct History {
    start: Instant,
    events: Mutex<Vec<Event>>,
    out: Mutex<std::io::BufWriter<std::fs::File>>,
}

impl History {
    pub fn create(path: &Path, start: Instant) -> std::io::Result<History> {
        Ok(History {
            start,
            events: Mutex::default(),
            out: Mutex::new(std::io::BufWriter::new(std::fs::File::create(path)?)),
        })
    }

    pub fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn push(&self, process: u64, kind: Kind, f: &str, key: Option<&str>, value: Value) -> usize {
        let mut ev = self.events.lock().expect("history lock");
        let e = Event {
            index: ev.len(),
            process,
            kind,
            f: f.to_string(),
            key: key.map(str::to_string),
            value,
            time: self.now(),
        };
        if let Ok(line) = serde_json::to_string(&e) {
            let mut o = self.out.lock().expect("history file lock");
            let _ = writeln!(o, "{line}");
        }
        let i = e.index;
        ev.push(e);
        i
    }

    pub fn invoke(&self, process: u64, f: &str, key: Option<&str>, value: Value) -> usize {
        self.push(process, Kind::Invoke, f, key, value)
    }

    pub fn complete(&self, process: u64, kind: Kind, f: &str, key: Option<&str>, value: Value) {
        self.push(process, kind, f, key, value);
    }

    pub fn events(&self) -> Vec<Event> {
        let _ = self.out.lock().expect("history file lock").flush();
        self.events.lock().expect("history lock").clone()
    }
}

/// An operation: its invocation paired with its completion (none: the
/// run ended first, which counts as info).
#[derive(Clone, Debug)]
pub struct Op {
    pub process: u64,
    pub f: String,
    pub key: Option<String>,
    pub invoke: Event,
    pub complete: Option<Event>,
}

impl Op {
    pub fn kind(&self) -> Kind {
        self.complete.as_ref().map(|c| c.kind).unwrap_or(Kind::Info)
    }
    pub fn ok(&self) -> bool {
        self.kind() == Kind::Ok
    }
    /// The completion's value (the invocation's if none).
    pub fn value(&self) -> &Value {
        self.complete
            .as_ref()
            .map(|c| &c.value)
            .unwrap_or(&self.invoke.value)
    }
    pub fn latency_ns(&self) -> Option<u64> {
        self.complete
            .as_ref()
            .map(|c| c.time.saturating_sub(self.invoke.time))
    }
}

/// Pairs invocations with completions (a process runs one operation at a
/// time).
pub fn pair(events: &[Event]) -> Vec<Op> {
    let mut open: std::collections::HashMap<u64, usize> = Default::default();
    let mut ops: Vec<Op> = Vec::new();
    for e in events {
        match e.kind {
            Kind::Invoke => {
                open.insert(e.process, ops.len());
                ops.push(Op {
                    process: e.process,
                    f: e.f.clone(),
                    key: e.key.clone(),
                    invoke: e.clone(),
                    complete: None,
                });
            }
            _ => {
                if let Some(i) = open.remove(&e.process) {
                    ops[i].complete = Some(e.clone());
                }
            }
        }
    }
    ops
}
