//! Group commit for the SQLite store: one thread owns the connection and runs
//! what the store's callers ask for in batches, one transaction per batch.
//!
//! A durable SQLite commit costs an fsync; with one connection, callers that
//! commit at the same moment used to queue for one fsync each. The writer takes
//! every call waiting when it is free (at most [`MAX_BATCH`]), opens one
//! transaction (`BEGIN IMMEDIATE` if any call writes), runs each call inside its
//! own savepoint — so each compare-and-swap is still checked on its own, and a
//! call that fails rolls back only its own changes — and commits once. Answers go
//! out after the commit: nobody is told "committed" before the fsync. If the
//! commit fails, every call that meant to keep its changes is told the store is
//! unavailable (the machine then treats the outcome as unknown, as for any lost
//! store answer).
//!
//! A caller that finds nobody else waiting and the connection free does not hand
//! its call to the thread: on a multi-threaded tokio runtime it runs it as a batch
//! of one on its own thread (`block_in_place`, so the runtime's other tasks move
//! on meanwhile), with no savepoint since nothing shares the transaction. On a
//! current-thread runtime, or when the connection is busy, the call goes to the
//! thread and is batched with whatever else waits. While a call runs on its
//! caller's thread, the task that made it does nothing else: a connection's actor
//! notices a shutdown or a drain deadline when the call returns (usually within a
//! millisecond; at most the busy timeout, when another process holds the
//! database's write lock that long).
//!
//! A call that panics (a bug in the store's own code) loses its batch, nothing
//! more: its callers are told the call was abandoned, its transaction is rolled
//! back as it unwinds, and the thread goes on.

use super::StoreError;
use crate::crypto::Keyring;
use rusqlite::Connection;
use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread::JoinHandle;
use tokio::runtime::{Handle, RuntimeFlavor};

/// The most calls run in one transaction.
const MAX_BATCH: usize = 64;

/// One call to run on the writer's connection.
trait Job: Send {
    /// Whether the call writes (the batch then takes the write lock at once).
    fn writes(&self) -> bool;
    /// Runs the call inside the batch's transaction; says whether to keep what it
    /// changed and keeps its answer until the batch's outcome is known.
    fn run(self: Box<Self>, conn: &Connection, keyring: &Keyring) -> Box<dyn Answer>;
    /// The batch could not start: answer without running.
    fn refuse(self: Box<Self>, why: &str);
}

/// A call's result, held until the batch commits.
trait Answer: Send {
    fn keep(&self) -> bool;
    fn send(self: Box<Self>, committed: Result<(), &str>);
}

struct Call<T, F> {
    write: bool,
    f: F,
    reply: tokio::sync::oneshot::Sender<Result<T, StoreError>>,
}

struct Reply<T> {
    result: Result<T, StoreError>,
    reply: tokio::sync::oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Job for Call<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection, &Keyring) -> Result<T, StoreError> + Send,
{
    fn writes(&self) -> bool {
        self.write
    }

    fn run(self: Box<Self>, conn: &Connection, keyring: &Keyring) -> Box<dyn Answer> {
        let result = (self.f)(conn, keyring);
        Box::new(Reply {
            result,
            reply: self.reply,
        })
    }

    fn refuse(self: Box<Self>, why: &str) {
        let _ = self.reply.send(Err(unavailable(why)));
    }
}

impl<T: Send + 'static> Answer for Reply<T> {
    fn keep(&self) -> bool {
        self.result.is_ok()
    }

    fn send(self: Box<Self>, committed: Result<(), &str>) {
        let result = match (self.result, committed) {
            (Ok(_), Err(why)) => Err(unavailable(why)),
            (result, _) => result,
        };
        // The caller may have stopped waiting; nothing to do then.
        let _ = self.reply.send(result);
    }
}

fn unavailable(why: &str) -> StoreError {
    StoreError::Unavailable(format!("SQLite: {why}"))
}

/// The handle callers send work through; dropping it ends the writer once the
/// work already sent is done.
pub(super) struct Writer {
    owned: Arc<Mutex<Owned>>,
    /// Calls sent to the thread that it has not taken yet.
    queued: Arc<AtomicUsize>,
    jobs: Option<mpsc::Sender<Box<dyn Job>>>,
    thread: Option<JoinHandle<()>>,
}

/// The connection and the keys its calls seal with, used by one batch at a time.
struct Owned {
    conn: Connection,
    keyring: Keyring,
}

impl Owned {
    fn run(&self, batch: Vec<Box<dyn Job>>) {
        run_batch(&self.conn, &self.keyring, batch);
    }
}

thread_local! {
    /// tokio refused to block on this thread (see [`Writer::run_here`]).
    static CANNOT_BLOCK: Cell<bool> = const { Cell::new(false) };
}

/// The connection. A panicking call does not poison the lock (calls run inside
/// `catch_unwind`, the guard outside it), and its transaction is rolled back as
/// it unwinds ([`RollbackOnPanic`]); the connection is sound either way.
fn lock(owned: &Mutex<Owned>) -> MutexGuard<'_, Owned> {
    owned.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Writer {
    /// Starts the thread that owns `conn`.
    pub(super) fn start(conn: Connection, keyring: Keyring) -> Result<Self, StoreError> {
        let owned = Arc::new(Mutex::new(Owned { conn, keyring }));
        let queued = Arc::new(AtomicUsize::new(0));
        let (jobs, queue) = mpsc::channel::<Box<dyn Job>>();
        let thread = {
            let (owned, queued) = (Arc::clone(&owned), Arc::clone(&queued));
            std::thread::Builder::new()
                .name("tokenfence-sqlite".into())
                .spawn(move || {
                    while let Ok(first) = queue.recv() {
                        let mut batch = vec![first];
                        batch.extend(queue.try_iter().take(MAX_BATCH - 1));
                        let owned = lock(&owned);
                        // Counted out once the connection is the batch's: until
                        // then a caller sees it waiting and queues behind it
                        // rather than overtaking it on its own thread.
                        queued.fetch_sub(batch.len(), Ordering::AcqRel);
                        // A call that panics loses its batch (its callers hear
                        // that the call was abandoned), not the writer.
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| owned.run(batch)));
                    }
                })
                .map_err(|e| unavailable(&format!("cannot start the writer thread: {e}")))?
        };
        Ok(Writer {
            owned,
            queued,
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Runs `f` on the writer's connection, in a batch with whatever else is
    /// waiting, and answers once the batch is committed (or rolled back).
    pub(super) async fn run<T, F>(&self, write: bool, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Keyring) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Box<dyn Job> = Box::new(Call { write, f, reply });
        if let Some(job) = self.run_here(job) {
            self.queued.fetch_add(1, Ordering::AcqRel);
            if self
                .jobs
                .as_ref()
                .is_none_or(|jobs| jobs.send(job).is_err())
            {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                return Err(unavailable("the writer thread has stopped"));
            }
        }
        answer.await.map_err(|_| {
            unavailable("the call was abandoned (the writer stopped or the call panicked)")
        })?
    }

    /// Runs `job` on this thread as a batch of one if nobody waits for the
    /// connection and it is free, on a runtime whose other tasks can move to
    /// another worker meanwhile; otherwise gives it back for the writer thread.
    ///
    /// tokio refuses to block in some places its runtime flavor does not show (a
    /// `LocalSet` on the thread of a multi-threaded runtime's `block_on`): it
    /// panics before running anything, the call goes to the writer thread, and so
    /// does every later call from this thread. A call that panics itself is
    /// abandoned, as on the writer thread: its caller hears so.
    fn run_here(&self, job: Box<dyn Job>) -> Option<Box<dyn Job>> {
        let multi_thread =
            Handle::try_current().is_ok_and(|rt| rt.runtime_flavor() == RuntimeFlavor::MultiThread);
        if !multi_thread || CANNOT_BLOCK.get() || self.queued.load(Ordering::Acquire) > 0 {
            return Some(job);
        }
        let owned = match self.owned.try_lock() {
            Ok(owned) => owned,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Some(job),
        };
        let mut job = Some(job);
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| {
            tokio::task::block_in_place(|| job.take().map(|job| owned.run(vec![job])))
        }));
        match (ran, job) {
            (Err(_), Some(job)) => {
                CANNOT_BLOCK.set(true);
                Some(job)
            }
            _ => None,
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop; wait for it so that the
        // connection is closed when the store is gone.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

/// Rolls the batch's transaction back if a call panics inside it, so that the
/// write lock other processes wait for is not held until the next batch.
struct RollbackOnPanic<'a>(&'a Connection);

impl Drop for RollbackOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.0.execute_batch("ROLLBACK");
        }
    }
}

fn run_batch(conn: &Connection, keyring: &Keyring, batch: Vec<Box<dyn Job>>) {
    let begin = if batch.iter().any(|j| j.writes()) {
        "BEGIN IMMEDIATE"
    } else {
        "BEGIN DEFERRED"
    };
    if let Err(e) = conn.execute_batch(begin) {
        let why = e.to_string();
        return batch.into_iter().for_each(|j| j.refuse(&why));
    }
    let _open = RollbackOnPanic(conn);
    // A call alone needs no savepoint: if it fails, the whole transaction is its.
    let savepoints = batch.len() > 1;
    let mut answers = Vec::with_capacity(batch.len());
    let mut broken: Option<String> = None;
    for job in batch {
        if let Some(why) = &broken {
            job.refuse(why.as_str());
            continue;
        }
        if savepoints {
            if let Err(e) = conn.execute_batch("SAVEPOINT call") {
                broken = Some(e.to_string());
                job.refuse(&e.to_string());
                continue;
            }
        }
        let answer = job.run(conn, keyring);
        let end = match (savepoints, answer.keep()) {
            (false, _) => None,
            (true, true) => Some("RELEASE call"),
            (true, false) => Some("ROLLBACK TO call; RELEASE call"),
        };
        if let Some(Err(e)) = end.map(|end| conn.execute_batch(end)) {
            broken = Some(e.to_string());
        }
        answers.push(answer);
    }
    let committed = match broken {
        None if answers.iter().any(|a| a.keep()) => {
            conn.execute_batch("COMMIT").map_err(|e| e.to_string())
        }
        // Every call failed and answers with its own error: nothing to keep.
        None => conn.execute_batch("ROLLBACK").map_err(|e| e.to_string()),
        Some(why) => Err(why),
    };
    if committed.is_err() {
        // Nothing of this batch stays; the connection is ready for the next one.
        let _ = conn.execute_batch("ROLLBACK");
    }
    let committed = committed.as_ref().map(|_| ()).map_err(String::as_str);
    for answer in answers {
        answer.send(committed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{EncryptionKey, KeyId};
    use std::time::Duration;

    /// What one test call does on the writer's connection.
    type TestCall = Box<dyn Fn(&Connection) -> Result<(), StoreError> + Send>;

    fn keyring() -> Keyring {
        Keyring::new(KeyId(1), EncryptionKey::from_slice(&[7; 32]).expect("key"))
    }

    fn open(path: &std::path::Path) -> Connection {
        let conn = Connection::open(path).expect("open");
        let _: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .expect("wal");
        conn.execute_batch("PRAGMA foreign_keys = ON").expect("fk");
        conn
    }

    fn count(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .expect("count")
    }

    /// Starts a writer whose first call holds the thread until `calls` more are
    /// queued behind it, so that those run as one batch; returns each call's
    /// result with (rows it saw, rows another connection saw committed).
    async fn batched(calls: Vec<TestCall>) -> (Vec<Result<(i64, i64), StoreError>>, i64) {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("batch.db");
        let conn = open(&path);
        conn.execute_batch(
            "CREATE TABLE parent (k INTEGER PRIMARY KEY); \
             CREATE TABLE t (k INTEGER PRIMARY KEY, \
               p INTEGER REFERENCES parent (k) DEFERRABLE INITIALLY DEFERRED)",
        )
        .expect("schema");
        let writer = Arc::new(Writer::start(conn, keyring()).expect("writer"));
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let first = {
            let writer = Arc::clone(&writer);
            tokio::spawn(async move {
                writer
                    .run(true, move |_, _| {
                        wait.recv().expect("go");
                        Ok(())
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let tasks: Vec<_> = calls
            .into_iter()
            .map(|call| {
                let writer = Arc::clone(&writer);
                let path = path.clone();
                tokio::spawn(async move {
                    writer
                        .run(true, move |conn, _| {
                            call(conn)?;
                            Ok((count(conn), count(&open(&path))))
                        })
                        .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        go.send(()).expect("release the first call");
        first.await.expect("first").expect("first call");
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.expect("task"));
        }
        drop(writer);
        (results, count(&open(&path)))
    }

    fn insert(k: i64, fail: bool) -> TestCall {
        Box::new(move |conn| {
            conn.execute("INSERT INTO t (k) VALUES (?1)", [k])
                .map_err(|e| unavailable(&e.to_string()))?;
            if fail {
                return Err(StoreError::Config(format!("call {k} fails")));
            }
            Ok(())
        })
    }

    #[tokio::test]
    async fn calls_waiting_together_share_one_commit_and_a_failing_call_rolls_back_alone() {
        let calls = (0..10).map(|k| insert(k, k == 3 || k == 7)).collect();
        let (results, stored) = batched(calls).await;
        let mut seen = 0;
        for (k, result) in results.into_iter().enumerate() {
            match result {
                Err(StoreError::Config(why)) => assert!(k == 3 || k == 7, "{k}: {why}"),
                Ok((own, committed)) => {
                    seen += 1;
                    // Inside the batch every earlier kept call is visible...
                    assert_eq!(own, seen, "call {k}");
                    // ...and none is committed yet: one transaction for all.
                    assert_eq!(committed, 0, "call {k} saw a commit inside its batch");
                }
                Err(e) => panic!("call {k}: {e}"),
            }
        }
        assert_eq!(seen, 8);
        assert_eq!(
            stored, 8,
            "the two failing calls' rows are rolled back, the rest kept"
        );
    }

    /// A writer on a fresh database with the test table; the directory lives as
    /// long as the returned guard.
    fn writer() -> (Arc<Writer>, std::path::PathBuf, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("w.db");
        let conn = open(&path);
        conn.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY)")
            .expect("schema");
        let writer = Arc::new(Writer::start(conn, keyring()).expect("writer"));
        (writer, path, dir)
    }

    /// Inserts `k` through the writer; says which thread ran the call.
    async fn insert_on(writer: &Writer, k: i64) -> Result<Option<String>, StoreError> {
        writer
            .run(true, move |conn, _| {
                insert(k, false)(conn)?;
                Ok(std::thread::current().name().map(str::to_string))
            })
            .await
    }

    /// Runs `f` on a current-thread runtime of its own thread (where calls go to
    /// the writer thread).
    fn on_current_thread<T: Send + 'static>(
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("rt")
                .block_on(f)
        })
        .join()
        .expect("thread")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_alone_runs_on_its_callers_thread_and_commits() {
        let (writer, path, _dir) = writer();
        let w = Arc::clone(&writer);
        let thread = tokio::spawn(async move { insert_on(&w, 1).await })
            .await
            .expect("task")
            .expect("insert");
        assert_ne!(thread.as_deref(), Some("tokenfence-sqlite"), "handed off");
        assert_eq!(count(&open(&path)), 1, "committed before the answer");
        // Under a current-thread runtime the writer thread runs it.
        let w = Arc::clone(&writer);
        let on_thread = on_current_thread(async move { insert_on(&w, 2).await });
        assert_eq!(
            on_thread.expect("insert").as_deref(),
            Some("tokenfence-sqlite")
        );
        assert_eq!(count(&open(&path)), 2);
    }

    #[test]
    fn where_tokio_refuses_to_block_the_writer_thread_runs_the_call() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("rt");
        let (writer, path, _dir) = writer();
        // A LocalSet on the thread of a multi-threaded runtime's `block_on`.
        let local = tokio::task::LocalSet::new();
        for k in [1, 2] {
            let thread = rt
                .block_on(local.run_until(insert_on(&writer, k)))
                .expect("no panic, an answer");
            assert_eq!(thread.as_deref(), Some("tokenfence-sqlite"));
        }
        assert_eq!(count(&open(&path)), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_alone_that_fails_keeps_nothing_on_either_path() {
        let (writer, path, _dir) = writer();
        let failing = |writer: Arc<Writer>| async move {
            writer.run(true, |conn, _| insert(1, true)(conn)).await
        };
        let here = tokio::spawn(failing(Arc::clone(&writer)))
            .await
            .expect("task");
        assert!(matches!(here, Err(StoreError::Config(_))), "{here:?}");
        let there = on_current_thread(failing(Arc::clone(&writer)));
        assert!(matches!(there, Err(StoreError::Config(_))), "{there:?}");
        assert_eq!(
            count(&open(&path)),
            0,
            "the failed calls' rows are rolled back"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_that_panics_is_abandoned_keeps_nothing_and_the_writer_goes_on() {
        let (writer, path, _dir) = writer();
        let panicking = |writer: Arc<Writer>| async move {
            writer
                .run(true, |conn, _| -> Result<(), StoreError> {
                    insert(1, false)(conn)?;
                    panic!("a bug in a store call");
                })
                .await
        };
        let abandoned = |r: &Result<(), StoreError>| matches!(r, Err(StoreError::Unavailable(why)) if why.contains("abandoned"));
        // Another process must not wait for the write lock the call took.
        let other_process_writes = |k: i64| {
            let conn = open(&path);
            conn.busy_timeout(Duration::ZERO).expect("timeout");
            insert(k, false)(&conn)
        };
        // On the caller's thread.
        let here = tokio::spawn(panicking(Arc::clone(&writer))).await;
        assert!(abandoned(&here.expect("the task itself does not panic")));
        other_process_writes(10).expect("the write lock is free");
        assert!(insert_on(&writer, 2).await.is_ok(), "usable after it");
        // On the writer thread (a current-thread runtime hands calls to it).
        let w = Arc::clone(&writer);
        let (there, after) = on_current_thread(async move {
            let there = panicking(Arc::clone(&w)).await;
            (there, insert_on(&w, 3).await)
        });
        assert!(abandoned(&there), "{there:?}");
        other_process_writes(11).expect("the write lock is free");
        assert!(after.is_ok(), "the writer thread is still there");
        let conn = open(&path);
        let kept: Vec<i64> = conn
            .prepare("SELECT k FROM t ORDER BY k")
            .and_then(|mut q| q.query_map([], |r| r.get(0))?.collect())
            .expect("rows");
        assert_eq!(
            kept,
            vec![2, 3, 10, 11],
            "the panicking calls' rows are rolled back"
        );
    }

    #[tokio::test]
    async fn a_batch_whose_commit_fails_answers_unavailable_and_keeps_nothing() {
        let mut calls = vec![insert(1, false), insert(2, true)];
        // A row whose deferred foreign key fails only at COMMIT.
        calls.push(Box::new(|conn: &Connection| {
            conn.execute("INSERT INTO t (k, p) VALUES (3, 99)", [])
                .map(|_| ())
                .map_err(|e| unavailable(&e.to_string()))
        }));
        let (results, stored) = batched(calls).await;
        assert!(
            matches!(&results[0], Err(StoreError::Unavailable(why)) if why.contains("FOREIGN KEY"))
        );
        assert!(
            matches!(&results[1], Err(StoreError::Config(_))),
            "its own error"
        );
        assert!(matches!(&results[2], Err(StoreError::Unavailable(_))));
        assert_eq!(stored, 0);
    }
}
