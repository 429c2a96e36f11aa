//! The hand-off between a connection's callers and its actor: the synchronisation
//! core of single-flight with dormant connections.
//!
//! One lock guards one state: the queue of commands and whether an actor runs. A
//! submitter enqueues under the lock and learns, in the same critical section,
//! whether it must start the actor; an actor retires only after seeing, under the
//! same lock, that nothing is queued. Hence no command is ever stranded in the queue
//! of a connection without an actor, and at most one actor (one machine) runs per
//! connection: an actor is started only on the `Dormant → Running` transition, and
//! only a running actor's retirement makes the state dormant again.
//!
//! What a retiring actor hands to the next one (`D`, e.g. the hard deadline already
//! warned about) travels inside the state, so the successor sees exactly what its
//! predecessor left, never an older value.
//!
//! The gate is generic over its lock so that the schedule explorer (shuttle, in the
//! tests below) runs this very code with its own mutex.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

/// A mutual-exclusion lock: `std::sync::Mutex` in the manager, the explorer's
/// mutex in its tests.
pub(crate) trait Lock<T> {
    /// A lock holding `value`.
    fn new(value: T) -> Self;
    /// Runs `f` with the value, holding the lock.
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R;
}

impl<T> Lock<T> for Mutex<T> {
    fn new(value: T) -> Self {
        Mutex::new(value)
    }
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        // The critical sections below cannot panic half-way; a poisoned lock still
        // holds a consistent state.
        f(&mut self.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Whether an actor runs.
enum Actor<D> {
    /// No actor; what the last one left for the next.
    Dormant(D),
    Running,
    /// Shut down: commands are refused.
    Closed,
    /// Removed from the manager's map (memory bound): commands are handed back
    /// for a fresh slot.
    Evicted,
}

/// The guarded state.
pub(crate) struct State<C, D> {
    queue: VecDeque<C>,
    actor: Actor<D>,
}

/// What became of a submitted command.
#[must_use]
pub(crate) enum Admission<C, D> {
    /// Queued for the running actor: wake it.
    Queued,
    /// Queued, and no actor runs: the submitter must start one, with what the last
    /// actor left.
    Spawn(D),
    /// The gate is closed; the command is handed back.
    Closed(C),
    /// The slot was evicted; the command is handed back for a fresh slot.
    Evicted(C),
}

/// A deliberately broken protocol, for showing that the explorer finds the bug.
#[cfg(test)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Flaw {
    /// The correct protocol.
    None,
    /// Retire checks for queued commands and marks itself dormant in two critical
    /// sections: a command queued in between is lost.
    RetireCheckThenAct,
    /// Submit reads whether an actor runs and enqueues in two critical sections:
    /// two submitters may both start an actor.
    SpawnCheckThenAct,
}

/// The gate of one connection.
pub(crate) struct Gate<C, D, L = Mutex<State<C, D>>> {
    state: L,
    #[cfg(test)]
    flaw: Flaw,
    _types: std::marker::PhantomData<fn() -> (C, D)>,
}

impl<C, D: Clone, L: Lock<State<C, D>>> Gate<C, D, L> {
    /// A gate with no actor; `initial` is handed to the first one.
    pub(crate) fn new(initial: D) -> Self {
        Gate {
            state: L::new(State {
                queue: VecDeque::new(),
                actor: Actor::Dormant(initial),
            }),
            #[cfg(test)]
            flaw: Flaw::None,
            _types: std::marker::PhantomData,
        }
    }

    /// The same gate with a deliberate flaw.
    #[cfg(test)]
    pub(crate) fn flawed(initial: D, flaw: Flaw) -> Self {
        Gate {
            flaw,
            ..Self::new(initial)
        }
    }

    /// Queues `command`. On [`Admission::Spawn`] the caller must start the actor.
    pub(crate) fn submit(&self, command: C) -> Admission<C, D> {
        #[cfg(test)]
        if self.flaw == Flaw::SpawnCheckThenAct {
            let seen = self.state.with(|s| match &s.actor {
                Actor::Dormant(d) => Some(d.clone()),
                Actor::Running | Actor::Closed | Actor::Evicted => None,
            });
            return self.state.with(|s| {
                s.queue.push_back(command);
                // Acting on the stale `seen` may start a second actor.
                let d = match (seen, &mut s.actor) {
                    (Some(d), _) => d,
                    (None, Actor::Dormant(d)) => d.clone(),
                    (None, _) => return Admission::Queued,
                };
                s.actor = Actor::Running;
                Admission::Spawn(d)
            });
        }
        self.state.with(|s| match &s.actor {
            Actor::Closed => Admission::Closed(command),
            Actor::Evicted => Admission::Evicted(command),
            Actor::Running => {
                s.queue.push_back(command);
                Admission::Queued
            }
            Actor::Dormant(_) => {
                s.queue.push_back(command);
                match std::mem::replace(&mut s.actor, Actor::Running) {
                    Actor::Dormant(d) => Admission::Spawn(d),
                    _ => unreachable!("matched Dormant above"),
                }
            }
        })
    }

    /// The actor's next command, if any.
    pub(crate) fn take(&self) -> Option<C> {
        self.state.with(|s| s.queue.pop_front())
    }

    /// The actor asks to stop, leaving `parting` for its successor. Refused (the
    /// actor must go on) while commands are queued.
    pub(crate) fn retire(&self, parting: D) -> bool {
        #[cfg(test)]
        if self.flaw == Flaw::RetireCheckThenAct {
            if !self.state.with(|s| s.queue.is_empty()) {
                return false;
            }
            return self.state.with(|s| {
                s.actor = Actor::Dormant(parting);
                true
            });
        }
        self.state.with(|s| {
            if !s.queue.is_empty() {
                return false;
            }
            // Give back whatever capacity a burst of callers left behind.
            s.queue = VecDeque::new();
            s.actor = Actor::Dormant(parting);
            true
        })
    }

    /// The running actor died (it panicked): hands back what was queued for it and
    /// makes the gate dormant with `parting`, so that the next command starts a
    /// fresh actor. A closed gate stays closed.
    pub(crate) fn abandon(&self, parting: D) -> VecDeque<C> {
        self.state.with(|s| {
            if matches!(s.actor, Actor::Running) {
                s.actor = Actor::Dormant(parting);
            }
            std::mem::take(&mut s.queue)
        })
    }

    /// Refuses every later command and hands back the queued ones (shutdown).
    pub(crate) fn close(&self) -> VecDeque<C> {
        self.state.with(|s| {
            s.actor = Actor::Closed;
            std::mem::take(&mut s.queue)
        })
    }

    /// What a dormant gate holds for the next actor (`None` while one runs).
    pub(crate) fn dormant<R>(&self, f: impl FnOnce(&D) -> R) -> Option<R> {
        self.state.with(|s| match &s.actor {
            Actor::Dormant(d) => Some(f(d)),
            Actor::Running | Actor::Closed | Actor::Evicted => None,
        })
    }

    /// Evicts a dormant gate for which `evictable` holds: later commands are
    /// handed back ([`Admission::Evicted`]) for the submitter to use a fresh slot.
    /// In the same critical section as every submission, so no command is ever
    /// queued on an evicted gate.
    pub(crate) fn evict(&self, evictable: impl FnOnce(&D) -> bool) -> bool {
        self.state.with(|s| match &s.actor {
            Actor::Dormant(d) if s.queue.is_empty() && evictable(d) => {
                s.actor = Actor::Evicted;
                true
            }
            _ => false,
        })
    }
}

#[cfg(test)]
mod explore;
