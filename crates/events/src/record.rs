//! The event record: 16 bytes, the same in the ring buffers and in the trace files.
//!
//! ```text
//!   word 0   time     raw clock ticks (see `Clock`): TSC ticks, or CLOCK_MONOTONIC ns
//!   word 1   bits  0..4   kind (0 is never written: a zeroed record is an unwritten one)
//!            bits  4..16  depth: the call depth of the function (0 = outermost traced)
//!            bits 16..64  payload: function id (entry, entry before attach, exit, unwound), count (lost),
//!                         thread id (thread), marker site id and data record count
//!                         (marker: bits 16..48 and 48..64)
//! ```
//!
//! With `dynprobe record -a` an entry carries the call's arguments and an exit its return
//! value the way a marker hit carries its arguments: the payload's bits 48..64 count the
//! `MarkerData` records after it (function ids stay below 2^24, so a trace recorded without
//! `-a` has 0 there and reads as before).
//!
//! A marker hit is a `Marker` record followed by the `MarkerData` records that carry its
//! arguments (see [`crate::marker`]), pushed together so that nothing comes between them:
//!
//! ```text
//!   MarkerData  word 0        data bytes 0..8
//!               word 1  bits  0..4   kind
//!                       bits  4..8   how many of the record's 15 data bytes are used
//!                       bits  8..64  data bytes 8..15
//! ```

/// The kinds of record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// A traced function was entered.
    Entry = 1,
    /// A traced function returned.
    Exit = 2,
    /// A traced function was left without returning (a `longjmp` or an exception unwound
    /// past it); the time is when that was noticed.
    Unwound = 3,
    /// The ring was full: `count` records were lost at this point.
    Lost = 4,
    /// From here on the ring's records are thread `tid`'s (a ring is reused when its thread
    /// is gone, and a forked or `vfork`ed child writes with its own tid).
    Thread = 5,
    /// A static marker was hit at this depth: the payload is the marker site's id and the
    /// count of `MarkerData` records that follow.
    Marker = 6,
    /// Up to 15 bytes of the arguments of the `Marker` record before it (or of the values of
    /// the `Entry` or `Exit` record before it).
    MarkerData = 7,
    /// A traced function that was already running when recording started in a running
    /// process (`record -p`), found on the thread's stack: the time is the attach, not its
    /// entry, and its `Exit` (or `Unwound`) follows when it ends during the recording.
    EntryBeforeAttach = 8,
}

impl Kind {
    fn from_bits(bits: u64) -> Option<Kind> {
        Some(match bits {
            1 => Kind::Entry,
            2 => Kind::Exit,
            3 => Kind::Unwound,
            4 => Kind::Lost,
            5 => Kind::Thread,
            6 => Kind::Marker,
            7 => Kind::MarkerData,
            8 => Kind::EntryBeforeAttach,
            _ => return None,
        })
    }
}

/// Most depth a record can hold.
pub const MAX_RECORD_DEPTH: u16 = (1 << 12) - 1;

/// One event.
///
/// ```
/// use dynprobe_events::record::{Kind, Record};
/// let r = Record::new(Kind::Entry, 1234, 3, 42);
/// assert_eq!((r.kind(), r.time, r.depth(), r.payload()), (Some(Kind::Entry), 1234, 3, 42));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct Record {
    /// Clock ticks.
    pub time: u64,
    /// Kind, depth and payload, packed (see the module documentation).
    pub word: u64,
}

impl Record {
    /// A record of `kind` at `time`; `depth` is cut to 12 bits, `payload` to 48.
    #[inline(always)]
    pub const fn new(kind: Kind, time: u64, depth: u16, payload: u64) -> Record {
        let word = kind as u64 | ((depth as u64 & 0xfff) << 4) | (payload << 16);
        Record { time, word }
    }

    /// The kind; `None` for a corrupt or unwritten record.
    pub fn kind(&self) -> Option<Kind> {
        Kind::from_bits(self.word & 0xf)
    }

    /// The call depth.
    pub fn depth(&self) -> u16 {
        ((self.word >> 4) & 0xfff) as u16
    }

    /// The function id, lost count or thread id.
    pub fn payload(&self) -> u64 {
        self.word >> 16
    }

    /// The bytes as stored in a trace file (little-endian).
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0; 16];
        b[..8].copy_from_slice(&self.time.to_le_bytes());
        b[8..].copy_from_slice(&self.word.to_le_bytes());
        b
    }

    /// The record stored as `bytes` in a trace file.
    pub fn from_bytes(b: &[u8; 16]) -> Record {
        let word = |r: &[u8]| u64::from_le_bytes(r.try_into().expect("8 bytes"));
        Record { time: word(&b[..8]), word: word(&b[8..]) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_at_their_limits() {
        let r = Record::new(Kind::Lost, u64::MAX, MAX_RECORD_DEPTH, (1 << 48) - 1);
        assert_eq!(r.kind(), Some(Kind::Lost));
        assert_eq!(r.depth(), MAX_RECORD_DEPTH);
        assert_eq!(r.payload(), (1 << 48) - 1);
        assert_eq!(Record::from_bytes(&r.to_bytes()), r);
        assert_eq!(Record::default().kind(), None);
    }
}
