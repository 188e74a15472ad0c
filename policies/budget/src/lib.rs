//! Each project's privacy budget at one trust: a durable ledger of what was spent.
//!
//! Every differentially private release appends a [`Kind::Spend`] line (project, query key, ε,
//! δ) and fsyncs it *before the query runs*, and once the answer is released a
//! [`Kind::Answer`] line holding it, fsync'd *before the answer leaves the node*. So a crash, or
//! a query that fails while running, can never un-spend a release, and a repeat of the same
//! query is answered from the ledger at no further cost: the noise cannot be averaged away by
//! asking again. A line torn by a crash was never acted on (the query runs, and the answer is
//! sent, only after the write completes) and is cut off on open.
//!
//! The same file keeps the query allowance of projects outside differential privacy: a
//! [`Kind::Query`] line per query that passed vetting (project, day, query key), fsync'd before
//! it runs, so a restart does not give a project its allowance back (see [`Queries`]).

// Library code returns errors; only tests may expect().
#![cfg_attr(not(test), deny(clippy::expect_used))]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Errors of the budget ledger.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    /// The ledger file could not be read or written.
    #[error("budget ledger {path}: {reason}")]
    Io {
        /// The ledger file.
        path: PathBuf,
        /// The reason.
        reason: String,
    },
    /// A line before the last is not a ledger entry: the file was damaged or edited.
    #[error(
        "budget ledger {path} is damaged at line {line}; the node will not guess what was spent \
         (restore the file from backup)"
    )]
    Damaged {
        /// The ledger file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
    },
}

/// What a ledger line records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Spent and answered in one line (ledgers written before spending came first).
    #[default]
    Release,
    /// Spent before the query ran; its answer, if it was released, is a later `Answer` line.
    Spend,
    /// The answer of an earlier `Spend`, kept for repeats; it spends nothing.
    Answer,
    /// A query of a project outside DP ran on `day`: counted against its query allowance,
    /// spending no ε and keeping no answer.
    Query,
    /// A pooled project's question was contributed to the pool `members`: the node answers it
    /// for that member set only, ever (a second set would let the coordinator subtract).
    Pool,
}

/// One line of the ledger: a release, a spend, or a released answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Charge {
    /// What the line records.
    #[serde(default)]
    pub kind: Kind,
    /// When (RFC 3339, UTC).
    pub at: String,
    /// The project that spent.
    pub project: String,
    /// The researcher who asked.
    pub researcher: String,
    /// The request id, to match the audit log.
    pub request_id: String,
    /// What identifies the query for the cache (plan fingerprint and parameters).
    pub query_key: String,
    /// ε spent (counted only for `Release` and `Spend`).
    pub epsilon: f64,
    /// δ spent (counted only for `Release` and `Spend`).
    pub delta: f64,
    /// The released answer (Arrow IPC bytes), returned again for a repeat; empty in a `Spend`.
    #[serde(with = "hex", default)]
    pub answer: Vec<u8>,
    /// For a `Query`: the day it was answered (days since 1970-01-01, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<i32>,
    /// For a `Pool`: the members the question was contributed to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
}

impl Charge {
    /// The `Query` line of a query of `project` run on `day`.
    pub fn query(
        project: &str,
        researcher: &str,
        request_id: &str,
        query_key: &str,
        day: i32,
        at: String,
    ) -> Charge {
        Charge {
            day: Some(day),
            ..Charge::free(Kind::Query, project, researcher, request_id, query_key, at)
        }
    }

    /// The `Pool` line: `project`'s question `query_key` contributed to `members`.
    pub fn pool(
        project: &str,
        researcher: &str,
        request_id: &str,
        query_key: &str,
        members: Vec<String>,
        at: String,
    ) -> Charge {
        Charge {
            members,
            ..Charge::free(Kind::Pool, project, researcher, request_id, query_key, at)
        }
    }

    /// A line of `kind` that spends nothing and keeps no answer.
    fn free(
        kind: Kind,
        project: &str,
        researcher: &str,
        request_id: &str,
        query_key: &str,
        at: String,
    ) -> Charge {
        Charge {
            kind,
            at,
            project: project.to_string(),
            researcher: researcher.to_string(),
            request_id: request_id.to_string(),
            query_key: query_key.to_string(),
            epsilon: 0.0,
            delta: 0.0,
            answer: Vec::new(),
            day: None,
            members: Vec::new(),
        }
    }
}

/// A project's spend so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spend {
    /// ε spent.
    pub epsilon: f64,
    /// δ spent.
    pub delta: f64,
    /// Releases charged.
    pub releases: usize,
}

/// What a project has used of its query allowance, as [`Queries::used`] tells it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueriesUsed {
    /// Queries counted on the day asked about.
    pub today: u64,
    /// Queries counted ever.
    pub total: u64,
    /// The query key was already counted that day.
    pub repeat: bool,
}

/// Queries per project, per day and in total, with the query keys of each day (a repeat of
/// one is not counted again).
#[derive(Debug, Clone, Default)]
pub struct Queries {
    projects: HashMap<String, ProjectQueries>,
}

#[derive(Debug, Clone, Default)]
struct ProjectQueries {
    total: u64,
    days: BTreeMap<i32, u64>,
    keys: HashSet<(i32, String)>,
    /// The latest day counted: keys of days before the one before it are dropped.
    latest: i32,
}

impl Queries {
    /// What `project` used on `day` and in all; whether `key` was counted that day.
    pub fn used(&self, project: &str, day: i32, key: &str) -> QueriesUsed {
        let Some(p) = self.projects.get(project) else {
            return QueriesUsed::default();
        };
        QueriesUsed {
            today: p.days.get(&day).copied().unwrap_or(0),
            total: p.total,
            repeat: p.keys.contains(&(day, key.to_string())),
        }
    }

    /// Counts a query; false if its key was already counted that day.
    pub fn count(&mut self, project: &str, day: i32, key: &str) -> bool {
        let p = self.projects.entry(project.to_string()).or_default();
        if day > p.latest {
            // Only today's keys decide a repeat (yesterday's too, for a clock set back a
            // little); older ones would grow without bound.
            p.latest = day;
            p.keys.retain(|(d, _)| *d >= day.saturating_sub(1));
        }
        if !p.keys.insert((day, key.to_string())) {
            return false;
        }
        p.total += 1;
        *p.days.entry(day).or_default() += 1;
        true
    }

    /// Projects with counted queries: (queries on `day`, in all), by project id.
    pub fn summary(&self, day: i32) -> BTreeMap<String, (u64, u64)> {
        self.projects
            .iter()
            .map(|(id, p)| {
                (
                    id.clone(),
                    (p.days.get(&day).copied().unwrap_or(0), p.total),
                )
            })
            .collect()
    }
}

#[derive(Default)]
struct State {
    spent: HashMap<String, Spend>,
    answers: HashMap<(String, String), Vec<u8>>,
    queries: Queries,
    /// (project, question) → the member set it was first contributed to.
    pools: HashMap<(String, String), Vec<String>>,
}

/// The ledger of one node.
pub struct Ledger {
    path: PathBuf,
    file: Mutex<File>,
    state: Mutex<State>,
}

/// Every project's spend, read without changing the file (safe while a node is writing it).
pub fn read_spend(path: &Path) -> Result<BTreeMap<String, Spend>, BudgetError> {
    Ok(read_state(path)?.spent.into_iter().collect())
}

/// Every project's counted queries, read like [`read_spend`].
pub fn read_queries(path: &Path) -> Result<Queries, BudgetError> {
    Ok(read_state(path)?.queries)
}

fn read_state(path: &Path) -> Result<State, BudgetError> {
    let text = std::fs::read_to_string(path).map_err(|e| BudgetError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut state = State::default();
    let mut lines = text.split_inclusive('\n').enumerate().peekable();
    while let Some((number, line)) = lines.next() {
        match serde_json::from_str::<Charge>(line.trim_end()) {
            Ok(charge) if line.ends_with('\n') => state.apply(charge),
            // A last line still being written is not a release yet.
            _ if lines.peek().is_none() && !line.ends_with('\n') => {}
            _ => {
                return Err(BudgetError::Damaged {
                    path: path.to_path_buf(),
                    line: number + 1,
                });
            }
        }
    }
    Ok(state)
}

impl Ledger {
    /// Opens (or creates) the ledger, replaying it; a torn last line is cut off.
    pub fn open(path: &Path) -> Result<Ledger, BudgetError> {
        let io = |e: std::io::Error| BudgetError::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io)?;
        let mut state = State::default();
        let mut good_end = 0u64;
        let mut reader = BufReader::new(&file);
        let mut line = String::new();
        let mut number = 0;
        loop {
            line.clear();
            let read = reader.read_line(&mut line).map_err(io)?;
            if read == 0 {
                break;
            }
            number += 1;
            let complete = line.ends_with('\n');
            match serde_json::from_str::<Charge>(line.trim_end()) {
                Ok(charge) if complete => {
                    state.apply(charge);
                    good_end += read as u64;
                }
                // Only the very last line can be torn, and it was never released.
                _ if !complete => break,
                _ => {
                    return Err(BudgetError::Damaged {
                        path: path.to_path_buf(),
                        line: number,
                    });
                }
            }
        }
        drop(reader);
        if file.metadata().map_err(io)?.len() != good_end {
            file.set_len(good_end).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        file.seek(SeekFrom::End(0)).map_err(io)?;
        Ok(Ledger {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            state: Mutex::new(state),
        })
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What `project` has spent.
    pub fn spent(&self, project: &str) -> Spend {
        self.lock_state()
            .spent
            .get(project)
            .copied()
            .unwrap_or_default()
    }

    /// Every project's spend, by project id.
    pub fn all(&self) -> BTreeMap<String, Spend> {
        self.lock_state()
            .spent
            .iter()
            .map(|(p, s)| (p.clone(), *s))
            .collect()
    }

    /// The queries counted against allowances so far (a copy: the node keeps its own tally
    /// while it runs, and records each count here).
    pub fn queries(&self) -> Queries {
        self.lock_state().queries.clone()
    }

    /// The member set `project`'s question `query_key` was contributed to, if it was.
    pub fn pool_members(&self, project: &str, query_key: &str) -> Option<Vec<String>> {
        self.lock_state()
            .pools
            .get(&(project.to_string(), query_key.to_string()))
            .cloned()
    }

    /// The answer already released to `project` for this query key, if any.
    pub fn cached(&self, project: &str, query_key: &str) -> Option<Vec<u8>> {
        self.lock_state()
            .answers
            .get(&(project.to_string(), query_key.to_string()))
            .cloned()
    }

    /// Records a release durably (written and fsync'd); only then may the answer leave.
    pub fn charge(&self, charge: Charge) -> Result<(), BudgetError> {
        let io = |e: std::io::Error| BudgetError::Io {
            path: self.path.clone(),
            reason: e.to_string(),
        };
        let mut line = serde_json::to_string(&charge).map_err(|e| BudgetError::Io {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        line.push('\n');
        {
            let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
            let before = file.metadata().map_err(io)?.len();
            if let Err(e) = file
                .write_all(line.as_bytes())
                .and_then(|()| file.sync_data())
            {
                // Leave no half line for the next charge to run into (nothing was released).
                let _ = file.set_len(before);
                return Err(io(e));
            }
        }
        self.lock_state().apply(charge);
        Ok(())
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn apply(&mut self, charge: Charge) {
        if charge.kind == Kind::Pool {
            // The first set stays: a later line can never widen what was promised.
            self.pools
                .entry((charge.project, charge.query_key))
                .or_insert(charge.members);
            return;
        }
        if charge.kind == Kind::Query {
            // A line without its day is not a count the node wrote; it counts on day 0.
            let day = charge.day.unwrap_or_default();
            self.queries.count(&charge.project, day, &charge.query_key);
            return;
        }
        if charge.kind != Kind::Answer {
            let spend = self.spent.entry(charge.project.clone()).or_default();
            spend.epsilon += charge.epsilon;
            spend.delta += charge.delta;
            spend.releases += 1;
        }
        if charge.kind != Kind::Spend {
            self.answers
                .insert((charge.project, charge.query_key), charge.answer);
        }
    }
}

/// Answers as lower-case hex in the JSON line.
mod hex {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub(crate) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&text)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        if !text.len().is_multiple_of(2) {
            return Err(D::Error::custom("odd hex length"));
        }
        (0..text.len())
            .step_by(2)
            .map(|i| {
                text.get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| D::Error::custom("not hex"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(project: &str, key: &str, epsilon: f64) -> Charge {
        Charge {
            kind: Kind::Release,
            at: "2026-11-23T00:00:00Z".into(),
            project: project.into(),
            researcher: "r".into(),
            request_id: "q".into(),
            query_key: key.into(),
            epsilon,
            delta: 0.0,
            answer: vec![0, 1, 254, 255],
            day: None,
            members: Vec::new(),
        }
    }

    #[test]
    fn a_pooled_question_keeps_its_first_member_set_across_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("budget.ledger");
        let ledger = Ledger::open(&path).expect("open");
        let set = |m: &[&str]| m.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let line = |members| Charge::pool("p", "r", "q", "k", members, "t".into());
        ledger.charge(line(set(&["A", "B", "C"]))).expect("charge");
        // A later line for another set never replaces the first.
        ledger.charge(line(set(&["A", "B", "D"]))).expect("charge");
        drop(ledger);
        let ledger = Ledger::open(&path).expect("reopen");
        assert_eq!(ledger.pool_members("p", "k"), Some(set(&["A", "B", "C"])));
        assert_eq!(ledger.pool_members("p", "other"), None);
        assert_eq!(ledger.spent("p").releases, 0, "a pool line spends nothing");
    }

    #[test]
    fn spend_and_answers_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/budget.ledger");
        let ledger = Ledger::open(&path).expect("open");
        ledger.charge(charge("a", "k1", 0.5)).expect("charge");
        ledger.charge(charge("a", "k2", 0.25)).expect("charge");
        ledger.charge(charge("b", "k1", 1.0)).expect("charge");
        drop(ledger);
        let ledger = Ledger::open(&path).expect("reopen");
        assert_eq!(ledger.spent("a").epsilon, 0.75);
        assert_eq!(ledger.spent("a").releases, 2);
        assert_eq!(ledger.spent("b").epsilon, 1.0);
        assert_eq!(ledger.spent("c"), Spend::default());
        assert_eq!(ledger.cached("a", "k2"), Some(vec![0, 1, 254, 255]));
        assert_eq!(ledger.cached("b", "k2"), None, "answers are per project");
    }

    #[test]
    fn a_spend_counts_before_its_answer_and_the_answer_spends_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("budget.ledger");
        let ledger = Ledger::open(&path).expect("open");
        let spend = Charge {
            kind: Kind::Spend,
            answer: Vec::new(),
            ..charge("a", "k1", 0.5)
        };
        ledger.charge(spend.clone()).expect("spend");
        assert_eq!(ledger.spent("a").epsilon, 0.5);
        assert_eq!(ledger.cached("a", "k1"), None, "nothing released yet");
        // A spend whose query failed stays spent; the next try spends again.
        ledger.charge(spend).expect("spend");
        ledger
            .charge(Charge {
                kind: Kind::Answer,
                epsilon: 0.0,
                ..charge("a", "k1", 0.0)
            })
            .expect("answer");
        drop(ledger);
        for spent in [
            Ledger::open(&path).expect("reopen").spent("a"),
            read_spend(&path).expect("read")["a"],
        ] {
            assert_eq!((spent.epsilon, spent.releases), (1.0, 2));
        }
        let ledger = Ledger::open(&path).expect("reopen");
        assert_eq!(ledger.cached("a", "k1"), Some(vec![0, 1, 254, 255]));
        // Lines written before kinds existed are releases.
        let old = r#"{"at":"t","project":"b","researcher":"r","request_id":"q","query_key":"k","epsilon":0.25,"delta":0.0,"answer":"00ff"}"#;
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        writeln!(file, "{old}").expect("write");
        drop(file);
        let ledger = Ledger::open(&path).expect("reopen");
        assert_eq!(ledger.spent("b").epsilon, 0.25);
        assert_eq!(ledger.cached("b", "k"), Some(vec![0, 255]));
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_appending_continues() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("budget.ledger");
        Ledger::open(&path)
            .expect("open")
            .charge(charge("a", "k1", 0.5))
            .expect("charge");
        let whole = std::fs::read(&path).expect("read");
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(&whole[..whole.len() / 2]).expect("tear");
        drop(file);
        let ledger = Ledger::open(&path).expect("reopen");
        assert_eq!(ledger.spent("a").epsilon, 0.5);
        ledger.charge(charge("a", "k2", 0.5)).expect("charge");
        drop(ledger);
        assert_eq!(Ledger::open(&path).expect("reopen").spent("a").epsilon, 1.0);
    }

    #[test]
    fn reading_spend_leaves_a_line_being_written_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("budget.ledger");
        Ledger::open(&path)
            .expect("open")
            .charge(charge("a", "k1", 0.5))
            .expect("charge");
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(b"{\"at\":").expect("partial write");
        drop(file);
        let before = std::fs::read(&path).expect("read");
        let spend = read_spend(&path).expect("read spend");
        assert_eq!(spend.get("a").map(|s| s.epsilon), Some(0.5));
        assert_eq!(
            std::fs::read(&path).expect("read"),
            before,
            "file untouched"
        );
    }

    #[test]
    fn a_damaged_line_in_the_middle_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("budget.ledger");
        let ledger = Ledger::open(&path).expect("open");
        ledger.charge(charge("a", "k1", 0.5)).expect("charge");
        drop(ledger);
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, format!("garbage\n{text}")).expect("write");
        match Ledger::open(&path) {
            Err(BudgetError::Damaged { line: 1, .. }) => {}
            other => panic!("expected a damaged-ledger error, got {:?}", other.err()),
        }
    }

    #[test]
    fn counted_queries_survive_reopening_and_spend_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("budget.ledger");
        let ledger = Ledger::open(&path).expect("open");
        ledger.charge(charge("dp", "k", 0.5)).expect("charge");
        let at = || "2026-11-23T00:00:00Z".to_string();
        for (key, day) in [("a", 10), ("b", 10), ("a", 10), ("a", 11)] {
            ledger
                .charge(Charge::query("sdc", "r", "q", key, day, at()))
                .expect("count");
        }
        drop(ledger);
        let ledger = Ledger::open(&path).expect("reopen");
        for queries in [ledger.queries(), read_queries(&path).expect("read")] {
            let used = queries.used("sdc", 10, "a");
            assert_eq!((used.today, used.total, used.repeat), (2, 3, true));
            let used = queries.used("sdc", 11, "b");
            assert_eq!((used.today, used.total, used.repeat), (1, 3, false));
            assert_eq!(queries.used("dp", 10, "k"), QueriesUsed::default());
        }
        assert_eq!(ledger.spent("sdc"), Spend::default(), "a count spends no ε");
        assert_eq!(ledger.spent("dp").releases, 1);
        assert_eq!(ledger.cached("sdc", "a"), None, "no answer is kept");
    }

    #[test]
    fn keys_of_old_days_are_dropped_but_their_counts_stay() {
        let mut queries = Queries::default();
        assert!(queries.count("p", 10, "a"));
        assert!(queries.count("p", 11, "b"));
        assert!(queries.used("p", 10, "a").repeat, "yesterday's keys stay");
        assert!(queries.count("p", 12, "c"));
        let used = queries.used("p", 10, "a");
        assert_eq!((used.today, used.total, used.repeat), (1, 3, false));
        assert!(queries.used("p", 11, "b").repeat);
    }
}
