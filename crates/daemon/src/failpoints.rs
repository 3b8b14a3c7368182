//! Failures the tests inject into a worker, to prove it survives them. Compiled only with the
//! `failpoints` feature, which release builds leave off, so no input can reach them there.

/// With `PHOENIXFS_FAILPOINT_PANIC_IN_READ=FILE` in the environment, the first READ handled
/// while FILE exists deletes it and panics (once: only the thread that deleted it panics).
pub(crate) fn panic_in_read() {
    if let Some(marker) = std::env::var_os("PHOENIXFS_FAILPOINT_PANIC_IN_READ") {
        if std::fs::remove_file(&marker).is_ok() {
            panic!("failpoint: a panic in the middle of a READ");
        }
    }
}
