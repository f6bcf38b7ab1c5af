//! A marker hit in records: a [`Kind::Marker`] record (site id, depth, time) and the
//! [`Kind::MarkerData`] records after it, whose data bytes hold the arguments, each a tag
//! byte and its value:
//!
//! ```text
//!   1 unsigned   8 bytes (little-endian)      5 pointer   8 bytes
//!   2 signed     8 bytes (two's complement)   6 string    1 length byte, then the bytes
//!   3 bool       1 byte                       7 string    the same, cut: it was longer
//!   4 char       4 bytes (a code point)       8 unavailable (nothing follows)
//!   9 omitted: the values after this did not fit (nothing follows)
//!  10 float      4 bytes (its bits)          11 double   8 bytes (its bits)
//! ```
//!
//! [`MarkerRecords`] encodes a hit on the traced thread (no allocation: fixed arrays on its
//! stack); [`decode`] reads the data bytes back.
//!
//! ```
//! use dynprobe_events::marker::{decode, MarkerRecords};
//! use dynprobe_events::model::MarkerValue;
//! let mut hit = MarkerRecords::new();
//! hit.unsigned(5).string(b"x");
//! let records = hit.finish(1000, 2, 7);
//! assert_eq!((records.len(), records[0].payload() & 0xffff_ffff), (2, 7));
//! let values = decode(&dynprobe_events::marker::data_bytes(&records[1..]).unwrap()).unwrap();
//! assert_eq!(values, [MarkerValue::Unsigned(5), MarkerValue::Str { bytes: b"x".to_vec(), cut: false }]);
//! ```

use std::mem::MaybeUninit;

use crate::model::MarkerValue;
use crate::record::{Kind, Record};

/// The most bytes of a string argument kept in a trace; a longer one is cut there.
pub const MARKER_STRING_MAX: usize = 64;
/// Data bytes in one `MarkerData` record.
pub const DATA_PER_RECORD: usize = 15;
/// The most `MarkerData` records of one hit: room for 14 strings of
/// [`MARKER_STRING_MAX`] bytes (a marker has at most 12 arguments).
pub const MAX_DATA_RECORDS: usize = 64;
const MAX_DATA_BYTES: usize = MAX_DATA_RECORDS * DATA_PER_RECORD;

const UNSIGNED: u8 = 1;
const SIGNED: u8 = 2;
const BOOL: u8 = 3;
const CHAR: u8 = 4;
const POINTER: u8 = 5;
const STRING: u8 = 6;
const CUT_STRING: u8 = 7;
const UNAVAILABLE: u8 = 8;
const OMITTED: u8 = 9;
const FLOAT: u8 = 10;
const DOUBLE: u8 = 11;

/// One marker hit being encoded: add its arguments in order, then [`finish`](Self::finish).
/// Everything is in the value itself, so it can live on a probed thread's stack.
///
/// It runs in a marker's probe detour, which a light proof (the probe layer's `light`
/// module) lets save no vector register: so it has no code that touches one. Nothing is
/// zeroed in advance (the 2 KiB would be a `memset`), and every byte is moved by a volatile
/// access of its own, which the compiler can neither merge into vector moves nor turn into
/// a call of the C library's `memcpy`.
pub struct MarkerRecords {
    /// Written up to `len`.
    data: [MaybeUninit<u8>; MAX_DATA_BYTES],
    len: usize,
    /// A value did not fit: the rest are left out (an `omitted` tag ends the data).
    full: bool,
    /// Written by `finish`, up to the count it returns.
    records: [MaybeUninit<Record>; 1 + MAX_DATA_RECORDS],
}

impl MarkerRecords {
    /// No argument yet.
    pub const fn new() -> MarkerRecords {
        MarkerRecords {
            data: [const { MaybeUninit::uninit() }; MAX_DATA_BYTES],
            len: 0,
            full: false,
            records: [const { MaybeUninit::uninit() }; 1 + MAX_DATA_RECORDS],
        }
    }

    /// Writes `byte` at `at` (below `MAX_DATA_BYTES`: the callers check; beyond is ignored).
    #[inline(always)]
    fn put(&mut self, at: usize, byte: u8) {
        if let Some(slot) = self.data.get_mut(at) {
            // SAFETY: a byte of this value's own array.
            unsafe { std::ptr::write_volatile(slot.as_mut_ptr(), byte) };
        }
    }

    /// The data byte at `at`, written before (`at < len`); 0 past the array.
    #[inline(always)]
    fn byte(&self, at: usize) -> u8 {
        match self.data.get(at) {
            // SAFETY: the callers read below `len`, which `put` wrote.
            Some(slot) => unsafe { std::ptr::read_volatile(slot.as_ptr()) },
            None => 0,
        }
    }

    /// Whether a tag and `bytes` more fit, one byte staying free for the `omitted` tag;
    /// marks the hit full when not.
    fn room(&mut self, bytes: usize) -> bool {
        if self.full || self.len + 1 + bytes >= MAX_DATA_BYTES {
            self.full = true;
        }
        !self.full
    }

    /// Appends a tag and the `n` low bytes of `v`, little-endian, or marks the hit full
    /// when they do not fit.
    #[inline(never)]
    fn value(&mut self, tag: u8, v: u64, n: usize) -> &mut Self {
        if self.room(n) {
            self.put(self.len, tag);
            for k in 0..n.min(8) {
                self.put(self.len + 1 + k, (v >> (8 * k)) as u8);
            }
            self.len += 1 + n.min(8);
        }
        self
    }

    /// An unsigned integer.
    pub fn unsigned(&mut self, v: u64) -> &mut Self {
        self.value(UNSIGNED, v, 8)
    }

    /// A signed integer.
    pub fn signed(&mut self, v: i64) -> &mut Self {
        self.value(SIGNED, v as u64, 8)
    }

    /// A `bool`.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.value(BOOL, u64::from(v), 1)
    }

    /// A `char`, as its code point (what was passed, even if it is not a valid one).
    pub fn char(&mut self, code: u32) -> &mut Self {
        self.value(CHAR, u64::from(code), 4)
    }

    /// A pointer.
    pub fn pointer(&mut self, v: u64) -> &mut Self {
        self.value(POINTER, v, 8)
    }

    /// A string's bytes, of which the first [`MARKER_STRING_MAX`] are kept.
    #[inline(never)]
    pub fn string(&mut self, bytes: &[u8]) -> &mut Self {
        let kept = bytes.len().min(MARKER_STRING_MAX);
        let tag = if kept < bytes.len() { CUT_STRING } else { STRING };
        if self.room(1 + kept) {
            self.put(self.len, tag);
            self.put(self.len + 1, kept as u8);
            for (k, b) in bytes.iter().take(kept).enumerate() {
                // SAFETY: a byte of `bytes`, read on its own (see the type's documentation).
                self.put(self.len + 2 + k, unsafe { std::ptr::read_volatile(b) });
            }
            self.len += 2 + kept;
        }
        self
    }

    /// A `float` (`bits` 32: the low 32 bits of `raw`) or a `double`, by its bits.
    pub fn float(&mut self, bits: u8, raw: u64) -> &mut Self {
        match bits {
            32 => self.value(FLOAT, raw, 4),
            _ => self.value(DOUBLE, raw, 8),
        }
    }

    /// A value that could not be read.
    pub fn unavailable(&mut self) -> &mut Self {
        self.value(UNAVAILABLE, 0, 0)
    }

    /// The records of the hit of site `site` at `time` and call `depth`: the `Marker`
    /// record, then the data.
    #[inline(never)]
    pub fn finish(&mut self, time: u64, depth: u16, site: u32) -> &[Record] {
        self.finish_as(Kind::Marker, time, depth, site)
    }

    /// The records of a traced call's entry or exit (`kind` [`Kind::Entry`] or
    /// [`Kind::Exit`]) of function `id`, with the values added as its typed arguments or
    /// return value (`dynprobe record -a`): the call's record, whose payload counts the data
    /// records after it as a marker hit's does, then the data. A call without values is the
    /// one record it always was (a count of 0).
    pub fn finish_as(&mut self, kind: Kind, time: u64, depth: u16, id: u32) -> &[Record] {
        if self.full {
            // `room` kept a byte free for this.
            self.put(self.len, OMITTED);
            self.len += 1;
        }
        let chunks = self.len.div_ceil(DATA_PER_RECORD);
        let payload = u64::from(id) | (chunks as u64) << 32;
        self.write_record(0, Record::new(kind, time, depth, payload));
        for i in 0..chunks {
            // A data record's bytes: up to 8 data bytes, the kind and length byte, up to 7
            // more (see `data_bytes`).
            let start = i * DATA_PER_RECORD;
            let n = (self.len - start).min(DATA_PER_RECORD);
            let mut low = 0u64;
            for k in 0..n.min(8) {
                low |= u64::from(self.byte(start + k)) << (8 * k);
            }
            let mut high = u64::from(Kind::MarkerData as u8 | (n as u8) << 4);
            for k in 8..n {
                high |= u64::from(self.byte(start + k)) << (8 * (k - 7));
            }
            self.write_record(1 + i, Record { time: low, word: high });
        }
        let written = &self.records[..(1 + chunks).min(self.records.len())];
        // SAFETY: `MaybeUninit<Record>` has `Record`'s layout, and the records up to
        // `1 + chunks` were written just above.
        unsafe { std::slice::from_raw_parts(written.as_ptr().cast::<Record>(), written.len()) }
    }

    /// Stores `record` at `at`, word by word (two neighbouring stores would be merged into
    /// one vector move).
    #[inline(always)]
    fn write_record(&mut self, at: usize, record: Record) {
        if let Some(slot) = self.records.get_mut(at) {
            let slot = slot.as_mut_ptr();
            // SAFETY: fields of this value's own record slot.
            unsafe {
                std::ptr::write_volatile(std::ptr::addr_of_mut!((*slot).time), record.time);
                std::ptr::write_volatile(std::ptr::addr_of_mut!((*slot).word), record.word);
            }
        }
    }
}

impl Default for MarkerRecords {
    fn default() -> Self {
        Self::new()
    }
}

/// The site id and the number of data records a `Marker` record announces (for an `Entry`
/// or `Exit` record: the function id and its values' data records).
pub fn marker_header(record: &Record) -> (u32, usize) {
    let payload = record.payload();
    ((payload & 0xffff_ffff) as u32, (payload >> 32) as usize)
}

/// The data bytes of `MarkerData` records, in order; `Err` names the first record (by
/// index) that is not one, or whose length is out of range.
pub fn data_bytes(records: &[Record]) -> Result<Vec<u8>, String> {
    let mut data = Vec::with_capacity(records.len() * DATA_PER_RECORD);
    for (i, record) in records.iter().enumerate() {
        if record.kind() != Some(Kind::MarkerData) {
            return Err(format!("data record {} of {} is not marker data", i + 1, records.len()));
        }
        let len = ((record.word >> 4) & 0xf) as usize;
        if len == 0 || len > DATA_PER_RECORD {
            return Err(format!("data record {} of {} says it holds {len} bytes", i + 1, records.len()));
        }
        let bytes = record.to_bytes();
        data.extend(bytes[..8].iter().chain(&bytes[9..]).take(len));
    }
    Ok(data)
}

/// The argument values in the data bytes of a marker hit; `Err` says what is wrong where.
pub fn decode(data: &[u8]) -> Result<Vec<MarkerValue>, String> {
    let mut values = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let tag = data[at];
        let rest = &data[at + 1..];
        let word = |n: usize| -> Result<[u8; 8], String> {
            let mut buf = [0u8; 8];
            let bytes = rest.get(..n).ok_or_else(|| format!("argument {} ends early", values.len() + 1))?;
            buf[..n].copy_from_slice(bytes);
            Ok(buf)
        };
        let (value, used) = match tag {
            UNSIGNED => (MarkerValue::Unsigned(u64::from_le_bytes(word(8)?)), 8),
            SIGNED => (MarkerValue::Signed(i64::from_le_bytes(word(8)?)), 8),
            POINTER => (MarkerValue::Pointer(u64::from_le_bytes(word(8)?)), 8),
            BOOL => (MarkerValue::Bool(word(1)?[0] != 0), 1),
            CHAR => (MarkerValue::Char(u64::from_le_bytes(word(4)?) as u32), 4),
            FLOAT => (MarkerValue::Float { bits: 32, raw: u64::from_le_bytes(word(4)?) }, 4),
            DOUBLE => (MarkerValue::Float { bits: 64, raw: u64::from_le_bytes(word(8)?) }, 8),
            STRING | CUT_STRING => {
                let len = usize::from(word(1)?[0]);
                let bytes =
                    rest.get(1..1 + len).ok_or_else(|| format!("string argument {} ends early", values.len() + 1))?;
                (MarkerValue::Str { bytes: bytes.to_vec(), cut: tag == CUT_STRING }, 1 + len)
            }
            UNAVAILABLE => (MarkerValue::Unavailable, 0),
            OMITTED => (MarkerValue::Omitted, 0),
            other => return Err(format!("argument {} has the unknown tag {other}", values.len() + 1)),
        };
        values.push(value);
        at += 1 + used;
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(hit: &mut MarkerRecords) -> (usize, Vec<MarkerValue>) {
        let records = hit.finish(5, 1, 3).to_vec();
        let (site, count) = marker_header(&records[0]);
        assert_eq!((site, count, records[0].depth(), records[0].time), (3, records.len() - 1, 1, 5));
        (count, decode(&data_bytes(&records[1..]).unwrap()).unwrap())
    }

    #[test]
    fn every_kind_of_value_round_trips() {
        let mut hit = MarkerRecords::new();
        hit.unsigned(u64::MAX).signed(i64::MIN).bool(true).char('λ' as u32).pointer(0x7fff_0000);
        hit.string(b"").string(&[b'x'; 100]).unavailable();
        hit.float(32, u64::from(0.1f32.to_bits())).float(64, (-2.5f64).to_bits());
        let (_, values) = round_trip(&mut hit);
        assert_eq!(
            values,
            [
                MarkerValue::Unsigned(u64::MAX),
                MarkerValue::Signed(i64::MIN),
                MarkerValue::Bool(true),
                MarkerValue::Char('λ' as u32),
                MarkerValue::Pointer(0x7fff_0000),
                MarkerValue::Str { bytes: vec![], cut: false },
                MarkerValue::Str { bytes: vec![b'x'; MARKER_STRING_MAX], cut: true },
                MarkerValue::Unavailable,
                MarkerValue::Float { bits: 32, raw: u64::from(0.1f32.to_bits()) },
                MarkerValue::Float { bits: 64, raw: (-2.5f64).to_bits() },
            ]
        );
        assert_eq!(values[8].to_string(), "0.1");
        assert_eq!(values[9].to_string(), "-2.5");
    }

    #[test]
    fn short_data_round_trips_at_every_length() {
        for n in 0..40 {
            let mut hit = MarkerRecords::new();
            hit.string(&vec![b'a'; n]);
            let (count, values) = round_trip(&mut hit);
            assert_eq!(count, (n + 2).div_ceil(DATA_PER_RECORD), "{n}");
            assert_eq!(values, [MarkerValue::Str { bytes: vec![b'a'; n], cut: false }], "{n}");
        }
    }

    #[test]
    fn a_hit_without_arguments_is_one_record() {
        let (count, values) = round_trip(&mut MarkerRecords::new());
        assert_eq!((count, values), (0, vec![]));
    }

    #[test]
    fn values_past_the_room_are_said_to_be_omitted() {
        let mut hit = MarkerRecords::new();
        for _ in 0..20 {
            hit.string(&[b'y'; 80]);
        }
        let (count, values) = round_trip(&mut hit);
        // 14 strings of a length byte and 64 bytes, each after its tag, and the last tag.
        assert_eq!(count, (14 * 66 + 1usize).div_ceil(DATA_PER_RECORD));
        assert_eq!(values.len(), 15);
        assert_eq!(values[14], MarkerValue::Omitted);
    }

    #[test]
    fn bad_data_is_named() {
        let other = Record::new(Kind::Entry, 0, 0, 0);
        assert_eq!(data_bytes(&[other]).unwrap_err(), "data record 1 of 1 is not marker data");
        let empty = Record { time: 0, word: Kind::MarkerData as u64 };
        assert_eq!(data_bytes(&[empty]).unwrap_err(), "data record 1 of 1 says it holds 0 bytes");
        assert_eq!(decode(&[1, 2, 3]).unwrap_err(), "argument 1 ends early");
        assert_eq!(decode(&[6, 5, b'a']).unwrap_err(), "string argument 1 ends early");
        assert_eq!(decode(&[3, 1, 42]).unwrap_err(), "argument 2 has the unknown tag 42");
    }
}
