//! A global allocator for fuzz binaries: while a fuzz input runs on a thread, any single request
//! above [`LIMIT`] from that thread is refused, after the input is saved. Inputs are at most
//! tens of KiB, so a GiB-sized request means a size was read from the input and trusted.
//!
//! Rust aborts the process when an allocation fails (there is no stable way to unwind), so the
//! input has to be saved here, before the refusal. Declare it in a binary or test crate:
//! `#[global_allocator] static A: recompose_fuzz::alloc::Guard = recompose_fuzz::alloc::Guard;`

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

pub const LIMIT: usize = 1 << 30;

pub struct Guard;

thread_local! {
    /// The input this thread is running and where findings go; set around each run.
    static CURRENT: Cell<Option<(*const u8, usize, &'static Path)>> = const { Cell::new(None) };
}

/// Marks `input` as running on this thread (None: finished). The slice must outlive the mark.
pub(crate) fn running(input: Option<(&[u8], &'static Path)>) {
    CURRENT.set(input.map(|(d, dir)| (d.as_ptr(), d.len(), dir)));
}

/// Saves the running input and refuses; outside a fuzz input, None (allocate as usual).
fn refuse(size: usize) -> Option<*mut u8> {
    // Taking the mark also keeps the save below from coming back here.
    let (ptr, len, dir) = CURRENT.take()?;
    // SAFETY: the worker clears the mark before the input it points to is dropped.
    let input = unsafe { std::slice::from_raw_parts(ptr, len) };
    let detail = format!("asked for {size} bytes in one allocation (more than {LIMIT})");
    match crate::runner::save(dir, "oom", input, &detail) {
        Ok(p) => eprintln!("recompose-fuzz: an input {detail}; saved as {}; aborting", p.display()),
        Err(e) => eprintln!("recompose-fuzz: an input {detail}; could not save it: {e}; aborting"),
    }
    Some(std::ptr::null_mut())
}

/// `allocate()`, unless the request is too large for a fuzz input.
fn guarded(size: usize, allocate: impl FnOnce() -> *mut u8) -> *mut u8 {
    if size > LIMIT {
        refuse(size).unwrap_or_else(allocate)
    } else {
        allocate()
    }
}

// SAFETY: every request is passed to `System` unchanged, or refused with a null pointer.
unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        guarded(layout.size(), || unsafe { System.alloc(layout) })
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        guarded(layout.size(), || unsafe { System.alloc_zeroed(layout) })
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        guarded(new_size, || unsafe { System.realloc(ptr, layout, new_size) })
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}
