//! What one instance costs in the structures kept for its life, counted with a counting allocator
//! (sizes rounded up to jemalloc's size classes; hash tables at their size with 10,000 entries).
//! Run with `cargo test --lib footprint -- --nocapture` to see the figures.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting on each thread the bytes live (rounded to jemalloc's classes).
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

/// jemalloc's size class of an allocation of `n` bytes (small and large classes alike: four
/// per doubling above 16 bytes... for these sizes).
pub(crate) fn size_class(n: usize) -> usize {
    match n {
        0..=8 => 8,
        9..=128 => n.div_ceil(16) * 16,
        _ => {
            let lg = usize::BITS - 1 - (n - 1).leading_zeros();
            let step = 1usize << (lg - 2);
            n.div_ceil(step) * step
        }
    }
}

fn add(n: isize) {
    let _ = LIVE.try_with(|l| l.set(l.get() + n));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        add(size_class(layout.size()) as isize);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        add(-(size_class(layout.size()) as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        add(size_class(layout.size()) as isize);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        add(size_class(new) as isize - size_class(layout.size()) as isize);
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// The bytes `f` leaves allocated on this thread (what it returns included).
pub(crate) fn kept_by<T>(f: impl FnOnce() -> T) -> (T, isize) {
    let before = LIVE.with(Cell::get);
    let t = f();
    (t, LIVE.with(Cell::get) - before)
}

#[test]
fn size_classes_are_jemallocs() {
    let classes: Vec<usize> = [
        1, 8, 9, 16, 17, 33, 128, 129, 160, 161, 257, 1024, 1025, 1300,
    ]
    .map(size_class)
    .to_vec();
    assert_eq!(
        classes,
        [
            8, 8, 16, 16, 32, 48, 128, 160, 160, 192, 320, 1024, 1280, 1536
        ]
    );
}
