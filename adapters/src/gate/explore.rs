//! The gate under shuttle's schedule explorer: callers race an actor that retires
//! whenever its queue looks empty (a linger of zero, the most eager exit), over the
//! real [`Gate`] code compiled against shuttle's mutex.
//!
//! The machine is modelled minimally: an actor starts with an empty machine that
//! loads from the store on its first command; an empty store means the token
//! expired, and the actor makes one provider call, stores and caches the token.
//! Checked in every explored schedule: exactly one provider call for the expiry,
//! every caller answered with the token, never two actors (each actor must start
//! from the hand-off its predecessor left, and no two handle commands at once), and
//! nothing left queued at the end. A lost command leaves its caller blocked for
//! ever, which shuttle reports as a deadlock.

use super::{Admission, Flaw, Gate, Lock, State};
use shuttle::scheduler::{DfsScheduler, PctScheduler, RandomScheduler};
use shuttle::sync::{mpsc, Arc, Mutex};
// Bookkeeping that only observes is kept out of the explorer's sight (std types are
// no scheduling points), so that its schedules are those of the protocol.
use shuttle::thread::{self, JoinHandle};
use shuttle::{Config, Runner};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

impl<T> Lock<T> for Mutex<T> {
    fn new(value: T) -> Self {
        Mutex::new(value)
    }
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        f(&mut self
            .lock()
            .expect("the model never panics holding the lock"))
    }
}

const TOKEN: u64 = 7;

/// Fixed, so that every run explores the same schedules and a failure replays.
const SEED: u64 = 0x7F3A_11CE;

/// What an actor hands to its successor: how many actors ran before.
#[derive(Clone, Copy, Default)]
struct Parting {
    incarnation: u64,
}

type Reply = mpsc::Sender<u64>;

struct World {
    gate: Gate<Reply, Parting, Mutex<State<Reply, Parting>>>,
    /// The lock-free hot path of the manager (a mutex suffices for the model).
    cache: Mutex<Option<u64>>,
    /// The shared store: `None` is the expired token.
    store: Mutex<Option<u64>>,
    provider_calls: AtomicUsize,
    /// Actors handling a command right now.
    handling: AtomicUsize,
    /// The incarnation of the actor that started last.
    started: AtomicU64,
    actors: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

/// One caller's request through the gate, as `TokenManager` sends it.
fn request(world: &Arc<World>) -> u64 {
    let (tx, rx) = mpsc::channel();
    match world.gate.submit(tx) {
        Admission::Queued => {}
        Admission::Spawn(parting) => {
            let w = world.clone();
            let actor = thread::spawn(move || run_actor(&w, parting));
            world.actors.lock().unwrap().push(actor);
        }
        Admission::Closed(_) => unreachable!("the model never closes the gate"),
        Admission::Evicted(_) => unreachable!("the model never evicts"),
    }
    rx.recv().expect("the actor answers every command it takes")
}

fn run_actor(world: &World, parting: Parting) {
    let me = parting.incarnation + 1;
    let before = world.started.swap(me, Ordering::SeqCst);
    assert_eq!(
        before, parting.incarnation,
        "an actor started without its predecessor's hand-off: two actors"
    );
    // The machine: empty at start, it loads from the store on first use.
    let mut machine: Option<u64> = None;
    loop {
        while let Some(reply) = world.gate.take() {
            let busy = world.handling.fetch_add(1, Ordering::SeqCst);
            assert_eq!(busy, 0, "two actors handle commands at once");
            let token = match machine {
                Some(t) => t,
                None => {
                    let stored = *world.store.lock().unwrap();
                    let t = match stored {
                        Some(t) => t,
                        None => {
                            world.provider_calls.fetch_add(1, Ordering::SeqCst);
                            *world.store.lock().unwrap() = Some(TOKEN);
                            TOKEN
                        }
                    };
                    *world.cache.lock().unwrap() = Some(t);
                    machine = Some(t);
                    t
                }
            };
            world.handling.fetch_sub(1, Ordering::SeqCst);
            let _ = reply.send(token);
        }
        if world.gate.retire(Parting { incarnation: me }) {
            return;
        }
    }
}

/// `callers` threads each ask `requests` times: first through the hot path (the gate
/// only on a cache miss), then straight through the gate (as connect, disconnect
/// and keep-alive do), so later requests meet retired actors and respawn them.
/// `runs` counts the schedules explored.
fn scenario(
    flaw: Flaw,
    callers: usize,
    requests: usize,
    runs: Arc<AtomicUsize>,
) -> impl Fn() + Send + Sync + 'static {
    move || {
        runs.fetch_add(1, Ordering::Relaxed);
        let world = Arc::new(World {
            gate: Gate::flawed(Parting::default(), flaw),
            cache: Mutex::new(None),
            store: Mutex::new(None),
            provider_calls: AtomicUsize::new(0),
            handling: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            actors: std::sync::Mutex::new(Vec::new()),
        });
        let threads: Vec<_> = (0..callers)
            .map(|_| {
                let w = world.clone();
                thread::spawn(move || {
                    let cached = *w.cache.lock().unwrap();
                    let first = cached.unwrap_or_else(|| request(&w));
                    assert_eq!(first, TOKEN);
                    for _ in 1..requests {
                        assert_eq!(request(&w), TOKEN);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        loop {
            let actor = world.actors.lock().unwrap().pop();
            match actor {
                Some(a) => a.join().unwrap(),
                None => break,
            }
        }
        assert_eq!(
            world.provider_calls.load(Ordering::SeqCst),
            1,
            "one provider call per expiry"
        );
        assert!(world.gate.take().is_none(), "a command was left queued");
        assert!(
            world.gate.dormant(|_| ()).is_some(),
            "the last actor retired"
        );
    }
}

/// How a run explores schedules.
#[derive(Clone, Copy)]
enum Explorer {
    /// Depth-first over every schedule, up to a limit.
    Dfs(usize),
    /// Probabilistic concurrency testing (depth 3), this many schedules.
    Pct(usize),
    /// Uniformly random, this many schedules.
    Random(usize),
}

/// The schedules explored, or the panic message of the first failing one with the
/// number of schedules it took to find it.
fn explore(
    explorer: Explorer,
    flaw: Flaw,
    callers: usize,
    requests: usize,
) -> Result<usize, (String, usize)> {
    let runs = Arc::new(AtomicUsize::new(0));
    let f = scenario(flaw, callers, requests, runs.clone());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match explorer {
        Explorer::Dfs(limit) => {
            Runner::new(DfsScheduler::new(Some(limit), false), Config::default()).run(f)
        }
        Explorer::Pct(n) => {
            Runner::new(PctScheduler::new_from_seed(SEED, 3, n), Config::default()).run(f)
        }
        Explorer::Random(n) => {
            Runner::new(RandomScheduler::new_from_seed(SEED, n), Config::default()).run(f)
        }
    }));
    let runs = runs.load(Ordering::Relaxed);
    result.map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        (message, runs)
    })
}

/// One caller asking twice against an actor that retires at any moment: the
/// submit-versus-retire race, every schedule of it.
#[test]
fn submit_racing_retire_every_schedule() {
    let limit = 100_000;
    let explored = explore(Explorer::Dfs(limit), Flaw::None, 1, 2).unwrap();
    println!("gate, 1 caller x 2 requests: {explored} schedules (exhaustive DFS)");
    assert!(
        explored < limit,
        "the DFS finished: every schedule was explored"
    );
}

/// Several callers: too many schedules for DFS, so sampled by PCT (which bounds
/// the number of priority changes, where most concurrency bugs live) and at random.
#[test]
fn several_callers_sampled() {
    for (callers, requests) in [(2, 1), (2, 2), (3, 2)] {
        let pct = explore(Explorer::Pct(30_000), Flaw::None, callers, requests).unwrap();
        let random = explore(Explorer::Random(30_000), Flaw::None, callers, requests).unwrap();
        println!(
            "gate, {callers} callers x {requests} requests: {pct} PCT + {random} random schedules"
        );
        assert_eq!((pct, random), (30_000, 30_000));
    }
}

#[test]
fn explorer_finds_a_lost_command() {
    let (message, after) = explore(Explorer::Dfs(100_000), Flaw::RetireCheckThenAct, 1, 2)
        .expect_err("the flawed retire loses a command");
    println!("lost command found after {after} schedules: {message}");
    assert!(message.contains("deadlock"), "{message}");
}

#[test]
fn explorer_finds_two_actors() {
    let (message, after) = explore(Explorer::Pct(20_000), Flaw::SpawnCheckThenAct, 2, 2)
        .expect_err("the flawed submit starts two actors");
    println!("two actors found after {after} schedules: {message}");
    assert!(message.contains("two actors"), "{message}");
}
