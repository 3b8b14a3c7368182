//! Requests, error answers and answered bytes by opcode, counted on the request path: relaxed
//! atomic adds in fixed tables indexed by opcode, no lock, nothing allocated.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::request::opcode;

/// Opcodes below this have a slot of their own; the rest share slot 0 (no opcode is 0).
const SLOTS: usize = 64;

pub struct OpcodeCounts {
    requests: [AtomicU64; SLOTS],
    errors: [AtomicU64; SLOTS],
    reply_bytes: [AtomicU64; SLOTS],
}

/// Counts by opcode name ("read", "lookup", ...), opcodes never seen left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpcodeTotals {
    pub requests: BTreeMap<&'static str, u64>,
    /// Requests answered with an errno, expected ones (ENOENT, ENOSYS) included.
    pub errors: BTreeMap<&'static str, u64>,
    /// Bytes of the answers' bodies (headers not counted).
    pub reply_bytes: BTreeMap<&'static str, u64>,
}

fn slot(opcode: u32) -> usize {
    if (opcode as usize) < SLOTS {
        opcode as usize
    } else {
        0
    }
}

impl OpcodeCounts {
    pub fn new() -> Self {
        let table = || std::array::from_fn(|_| AtomicU64::new(0));
        OpcodeCounts { requests: table(), errors: table(), reply_bytes: table() }
    }

    pub fn request(&self, opcode: u32) {
        self.requests[slot(opcode)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn error(&self, opcode: u32) {
        self.errors[slot(opcode)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn replied(&self, opcode: u32, bytes: usize) {
        self.reply_bytes[slot(opcode)].fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn totals(&self) -> OpcodeTotals {
        let by_name = |table: &[AtomicU64; SLOTS]| {
            let mut totals = BTreeMap::new();
            for (op, count) in table.iter().enumerate() {
                let count = count.load(Ordering::Relaxed);
                if count > 0 {
                    *totals.entry(opcode::name(op as u32)).or_default() += count;
                }
            }
            totals
        };
        OpcodeTotals { requests: by_name(&self.requests), errors: by_name(&self.errors), reply_bytes: by_name(&self.reply_bytes) }
    }
}

impl Default for OpcodeCounts {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_go_by_name_and_strange_opcodes_share_other() {
        let counts = OpcodeCounts::new();
        for op in [opcode::READ, opcode::READ, opcode::LOOKUP, 4096, 63] {
            counts.request(op);
        }
        counts.error(opcode::LOOKUP);
        counts.replied(opcode::READ, 4096);
        counts.replied(opcode::READ, 100);
        let totals = counts.totals();
        assert_eq!(totals.requests.into_iter().collect::<Vec<_>>(), vec![("lookup", 1), ("other", 2), ("read", 2)]);
        assert_eq!(totals.errors.into_iter().collect::<Vec<_>>(), vec![("lookup", 1)]);
        assert_eq!(totals.reply_bytes.into_iter().collect::<Vec<_>>(), vec![("read", 4196)]);
    }
}
