//! The embedded coordinator's optional durable log: one JSON line per decision, written and
//! fsynced before any participant hears it, and one per finished transaction. Opening a log
//! returns the decided transactions that did not finish; a coordinator opened on it resumes
//! them with the participants it is given, matched by [`crate::Participant::id`]. When more
//! than half of the lines belong to finished transactions, the file is rewritten with the
//! unfinished ones only (written beside it, fsynced, renamed over it).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::TxnId;

/// Why the log cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    /// Reading, writing or syncing the file failed.
    #[error("transaction log {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        message: String,
    },
    /// A line is not a record of this log.
    #[error("transaction log {path}, line {line}: {message}")]
    Corrupt {
        /// The file.
        path: String,
        /// The line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    /// The decision, before phase 2: who must hear it.
    Decided {
        /// The transaction.
        txn: uuid::Uuid,
        /// Commit (or roll back).
        commit: bool,
        /// The ids of the participants that voted ready (phase 2 is theirs).
        participants: Vec<String>,
    },
    /// Every participant confirmed.
    Finished {
        /// The transaction.
        txn: uuid::Uuid,
    },
}

/// A decided transaction the log says is not finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfinished {
    /// The transaction.
    pub txn: TxnId,
    /// Commit (or roll back).
    pub commit: bool,
    /// The ids of the participants that must hear it.
    pub participants: Vec<String>,
}

/// An open log.
pub struct DecisionLog {
    path: PathBuf,
    file: File,
    /// Unfinished decisions, by transaction.
    open: BTreeMap<uuid::Uuid, Record>,
    /// Lines in the file.
    lines: usize,
}

fn io(path: &Path, what: &str, e: std::io::Error) -> LogError {
    LogError::Io {
        path: path.display().to_string(),
        message: format!("{what}: {e}"),
    }
}

impl DecisionLog {
    /// Opens (or creates) the log at `path`; the unfinished decisions it holds.
    pub fn open(path: &Path) -> Result<(DecisionLog, Vec<Unfinished>), LogError> {
        let mut open = BTreeMap::new();
        let mut lines = 0;
        if path.exists() {
            let f = File::open(path).map_err(|e| io(path, "open", e))?;
            for (n, line) in BufReader::new(f).lines().enumerate() {
                let line = line.map_err(|e| io(path, "read", e))?;
                if line.trim().is_empty() {
                    continue;
                }
                lines += 1;
                let rec: Record = serde_json::from_str(&line).map_err(|e| LogError::Corrupt {
                    path: path.display().to_string(),
                    line: n + 1,
                    message: e.to_string(),
                })?;
                match &rec {
                    Record::Decided { txn, .. } => {
                        open.insert(*txn, rec);
                    }
                    Record::Finished { txn } => {
                        open.remove(txn);
                    }
                }
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| io(path, "open for append", e))?;
        let unfinished = open
            .values()
            .filter_map(|r| match r {
                Record::Decided {
                    txn,
                    commit,
                    participants,
                } => Some(Unfinished {
                    txn: TxnId(*txn),
                    commit: *commit,
                    participants: participants.clone(),
                }),
                Record::Finished { .. } => None,
            })
            .collect();
        let log = DecisionLog {
            path: path.to_path_buf(),
            file,
            open,
            lines,
        };
        Ok((log, unfinished))
    }

    /// Appends a decision and syncs it to disk before returning.
    pub fn decided(
        &mut self,
        txn: TxnId,
        commit: bool,
        participants: Vec<String>,
    ) -> Result<(), LogError> {
        let rec = Record::Decided {
            txn: txn.0,
            commit,
            participants,
        };
        self.append(&rec)?;
        self.file
            .sync_data()
            .map_err(|e| io(&self.path, "fsync", e))?;
        self.open.insert(txn.0, rec);
        Ok(())
    }

    /// Appends that a transaction finished (no sync needed: losing it only resends a
    /// decision everyone already applied), and compacts the file when it is mostly done.
    pub fn finished(&mut self, txn: TxnId) -> Result<(), LogError> {
        if self.open.remove(&txn.0).is_none() {
            return Ok(());
        }
        self.append(&Record::Finished { txn: txn.0 })?;
        if self.lines > 64 && self.open.len() * 2 < self.lines {
            self.compact()?;
        }
        Ok(())
    }

    fn append(&mut self, rec: &Record) -> Result<(), LogError> {
        let mut line = serde_json::to_vec(rec).map_err(|e| LogError::Io {
            path: self.path.display().to_string(),
            message: e.to_string(),
        })?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .map_err(|e| io(&self.path, "write", e))?;
        self.lines += 1;
        Ok(())
    }

    /// Rewrites the file with the unfinished decisions only.
    fn compact(&mut self) -> Result<(), LogError> {
        let tmp = self.path.with_extension("compacting");
        let mut f = File::create(&tmp).map_err(|e| io(&tmp, "create", e))?;
        for rec in self.open.values() {
            let mut line = serde_json::to_vec(rec).map_err(|e| LogError::Io {
                path: tmp.display().to_string(),
                message: e.to_string(),
            })?;
            line.push(b'\n');
            f.write_all(&line).map_err(|e| io(&tmp, "write", e))?;
        }
        f.sync_all().map_err(|e| io(&tmp, "fsync", e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| io(&self.path, "rename", e))?;
        if let Some(dir) = self.path.parent()
            && let Ok(d) = File::open(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            })
        {
            let _ = d.sync_all();
        }
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| io(&self.path, "reopen", e))?;
        self.lines = self.open.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unfinished_decisions_survive_a_reopen_and_compaction_keeps_only_them() {
        let dir = std::env::temp_dir().join(format!("txcoord-log-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("decisions.jsonl");
        let (mut log, none) = DecisionLog::open(&path).unwrap();
        assert!(none.is_empty());
        let keep = TxnId(uuid::Uuid::new_v4());
        log.decided(keep, true, vec!["ledger".into()]).unwrap();
        for _ in 0..100 {
            let t = TxnId(uuid::Uuid::new_v4());
            log.decided(t, false, vec!["a".into()]).unwrap();
            log.finished(t).unwrap();
        }
        drop(log);
        let (_, unfinished) = DecisionLog::open(&path).unwrap();
        assert_eq!(
            unfinished,
            vec![Unfinished {
                txn: keep,
                commit: true,
                participants: vec!["ledger".into()]
            }]
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.lines().count() < 60,
            "compacted: {} lines",
            text.lines().count()
        );
        std::fs::write(&path, "not json\n").unwrap();
        assert!(matches!(
            DecisionLog::open(&path),
            Err(LogError::Corrupt { line: 1, .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
