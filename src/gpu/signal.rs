//! A value set once by a GPU callback (a buffer mapped, a queue drained) and awaited by whoever
//! needs it. Natively the value is set while `device.poll` runs, so the awaiting future is ready
//! at its first poll; in a browser the callback runs from the event loop, and the waker set here
//! resumes the awaiting task then. Nothing spins and nothing blocks the browser's only thread.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

#[derive(Default)]
struct State<T> {
    value: Option<T>,
    waker: Option<Waker>,
}

/// A shared slot: `set` from the callback, `peek` or `.wait().await` from the reader.
pub struct Signal<T>(Arc<Mutex<State<T>>>);

impl<T> Clone for Signal<T> {
    fn clone(&self) -> Self {
        Signal(self.0.clone())
    }
}

impl<T: Clone> Default for Signal<T> {
    fn default() -> Self {
        Signal(Arc::new(Mutex::new(State {
            value: None,
            waker: None,
        })))
    }
}

impl<T: Clone> Signal<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores the value and wakes the task awaiting it.
    pub fn set(&self, value: T) {
        let waker = {
            let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
            s.value = Some(value);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Empties the slot for reuse.
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).value = None;
    }

    /// The value, if it has arrived.
    pub fn peek(&self) -> Option<T> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .value
            .clone()
    }

    /// Resolves when the value arrives.
    pub fn wait(&self) -> impl Future<Output = T> + '_ {
        Wait(self)
    }
}

struct Wait<'a, T>(&'a Signal<T>);

impl<T: Clone> Future for Wait<'_, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut s = self.0.0.lock().unwrap_or_else(|e| e.into_inner());
        match &s.value {
            Some(v) => Poll::Ready(v.clone()),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Set when the user asks the process to stop (Ctrl-C, SIGTERM): long GPU work that is not a
/// training step (measuring kernel candidates) looks at it between pieces and gives up.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks long GPU work to stop at its next chance.
pub fn request_stop() {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Whether a stop was asked for.
pub fn stop_requested() -> bool {
    STOP.load(std::sync::atomic::Ordering::SeqCst)
}
