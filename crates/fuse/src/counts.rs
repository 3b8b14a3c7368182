//! Requests and error answers by opcode, counted on the request path: one relaxed atomic
//! add per request in a fixed table indexed by opcode, no lock, nothing allocated.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::request::opcode;

/// Opcodes below this have a slot of their own; the rest share slot 0 (no opcode is 0).
const SLOTS: usize = 64;

pub struct OpcodeCounts {
    requests: [AtomicU64; SLOTS],
    errors: [AtomicU64; SLOTS],
}

/// Counts by opcode name ("read", "lookup", ...), opcodes never seen left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpcodeTotals {
    pub requests: BTreeMap<&'static str, u64>,
    /// Requests answered with an errno, expected ones (ENOENT, ENOSYS) included.
    pub errors: BTreeMap<&'static str, u64>,
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
        OpcodeCounts { requests: std::array::from_fn(|_| AtomicU64::new(0)), errors: std::array::from_fn(|_| AtomicU64::new(0)) }
    }

    pub fn request(&self, opcode: u32) {
        self.requests[slot(opcode)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn error(&self, opcode: u32) {
        self.errors[slot(opcode)].fetch_add(1, Ordering::Relaxed);
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
        OpcodeTotals { requests: by_name(&self.requests), errors: by_name(&self.errors) }
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
        let totals = counts.totals();
        assert_eq!(totals.requests.into_iter().collect::<Vec<_>>(), vec![("lookup", 1), ("other", 2), ("read", 2)]);
        assert_eq!(totals.errors.into_iter().collect::<Vec<_>>(), vec![("lookup", 1)]);
    }
}
