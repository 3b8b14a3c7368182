//! [`ImageBytes`]: the shared, immutable bytes an image is read from.
//!
//! Owns: one cheap-to-clone handle to a whole buffer plus a range of it, so that an image file,
//! its bootstrap and its chunk table are three views of one buffer and no part is copied. The
//! buffer may be a `Vec` or anything else that derefs to bytes and is never written again: a
//! worker hands in a read-only mapping of a sealed memfd, owned (and unmapped) by its own type.
//!
//! Must never: know where the bytes come from (no I/O, no mmap here), or panic when the owner
//! breaks its promise to return the same bytes every time: a range that no longer fits reads as
//! empty, which every reader turns into a "truncated" error.

use std::fmt;
use std::ops::{Deref, Range};
use std::sync::Arc;

/// Immutable bytes shared by every view of one image buffer.
#[derive(Clone)]
pub struct ImageBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl ImageBytes {
    /// All of `owner`'s bytes. `owner.as_ref()` must return the same bytes on every call for as
    /// long as the owner lives: a `Vec` nobody can reach any more, or a read-only mapping of a
    /// sealed file.
    pub fn new(owner: Arc<dyn AsRef<[u8]> + Send + Sync>) -> Self {
        let len = (*owner).as_ref().len();
        ImageBytes { owner, range: 0..len }
    }

    /// The bytes `range` of these bytes, sharing the buffer; None if `range` does not fit.
    pub(crate) fn slice(&self, range: Range<usize>) -> Option<ImageBytes> {
        let start = self.range.start.checked_add(range.start)?;
        let end = self.range.start.checked_add(range.end)?;
        (start <= end && end <= self.range.end).then(|| ImageBytes { owner: self.owner.clone(), range: start..end })
    }
}

impl From<Vec<u8>> for ImageBytes {
    fn from(bytes: Vec<u8>) -> Self {
        ImageBytes::new(Arc::new(bytes))
    }
}

impl Deref for ImageBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        (*self.owner).as_ref().get(self.range.clone()).unwrap_or_default()
    }
}

impl AsRef<[u8]> for ImageBytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl fmt::Debug for ImageBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageBytes({} bytes at {:?})", self.range.len(), self.range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_share_the_buffer_and_refuse_ranges_that_do_not_fit() {
        let whole = ImageBytes::from((0u8..100).collect::<Vec<u8>>());
        let middle = whole.slice(10..50).unwrap();
        assert_eq!(&middle[..3], &[10, 11, 12]);
        let inner = middle.slice(5..8).unwrap();
        assert_eq!(&*inner, &[15, 16, 17]);
        assert_eq!(whole.as_ptr().wrapping_add(15), inner.as_ptr());
        assert!(middle.slice(0..41).is_none());
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = 30..20;
        assert!(middle.slice(backwards).is_none());
        assert!(middle.slice(usize::MAX..usize::MAX).is_none());
        assert_eq!(middle.slice(40..40).unwrap().len(), 0);
    }

    /// An owner that breaks its promise and shrinks: views read as empty instead of panicking.
    #[test]
    fn an_owner_that_shrinks_reads_as_empty() {
        struct Shrinking(std::sync::atomic::AtomicBool);
        impl AsRef<[u8]> for Shrinking {
            fn as_ref(&self) -> &[u8] {
                if self.0.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    &[]
                } else {
                    &[1, 2, 3]
                }
            }
        }
        let bytes = ImageBytes::new(Arc::new(Shrinking(false.into())));
        assert!(bytes.is_empty());
    }
}
