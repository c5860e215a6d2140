//! The simulated world of the history explorer (tests/explorer.rs): an in-memory apiserver
//! (`kube`), NetBird servers answering at the HTTP level (`netbird`), and the count of external
//! calls a crash is placed by.

pub mod kube;
pub mod netbird;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Print every call (NBOP_TRACE=1: replaying one history to see what happened).
pub static TRACE: AtomicBool = AtomicBool::new(false);

pub fn trace(line: impl FnOnce() -> String) {
    if TRACE.load(Ordering::Relaxed) {
        eprintln!("  {}", line());
    }
}

/// External calls (NetBird requests and Kubernetes writes) and the crash point of a pass.
pub struct Calls {
    pub count: AtomicU64,
    /// The process now running; calls of an earlier (crashed) one never arrive.
    pub epoch: AtomicU64,
    /// Crash at this call count, after (true) or before (false) it is handled.
    crash: Mutex<Option<(u64, bool)>>,
    pub crashed: tokio::sync::watch::Sender<bool>,
}

impl Default for Calls {
    fn default() -> Self {
        Calls {
            count: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            crash: Mutex::new(None),
            crashed: tokio::sync::watch::channel(false).0,
        }
    }
}

impl Calls {
    /// The process dies at the `after`-th external call from now.
    pub fn arm(&self, after: u64, applied: bool) {
        let now = self.count.load(Ordering::SeqCst);
        *self.crash.lock().unwrap() = Some((now + after, applied));
        self.crashed.send_replace(false);
    }

    pub fn disarm(&self) {
        *self.crash.lock().unwrap() = None;
    }

    /// A new process: calls of the previous one are lost.
    pub fn restart(&self) -> u64 {
        self.disarm();
        self.crashed.send_replace(false);
        self.epoch.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Counts a call of process `epoch`; Some(applied) when it does not answer (the process
    /// died at it, or before).
    pub fn tick(&self, epoch: u64) -> Option<bool> {
        if epoch != self.epoch.load(Ordering::SeqCst) || *self.crashed.borrow() {
            return Some(false);
        }
        let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        let mut crash = self.crash.lock().unwrap();
        match *crash {
            Some((at, applied)) if n >= at => {
                *crash = None;
                self.crashed.send_replace(true);
                Some(applied)
            }
            _ => None,
        }
    }
}

impl Calls {
    /// A read by process `epoch`: true when that process is dead (no answer).
    pub fn tick_read(&self, epoch: u64) -> bool {
        epoch != self.epoch.load(Ordering::SeqCst) || *self.crashed.borrow()
    }
}
